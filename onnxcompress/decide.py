"""Decide: curves + the size rule -> the plan's entries, running whatever measurements the rule
needs (sensitivity probes for budgets and targets, validation passes for a target).

* `keep` / `tolerance`: per site, in each method's own sense (`allocate.per_site`);
* `keep` with `spread`: per kind of site, the parameters the per-site `keep` leaves, spread over
  that kind's sites by the shared greedy walk over sensitivity-weighted curves (`_spread`);
* `params_target` / `flops_target` / `size_target`: the shared greedy walk (`allocate.budget`)
  over sensitivity-weighted curves;
* `latency_target`: the walk to the end over the latency model's estimate, then
  `allocate.search_budget` over it, each probe a real compressed model timed against the
  original at one sample (at most 5 timings; `_latency_budget`). Without `latency_check`, with
  `quantize` (the probes would have to be quantized to be timed as written), or for a model past
  `LARGE_MODEL` bytes of weights, the estimate alone, as the other budgets;
* `target`: the walk to the end, then `allocate.search_path` over it, each probe a real
  compressed model compared with the original on the validation feeds (at most 8 passes).

A site left at its full size gets an entry only where its method makes one for "unchanged" (an
ID group keeps all its channels) and no other site shrinks its weights; the others are reported
as left alone, with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from itertools import islice

import numpy as np

from . import latency as latency_mod
from .allocate import CostModel, budget, conflicts, densify, per_site, search_budget, search_path, walk
from .core.errors import AgreementError, UsageError
from .core.runtime import LARGE_MODEL, weights_bytes
from .core.threads import parallel_map
from .core.validate import output_error
from .methods.base import Skipped
from .methods.id import activation_products
from .methods import loadtime
from .methods.quant import stage as quant_stage
from .sensitivity import measure

log = logging.getLogger(__name__)

BUDGETS = {"params_target": "params", "flops_target": "flops", "size_target": "bytes", "latency_target": "latency"}
MINIMIZE = {"size": "bytes", "params": "params", "flops": "flops", "latency": "latency"}
PASSES = 8
LATENCY_PASSES = 5   # whole-model timings of a --latency-target search
LABELS = {"id": "channel group", "lowrank": "low rank", "quant": "quantization"}


def decide(norm, g, methods: dict, curves: list, config, before: dict, *, calib_src, reference, report,
           timer, progress=None, sample=None):
    """Returns (entries, skipped, chosen): the plan's entries, the sites left whole with reasons,
    and for a target the chosen (model, agreement, `--quantize` sites) already built and
    validated (else None). `sample`: one feed at batch 1, the shapes `--quantize` indexes at."""
    rule, value = config.size_rule
    report.allocation = {"rule": rule, "value": value}
    if rule == "keep" and config.spread:
        return _spread(norm, g, methods, curves, config, value, calib_src, report, timer, progress)
    if rule in ("keep", "tolerance"):
        with timer("decide"):
            idx, reasons = per_site(curves, _choice(methods, rule, value))
            entries, left = _realize(g, methods, curves, idx, config, reasons)
        return entries, left, None
    costs = CostModel(curves, {m: before[m] for m in ("params", "flops", "bytes", "latency") if before.get(m) is not None})
    weights = _weights(norm, g, methods, curves, config, calib_src, report, timer, progress)
    if (rule == "latency_target" and config.latency_check and not config.quantize and sample is not None
            and weights_bytes(norm) <= LARGE_MODEL):
        found = _latency_budget(norm, g, methods, curves, costs, weights, config, value, report, timer, sample)
        if found is not None:
            return found
    if rule != "target":
        metric = BUDGETS[rule]
        with timer("decide"):
            idx, path = budget(curves, costs, metric, value, weights)
            report.allocation.update(metric=metric, estimated_error=path.error(len(path.steps)),
                                     reached=path.cost(len(path.steps), metric) / (path.start[metric] or 1.0))
            entries, left = _realize(g, methods, curves, idx, config,
                                     _left_whole(curves, idx, f"{rule.replace('_', ' ')} {value} is met without it"))
        return entries, left, None
    return _search(norm, g, methods, curves, costs, weights, config, reference, report, timer, progress,
                   calib_src, sample)


def _choice(methods: dict, rule: str, value: float):
    """`per_site`'s choice for `keep` / `tolerance`: each method's own index for the value."""
    def choose(c):
        m = methods[c.site.method]
        j = m.keep_index(c, value) if rule == "keep" else m.tolerance_index(c, value)
        return c.dropped.get(j, j) if not isinstance(j, str) else j
    return choose


def kind(g, site) -> str:
    """The kind of a site, within which `--spread` moves parameters: attention heads (channel
    groups kept in whole heads that pass the Q K^T and P V products), other channel groups, or the
    sites of one other method."""
    if site.method == "id" and getattr(site.target, "block", 1) > 1 and activation_products(g, site.target):
        return "attention heads"
    return LABELS.get(site.method, site.method)


def _spread(norm, g, methods, curves, config, fraction, calib_src, report, timer, progress):
    """`keep` F with `spread`: for each kind of site (`kind`), the parameters P_F that keeping F
    in every site of that kind leaves, now allocated across those sites by the budget walk,

        minimize sum_s w_s e_s(j_s)  subject to  sum_s params_s(j_s) <= P_F  (per kind),

    so a layer whose channels matter less gives more of them up; the kind's total (heads,
    neurons, ranks) stays that of the uniform F. Each kind is a separate budget: the model
    keeps F of its heads and F of its other channels, not a mix the walk prefers."""
    uniform, reasons = per_site(curves, _choice(methods, "keep", fraction))
    kinds: dict[str, list[int]] = {}
    for ci, c in enumerate(curves):
        if ci not in reasons:
            kinds.setdefault(kind(g, c.site), []).append(ci)
    # only the sites a budget can trade between are probed
    traded = [ci for members in kinds.values() if len(members) > 1 and any(uniform[ci] for ci in members)
              for ci in members]
    weights = [1.0] * len(curves)
    for ci, w in zip(traded, _weights(norm, g, methods, [curves[ci] for ci in traded], config, calib_src, report,
                                      timer, progress)):
        weights[ci] = w
    idx, rows = [0] * len(curves), []
    with timer("decide"):
        for name, members in kinds.items():
            # plain keep's size is on every site's grid (the walk's steps may be thinned)
            sub = [curves[ci] if curves[ci].steps is None
                   else replace(curves[ci], steps=np.union1d(curves[ci].steps, [uniform[ci]]).astype(np.int64))
                   for ci in members]
            costs = CostModel(sub, {})
            full = costs.total("params", [0] * len(sub))
            goal = costs.total("params", [uniform[ci] for ci in members]) / full if full else 1.0
            found, path = budget(sub, costs, "params", goal, [weights[ci] for ci in members])
            for ci, j in zip(members, found):
                idx[ci] = j
            rows.append({"kind": name, "sites": len(members), "params": float(goal),
                         "reached": float(path.cost(len(path.steps), "params") / full) if full else 1.0,
                         "estimated_error": float(path.error(len(path.steps))),
                         "uniform_estimated_error": float(sum(weights[ci] * curves[ci].error[uniform[ci]]
                                                              for ci in members))})
        report.allocation["spread"] = rows
        # a site the walk leaves whole is reported as plain keep reports it (an ID group: an entry
        # keeping all its channels; a layer: left alone, with the reason)
        why = f"--keep {fraction} --spread keeps it whole"
        whole = {ci: _no_candidate(curves[ci]) or why for ci in range(len(curves))
                 if idx[ci] == 0 and not methods[curves[ci].site.method].entry_at_full}
        entries, left = _realize(g, methods, curves, idx, config, {**whole, **reasons})
    return entries, left, None


def _weights(norm, g, methods, curves, config, calib_src, report, timer, progress) -> list[float]:
    if not config.sensitivity or len(curves) < 2:
        report.allocation["sensitivity"] = None
        return [1.0] * len(curves)
    with timer("sensitivity"):
        feeds = list(islice(iter(calib_src), config.probe_feeds))
        found = measure(norm, g, methods, curves, feeds, config, progress=progress)
    report.allocation["sensitivity"] = [s.to_dict() for s in found]
    return [s.weight for s in found]


def _realize(g, methods: dict, curves: list, idx: list[int], config, reasons: dict, cache: dict | None = None):
    """Entries for the allocation `idx`; a site at index 0 gets an entry only if its method makes
    one and none of its weights is shrunk by another site. `cache` ((site, index) -> entry) lets
    the target search reuse what earlier probes realized."""
    clash = conflicts(curves)
    cache = {} if cache is None else cache
    keys, left = [], []
    for ci, c in enumerate(curves):
        method = methods[c.site.method]
        if idx[ci] == 0:
            shrunk_by = next((curves[o].id for o in clash[ci] if idx[o] > 0), None)
            if shrunk_by or not method.entry_at_full or ci in reasons:
                why = f"its weights are compressed by {shrunk_by}" if shrunk_by else reasons.get(ci)
                if why:
                    left.append(Skipped(c.site.key, c.site.op, f"{LABELS.get(c.site.method, c.site.method)}: {why}"))
                continue
        keys.append((ci, idx[ci]))
    todo = [k for k in dict.fromkeys(keys) if k not in cache]  # sites are independent: side by side
    for k, entry in zip(todo, parallel_map(lambda k: methods[curves[k[0]].site.method].realize(
            g, curves[k[0]], k[1], config), todo)):
        cache[k] = entry
    return [cache[k] for k in keys], _merge_skipped(left)


def _no_candidate(curve) -> str | None:
    """Why a site offers no smaller size at all, when every one was dropped (`Curve.dropped`:
    a split slower than its layer, ...): the first reason; None when some size is offered."""
    if not curve.dropped or curve.steps is None or any(int(j) > 0 for j in curve.steps):
        return None
    return next(iter(curve.dropped.values()))


def _left_whole(curves: list, idx: list[int], why: str) -> dict[int, str]:
    """For `_realize`: every site an allocation leaves at full size, with why (`_no_candidate`'s
    reason when it had no smaller size at all)."""
    return {ci: _no_candidate(curves[ci]) or why for ci in range(len(curves)) if idx[ci] == 0}


def _merge_skipped(left: list) -> list:
    """One entry per node: the reasons of every method that left it whole, joined."""
    merged: dict = {}
    for s in left:
        merged.setdefault((s.node, s.op), []).append(s.reason)
    return [Skipped(node, op, "; ".join(dict.fromkeys(r))) for (node, op), r in merged.items()]


def _search(norm, g, methods, curves, costs, weights, config, reference, report, timer, progress, calib_src, sample):
    """The most compressed allocation along the walk whose validation outputs meet the target.
    With `--quantize`, each probe is quantized (`methods.quant.stage`) before it is validated."""
    target = config.quality_target
    metric = MINIMIZE[config.minimize]
    with timer("decide"):
        path = walk(curves, costs, metric, weights)
    best, realized = {}, {}

    def evaluate(pos: int) -> float:
        idx = path.at(pos)
        with timer("decide"):
            entries, _ = _realize(g, methods, curves, idx, config, {}, realized)
        with timer("rewrite"):
            new = _build(norm, g, methods, curves, entries)
        late_sites = []
        if config.quantize:
            with timer("quantize"):
                new, late, late_sites, _ = quant_stage.quantize_rest(new, config.quantize, calib_src, config, sample,
                                                                     progress=progress, warnings=warnings)
            entries = entries + late
        with timer("rewrite"):
            new = loadtime.finish(new, norm, config)
        with timer("validate"):
            agreement = reference.compare(new, progress=progress)
        score = worst(agreement, target)
        if np.isnan(score):
            raise UsageError(f"--target {target.metric}: no output of this model has that figure "
                             f"({', '.join(a.output for a in agreement)}); use cosine or rel_l2")
        probe_info[pos] = {"measured_error": output_error(agreement),
                           "cost": {m: path.cost(pos, m) / (path.start[m] or 1.0) for m in ("params", "flops", "bytes")
                                    + (("latency",) if path.start.get("latency") else ())}}
        if target.met(score) and (not best or pos > best["pos"]):
            best.update(pos=pos, entries=entries, model=new, agreement=agreement, late=late_sites)
        return score

    probe_info = {}
    warnings = []
    pos, probes = search_path(path, metric, target, evaluate, passes=PASSES)
    report.allocation.update(metric=metric, target=str(target), path_length=len(path.steps), probes=[
        {"position": p.position, **probe_info[p.position], "estimated_error": p.estimated_error,
         "score": p.score, "passed": p.passed} for p in probes])
    if pos == 0 or not best:
        tried = min(probes, key=lambda p: p.position) if probes else None
        reached = f"; the smallest step tried reaches {target.metric} {tried.score:.4f}" if tried else ""
        raise AgreementError(f"target: no compressed model meets --target {target}{reached}; nothing written", report)
    idx = path.at(best["pos"])
    report.allocation["estimated_error"] = path.error(best["pos"])
    report.allocation["reached"] = path.cost(best["pos"], metric) / (path.start[metric] or 1.0)
    chosen_reason = f"target {target} is met without it"
    _, left = _realize(g, methods, curves, idx, config, {ci: chosen_reason for ci in range(len(curves)) if idx[ci] == 0})
    for w in dict.fromkeys(warnings):
        report.warn(w)
    return best["entries"], left, (best["model"], best["agreement"], best["late"])


def _build(norm, g, methods: dict, curves: list, entries: list):
    """The model with `entries` applied, method by method (a probe of a search)."""
    new = norm
    for name, m in methods.items():
        new = m.rewrite(new, g, [c.site for c in curves if c.site.method == name],
                        [e for e in entries if e.method == name])
    return new


class _Untimed(Exception):
    """A probe of `_latency_budget` that ONNX Runtime could not time."""


def _latency_budget(norm, g, methods, curves, costs, weights, config, goal, report, timer, sample):
    """`--latency-target R` as measured: the walk to the end orders the allocations by the
    latency model's estimate (`densify`: every size a move jumped over is a position), and
    `search_budget` times a few of them (the compressed model against the original at `sample`,
    interleaved, on `latency_threads` threads) for the least compressed one that runs within R.
    The estimate can be off both ways (it prices each node alone, from a profile of the
    original); the timing is what the user asked for. When the timing sessions cannot run the
    model: None (the estimate decides, as for the other budgets), with a warning in the report."""
    with timer("decide"):
        path = densify(walk(curves, costs, "latency", weights), curves, costs, weights)
    realized = {}

    def entries_at(pos: int):
        idx = path.at(pos)
        with timer("decide"):
            return _realize(g, methods, curves, idx, config,
                            _left_whole(curves, idx, f"latency target {goal} is met without it"), realized)

    timed = []

    def evaluate(pos: int) -> float:
        entries, _ = entries_at(pos)
        with timer("rewrite"):
            new = loadtime.finish(_build(norm, g, methods, curves, entries), norm, config)  # timed as written
        with timer("latency_search"):
            try:
                ratio = latency_mod.measured_ratio(norm, new, sample, config.latency_threads)
            except Exception as e:  # a model the timing sessions cannot load as they are
                raise _Untimed(str(e).splitlines()[0][:200] if str(e) else type(e).__name__) from e
        timed.append({"position": pos, "estimated": float(path.cost(pos, "latency") / (path.start["latency"] or 1.0)),
                      "measured": float(ratio), "passed": bool(ratio <= goal), "estimated_error": float(path.error(pos))})
        return ratio

    try:
        pos, _, met, closed = search_budget(path, "latency", goal, evaluate, passes=LATENCY_PASSES)
    except _Untimed as e:
        report.allocation["latency_probes"] = timed
        report.warn(f"latency target: a compressed model could not be timed ({e}); the latency model's "
                    f"estimate decides alone")
        return None
    measured = next((p["measured"] for p in timed if p["position"] == pos), None)
    report.allocation.update(
        metric="latency", estimated_error=float(path.error(pos)),
        reached=float(path.cost(pos, "latency") / (path.start["latency"] or 1.0)),
        measured_latency=measured, threads=config.latency_threads, path_length=len(path.steps),
        latency_probes=timed, search_closed=closed)
    if not met:
        tried = f" (the most compressed model measured {measured:.3f})" if measured is not None else ""
        report.warn(f"latency target {goal} is not reached as timed{tried}: the most compressed model is written")
    elif not closed:
        last_over = max((p["position"] for p in timed if not p["passed"]), default=0)
        report.warn(f"latency target {goal}: the search ended after {len(timed)} timings with positions "
                    f"{last_over + 1} to {pos - 1} of the walk untried; the model written measured {measured:.3f}, "
                    f"and a less compressed one may also be within the target")
    return (*entries_at(pos), None)


def worst(agreement, target) -> float:
    """The worst output's value of the target's metric (outputs without that metric are ignored;
    for top-1, outputs that do not look like scores)."""
    values = [getattr(a, target.metric) for a in agreement if getattr(a, target.metric) is not None]
    if target.metric == "top1":
        values = [a.top1 for a in agreement if a.top1 is not None]
    if not values:
        return float("nan")
    values = [v if np.isfinite(v) else (np.inf if target.op == "<=" else -np.inf) for v in values]
    return float(max(values) if target.op == "<=" else min(values))
