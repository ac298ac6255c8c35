"""Low-rank factorization solvers (docs/maths.md, "Low rank").

Pure numpy/scipy functions, float64 throughout, no I/O, no logging.

Axes. A weight W is (out x in) and acts as y = W x. A factorization is W ~ A @ B with A (out x r)
and B (r x in); in the graph, B runs first (in -> r), then A (r -> out). The calibration statistic
of the layer's input is G = sum x x^T (in x in, symmetric PSD, possibly rank-deficient). For an
embedding table E (vocab x d) the rows are the data: E ~ A @ B with A (vocab x r), B (r x d), so
"out" is the vocabulary axis and "in" the embedding axis (Gather(E) -> Gather(A) + MatMul(B)).

Errors are relative energies in [0, 1]: error[r] is the squared error of keeping r components
over the squared error of keeping none (not its square root), so error[0] = 1 and error[m] = 0.
When there is nothing to lose (W = 0, or W x = 0 on every calibration row) the curve is 0.

* `svd`: Eckart-Young, W = U S V^T; A = U_r S_r, B = V_r^T; error[r] = sum_{j>r} s_j^2 / sum s_j^2.
* `activation_aware`: the calibration output error is tr(D G D^T) with D = W - A B. With
  G + lam I = L L^T (Cholesky) it equals ||D L||_F^2 (ridge aside), minimized over rank r by the
  truncated SVD of W L = U S V^T: A = U_r S_r, B = V_r^T L^-1. Exact optimum for every r at once;
  error[r] is the exact (unridged) output error of those factors, tr(D_r G D_r^T) / tr(W G W^T).
* `frequency_weighted`: a Gather outputs onehot @ E, so G = diag(token counts) and the output
  error weighs row i by its count. With w = counts + alpha * mean(counts) (smoothed, so unseen
  tokens keep a say; alpha by default the Good-Turing unseen mass): SVD of diag(sqrt w) E gives B = V_r^T, and A = E B^T projects every row
  (seen or not) onto span(V_r), the best A for any row weights once B is fixed.
* `lp_subspace`: robust subspace of the rows of X (n x d): minimize sum_i w_i dist(x_i, V)^p,
  p in [1, 2], by IRLS (majorize-minimize: each step is a weighted SVD with weights
  w_i max(dist_i, floor)^(p-2)). p = 2 is the weighted SVD subspace itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

#: floor of the default (Good-Turing) token-count smoothing: pseudo-counts of at least 1% of the
#: observed tokens, so unseen tokens always keep some weight.
MIN_SMOOTHING = 0.01


@dataclass(frozen=True)
class Spectrum:
    """What one factorization gives for every rank at once.

    left (out x m) and right (m x in), m = min(out, in), components ordered by importance;
    error (m + 1,) relative error of keeping the first r components: error[0] = 1 (0 if there is
    nothing to approximate), non-increasing, error[m] ~ 0.
    """
    left: np.ndarray
    right: np.ndarray
    error: np.ndarray

    @property
    def max_rank(self) -> int:
        return self.right.shape[0]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) = (left[:, :r], right[:r]); A @ B is the rank-r approximation."""
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} outside [0, {self.max_rank}]")
        return self.left[:, :rank], self.right[:rank]

    def rank_for(self, tolerance: float) -> int:
        """Smallest r with error[r] <= tolerance (max rank if none)."""
        ok = np.flatnonzero(self.error <= tolerance)
        return int(ok[0]) if len(ok) else self.max_rank


def _matrix(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    return a


def _tail_fraction(energy: np.ndarray) -> np.ndarray:
    """error[r] = sum_{j>=r} energy[j] / sum(energy), r = 0..m, made exactly non-increasing."""
    energy = np.clip(energy, 0.0, None)
    total = float(np.sum(energy))
    if not total > 0:
        return np.zeros(len(energy) + 1)
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) / total
    tail[0] = 1.0
    return np.minimum.accumulate(np.clip(tail, 0.0, 1.0))


def svd(W) -> Spectrum:
    """Truncated SVD: A = U_r S_r, B = V_r^T; error[r] = ||W - A B||_F^2 / ||W||_F^2."""
    w = _matrix(W, "W")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return Spectrum(u * s, vt, _tail_fraction(s * s))


