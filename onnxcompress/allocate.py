"""One allocator for every method and every size rule.

Input: one `Curve` per site (any method), each with candidate sizes j = 0 (unchanged), 1, ...,
a local relative error e_s(j), and cost items (`methods.base.Cost`). Sites are compared in one
currency: the estimated contribution to the model's output error,

    E_s(j) = w_s e_s(j),   E = sum_s E_s(j_s),

where w_s is the site's end-to-end sensitivity (measured by `sensitivity.py`: the model's
relative output error energy per unit of local error, from one probe per site), or 1 when no
probe was run. Costs ("params", "flops", "bytes", and "latency" in seconds from the measured
latency model, `latency.py`) are products over the sites that share an item (a Conv between two
channel groups scales with both kept fractions):

    C(j) = fixed + sum_items base_i prod_{s touching i} f_{s,i}(j_s).

Rules:

* per site (`keep`, `tolerance`): each method's own index for the site;
* budgets (`params_target`, `flops_target`, `size_target`, `latency_target` R): walk from the full model, each
  step taking, over all sites, the move j -> j' (j' > j, any later candidate: a look-ahead over
  the whole curve, so non-convex curves are followed along their lower convex hull) with the
  least added E per unit of cost saved, until C <= R C_full (seed 000's greedy, in the shared
  currency). For separable costs and convex curves every point the walk passes is optimal:
  no allocation of lower or equal cost has lower E (tests compare with brute force). The move
  that crosses the goal is the one, of all single moves that reach it, adding the least error;
  coarse steps (rounded widths) would otherwise overshoot;
* a quality target (`--target`): the same walk to the end gives a path of allocations of
  decreasing cost; `search_path` picks the most compressed one that the real model confirms;
* a timed latency budget (`latency_target` in `decide`): the walk to the end, made finer
  (`densify`), and `search_budget` picks the least compressed position the real model, timed,
  runs within R at.

Two sites of different methods that claim the same initializer (`Site.claims`) exclude each
other: once one moves off its full size, the other is frozen whole. The walk may still switch:
a frozen site's move takes its own step and puts the sites that froze it back to their full
size, at an added error of E_s(j') - sum of theirs, per unit of cost saved by both together;
it is taken when that rate is the best. So an early small step (a low-rank split of one Conv)
does not lock out a channel group that would save far more (for per-site rules the earlier
method in the registry wins).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .core.target import Target
from .methods.base import Curve

log = logging.getLogger(__name__)

METRICS = ("params", "flops", "bytes", "latency")


class CostModel:
    """The model's totals as products of the curves' cost items (see the module docstring)."""

    def __init__(self, curves: list[Curve], totals: dict[str, float]):
        self.curves = curves
        self.items: dict[tuple[str, str], tuple[float, list[tuple[int, np.ndarray]]]] = {}
        for ci, c in enumerate(curves):
            for cost in c.costs:
                key = (cost.metric, cost.item)
                base, parts = self.items.get(key, (cost.base, []))
                parts.append((ci, np.asarray(cost.factor, dtype=np.float64)))
                self.items[key] = (base, parts)
        self.by_site: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for key, (_, parts) in self.items.items():
            for ci, _ in parts:
                self.by_site.setdefault((key[0], ci), []).append(key)
        zero = [0] * len(curves)
        # a measured total below the sum of its items (per-op timings in isolation) fixes nothing
        self.fixed = {m: max(0.0, float(totals.get(m, 0.0)) - self._variable(m, zero)) for m in METRICS}

    def _variable(self, metric: str, idx) -> float:
        total = 0.0
        for (m, _), (base, parts) in self.items.items():
            if m == metric:
                f = base
                for ci, factor in parts:
                    f *= factor[idx[ci]]
                total += f
        return total

    def total(self, metric: str, idx) -> float:
        return self.fixed[metric] + self._variable(metric, idx)

    def site_costs(self, metric: str, ci: int, idx) -> np.ndarray:
        """The cost of the items site `ci` touches, for each of its candidates, the other sites
        at `idx`."""
        out = np.zeros(len(self.curves[ci].sizes))
        for key in self.by_site.get((metric, ci), ()):
            base, parts = self.items[key]
            other = base
            mine = None
            for cj, factor in parts:
                if cj == ci:
                    mine = factor if mine is None else mine * factor
                else:
                    other *= factor[idx[cj]]
            out += other * mine
        return out

    def neighbours(self, metric: str, ci: int) -> set[int]:
        return {cj for key in self.by_site.get((metric, ci), ()) for cj, _ in self.items[key][1]}


@dataclass(frozen=True)
class Step:
    """One move of the walk: site `site` (index into the curves) to candidate `index`, and the
    model after it: its cost in every metric and its estimated output error."""
    site: int
    index: int
    cost: dict
    error: float
    resets: tuple = ()   # sites put back to their full size by this move (a switch, `walk`)


@dataclass(frozen=True)
class Path:
    """The walk from the full model (`start`) through `steps`; `at(n)` is the allocation after n."""
    start: dict
    steps: tuple[Step, ...]
    sites: int = 0

    def at(self, n: int) -> list[int]:
        idx = [0] * self.sites
        for s in self.steps[:n]:
            for r in s.resets:
                idx[r] = 0
            idx[s.site] = s.index
        return idx

    def cost(self, n: int, metric: str) -> float:
        return self.start[metric] if n == 0 else self.steps[n - 1].cost[metric]

    def error(self, n: int) -> float:
        return 0.0 if n == 0 else self.steps[n - 1].error


def conflicts(curves: list[Curve]) -> list[set[int]]:
    """Per site, the sites of other methods that claim one of its initializers (sites of one
    method compose: a Conv between two channel groups is sliced by both)."""
    owner: dict[str, list[int]] = {}
    for ci, c in enumerate(curves):
        for name in c.site.claims:
            owner.setdefault(name, []).append(ci)
    out = [set() for _ in curves]
    for sites in owner.values():
        for a in sites:
            out[a].update(b for b in sites if curves[b].site.method != curves[a].site.method)
    return out


def walk(curves: list[Curve], costs: CostModel, metric: str, weights: list[float], *,
         goal: float | None = None) -> Path:
    """Seed 000's greedy in the shared currency: repeatedly take the move with the least added
    weighted error per unit of `metric` saved, until the total is at most `goal` (None: until no
    move is left). Each site's candidate moves are its `steps` (all indices when None)."""
    n = len(curves)
    idx = [0] * n
    clash = conflicts(curves)
    frozen = [False] * n
    err = [weights[i] * np.asarray(c.error, dtype=np.float64) for i, c in enumerate(curves)]
    grids = [c.grid for c in curves]
    best: dict[int, tuple[float, float, int] | None] = {}

    def candidate(ci: int):
        grid = grids[ci]
        later = grid[grid > idx[ci]]
        if not len(later):
            return None
        resets = tuple(sorted(o for o in clash[ci] if idx[o] != 0)) if frozen[ci] else ()
        if frozen[ci] and not resets:
            return None
        if resets:   # a switch: the sites that froze this one go back to their full size
            base = list(idx)
            for o in resets:
                base[o] = 0
            cost = costs.site_costs(metric, ci, base)
            saved = costs.total(metric, idx) - (costs.total(metric, base) - cost[idx[ci]] + cost[later])
            added = err[ci][later] - err[ci][idx[ci]] - sum(err[o][idx[o]] - err[o][0] for o in resets)
        else:
            cost = costs.site_costs(metric, ci, idx)
            saved = cost[idx[ci]] - cost[later]
            added = err[ci][later] - err[ci][idx[ci]]
        ok = saved > 1e-12 * max(1.0, abs(cost[idx[ci]]))
        if not np.any(ok):
            return None
        ratio = np.where(ok, added / np.where(ok, saved, 1.0), np.inf)
        j = int(np.argmin(ratio))
        return float(ratio[j]), float(saved[j]), int(later[j]), resets, float(added[j])

    def _finish(ci: int, j: int, saved: float, resets: tuple, added: float, need: float):
        """The last move: of all single moves that save at least `need`, the one adding the least
        error (coarse steps, such as rounded widths, would otherwise overshoot the goal)."""
        choice, least = (ci, j, saved, resets, added), added
        for cj in range(n):
            if frozen[cj]:
                continue
            grid = grids[cj]
            later = grid[grid > idx[cj]]
            if not len(later):
                continue
            cost = costs.site_costs(metric, cj, idx)
            gain = cost[idx[cj]] - cost[later]
            added = err[cj][later] - err[cj][idx[cj]]
            ok = np.nonzero(gain >= need)[0]
            if len(ok):
                k = ok[int(np.argmin(added[ok]))]
                if added[k] < least:
                    choice, least = (cj, int(later[k]), float(gain[k]), (), float(added[k])), added[k]
        return choice

    start = {m: costs.total(m, idx) for m in METRICS}
    current = start[metric]
    total_err = 0.0
    steps = []
    while goal is None or current > goal:
        for ci in range(n):
            if ci not in best:
                best[ci] = candidate(ci)
        options = [(b[0], -b[1], ci) for ci, b in best.items() if b is not None]
        if not options:
            break
        _, _, ci = min(options)
        _, saved, j, resets, added = best[ci]
        if goal is not None and current - saved < goal:
            ci, j, saved, resets, added = _finish(ci, j, saved, resets, added, current - goal)
        total_err += added
        moved = {ci, *resets}
        for o in resets:
            idx[o], frozen[o] = 0, True
        idx[ci], frozen[ci] = j, False
        current -= saved
        dirty = set(moved)
        for m in moved:
            dirty |= costs.neighbours(metric, m)
        for other in clash[ci]:
            if idx[other] == 0 and not frozen[other]:
                frozen[other] = True
        # a frozen site's switch depends on the sites that froze it and on their neighbours
        dirty |= {f for f in range(n) if frozen[f] and (clash[f] & dirty or f in dirty)}
        for d in dirty:
            best.pop(d, None)
        steps.append(Step(ci, j, {m: costs.total(m, idx) for m in METRICS}, total_err, resets))
        current = steps[-1].cost[metric]
    return Path(start, tuple(steps), n)


