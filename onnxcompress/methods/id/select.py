"""ID selection: a group's statistics, its error curve and the kept channels (docs/maths.md).

Per group, the selection Gram is the sum over its exit tensors e of D_e G_e D_e / trace, where
D_e = diag(norms of the consumers' input columns) (with `weighted`), so pivoting targets the
consumers' output error rather than the raw activations'. Its pivoted Cholesky gives the channel
order and the error for every size k at once: the normalized residual energy, which the
allocator (`allocate.py`) reads as the group's curve.

Groups kept in whole blocks (attention heads) instead minimize the consumers' output error
E(S) = tr(Q_e (G_e - G_e[:,S] G_e[S,S]^-1 G_e[S,:])), Q_e = W_e^T W_e, over sets of blocks
(`search.py`: exhaustive where there are few subsets, else greedy growth and swaps); their
curve is E of the set chosen for each size, and the sets need not be nested.

Then, per exit tensor, T_e = G_e[S,S]^-1 G_e[S,:] (or the plain selection for `select="norm"`).

Intercept (`intercept=True`, ID only): where every consumer of an exit tensor has a bias that can
absorb a constant (see `edits.Shift`), the fit is Z ~ Z[:,S] T + 1 c0, least squares with an
intercept: T from the centered Gram G - s s^T / n, c0 = mu - mu[S] T with mu = s / n, and
pivoting also runs on the centered Gram (the mean of a channel then costs nothing to keep).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ...core.config import Config
from ...core.graph import GraphIndex
from .groups import Group, embed_stats
from .interpolate import best_residual, block_pivot_order
from .search import SubsetError, block_subsets

EXHAUSTIVE = 256   # block groups: every subset of m blocks is tried where there are at most this many


@dataclass(frozen=True)
class GroupStats:
    """A group's selection statistics: order of channels and normalized residual energy."""
    group: Group
    gram: np.ndarray          # selection Gram (consumer-weighted, trace-normalized sum)
    weights: dict             # exit tensor -> consumer column norms D_e (C,)
    grams: dict               # exit tensor -> the Gram fitted (centered where an intercept is used)
    means: dict               # exit tensor -> channel means mu (C,), only where an intercept is used
    order: np.ndarray
    residual: np.ndarray      # residual[k] / residual[0], k = 0..C
    rows: int = 0             # the fewest calibration rows behind any exit's Gram
    sets: tuple | None = None  # block groups: sets[m] = the m blocks kept (`search.block_subsets`)
    # groups through a Concat: (offset, width) -> kept share of that window at each curve size
    windows: dict | None = None

    def keep(self, k: int) -> np.ndarray:
        """The channels kept at size k (sorted): the searched set of ceil(k / block) blocks where
        there is one and it leaves every window a block, else the first k of `order`
        (`Group.kept_channels`)."""
        b = self.group.block
        m = -(-k // b)
        if self.sets is not None and m < len(self.sets):
            keep = (np.asarray(self.sets[m], dtype=np.int64)[:, None] * b + np.arange(b)).ravel()
            if all(np.any((keep >= o) & (keep < o + w)) for o, w in self.group.windows):
                return np.sort(keep)
        return self.group.kept_channels(self.order, k)

    @cached_property
    def best(self) -> np.ndarray:
        """Best rank-k residual energy of the selection Gram for k = 0..C (its eigenvalue
        tails, `interpolate.best_residual`): one eigendecomposition per group, computed when a
        size is first realized and reused by every later one (probes, the target search)."""
        return best_residual(self.gram)


def consumer_norms(g: GraphIndex, group: Group, source: str) -> np.ndarray:
    """Per input channel, the norm of the consumer weights reading it (all exits of `source`)."""
    sq = np.zeros(group.channels)
    for mix in group.mixes(source):
        window = slice(mix.offset, mix.offset + (mix.width or group.channels))
        for block in _consumer_rows(g, group, mix):
            sq[window] += np.einsum("rcs,rcs->c", block, block)
    return np.sqrt(sq)


def consumer_gram(g: GraphIndex, group: Group, source: str) -> np.ndarray:
    """Q = sum over the consumers of `source` of W^T W (C x C, W out x C on the input-channel
    axis; a consumer reading channels x spatial positions adds sum_s W[:, :, s]^T W[:, :, s]):
    the output error energy of an interpolation residual with Gram R is tr(Q R)."""
    q = np.zeros((group.channels, group.channels))
    for mix in group.mixes(source):
        window = slice(mix.offset, mix.offset + (mix.width or group.channels))
        for block in _consumer_rows(g, group, mix):
            q[window, window] += np.einsum("rcs,rds->cd", block, block)
    return q


def _consumer_rows(g: GraphIndex, group: Group, mix):
    """The consumer's weight as the error sees it, out x C x spatial in float64 blocks of rows:
    W itself, or Gamma P W where the consumer's outputs reach a LayerNormalization over them
    (`_normalized_by`). To first order LN(x + W e) - LN(x) = Gamma (P - u u^T) W e / sigma(x),
    P = I - 1 1^T / out removing the mean over the outputs, u = (x - mean) / (sigma sqrt(out))
    the token's own direction; the terms that depend on the token (1 / sigma, u u^T) are left
    out, so the error there weighs W's rows by gamma and loses their mean."""
    w = np.moveaxis(g.const(mix.tensor), mix.axis, -1)
    width = mix.width or group.channels
    gamma = _normalized_by(g, mix)
    if gamma is not None and mix.spatial == 1 and w.ndim == 2 and len(gamma) == w.shape[0]:
        w = w.astype(np.float64)
        yield ((w - w.mean(axis=0)) * gamma[:, None]).reshape(-1, width, 1)
        return
    for block in _row_blocks(w):  # in float64 a block at a time, not the whole weight
        yield block.astype(np.float64).reshape(-1, width, mix.spatial)


def _normalized_by(g: GraphIndex, mix) -> np.ndarray | None:
    """The scale gamma (out,) of a LayerNormalization over the last axis that is the only reader
    of the consumer's (MatMul or Gemm) output after an Add of a constant (its bias) and an Add
    of another activation (a residual join), as in a post-LN transformer block; else None."""
    node = g.nodes[mix.node]
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    add = _only_add(g, node.output[0])
    if add is not None and g.const(add[1]) is not None:     # the consumer's bias
        add = _only_add(g, g.nodes[add[0]].output[0])
    if add is None or g.const(add[1]) is not None:          # not a residual join
        return None
    tensor = g.nodes[add[0]].output[0]
    users = g.users(tensor)
    if not users or tensor in g.graph_outputs:
        return None
    gammas = []
    for j, pos in users:
        ln = g.nodes[j]
        if ln.op_type != "LayerNormalization" or pos != 0 or g.attr(j, "axis", -1) != -1 or len(ln.input) < 2:
            return None
        gamma = g.const(ln.input[1])
        if gamma is None or gamma.ndim != 1:
            return None
        gammas.append(gamma.astype(np.float64))
    return np.sqrt(np.mean(np.square(gammas), axis=0))


def _only_add(g: GraphIndex, tensor: str) -> tuple[int, str] | None:
    """(node, other input) when an Add is the only reader of `tensor`, which is no graph output."""
    users = g.users(tensor)
    if len(users) != 1 or tensor in g.graph_outputs:
        return None
    j, pos = users[0]
    node = g.nodes[j]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    return j, node.input[1 - pos]


def _row_blocks(w: np.ndarray, elements: int = 2**22):
    """Slices of w along its first axis of about `elements` elements each."""
    step = max(1, elements // max(1, w[:1].size))
    for start in range(0, w.shape[0], step):
        yield w[start:start + step]


def group_curve(g: GraphIndex, group: Group, stats: dict, config: Config, focus=None) -> GroupStats:
    """The selection Gram sums each exit's Gram, trace-normalized, with one per-channel weight
    shared by all exits: the rms over exits of each exit's (rms-normalized) consumer norms.
    Exit-specific weights would break the collinearity the exits share (a channel that copies
    another in every exit tensor would no longer look like a copy), so the pivots could keep
    both copies and lose a channel. `focus`: the numbers of blocks a block group's search must
    cover (None: every size; a rule that fixes the size needs one)."""
    gsel = np.zeros((group.channels, group.channels))
    weights, grams, means = {}, {}, {}
    for e in group.exits:
        st = embed_stats(stats[e.tensor], e, group.channels)
        gram = st.gram
        if config.intercept and config.select == "id" and group.can_shift(e.tensor) and st.rows > 0:
            means[e.tensor] = st.sums / st.rows
            gram = gram - np.outer(st.sums, st.sums) / st.rows
        grams[e.tensor] = gram
        weights[e.tensor] = consumer_norms(g, group, e.tensor) if config.weighted else np.ones(group.channels)
    d = _shared_weight(list(weights.values()), group.channels)
    for gram in grams.values():
        part = gram * np.outer(d, d)
        tr = float(np.trace(part))
        if tr > 0:
            gsel += part / tr
    order, residual = block_pivot_order(gsel, group.block)
    norm = residual / residual[0] if residual[0] > 0 else residual
    sets = None
    if group.block > 1 and config.select == "id":
        sets, norm = _block_search(g, group, grams, config, order, focus)
    rows = min((stats[e.tensor].rows for e in group.exits), default=0)
    return GroupStats(group, gsel, weights, grams, means, order, norm, rows, sets)


def _block_search(g: GraphIndex, group: Group, grams: dict, config: Config, order: np.ndarray,
                  focus=None) -> tuple[tuple, np.ndarray]:
    """Sets of whole blocks minimizing the consumers' output error (`search.py`):
    E(S) = mean over exits e of tr(Q_e R_e(S)) / tr(Q_e G_e), R_e(S) the Schur complement of
    G_e[S,S] in G_e, Q_e = W_e^T W_e over the exit's consumers (the identity without `weighted`).
    Returns (sets, residual): sets[m] the m blocks kept, residual[k] = E of the set for
    ceil(k / block) blocks, k = 0..C. Sizes outside `focus` (when given) keep the first blocks
    of the pivot `order` instead of being searched."""
    parts = []
    for tensor, gram in grams.items():
        q = consumer_gram(g, group, tensor) if config.weighted else np.eye(group.channels)
        part = SubsetError(gram, q, config.ridge)
        if part.total > 0:
            parts.append(part)
    if not parts:
        return None, np.zeros(group.channels + 1)
    error = lambda keep: sum(p(keep) / p.total for p in parts) / len(parts)   # noqa: E731
    sets, energy = block_subsets(error, 1.0, group.channels // group.block, group.block, EXHAUSTIVE,
                                 order=np.asarray(order)[::group.block] // group.block, search=focus)
    units = -(-np.arange(group.channels + 1) // group.block)   # ceil(k / block)
    return tuple(sets), energy[units]


def _shared_weight(per_exit: list[np.ndarray], channels: int) -> np.ndarray:
    """sqrt(mean_e d_e^2 / mean(d_e^2)): each exit's consumer norms count equally."""
    sq = np.zeros(channels)
    for d in per_exit:
        ms = float(np.mean(d * d))
        if ms > 0:
            sq += d * d / ms
    return np.sqrt(sq / max(len(per_exit), 1))


def norm_order(g: GraphIndex, group: Group) -> np.ndarray:
    """Channels by decreasing L2 norm of their producer weights (the baseline selection)."""
    sq = np.zeros(group.channels)
    for s in group.weights:
        w = np.moveaxis(g.const(s.tensor), s.axis, 0)
        start = s.offset
        for block in _row_blocks(w):
            block = block.astype(np.float64).reshape(len(block), -1)
            sq[start:start + len(block)] += np.einsum("ij,ij->i", block, block)
            start += len(block)
    if group.block > 1:  # whole blocks, by their total norm
        blocks = np.argsort(-sq.reshape(-1, group.block).sum(axis=1), kind="stable")
        return (blocks[:, None] * group.block + np.arange(group.block)).ravel()
    return np.argsort(-sq, kind="stable")


def selection_error(curve: GroupStats, keep: np.ndarray, interp: dict) -> float:
    """Relative consumer-weighted error sqrt(mean_e ||(Z_e - Z_e[:,S] T_e) D_e||^2 / ||Z_e D_e||^2)
    over the exits, on the Gram each exit fits (centered where an intercept is used)."""
    num = den = 0.0
    keep = np.asarray(keep, dtype=np.int64)
    for tensor, t in interp.items():
        gram, d = curve.grams[tensor], curve.weights[tensor]
        d2 = d * d
        total = float(np.dot(d2, np.diag(gram)))
        if total <= 0:
            continue
        # a kept channel with T[:, S] = I (both `interpolate` matrices) is rebuilt exactly:
        # residual G_cc - 2 G_cc + G_cc = 0, so only the other columns are evaluated
        cols = (np.setdiff1d(np.arange(len(d)), keep)
                if np.array_equal(t[:, keep], np.eye(len(keep))) else np.arange(len(d)))
        tc = t[:, cols]
        gss = gram[np.ix_(keep, keep)]
        lin = np.einsum("jc,jc->c", gram[np.ix_(keep, cols)], tc)
        quad = np.einsum("jc,jc->c", tc, gss @ tc)
        res = np.diag(gram)[cols] - 2 * lin + quad
        num += float(np.dot(d2[cols], np.maximum(res, 0.0))) / total
        den += 1.0
    return math.sqrt(num / den) if den else 0.0