def _ridged_cholesky(g: np.ndarray, ridge: float) -> tuple[np.ndarray, float]:
    """Lower L with L L^T = G + lam I, lam = ridge * trace(G) / in (1 if trace(G) = 0)."""
    n = g.shape[0]
    trace = float(np.trace(g))
    lam = ridge * trace / n if trace > 0 else 1.0
    lam = max(lam, np.finfo(np.float64).tiny)
    for _ in range(10):
        try:
            return scipy.linalg.cholesky(g + lam * np.eye(n), lower=True, check_finite=False), lam
        except np.linalg.LinAlgError:
            lam *= 100.0
    raise ValueError("G + lambda I is not positive definite; is G a Gram matrix?")


def activation_aware(W, G, ridge: float = 1e-6) -> Spectrum:
    """Factors minimizing the calibration output error tr((W - AB) G (W - AB)^T) for every rank.

    G + lam I = L L^T with lam = ridge * trace(G) / in (G = 0: lam = 1, i.e. plain SVD);
    SVD W L = U S V^T; A = U_r S_r, B = V_r^T L^-1 (triangular solve). error[r] is the exact
    relative output error of (A_r, B_r) on G, equal to `output_error`; if W G W^T = 0 (no signal
    reaches the outputs) it falls back to the ridged curve sum_{j>r} s_j^2 / sum s_j^2.
    Dead or duplicated input channels are fine: the ridge splits their weight smoothly.
    """
    w = _matrix(W, "W")
    g = _matrix(G, "G")
    if g.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"G must be ({w.shape[1]} x {w.shape[1]}), got {g.shape}")
    g = 0.5 * (g + g.T)
    low, _ = _ridged_cholesky(g, ridge)
    u, s, vt = np.linalg.svd(w @ low, full_matrices=False)
    b = scipy.linalg.solve_triangular(low, vt.T, lower=True, trans="T", check_finite=False).T
    # D_r = sum_{j>r} s_j u_j b_j, u orthonormal -> tr(D_r G D_r^T) = sum_{j>r} s_j^2 b_j G b_j^T.
    energy = s * s * np.sum((b @ g) * b, axis=1)
    if not np.sum(np.clip(energy, 0, None)) > 1e-12 * np.sum(s * s):
        energy = s * s
    return Spectrum(u * s, b, _tail_fraction(energy))


