"""Decide: statistics + size rule -> Plan (design.md section 3, "Choosing sizes").

Per group, the selection Gram is the sum over its exit tensors e of D_e G_e D_e / trace, where
D_e = diag(norms of the consumers' input columns) (with `weighted`), so pivoting targets the
consumers' output error rather than the raw activations'. Its pivoted Cholesky gives the channel
order and the error for every size at once; the size rule picks k:

* keep F:        k = round(F C) in every group;
* tolerance eps: the smallest k whose relative error sqrt(residual_k / trace) is at most eps;
* flops/params target R: start at full width and repeatedly shrink the group whose next step
  costs the least added (normalized) residual energy per FLOP/parameter saved (seed 000), until
  the model's total is at most R of the original or every group is at `min_keep`.

Then, per exit tensor, T_e = G_e[S,S]^-1 G_e[S,:] (or the plain selection for `select="norm"`).

Intercept (`intercept=True`, ID only): where every consumer of an exit tensor has a bias that can
absorb a constant (see `edits.Shift`), the fit is Z ~ Z[:,S] T + 1 c0, least squares with an
intercept: T from the centered Gram G - s s^T / n, c0 = mu - mu[S] T with mu = s / n, and
pivoting also runs on the centered Gram (the mean of a channel then costs nothing to keep).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ...core.config import Config
from ...core.cost import Item, cheapest_first, scaled_total
from ...core.graph import GraphIndex
from .groups import Analysis, Group, embed_stats
from .interpolate import best_residual, block_pivot_order, interpolation_matrix, selection_matrix
from ...core.plan import GroupPlan, Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """Totals of the model and what the groups can shrink (for the budget rules)."""
    params_total: float
    flops_total: float
    param_items: tuple[Item, ...]
    flop_items: tuple[Item, ...]


@dataclass(frozen=True)
class Curve:
    """A group's selection statistics: order of channels and normalized residual energy."""
    group: Group
    gram: np.ndarray          # selection Gram (consumer-weighted, trace-normalized sum)
    weights: dict             # exit tensor -> consumer column norms D_e (C,)
    grams: dict               # exit tensor -> the Gram fitted (centered where an intercept is used)
    means: dict               # exit tensor -> channel means mu (C,), only where an intercept is used
    order: np.ndarray
    residual: np.ndarray      # residual[k] / residual[0], k = 0..C


def consumer_norms(g: GraphIndex, group: Group, source: str) -> np.ndarray:
    """Per input channel, the norm of the consumer weights reading it (all exits of `source`)."""
    sq = np.zeros(group.channels)
    for mix in group.mixes(source):
        w = np.moveaxis(g.const(mix.tensor), mix.axis, -1)
        window = slice(mix.offset, mix.offset + (mix.width or group.channels))
        for block in _row_blocks(w):  # in float64 a block at a time, not the whole weight
            block = block.astype(np.float64).reshape(-1, mix.width or group.channels, mix.spatial)
            sq[window] += np.einsum("rcs,rcs->c", block, block)
    return np.sqrt(sq)


