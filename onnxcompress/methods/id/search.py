"""Block selection on the consumers' exact output error (attention heads, channel blocks).

Keeping the channels S of an exit tensor Z (Gram G, C x C) and interpolating the others with the
least-squares T = G[S,S]^-1 G[S,:] (`interpolate.py`, optimal for every consumer), a consumer W
(out x C, y = W z) sees the output error energy

    E(S) = tr(Q (G - G[:,S] G[S,S]^-1 G[S,:])),    Q = W^T W,

the consumer-weighted trace of the Schur complement. Pivoting on D G D (D = diag of the column
norms of W, `select.py`) is a proxy of it that ignores the off-diagonal of Q and is greedy. For
groups that keep whole blocks of channels (attention heads: n = 12 blocks), E can be minimized
over subsets of blocks directly:

* where C(n, m) is at most `limit`, every subset of m blocks is evaluated (the exact optimum);
* otherwise the set for m - 1 blocks is grown by the block that lowers E the most, then refined
  by swaps (one kept block for one dropped block) while one lowers E.

So E(S_m) is non-increasing in m, and the sets need not be nested. E is evaluated with
G' = G + lambda I (lambda = `ridge` times the mean of diag G, as the interpolation's ridge) in
whichever is smaller of the kept or the dropped channels:

* kept: E = tr(Q G') - tr(G'[S,S]^-1 K[S,S]),  K = G' Q G';
* dropped (D = the complement of S): the Schur complement of G'[S,S] in G' is zero outside D x D
  and (P[D,D])^-1 there, with P = G'^-1, so E = tr(Q[D,D] (P[D,D])^-1).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.linalg


class SubsetError:
    """E(S) = tr(Q (G' - G'[:,S] G'[S,S]^-1 G'[S,:])) for sets S of channels (module docstring)."""

    def __init__(self, gram: np.ndarray, q: np.ndarray, ridge: float = 1e-9):
        g = np.asarray(gram, dtype=np.float64)
        c = g.shape[0]
        scale = max(float(np.mean(np.diag(g))) if c else 0.0, np.finfo(np.float64).tiny)
        self.g = g + (ridge * scale + 1e-300) * np.eye(c)
        self.q = np.asarray(q, dtype=np.float64)
        self.total = float(np.sum(self.q * self.g))          # tr(Q G'), G' and Q symmetric
        self.k = self.g @ self.q @ self.g
        self._p = None

    @property
    def p(self) -> np.ndarray:
        if self._p is None:
            self._p = _spd_inverse(self.g)
        return self._p

    def __call__(self, keep) -> float:
        keep = np.asarray(keep, dtype=np.int64)
        c = self.g.shape[0]
        if len(keep) == 0:
            return self.total
        if len(keep) == c:
            return 0.0
        if 2 * len(keep) <= c:
            gss = self.g[np.ix_(keep, keep)]
            captured = float(np.sum(_spd_solve(gss, self.k[np.ix_(keep, keep)]).diagonal()))
            return max(self.total - captured, 0.0)
        drop = np.setdiff1d(np.arange(c), keep)
        pdd = self.p[np.ix_(drop, drop)]
        return max(float(np.sum(_spd_solve(pdd, self.q[np.ix_(drop, drop)]).diagonal())), 0.0)


def block_subsets(error, total: float, blocks: int, block: int, limit: int = 256, *,
                  order=None, search=None) -> tuple[list, np.ndarray]:
    """For m = 0..blocks, a set of m blocks (block indices, sorted) with low `error`, and its
    error. `error(channels)` is E of a sorted array of kept channels (a `SubsetError`, or a sum
    of them over several exits), `total` its value for the empty set.

    Exhaustive where C(blocks, m) <= limit, else greedy growth from the set for m - 1 and swap
    refinement (module docstring). Returns (sets, energy), energy[m] = E(sets[m]),
    non-increasing, energy[blocks] = 0. With `search` (a set of sizes m) only those sizes are
    searched; every other size keeps the first m blocks of `order` (a block pivot order), and
    energy[m] is still E of the set kept, so it need not be monotone."""
    def channels(units) -> np.ndarray:
        return (np.asarray(sorted(units), dtype=np.int64)[:, None] * block + np.arange(block)).ravel()

    def cost(units) -> float:
        return error(channels(units))

    sets, energy = [()], [total]
    for m in range(1, blocks + 1):
        if search is not None and m not in search:
            best = tuple(int(u) for u in order[:m])
            value = cost(best)
        elif math.comb(blocks, m) <= limit:
            best = min(itertools.combinations(range(blocks), m), key=cost)
            value = cost(best)
        else:
            prev = set(sets[-1])
            best, value = min((((*prev, u), cost((*prev, u))) for u in range(blocks) if u not in prev),
                              key=lambda x: x[1])
            best, value = _swap(set(best), value, blocks, cost)
        sets.append(tuple(sorted(best)))
        energy.append(value)
    energy[-1] = 0.0
    energy = np.asarray(energy)
    return sets, (np.minimum.accumulate(energy) if search is None else energy)


def _swap(chosen: set, value: float, blocks: int, cost) -> tuple[tuple, float]:
    """Best-improvement swaps of one kept block for one dropped block until none lowers E."""
    while True:
        trials = [(tuple(sorted(chosen - {a} | {b})), a, b) for a in chosen for b in range(blocks) if b not in chosen]
        if not trials:
            return tuple(sorted(chosen)), value
        scored = [(cost(s), s) for s, _, _ in trials]
        new, s = min(scored, key=lambda x: x[0])
        if new >= value * (1 - 1e-12):
            return tuple(sorted(chosen)), value
        chosen, value = set(s), new


def _spd_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a, lower=True, check_finite=False), b,
                                      check_finite=False)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    return _spd_solve(a, np.eye(a.shape[0]))