def densify(path: Path, curves: list[Curve], costs: CostModel, weights: list[float]) -> Path:
    """The walk with every grid size it jumped over put back as a position of its own. A
    look-ahead move takes a site from j to a much smaller j' at once (the lower convex hull), so
    one position can save a large share of the cost; a search that places its cut by measurement
    (`search_budget`) needs the sizes in between. A move j -> j' becomes j -> j_1 -> ... -> j' over
    the site's grid (a switch, which also resets other sites, stays one move). Every position is
    still an allocation the walk's order reaches; the estimated error of a point inside a jump
    can be above the hull's."""
    idx = [0] * path.sites
    steps, before = [], 0.0
    for step in path.steps:
        ci = step.site
        if not step.resets:
            c = curves[ci]
            grid = c.grid
            err = weights[ci] * np.asarray(c.error, dtype=np.float64)
            for j in grid[(grid > idx[ci]) & (grid < step.index)]:
                trial = list(idx)
                trial[ci] = int(j)
                steps.append(Step(ci, int(j), {m: costs.total(m, trial) for m in METRICS},
                                  before + float(err[j] - err[idx[ci]])))
        for r in step.resets:
            idx[r] = 0
        idx[ci] = step.index
        steps.append(step)
        before = step.error
    return Path(path.start, tuple(steps), path.sites)