def _row_blocks(w: np.ndarray, elements: int = 2**22):
    """Slices of w along its first axis of about `elements` elements each."""
    step = max(1, elements // max(1, w[:1].size))
    for start in range(0, w.shape[0], step):
        yield w[start:start + step]


def group_curve(g: GraphIndex, group: Group, stats: dict, config: Config) -> Curve:
    """The selection Gram sums each exit's Gram, trace-normalized, with one per-channel weight
    shared by all exits: the rms over exits of each exit's (rms-normalized) consumer norms.
    Exit-specific weights would break the collinearity the exits share (a channel that copies
    another in every exit tensor would no longer look like a copy), so the pivots could keep
    both copies and lose a channel."""
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
    return Curve(group, gsel, weights, grams, means, order, norm)


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


def decide(g: GraphIndex, analysis: Analysis, stats: dict, config: Config, budget: Budget) -> Plan:
    curves = [group_curve(g, grp, stats, config) for grp in analysis.groups]
    sizes = choose_sizes(curves, config, budget)
    plans = []
    for curve in curves:
        grp, k = curve.group, sizes[curve.group.id]
        order = curve.order if config.select == "id" else norm_order(g, grp)
        keep = grp.kept_channels(order, k)
        interp, intercept = {}, {}
        for e in grp.exits:
            gram = curve.grams[e.tensor]
            interp[e.tensor] = (interpolation_matrix(gram, keep, config.ridge) if config.select == "id"
                                else selection_matrix(grp.channels, keep))
            if e.tensor in curve.means:
                mu = curve.means[e.tensor]
                intercept[e.tensor] = mu - mu[keep] @ interp[e.tensor]
        err = selection_error(curve, keep, interp)
        best = best_residual(curve.gram)
        best_err = math.sqrt(max(best[k], 0.0) / best[0]) if best[0] > 0 else 0.0
        plans.append(GroupPlan(grp.id, grp.channels, tuple(int(c) for c in keep), interp, err, best_err,
                               intercept))
    return Plan(config.method, config.select, tuple(plans))


def selection_error(curve: Curve, keep: np.ndarray, interp: dict) -> float:
    """Relative consumer-weighted error sqrt(mean_e ||(Z_e - Z_e[:,S] T_e) D_e||^2 / ||Z_e D_e||^2)
    over the exits, on the Gram each exit fits (centered where an intercept is used)."""
    num = den = 0.0
    for tensor, t in interp.items():
        gram, d = curve.grams[tensor], curve.weights[tensor]
        d2 = d * d
        total = float(np.dot(d2, np.diag(gram)))
        if total <= 0:
            continue
        gss = gram[np.ix_(keep, keep)]
        lin = np.einsum("jc,jc->c", gram[keep, :], t)
        quad = np.einsum("jc,jc->c", t, gss @ t)
        res = np.diag(gram) - 2 * lin + quad
        num += float(np.dot(d2, np.maximum(res, 0.0))) / total
        den += 1.0
    return math.sqrt(num / den) if den else 0.0


def choose_sizes(curves: list[Curve], config: Config, budget: Budget) -> dict[str, int]:
    rule, value = config.size_rule
    sizes = {}
    for c in curves:
        n = c.group.channels
        b = c.group.block  # sizes are whole blocks
        if rule == "keep":
            sizes[c.group.id] = max(b, min(n, b * round(value * n / b)))
        elif rule == "tolerance":
            rel = np.sqrt(np.clip(c.residual, 0, None))
            k = max(1, int(np.argmax(rel <= value)) if np.any(rel <= value) else n)
            sizes[c.group.id] = b * -(-k // b)
    if rule in ("flops_target", "params_target"):
        sizes = greedy_sizes(curves, config, budget, rule, value)
    return sizes


def greedy_sizes(curves: list[Curve], config: Config, budget: Budget, rule: str, target: float) -> dict[str, int]:
    """Shrink, step by step, the group with the least added residual energy per unit of cost
    saved, until the model total is at most `target` of the original (seed 000's allocation)."""
    items = list(budget.flop_items if rule == "flops_target" else budget.param_items)
    total = budget.flops_total if rule == "flops_target" else budget.params_total
    fixed = total - sum(it.cost for it in items)
    by_group = {c.group.id: [it for it in items if c.group.id in it.groups] for c in curves}
    channels = {c.group.id: c.group.channels for c in curves}
    k = dict(channels)
    block = {c.group.id: c.group.block for c in curves}
    floor = {gid: block[gid] * max(1, math.ceil(config.min_keep * n / block[gid])) for gid, n in channels.items()}
    frac = {gid: 1.0 for gid in k}
    goal = target * total

    def steps():
        for c in curves:
            gid, n = c.group.id, c.group.channels
            if k[gid] <= floor[gid] or not by_group[gid]:
                continue
            new_k = max(floor[gid], k[gid] - block[gid] * max(1, n // 64 // block[gid]))
            saved = scaled_total(by_group[gid], frac) - scaled_total(by_group[gid], {**frac, gid: new_k / n})
            if saved > 0:
                yield (c.residual[new_k] - c.residual[k[gid]]) / saved, gid, new_k, saved

    def take(gid, new_k):
        k[gid] = new_k
        frac[gid] = new_k / channels[gid]

    reached = cheapest_first(fixed + scaled_total(items, frac), goal, steps, take)
    if reached > goal:
        log.warning("decide: %s %.3f is not reachable by shrinking these groups; reached %.3f",
                    rule, target, reached / total if total else 0.0)
    return k
