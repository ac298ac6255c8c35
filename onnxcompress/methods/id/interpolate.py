"""Interpolative decomposition from a Gram matrix (seed 000), and the baseline norm selection.

Let Z (rows x C) be the activations feeding a layer, G = Z^T Z (C x C). A column ID picks k
channels S and T (k x C) with Z ~ Z[:, S] T.

* Pivoted Cholesky of G (LAPACK `?pstrf`; equal to pivoted QR of any Z with that Gram) orders the
  channels greedily: after choosing S_k = the first k pivots, the residual
  ||Z - Z[:, S_k] T||_F^2 = trace(G) - sum_{i<k} ||U[i, :]||^2 = trace of the Schur complement,
  where G[P, P] = U^T U. One factorization gives the error for every k.
* T = G[S, S]^-1 G[S, :] is the least-squares interpolation; it is optimal for any consumer W'
  (the residual is orthogonal to Z[:, S]), so the consumer becomes W' T^T.
* The best rank-k error (any k-dimensional subspace, not just k columns) is the sum of the
  C - k smallest eigenvalues of G: the reference the selection is compared with.

Dead channels (zero columns) are never picked and get T = 0; a channel that duplicates or is a
linear combination of picked ones is reproduced exactly.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg import lapack


def pivot_order(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy pivot order of a PSD matrix and its residual-energy curve.

    Returns (order, residual): `order` is a permutation of range(C); residual[k] (k = 0..C) is the
    trace of the Schur complement after pivoting on order[:k], i.e. the squared Frobenius error of
    the best interpolation of all columns from the first k pivots. residual[0] = trace(G),
    residual is non-increasing, residual[C] = 0.
    """
    # the upper triangle only (a copy): dpstrf reads and writes no other, so the strict lower
    # triangle of U stays zero and U's row norms need no masking
    g = np.triu(np.asarray(gram, dtype=np.float64))
    c = g.shape[0]
    total = float(np.trace(g))
    if c == 0 or total <= 0:
        return np.arange(c), np.zeros(c + 1)
    u, piv, rank, info = lapack.dpstrf(g, lower=0, tol=-1.0, overwrite_a=1)
    if info < 0:
        raise ValueError(f"dpstrf failed (info={info})")
    order = piv[:c].astype(np.int64) - 1
    rows = u[:rank]
    captured = np.cumsum(np.einsum("ij,ij->i", rows, rows))
    residual = np.empty(c + 1)
    residual[0] = total
    residual[1:rank + 1] = np.maximum(total - captured, 0.0)
    residual[rank + 1:] = residual[rank] if rank > 0 else total
    residual[c] = 0.0
    return order, np.minimum.accumulate(residual)


def best_residual(gram: np.ndarray) -> np.ndarray:
    """Residual energy of the best rank-k approximation for k = 0..C (eigenvalue tails)."""
    w = np.clip(np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64)), 0.0, None)[::-1]
    tail = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])
    return tail


def interpolation_matrix(gram: np.ndarray, keep: np.ndarray, ridge: float = 1e-9) -> np.ndarray:
    """T (k x C) minimizing ||Z - Z[:, keep] T||_F for the Z behind `gram`.

    Solves (G[S,S] + lambda I) T[:, R] = G[S,R] for the channels R not kept, with
    lambda = ridge * mean(diag G[S,S]) (plus a tiny floor) so rank-deficient selections stay
    solvable; T[:, S] = I exactly, so kept channels pass through unchanged (and are not solved
    for: C - k right-hand sides, not C).
    """
    g = np.asarray(gram, dtype=np.float64)
    keep = np.asarray(keep, dtype=np.int64)
    k, c = len(keep), g.shape[0]
    if k == 0:
        return np.zeros((0, c))
    rest = np.setdiff1d(np.arange(c), keep)
    t = np.zeros((k, c))
    t[np.arange(k), keep] = 1.0
    if not len(rest):
        return t
    gss = g[np.ix_(keep, keep)]
    rhs = g[np.ix_(keep, rest)]
    scale = max(float(np.mean(np.diag(gss))), np.finfo(np.float64).tiny)
    lam = ridge * scale + 1e-300
    for _ in range(8):
        try:
            factor = scipy.linalg.cho_factor(gss + lam * np.eye(k), lower=True, check_finite=False)
            t[:, rest] = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
            break
        except np.linalg.LinAlgError:
            lam = max(lam * 100, 1e-12 * scale)
    else:
        t[:, rest] = np.linalg.lstsq(gss, rhs, rcond=None)[0]
    return t


def selection_matrix(channels: int, keep: np.ndarray) -> np.ndarray:
    """T for plain pruning (no correction): rows of the identity at `keep`."""
    t = np.zeros((len(keep), channels))
    t[np.arange(len(keep)), keep] = 1.0
    return t


def relative_error(residual: np.ndarray) -> np.ndarray:
    """sqrt(residual[k] / residual[0]): relative Frobenius error for every k (0 for an empty G)."""
    total = residual[0]
    if total <= 0:
        return np.zeros_like(residual)
    return np.sqrt(np.clip(residual / total, 0.0, None))


def block_pivot_order(gram: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy block pivoting (block ID): the channels in blocks of `block` consecutive ones
    (attention heads, GroupNormalization groups, grouped-convolution groups), chosen a whole block
    at a time.

    With R the Schur complement of the blocks chosen so far (R = G at the start), a block B
    captures trace(R[:, B] R[B, B]^+ R[B, :]) of the residual energy; the block capturing the most
    is taken and R <- R - R[:, B] R[B, B]^+ R[B, :]. Returns (order, residual) as `pivot_order`
    does: `order` lists the channels block by block in pivot order; residual[k] (k = 0..C) is the
    residual energy with ceil(k / block) blocks kept (a size between multiples of the block is
    rounded up), so residual[C] = 0.
    """
    g = np.array(gram, dtype=np.float64, copy=True)
    c = g.shape[0]
    if block <= 1:
        return pivot_order(g)
    if c % block:
        raise ValueError(f"{c} channels do not split into blocks of {block}")
    n = c // block
    left, order, energy = list(range(n)), [], [float(np.trace(g))]
    for _ in range(n):
        # every remaining block at once: eigh of the (len(left), block, block) diagonal blocks,
        # then R[:, B] V_B W_B^{-1/2} with the numerically null directions of R[B, B] dropped
        g4 = g.reshape(n, block, n, block)
        idx = np.asarray(left)
        w, v = np.linalg.eigh(g4[idx, :, idx, :])
        tol = np.maximum(w[:, -1:], 0.0) * block * np.finfo(np.float64).eps * 16
        use = w > tol
        cols = np.moveaxis(g4[:, :, idx, :].reshape(c, len(left), block), 1, 0)   # R[:, B] per block
        proj = (cols @ v) / np.sqrt(np.where(use, w, 1.0))[:, None, :] * use[:, None, :]
        gains = np.einsum("bij,bij->b", proj, proj)
        pick = int(np.argmax(gains))   # the first of equal gains, in `left` order
        best = left.pop(pick)
        order.extend(range(best * block, (best + 1) * block))
        if use[pick].any():
            update = proj[pick][:, use[pick]]
            g -= update @ update.T
        energy.append(max(float(np.trace(g)), 0.0))
    energy[-1] = 0.0
    blocks = -(-np.arange(c + 1) // block)   # ceil(k / block)
    residual = np.minimum.accumulate(np.asarray(energy))[blocks]
    return np.asarray(order, dtype=np.int64), residual