def per_site(curves: list[Curve], choose: Callable[[Curve], int | str]) -> tuple[list[int], dict[int, str]]:
    """Per-site rules: `choose(curve)` gives an index or the reason the site stays whole. A site
    that claims an initializer an earlier site of another method has taken (at any size, even
    whole) stays whole, with the reason: the earlier method in the registry wins."""
    clash = conflicts(curves)
    idx, reasons, taken = [0] * len(curves), {}, [False] * len(curves)
    for ci, c in enumerate(curves):
        first = next((o for o in sorted(clash[ci]) if o < ci and taken[o]), None)
        if first is not None:
            reasons[ci] = f"its weights are compressed by {curves[first].id}"
            continue
        j = choose(c)
        if isinstance(j, str):
            reasons[ci] = j
        else:
            idx[ci], taken[ci] = int(j), True
    return idx, reasons


def budget(curves: list[Curve], costs: CostModel, metric: str, fraction: float,
           weights: list[float]) -> tuple[list[int], Path]:
    """The allocation that walks down to `fraction` of the full model's `metric`."""
    goal = fraction * costs.total(metric, [0] * len(curves))
    path = refill(curves, costs, metric, weights, walk(curves, costs, metric, weights, goal=goal), goal)
    full = path.start[metric]
    reached = path.cost(len(path.steps), metric)
    if reached > fraction * full + 1e-9 * full:
        log.warning("allocate: %s %.3f is not reachable with these sites; reached %.3f",
                    {"bytes": "size_target"}.get(metric, metric + "_target"), fraction,
                    reached / full if full else 0.0)
    return path.at(len(path.steps)), path