def output_error(W, A, B, G) -> float:
    """Relative calibration output error tr(D G D^T) / tr(W G W^T), D = W - A @ B.

    0 if both vanish; inf if W's outputs vanish on the data but A B's do not.
    """
    w, g = _matrix(W, "W"), _matrix(G, "G")
    d = w - _matrix(A, "A") @ _matrix(B, "B")
    num = max(float(np.sum((d @ g) * d)), 0.0)
    den = max(float(np.sum((w @ g) * w)), 0.0)
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def token_weights(counts, smoothing: float | None = None) -> np.ndarray:
    """Row weights w = counts + alpha * mean(counts) for token counts (occurrences, not rates).

    The pseudo-counts total alpha times the observed tokens, spread evenly over the vocabulary, so
    a token unseen in calibration weighs alpha times an average token and no row weighs 0.
    smoothing = alpha >= 0; None (default) uses the Good-Turing estimate of the probability mass
    of unseen tokens, alpha = n1 / N (n1 = tokens seen exactly once, N = all occurrences), clipped
    to [MIN_SMOOTHING, 1]: large for a small calibration set over a large vocabulary, small once
    the vocabulary is well sampled. smoothing = inf, or counts all zero: uniform (plain SVD).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("counts must be a 1-D array of finite non-negative numbers")
    if smoothing is not None and not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    total = float(np.sum(c))
    if total == 0 or (smoothing is not None and np.isinf(smoothing)):
        return np.ones_like(c)
    if smoothing is None:
        smoothing = float(np.clip(np.count_nonzero(c == 1) / total, MIN_SMOOTHING, 1.0))
    return c + smoothing * total / len(c)


def frequency_weighted(E, counts, smoothing: float | None = None) -> Spectrum:
    """Embedding table E (vocab x d) ~ A (vocab x r) @ B (r x d), rows weighted by token counts.

    w = token_weights(counts, smoothing); SVD of diag(sqrt w) E = U S V^T; B = V_r^T, A = E B^T
    (every row projected onto span(V_r)). error[r] = sum_i w_i ||e_i - a_i B||^2 / sum_i w_i
    ||e_i||^2 = sum_{j>r} s_j^2 / sum s_j^2. smoothing = inf is plain `svd(E)`.
    """
    e = _matrix(E, "E")
    w = token_weights(counts, smoothing)
    if len(w) != e.shape[0]:
        raise ValueError(f"counts has {len(w)} entries, E has {e.shape[0]} rows")
    if smoothing is not None and np.isinf(smoothing):
        return svd(e)
    energy, vt = _weighted_svd(e, w)
    return Spectrum(e @ vt.T, vt, _tail_fraction(energy))


def _row_weights(row_weights, n: int) -> np.ndarray:
    if row_weights is None:
        return np.ones(n)
    w = np.asarray(row_weights, dtype=np.float64)
    if w.shape != (n,) or np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"row_weights must be {n} finite non-negative numbers")
    return w


def _distances(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x - (x @ v) @ v.T, axis=1)


def _weighted_svd(x: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values (m,) and right singular vectors (m x d) of diag(sqrt w) X, m = min(n, d).

    Tall X (n > d, e.g. a vocabulary): eigenvectors of the d x d Gram X^T diag(w) X, one GEMM and
    a small eigh instead of an SVD of the whole table (squaring only blurs components below
    sqrt(eps) of the largest, energies below eps of the total).
    """
    n, d = x.shape
    if n <= d:
        _, s, vt = np.linalg.svd(np.sqrt(weights)[:, None] * x, full_matrices=False)
        return s * s, vt
    gram = (x * weights[:, None]).T @ x
    energy, v = np.linalg.eigh(0.5 * (gram + gram.T))
    return np.clip(energy[::-1], 0.0, None), v[:, ::-1].T


def lp_objective(X, V, p: float, row_weights=None) -> float:
    """sum_i w_i dist(x_i, span V)^p for the rows x_i of X (n x d), V (d x k) orthonormal."""
    x = _matrix(X, "X")
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    w = _row_weights(row_weights, x.shape[0])
    return float(np.sum(w * _distances(x, _matrix(V, "V")) ** p))


def _lp_irls(X, rank, p, row_weights=None, iters=50, tol=1e-7, floor=1e-8):
    """IRLS for `lp_subspace`; returns (V, objectives of the accepted iterates, SVD start first)."""
    x = _matrix(X, "X")
    n, d = x.shape
    if not 1 <= p <= 2:
        raise ValueError(f"p must be in [1, 2], got {p}")
    if not 0 <= rank <= min(n, d) or int(rank) != rank:
        raise ValueError(f"rank {rank} outside [0, {min(n, d)}]")
    w, rank = _row_weights(row_weights, n), int(rank)
    v = _weighted_svd(x, w)[1][:rank].T
    history = [float(np.sum(w * _distances(x, v) ** p))]
    if p == 2 or rank in (0, d):
        return v, history
    eps = floor * float(np.sqrt(np.mean(np.sum(x * x, axis=1))))
    for _ in range(iters):
        if not history[-1] > 0:
            break
        dist = _distances(x, v)
        candidate = _weighted_svd(x, w * np.maximum(dist, eps) ** (p - 2))[1][:rank].T
        objective = float(np.sum(w * _distances(x, candidate) ** p))
        if objective >= history[-1]:
            break
        v, improvement = candidate, history[-1] - objective
        history.append(objective)
        if improvement <= tol * history[-2]:
            break
    return v, history


