"""Robust l_p subspaces from a Löwner ellipsoid (seed 002's solver; `--solver ellipsoid`).

Pure numpy, float64, no I/O. X is (n x d), its rows x_i are the points (for an embedding table:
the vocabulary rows; for a weight W (out x in): its rows). The goal is the rank-k subspace V
(d x k, orthonormal) minimizing cost(V) = sum_i dist(x_i, span V)^p, p in [1, 2].

1. Löwner ellipsoid of points (`mvee`). The minimum-volume ellipsoid containing +-x_i (centred
   at 0) is {y : y^T M(u*)^-1 y <= d} with M(u) = sum_i u_i x_i x_i^T and u* in the simplex
   maximizing log det M(u) (D-optimal design). Khachiyan's algorithm with the Todd-Yildirim
   away steps: kappa_i = x_i^T M^-1 x_i; move weight towards argmax kappa (or away from the
   support point with the least kappa) by exact line search; M^-1 and kappa by rank-one updates,
   O(n d) per step. It stops when max kappa <= (1 + eps) d. Then E = {y : y^T M^-1 y <= max
   kappa} contains every row and vol(E) <= (1 + eps)^(d/2) vol(minimum ellipsoid) (because
   det M(u) <= det M(u*) for any u in the simplex).
2. The l_p body. Seed 002 takes the Löwner ellipsoid of L_p = {z : ||X z||_p <= 1}. It is
   given by the l_p Lewis weights w (Lewis 1978): w_i = (x_i^T (X^T W^(1-2/p) X)^-1 x_i)^(p/2),
   sum w = d; with Q = X^T W^(1-2/p) X, for every z
       ||Q^(1/2) z||_2  <=  ||X z||_p  <=  d^(1/p - 1/2) ||Q^(1/2) z||_2,
   so {z : z^T Q z <= 1} is within a factor d^(1/p-1/2) of L_p both ways (inscribed and, scaled by
   that factor, circumscribed). The same ellipsoid is the Löwner ellipsoid of the rescaled
   points c_i = w_i^(-1/p) x_i: with u = w / d, every c_i has kappa_i = d, which is the
   optimality condition of step 1. We find w by the Cohen-Peng fixed point (a contraction with
   factor |1 - p/2| for p < 4) and then run step 1 on the c_i from u = w / d, which certifies
   containment and the volume factor. p = 2: w are the leverage scores and Q = X^T X.
3. The subspace: V = the k eigenvectors of Q with the largest eigenvalues (the directions in which
   L_p is thinnest, i.e. ||X z||_p largest). Bound: for exact Lewis weights,
       cost(V) <= (d (d - k))^(1 - p/2) * min_V' cost(V')
   (the ellipsoid sandwich gives d^(1-p/2), and summing |x_i^T u_j|^p over an orthonormal basis
   u_j of the (d-k)-dimensional complement is within (d-k)^(1-p/2) of dist(x_i, V)^p; Cauchy
   interlacing compares the complements). p = 2 gives factor 1: the SVD subspace.

Rows are first expressed in an orthonormal basis of their span (rank r <= d), so a wide weight
(fewer rows than columns) works in r dimensions. Row weights omega_i (token counts) enter as
omega_i dist^p = dist(omega_i^(1/p) x_i)^p, i.e. by rescaling the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

_RANK_TOL = 1e-10   # eigenvalues of X^T X below this fraction of the largest are treated as 0
_LEWIS_TOL = 1e-6   # relative change of the Lewis weights at which the fixed point stops


@dataclass(frozen=True)
class Ellipsoid:
    """E = {y : y^T M^-1 y <= scale}, centred at 0.

    weights: the design u (n,) in the simplex with M = sum u_i x_i x_i^T; gap: max_i kappa_i / d - 1
    at the end (so vol(E) <= (1 + gap)^(d/2) times the minimum); iterations: steps taken.
    """
    shape: np.ndarray
    scale: float
    weights: np.ndarray
    gap: float
    iterations: int

    def contains(self, points, slack: float = 1e-9) -> np.ndarray:
        """Boolean (n,): y^T M^-1 y <= scale (1 + slack) for each row y of `points`."""
        y = np.asarray(points, dtype=np.float64)
        q = np.sum(y * np.linalg.solve(self.shape, y.T).T, axis=1)
        return q <= self.scale * (1 + slack)

    def log_volume(self) -> float:
        """log vol(E) up to the constant of the unit ball: 0.5 (log det M + d log scale)."""
        sign, logdet = np.linalg.slogdet(self.shape)
        return 0.5 * (logdet + self.shape.shape[0] * math.log(self.scale))


def mvee(points, eps: float = 1e-3, start=None, max_iter: int = 100_000) -> Ellipsoid:
    """Approximate minimum-volume ellipsoid containing +-points (n x d, rank d), centred at 0.

    Khachiyan / Todd-Yildirim (see the module docstring): stops when max kappa <= (1 + eps) d.
    `start`: an initial design (n,) (normalized to the simplex); default uniform.
    Raises ValueError if the points do not span R^d.
    """
    x = np.asarray(points, dtype=np.float64)
    n, d = x.shape
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    u = np.full(n, 1.0 / n) if start is None else np.clip(np.asarray(start, dtype=np.float64), 0, None)
    if u.shape != (n,) or not u.sum() > 0:
        raise ValueError("start must be n non-negative numbers, not all zero")
    u = u / u.sum()

    def exact(u):
        m = x.T @ (u[:, None] * x)
        try:
            m_inv = np.linalg.inv(m)
        except np.linalg.LinAlgError as e:
            raise ValueError("the points do not span R^d") from e
        return m_inv, np.einsum("ij,ij->i", x @ m_inv, x)

    m_inv, kappa = exact(u)
    if not np.all(np.isfinite(kappa)) or np.linalg.cond(x.T @ x) > 1 / _RANK_TOL ** 2:
        raise ValueError("the points do not span R^d")
    it = 0
    for it in range(1, max_iter + 1):
        j = int(np.argmax(kappa))
        plus = kappa[j] / d - 1
        support = np.flatnonzero(u > 0)
        i = int(support[np.argmin(kappa[support])])
        minus = 1 - kappa[i] / d
        if plus <= eps:
            break
        if plus >= minus:                      # towards the farthest point
            k, tau = j, (kappa[j] - d) / (d * (kappa[j] - 1))
        else:                                  # away from the nearest support point
            k = i
            tau = -min((d - kappa[i]) / (d * (kappa[i] - 1)) if kappa[i] > 1 else np.inf,
                       u[i] / (1 - u[i]))
        # M' = (1 - tau) M + tau x_k x_k^T; Sherman-Morrison on M^-1 and on every kappa.
        g = m_inv @ x[k]
        a = tau / (1 - tau)
        c = a / (1 + a * kappa[k])
        m_inv = (m_inv - c * np.outer(g, g)) / (1 - tau)
        kappa = (kappa - c * (x @ g) ** 2) / (1 - tau)
        u = (1 - tau) * u
        u[k] += tau
        u[k] = max(u[k], 0.0)
        if it % 200 == 0:                      # drift control
            m_inv, kappa = exact(u)
    m_inv, kappa = exact(u)
    top = float(np.max(kappa))
    return Ellipsoid(x.T @ (u[:, None] * x), top, u, top / d - 1, it)


def lewis_weights(X, p: float, iters: int = 200, tol: float = 1e-10) -> np.ndarray:
    """l_p Lewis weights (n,) of the rows of X (n x r, rank r): w_i = (x_i^T (X^T W^(1-2/p) X)^-1
    x_i)^(p/2), sum w = r, by the Cohen-Peng fixed point from uniform weights (p in [1, 2])."""
    x = np.asarray(X, dtype=np.float64)
    n, r = x.shape
    w = np.full(n, r / n)
    for _ in range(iters):
        q = x.T @ (x * (w ** (1 - 2 / p))[:, None])
        low = np.linalg.cholesky(0.5 * (q + q.T))
        z = scipy.linalg.solve_triangular(low, x.T, lower=True, check_finite=False)
        new = np.clip(np.einsum("ij,ij->j", z, z), 1e-300, None) ** (p / 2)
        done = np.max(np.abs(new - w) / new) <= tol
        w = new
        if done:
            break
    return w


@dataclass(frozen=True)
class EllipsoidSubspace:
    """V (d x k) orthonormal; ellipsoid of the rescaled rows (in the r-dimensional row basis);
    bound: the guaranteed factor (d (d - k))^(1 - p/2) over the optimal cost (r in place of d)."""
    basis: np.ndarray
    ellipsoid: Ellipsoid | None
    bound: float


def subspace(X, rank: int, p: float, row_weights=None, eps: float = 1e-3) -> EllipsoidSubspace:
    """Seed 002's rank-k subspace of the rows of X (n x d) from the Löwner ellipsoid of L_p."""
    x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= p <= 2:
        raise ValueError(f"p must be in [1, 2], got {p}")
    if not 0 <= rank <= min(n, d) or int(rank) != rank:
        raise ValueError(f"rank {rank} outside [0, {min(n, d)}]")
    rank = int(rank)
    if row_weights is not None:
        om = np.asarray(row_weights, dtype=np.float64)
        if om.shape != (n,) or np.any(om < 0) or not np.all(np.isfinite(om)):
            raise ValueError(f"row_weights must be {n} finite non-negative numbers")
        x = x * (om ** (1 / p))[:, None]
    # orthonormal basis of the row span: z = x @ basis is (n x r) of rank r
    energy, vecs = np.linalg.eigh(x.T @ x)
    keep = energy > _RANK_TOL * max(float(energy[-1]), 0.0)
    basis = vecs[:, keep][:, ::-1]
    r = basis.shape[1]
    if rank == 0 or r <= rank:
        return EllipsoidSubspace(basis[:, :rank] if r >= rank else _complete(basis, rank, d), None, 1.0)
    z = x @ basis
    live = np.any(z != 0, axis=1)
    zl = z[live]
    w = lewis_weights(zl, p, tol=_LEWIS_TOL)   # Khachiyan below closes the rest of the gap
    ell = mvee(zl * (w ** (-1 / p))[:, None], eps=eps, start=w)
    # Q is proportional to M of the rescaled rows: sum u_i w_i^(-2/p) z_i z_i^T with u = w / r.
    vals, v = np.linalg.eigh(ell.shape)
    top = v[:, ::-1][:, :rank]
    bound = (r * (r - rank)) ** (1 - p / 2)
    return EllipsoidSubspace(basis @ top, ell, bound)


def _complete(basis: np.ndarray, rank: int, d: int) -> np.ndarray:
    """Extend an orthonormal (d x r) basis to `rank` columns (rows span fewer than rank dims)."""
    q, _ = np.linalg.qr(np.concatenate([basis, np.eye(d)], axis=1))
    return q[:, :rank]


def lp_factors(X, rank: int, p: float, row_weights=None, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """A = X V (n x k), B = V^T (k x d) with V from `subspace` (row weights only choose V)."""
    v = subspace(X, rank, p, row_weights, eps).basis
    return np.asarray(X, dtype=np.float64) @ v, v.T