def refill(curves: list[Curve], costs: CostModel, metric: str, weights: list[float], path: Path,
           goal: float) -> Path:
    """Spend what the walk left under `goal`. The walk's moves can be coarse (a table from int8
    straight to a codebook, a group by a rounded width), so its last move may land well below
    the goal. Then, repeatedly, one site moves back to a larger candidate of its grid (or to its
    full size) that keeps the total within the goal: the move removing the most weighted error
    per unit of `metric` it adds, until none fits. Each move is appended to the path as a step,
    so `path.at(len(path.steps))`, its cost and its error are the final allocation's."""
    n = len(curves)
    idx = path.at(len(path.steps))
    err = [weights[i] * np.asarray(c.error, dtype=np.float64) for i, c in enumerate(curves)]
    grids = [c.grid for c in curves]
    steps = list(path.steps)
    total_err = path.error(len(steps))
    current = costs.total(metric, idx)
    while current < goal:
        slack = goal - current
        best = None
        for ci in range(n):
            if idx[ci] == 0:
                continue
            grid = grids[ci]
            earlier = np.unique(np.concatenate([[0], grid[grid < idx[ci]]]))
            cost = costs.site_costs(metric, ci, idx)
            added = cost[earlier] - cost[idx[ci]]
            gain = err[ci][idx[ci]] - err[ci][earlier]
            ok = np.nonzero((added <= slack) & (gain > 0))[0]
            for k in ok:
                rate = gain[k] / max(added[k], 1e-12 * max(1.0, abs(goal)))
                if best is None or rate > best[0]:
                    best = (rate, ci, int(earlier[k]), float(gain[k]))
        if best is None:
            break
        _, ci, j, gain = best
        idx[ci] = j
        total_err -= gain
        step = Step(ci, j, {m: costs.total(m, idx) for m in METRICS}, total_err)
        steps.append(step)
        current = step.cost[metric]
    return Path(path.start, tuple(steps), n) if len(steps) > len(path.steps) else path


# ------------------------------------------------------------------------------------------
# quality targets


@dataclass
class Probe:
    """One validation pass of the search: path position, its cost and estimated error, the
    measured worst score and whether it met the target."""
    position: int
    cost: float
    estimated_error: float
    score: float
    passed: bool
    extra: dict = field(default_factory=dict)