def lp_subspace(X, rank: int, p: float, row_weights=None, iters: int = 50, tol: float = 1e-7,
                floor: float = 1e-8) -> np.ndarray:
    """Robust l_p rank-k subspace of the rows of X (n x d): V (d x k), orthonormal columns.

    Minimizes sum_i w_i dist(x_i, span V)^p, p in [1, 2], by IRLS from the weighted SVD: weights
    w_i max(dist_i, floor * rms row norm)^(p-2), weighted SVD, repeat until the objective
    decreases by less than tol (relative) or `iters` steps; a step that would increase it is not
    taken, so the result is never worse than the SVD start. Local optimum (the problem is not
    convex for p < 2). p = 2 returns the weighted SVD subspace exactly.
    Raises ValueError for p outside [1, 2] or rank outside [0, min(n, d)].
    """
    return _lp_irls(X, rank, p, row_weights, iters, tol, floor)[0]


def lp_factors(X, rank: int, p: float, row_weights=None, **kw) -> tuple[np.ndarray, np.ndarray]:
    """A = X V (n x k), B = V^T (k x d) with V = lp_subspace(X, rank, p, row_weights, **kw)."""
    v = lp_subspace(X, rank, p, row_weights, **kw)
    return _matrix(X, "X") @ v, v.T


@dataclass(frozen=True)
class TableSplit:
    """An embedding table E (vocab x d) as E ~ A B + R_S: rank-r factors for every token, plus the
    exact residual rows R = E[S] - A[S] B of the tokens in S (the ones calibration saw).

    `error` is the Good-Turing estimate of the held-out error energy (`token_weights`): with
    w_v = counts_v + alpha N / V, sum_{v not in S} w_v ||e_v - a_v B||^2 / sum_v w_v ||e_v||^2.
    The tokens of S contribute nothing to it; the others, mostly tokens calibration never saw,
    carry the smoothed mass alpha N that held-out text is expected to spend on unseen tokens."""
    left: np.ndarray      # A (vocab x r)
    right: np.ndarray     # B (r x d)
    rows: np.ndarray      # S, sorted token ids (int64)
    residual: np.ndarray  # R (|S| x d)
    error: float


def smoothed_error(E, counts, smoothing, a, b, rows=()) -> float:
    """The Good-Turing held-out error energy of E ~ A B (+ exact rows `rows`), as `TableSplit.error`."""
    e = _matrix(E, "E")
    return _held_out(e, token_weights(counts, smoothing), e - a @ b, rows)


def _held_out(e: np.ndarray, w: np.ndarray, diff: np.ndarray, rows) -> float:
    """sum_{v not in rows} w_v ||diff_v||^2 / sum_v w_v ||e_v||^2."""
    per = np.einsum("ij,ij->i", diff, diff)
    per[np.asarray(rows, dtype=np.int64)] = 0.0
    total = float(np.dot(w, np.einsum("ij,ij->i", e, e)))
    return float(np.dot(w, per)) / total if total > 0 else 0.0


def frequent_rows(E, counts, rank: int, smoothing: float | None = None, *, itemsize: int = 4,
                  multiple: int = 1, floor: int = 1) -> TableSplit | None:
    """The table split with exact rows for the tokens calibration saw, at no more parameters and
    bytes than the plain rank-`rank` split: the factors drop to rank

        r' = rank - ceil(((|S| + 1) d s + 4 V) / ((V + d) s))

    (s the table's bytes per element: |S| residual rows and a zero row of d, and the int32 index
    map of V entries that points each token at its row or at the zero row), rounded down to a
    multiple of `multiple`, and are the frequency-weighted SVD of the other tokens' rows (weights
    w_v with w_S = 0: the rows of S are exact whatever the factors give them). None when r' is
    below `floor` (or 1)."""
    e = _matrix(E, "E")
    n, d = e.shape
    c = np.asarray(counts, dtype=np.float64)
    rows = np.flatnonzero(c > 0)
    low = rank - math.ceil(((len(rows) + 1) * d * itemsize + 4 * n) / ((n + d) * itemsize))
    if multiple > 1:
        low = multiple * (low // multiple)
    if low < max(1, floor) or not len(rows):
        return None
    weights = token_weights(c, smoothing)
    w = weights.copy()
    w[rows] = 0.0
    _, vt = _weighted_svd(e, w)
    b = vt[:low]
    a = e @ b.T
    diff = e - a @ b    # the residual rows of S are stored; the others are the split's error
    return TableSplit(a, b, rows.astype(np.int64), diff[rows], _held_out(e, weights, diff, rows))
