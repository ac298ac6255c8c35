"""ID channel pruning (seed 000) as a method of the shared allocator.

Sites are channel groups (`groups.py`); a group of C channels has candidates k = C, C-1, ..., 1
(index j = C - k). Its local error at k is the normalized residual energy of the pivoted
Cholesky of the consumer-weighted selection Gram (`select.py`), i.e. the relative calibration
output error energy of the group's exits at k channels; for a group kept in whole blocks
(attention heads) it is the consumers' exact output error of the best set of blocks found for
each size (`search.py`). Every weight the group slices or mixes
scales with k / C (params, bytes), as does every node whose weight it edits (FLOPs).
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ...core.config import Config
from ...core.graph import GraphIndex
from ...core.plan import GroupPlan
from ...ops.edits import Mix, SetAttr, Shift, Slice
from ..base import Cost, Curve, Site
from .. import rounding
from .groups import Analysis, exit_request, find_groups
from .interpolate import interpolation_matrix, selection_matrix
from .rewrite import rewrite as rewrite_groups
from .select import group_curve, norm_order, selection_error


class IdMethod:
    name = "id"
    decision = GroupPlan
    section = "groups"
    entry_at_full = True   # a group kept whole is still an entry (its kept channels are all)

    def sites(self, g: GraphIndex, config: Config):
        # per-site rules calibrate in blocks (`blocks.py`): no budget over all groups at once
        analysis = find_groups(g, exclude=config.exclude, include=config.include, total_budget=not config.per_site)
        sites = [Site(self.name, grp.id, "group", _claims(grp), grp) for grp in analysis.groups]
        return sites, list(analysis.skipped)

    def requests(self, site: Site):
        grp = site.target
        return [exit_request(grp.channels, e) for e in grp.exits]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        grp = site.target
        c = grp.channels
        n = math.lcm(grp.block, rounding.multiple(config.round, _kind(g, grp)))  # whole blocks, hardware widths
        rule, value = config.size_rule
        focus = {-(-rounding.keep_size(value * c, c, n) // grp.block)} if rule == "keep" and config.per_site else None
        state = group_curve(g, grp, {r.tensor: stats[r] for r in self.requests(site)}, config, focus)
        sizes = np.arange(c, 0, -1)
        error = np.maximum(state.residual[sizes], 0.0)
        floor = max(1, math.ceil(config.min_keep * c))
        steps = rounding.grid(sizes, n, floor)
        windows = window_fractions(grp, sizes, state if config.select == "id" else None,
                                   norm_order(g, grp) if config.select != "id" else None)
        state = replace(state, windows=windows)
        return Curve(site, sizes, error, tuple(group_costs(g, grp, sizes / c, flops, windows)), state, steps, n)

    def keep_index(self, curve: Curve, fraction: float):
        c = curve.site.target.channels
        return c - rounding.keep_size(fraction * c, c, curve.multiple)

    def tolerance_index(self, curve: Curve, eps: float):
        rel = np.sqrt(np.clip(curve.error, 0, None))
        ok = np.nonzero(rel <= eps)[0]
        if not len(ok):
            return 0
        c = curve.site.target.channels
        return c - rounding.at_least(int(curve.sizes[int(ok[-1])]), c, curve.multiple)

    def realize(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> GroupPlan:
        grp, state = curve.site.target, curve.state
        k = int(curve.sizes[index])
        keep = state.keep(k) if config.select == "id" else grp.kept_channels(norm_order(g, grp), k)
        interp, intercept = {}, {}
        for e in grp.exits:
            gram = state.grams[e.tensor]
            interp[e.tensor] = (interpolation_matrix(gram, keep, config.ridge) if config.select == "id"
                                else selection_matrix(grp.channels, keep))
            if e.tensor in state.means:
                mu = state.means[e.tensor]
                intercept[e.tensor] = mu - mu[keep] @ interp[e.tensor]
        err = selection_error(state, keep, interp)
        best_err = math.nan   # the floor costs one eigendecomposition per group: only on request
        if config.best:
            best = state.best
            best_err = math.sqrt(max(best[len(keep)], 0.0) / best[0]) if best[0] > 0 else 0.0
        return GroupPlan(grp.id, grp.channels, tuple(int(c) for c in keep), interp, err, best_err, intercept)

    def rewrite(self, model, g: GraphIndex, sites: list[Site], decisions: list):
        if not decisions:
            return model
        from ...core.plan import Plan
        return rewrite_groups(model, g, Analysis(tuple(s.target for s in sites), ()), Plan("id", "id", tuple(decisions)))

    def describe(self, site: Site, decision: GroupPlan) -> dict:
        grp = site.target
        row = decision.to_dict(matrices=False)
        row.pop("keep")  # the kept channel list is the plan's (--save-plan), not the report's
        return {**row, "producers": list(grp.producers),
                "exits": [e.tensor for e in grp.exits],
                "error_ratio": (decision.error / decision.best_error) if decision.best_error > 0 else None}


def activation_products(g: GraphIndex, grp) -> list[int]:
    """The MatMuls of two activations the group passes through (an attention head group's
    Q K^T and P V)."""
    found = []
    for key in grp.nodes:
        i = g.index_of(key)
        node = g.nodes[i]
        if node.op_type == "MatMul" and len(node.input) == 2 and all(g.const(n) is None for n in node.input):
            found.append(i)
    return found


def _kind(g: GraphIndex, grp) -> str:
    """"conv" when a Conv produces the group's channels (its width is a Conv channel count),
    else "gemm" (`rounding.multiple`)."""
    ops = {g.nodes[g.index_of(p)].op_type for p in grp.producers}
    return "conv" if "Conv" in ops else "gemm"


def _claims(grp) -> frozenset:
    return frozenset(e.tensor for e in grp.edits if isinstance(e, (Slice, Mix, Shift)))


def window_fractions(grp, sizes: np.ndarray, state=None, order=None) -> dict | None:
    """For a group that passes a Concat along the channels: per window (offset, width), the
    share of the window's channels kept at each size k of `sizes`, |S_k within the window| /
    width, with S_k the channels `realize` keeps (`state.keep(k)`, or the first k of `order` for
    the norm selection, every window keeping at least one block). A producer or consumer in one
    window scales with that share, not with k / C: a selection may keep most of an expensive
    window and little of a cheap one. None when the group has no windows."""
    if not grp.windows:
        return None
    out = {w: np.empty(len(sizes)) for w in grp.windows}
    b = grp.block
    if state is None or state.sets is None:
        # kept_channels in closed form: the required first block of every window, then the
        # first units of the order until n = max(ceil(k / b), #required) units are chosen
        ordered = np.asarray(order if order is not None else state.order)
        units = ordered[::b] // b
        required = grp.required_units(units)
        extra = ~np.isin(units, required)
        cum = np.concatenate([[0], np.cumsum(extra)])
        need = np.maximum(-(-np.asarray(sizes) // b), len(required)) - len(required)
        first = np.searchsorted(cum, need, side="left")      # units[:first] hold `need` extra ones
        for (offset, width), f in out.items():
            inside = (units * b >= offset) & (units * b < offset + width)
            cum_w = np.concatenate([[0], np.cumsum(inside & extra)])
            req_w = sum(offset <= u * b < offset + width for u in required)
            f[:] = (cum_w[first] + req_w) * b / width
        return out
    for j, k in enumerate(sizes):
        keep = state.keep(int(k))
        for (offset, width), f in out.items():
            f[j] = np.count_nonzero((keep >= offset) & (keep < offset + width)) / width
    return out


def group_costs(g: GraphIndex, grp, fraction: np.ndarray, flops: dict, windows: dict | None = None) -> list[Cost]:
    """Parameters and bytes of every weight the group slices or mixes, FLOPs of every node whose
    weight it edits (or whose group attribute it sets), each scaling with k / C, or, for an edit
    in one window of a Concat along the channels, with that window's kept share (`windows`,
    from `window_fractions`); a weight edited on two axes (sliced as a producer, mixed as an
    exit) with the product of both. An attention head group also scales the products of two
    activations it passes through, Q K^T (2 H S^2 d per sample) and P V (2 H S^2 d), with the
    kept heads h / H = k / C."""
    def share(e) -> np.ndarray:
        return windows.get((e.offset, e.width), fraction) if windows and e.width else fraction

    axes: dict[str, dict[int, np.ndarray]] = {}   # tensor -> axis -> kept share along it
    weights, attrs = {}, {}
    for e in grp.edits:
        if isinstance(e, (Slice, Mix)):
            axes.setdefault(e.tensor, {}).setdefault(e.axis, share(e))
            node = g.nodes[e.node]
            weight_pos = 0 if node.op_type == "Gather" else 1
            if len(node.input) > weight_pos and node.input[weight_pos] == e.tensor:
                weights[e.node] = e.tensor
        elif isinstance(e, SetAttr):
            attrs.setdefault(e.node, share(e))
    # a weight the group slices on one axis and mixes on another (a Conv that reads the group
    # and writes into it, through a residual join) scales with both shares
    tensors = {t: np.prod(list(by_axis.values()), axis=0) for t, by_axis in axes.items()}
    nodes = {i: fraction for i in activation_products(g, grp)}
    nodes.update(attrs)
    nodes.update({i: tensors[t] for i, t in weights.items()})
    out = []
    for t in sorted(tensors):
        value = g.const(t)
        out.append(Cost("params", t, float(value.size), tensors[t]))
        out.append(Cost("bytes", t, float(value.nbytes), tensors[t]))
    for i in sorted(nodes):
        if i in flops:
            out.append(Cost("flops", g.key(i), flops[i], nodes[i]))
    return out