def search_path(path: Path, metric: str, target: Target, evaluate: Callable[[int], float], *,
                passes: int = 8, tolerance: float = 0.005) -> tuple[int, list[Probe]]:
    """The most compressed position of `path` whose measured score meets `target`, with at most
    `passes` calls of `evaluate(position) -> worst score`. Position 0 (the original) passes by
    definition and is never evaluated. Returns (position, probes); position 0 means no probe
    passed.

    The first probe is where the estimated error reaches the target's error (`Target.as_error`);
    later ones correct that estimate by the ratio measured/estimated of the nearest probes, kept
    strictly inside the bracket (lo passes, hi fails) and at least an eighth of it away from
    either end, so the bracket shrinks geometrically. It stops when the bracket's cost gap is below
    `tolerance` of the full cost; the last pass is spent on position 1 if nothing passed yet."""
    n = len(path.steps)
    full = path.start[metric] or 1.0
    lo, hi = 0, n + 1           # lo: known to pass; hi: known to fail (n + 1: none known)
    probes: list[Probe] = []
    goal = target.as_error(target.value)
    ratio = 1.0
    while len(probes) < passes and hi - lo > 1:
        last = len(probes) == passes - 1
        if hi <= n and path.cost(lo, metric) - path.cost(hi, metric) < tolerance * full:
            break
        if last and lo == 0:
            pos = 1
        else:
            want = goal / ratio if ratio > 0 else goal
            pos = _position_for(path, want, lo, min(hi, n + 1))
            span = min(hi, n + 1) - lo
            margin = max(1, span // 8)
            upper = hi - margin if hi <= n else n
            pos = int(min(max(pos, lo + margin), max(upper, lo + 1)))
        score = evaluate(pos)
        passed = target.met(score)
        probes.append(Probe(pos, path.cost(pos, metric), path.error(pos), score, passed))
        if passed:
            lo = max(lo, pos)
        else:
            hi = min(hi, pos)
        est = path.error(pos)
        if est > 0:
            ratio = max(target.as_error(score), 1e-12) / est
    return lo, probes


def search_budget(path: Path, metric: str, goal: float, evaluate: Callable[[int], float], *,
                  passes: int = 5, tolerance: float = 0.01) -> tuple[int, list[Probe], bool, bool]:
    """The least compressed position of `path` whose measured ratio `evaluate(position)` (the
    model's `metric` over the original's, as timed) is at most `goal`, with at most `passes`
    calls. The walk's estimate only orders the positions; the measurements place the cut, by a
    safeguarded false position on (estimated ratio e, measured ratio m), position 0 being the
    original (1, 1) and counting as over any goal below 1:

    * while nothing is within the goal, the next probe assumes the measured savings 1 - m scale
      with the estimated ones as at the last probe over it (the first: as estimated), and aims
      at the first position whose estimate gives m = goal; the last pass goes to the walk's end;
    * with a bracket (lo measured over the goal, hi within it), it aims at the estimate where the
      line through both ends reaches the goal, and bisects (by position) when the same end has
      moved twice in a row, so the bracket at least halves every other probe;
    * it stops when the bracket is closed (adjacent positions) or its estimated gap is below
      `tolerance`.

    Returns (position, probes, met, closed): the smallest position measured within the goal
    (met), else the walk's end; `closed` says whether the bracket closed (else a position
    between the last one over the goal and the one returned may also be within it)."""
    n = len(path.steps)
    full = path.start[metric] or 1.0

    def est(k: int) -> float:
        return path.cost(k, metric) / full

    probes: list[Probe] = []
    if goal >= 1.0 or n == 0:
        return 0, probes, goal >= 1.0, True
    lo, hi = 0, n + 1                # lo: measured over the goal; hi: within it (n + 1: none yet)
    measured = {0: 1.0}
    moved: list[bool] = []           # per probe: did it pass (move hi)?
    while len(probes) < passes and hi - lo > 1:
        if hi <= n and abs(est(lo) - est(hi)) < tolerance:
            break
        top = min(hi, n + 1)
        if hi > n:
            if len(probes) == passes - 1:
                pos = n
            else:
                saved_e, saved_m = 1.0 - est(lo), 1.0 - measured[lo]
                rate = saved_m / saved_e if lo > 0 and saved_e > 0 and saved_m > 0 else 1.0
                pos = _first_at_most(est, 1.0 - (1.0 - goal) / rate, lo, top)
        elif len(moved) >= 2 and moved[-1] == moved[-2]:
            pos = (lo + hi) // 2
        else:
            e_lo, e_hi, m_lo, m_hi = est(lo), est(hi), measured[lo], measured[hi]
            want = e_lo + (goal - m_lo) * (e_hi - e_lo) / (m_hi - m_lo) if m_lo != m_hi else (e_lo + e_hi) / 2
            pos = _first_at_most(est, want, lo, top)
        pos = int(min(max(pos, lo + 1), top - 1))
        ratio = float(evaluate(pos))
        measured[pos] = ratio
        passed = ratio <= goal
        probes.append(Probe(pos, est(pos), path.error(pos), ratio, passed))
        moved.append(passed)
        if passed:
            hi = pos
        else:
            lo = pos
    closed = hi - lo <= 1 or (hi <= n and abs(est(lo) - est(hi)) < tolerance)
    if hi <= n:
        return hi, probes, True, closed
    return n, probes, False, closed


def _first_at_most(est: Callable[[int], float], want: float, lo: int, top: int) -> int:
    """The first position in (lo, top) whose estimated ratio is at most `want` (top - 1 if none)."""
    return next((k for k in range(lo + 1, top) if est(k) <= want), top - 1)


def _position_for(path: Path, error: float, lo: int, hi: int) -> int:
    """The last position in (lo, hi) whose estimated error is at most `error` (at least lo + 1)."""
    errors = np.array([path.error(k) for k in range(lo + 1, min(hi, len(path.steps) + 1))])
    if not len(errors):
        return lo + 1
    ok = np.nonzero(errors <= error)[0]
    return lo + 1 + (int(ok[-1]) if len(ok) else 0)
