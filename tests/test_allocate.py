"""The shared allocator on toy curves: the walk against brute force, budgets, conflicts between
methods, and the target search."""
import itertools

import numpy as np
import pytest

from onnxcompress.allocate import CostModel, budget, densify, per_site, search_budget, search_path, walk
from onnxcompress.core.target import Target, parse_target
from onnxcompress.methods.base import Cost, Curve, Site


def curve(name, errors, costs, method="m", claims=(), item=None):
    """A site whose candidates j = 0..n-1 have local error errors[j] and cost costs[j] (one
    item of its own unless `item` names a shared one)."""
    errors, costs = np.asarray(errors, float), np.asarray(costs, float)
    site = Site(method, name, "toy", frozenset(claims), None)
    cost = Cost("params", item or name, costs[0], costs / costs[0])
    return Curve(site, np.arange(len(errors))[::-1] + 1, errors, (cost,), None, None)


def random_curves(rng, sites, points, convex):
    out = []
    for s in range(sites):
        saved = np.cumsum(np.concatenate([[0.0], rng.uniform(1, 5, points - 1)]))
        costs = 20.0 - saved * (19.0 / saved[-1])
        if convex:
            slopes = np.sort(rng.uniform(0.01, 1.0, points - 1))       # error per unit saved grows
            errors = np.concatenate([[0.0], np.cumsum(slopes * np.diff(saved))])
        else:
            errors = np.concatenate([[0.0], np.sort(rng.uniform(0, 5, points - 1))])
        out.append(curve(f"s{s}", errors, costs))
    return out


def brute_force(curves):
    """(cost, error) of every allocation."""
    for idx in itertools.product(*[range(len(c.sizes)) for c in curves]):
        yield sum(c.costs[0].base * c.costs[0].factor[j] for c, j in zip(curves, idx)), \
            sum(c.error[j] for c, j in zip(curves, idx))


@pytest.mark.parametrize("convex", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_every_point_of_the_walk_is_optimal_for_its_cost(seed, convex):
    """Separable costs: no allocation that costs as little as a point of the walk has a lower
    estimated error (for non-convex curves too: the walk follows their lower convex hulls)."""
    rng = np.random.default_rng(seed)
    curves = random_curves(rng, sites=3, points=5, convex=convex)
    total = sum(c.costs[0].base for c in curves)
    costs = CostModel(curves, {"params": total})
    path = walk(curves, costs, "params", [1.0] * len(curves))
    assert path.steps, "there is always a move"
    options = list(brute_force(curves))
    for n in range(len(path.steps) + 1):
        cost, err = path.cost(n, "params"), path.error(n)
        best = min(e for c, e in options if c <= cost + 1e-9)
        assert err <= best + 1e-9, (n, cost, err, best)
    assert path.cost(len(path.steps), "params") == pytest.approx(min(c for c, _ in options))


def test_weights_scale_each_site_in_the_currency():
    """Two identical sites; the one whose measured sensitivity is 10x is shrunk last."""
    a = curve("a", [0, 1, 2, 3], [4, 3, 2, 1])
    b = curve("b", [0, 1, 2, 3], [4, 3, 2, 1])
    costs = CostModel([a, b], {"params": 8})
    idx, _ = budget([a, b], costs, "params", 5 / 8, [1.0, 10.0])
    assert idx == [3, 0]
    idx, _ = budget([a, b], costs, "params", 5 / 8, [10.0, 1.0])
    assert idx == [0, 3]


def test_budget_stops_at_the_goal_and_counts_fixed_costs():
    a = curve("a", [0, 0.1, 0.5, 2.0], [10, 7, 4, 1])
    costs = CostModel([a], {"params": 30})              # 20 parameters no site can shrink
    idx, path = budget([a], costs, "params", 27 / 30, [1.0])
    assert idx == [1] and path.cost(len(path.steps), "params") == pytest.approx(27)
    idx, path = budget([a], costs, "params", 0.1, [1.0])   # unreachable: everything taken
    assert idx == [3] and path.cost(len(path.steps), "params") == pytest.approx(21)


def test_a_coarse_last_move_is_refilled_to_the_budget():
    """b is shrunk first (the least error per unit saved); then a's only move, a big one, passes
    the goal by far. The refill gives b back its full size, which the budget now affords: the
    brute-force optimum within the budget, and the path ends there."""
    a = curve("a", [0, 1.0], [10, 0.001])
    b = curve("b", [0, 0.1], [10, 8])
    c = curve("c", [0, 5.0], [10, 9])
    costs = CostModel([a, b, c], {"params": 30})
    walked = walk([a, b, c], costs, "params", [1.0] * 3, goal=22)
    assert walked.at(len(walked.steps)) == [1, 1, 0]   # the walk alone: 18 of 22, error 1.1
    idx, path = budget([a, b, c], costs, "params", 22 / 30, [1.0] * 3)
    assert idx == [1, 0, 0]
    assert path.cost(len(path.steps), "params") == pytest.approx(20.001)
    assert path.error(len(path.steps)) == pytest.approx(1.0)
    best = min(e for cost, e in brute_force([a, b, c]) if cost <= 22 + 1e-9)
    assert path.error(len(path.steps)) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(6))
def test_the_refill_never_leaves_the_budget_nor_adds_error(seed):
    rng = np.random.default_rng(seed)
    curves = random_curves(rng, sites=3, points=5, convex=False)
    total = sum(c.costs[0].base for c in curves)
    costs = CostModel(curves, {"params": total})
    for fraction in (0.3, 0.5, 0.7):
        walked = walk(curves, costs, "params", [1.0] * 3, goal=fraction * total)
        idx, path = budget(curves, costs, "params", fraction, [1.0] * 3)
        reached = path.cost(len(path.steps), "params")
        assert reached <= max(fraction * total, walked.cost(len(walked.steps), "params")) + 1e-9
        assert path.error(len(path.steps)) <= walked.error(len(walked.steps)) + 1e-9
        assert path.error(len(path.steps)) == pytest.approx(sum(c.error[j] for c, j in zip(curves, idx)))


def test_shared_items_multiply():
    """A weight between two sites (a Conv between two channel groups) scales with both."""
    sa, sb = Site("id", "a", "group", frozenset(), None), Site("id", "b", "group", frozenset(), None)
    fa, fb = np.array([1.0, 0.5]), np.array([1.0, 0.25])
    a = Curve(sa, np.array([2, 1]), np.array([0.0, 0.1]), (Cost("params", "w", 100.0, fa),))
    b = Curve(sb, np.array([4, 1]), np.array([0.0, 0.1]), (Cost("params", "w", 100.0, fb),))
    costs = CostModel([a, b], {"params": 100.0})
    assert costs.total("params", [1, 1]) == pytest.approx(12.5)
    assert costs.site_costs("params", 0, [0, 1]).tolist() == pytest.approx([25.0, 12.5])


def test_sites_of_two_methods_claiming_one_weight_exclude_each_other():
    grp = curve("g", [0, 0.1, 0.2], [10, 6, 2], method="id", claims={"w"})
    lay = curve("l", [0, 0.05, 0.3], [10, 5, 3], method="lowrank", claims={"w"}, item="l")
    other = curve("o", [0, 0.01, 0.02], [10, 5, 1], method="lowrank", claims={"v"})
    curves = [grp, lay, other]
    path = walk(curves, CostModel(curves, {"params": 30}), "params", [1, 1, 1])
    final = path.at(len(path.steps))
    assert final[2] == 2 and (final[0] == 0) != (final[1] == 0)   # exactly one of the two moved
    idx, reasons = per_site(curves, lambda c: 1)
    assert idx == [1, 0, 1] and "compressed by id toy g" in reasons[1]


def test_an_early_small_step_does_not_lock_out_a_site_that_saves_more():
    """A low-rank step that is cheap in error but saves little comes first; the channel group
    claiming the same weight saves far more. The walk switches: the group takes its step and the
    layer goes back to its full size, in one move, and the budget is met at the group's error."""
    lay = curve("l", [0, 0.001, 0.5], [10, 9, 8.5], method="lowrank", claims={"w"})
    grp = curve("g", [0, 0.1, 0.2], [10, 5, 2], method="id", claims={"w"})
    curves = [lay, grp]
    costs = CostModel(curves, {"params": 20})
    idx, path = budget(curves, costs, "params", 0.75, [1, 1])
    assert path.steps[0].site == 0                      # the small step is still taken first
    switch = next(s for s in path.steps if s.resets)
    assert switch.site == 1 and switch.resets == (0,)
    assert idx == [0, 1] and costs.total("params", idx) <= 15
    assert path.error(len(path.steps)) == pytest.approx(0.1)
    # every position of the path is a consistent allocation: cost and error replay from `at`
    for n in range(len(path.steps) + 1):
        at = path.at(n)
        assert not (at[0] and at[1])
        assert path.cost(n, "params") == pytest.approx(costs.total("params", at))
        assert path.error(n) == pytest.approx(sum(c.error[j] for c, j in zip(curves, at)))


def test_search_finds_the_last_passing_position_within_the_passes():
    curves = [curve(f"s{i}", np.linspace(0, 1, 30) ** 2, np.linspace(30, 1, 30)) for i in range(3)]
    costs = CostModel(curves, {"params": 90})
    path = walk(curves, costs, "params", [1, 1, 1])
    n = len(path.steps)
    calls = []
    for threshold in (1, n // 3, n - 2, n):
        calls.clear()
        evaluate = lambda pos: (calls.append(pos), 1.0 if pos <= threshold else 0.5)[1]  # noqa: E731
        pos, probes = search_path(path, "params", Target("cosine", ">=", 0.99), evaluate, passes=8, tolerance=0.0)
        assert len(calls) <= 8 and [p.position for p in probes] == calls
        assert all(p.passed == (p.position <= threshold) for p in probes)
        assert pos <= threshold and pos in calls
        # the bracket closed, or 8 passes were spent narrowing it
        assert pos == threshold or len(calls) == 8


def test_search_tries_the_smallest_step_before_giving_up():
    curves = [curve("a", np.linspace(0, 1, 40), np.linspace(40, 1, 40))]
    path = walk(curves, CostModel(curves, {"params": 40}), "params", [1])
    calls = []
    pos, probes = search_path(path, "params", Target("top1", ">=", 0.99), lambda p: (calls.append(p), 0.0)[1])
    assert pos == 0 and 1 in calls and len(calls) <= 8 and not any(p.passed for p in probes)


@pytest.mark.parametrize("timing", [lambda e: 0.8 * e, lambda e: e, lambda e: min(1.0, 1.25 * e),
                                    lambda e: 1 - 2 * (1 - e), lambda e: 1 - 0.5 * (1 - e), lambda e: 0.3 + 0.7 * e,
                                    lambda e: e * e],
                         ids=["0.8e", "e", "1.25e", "twice the savings", "half the savings", "overhead", "e^2"])
def test_budget_search_cuts_where_the_measured_ratio_meets_the_goal(timing):
    """A measured budget (`--latency-target`, here over a params path): the least compressed
    position whose measured ratio is within the goal, whether the estimate is conservative,
    exact or optimistic, proportional to the timing or not, in at most the passes given."""
    curves = [curve(f"s{i}", np.linspace(0, 1, 30) ** 2, np.linspace(30, 1, 30)) for i in range(3)]
    path = walk(curves, CostModel(curves, {"params": 90}), "params", [1, 1, 1])
    n = len(path.steps)
    full = path.start["params"]
    measured = [1.0] + [timing(path.cost(k, "params") / full) for k in range(1, n + 1)]
    want = next(k for k in range(n + 1) if measured[k] <= 0.6)
    calls = []
    pos, probes, met, closed = search_budget(path, "params", 0.6, lambda k: (calls.append(k), measured[k])[1],
                                             passes=5, tolerance=0.0)
    assert met and closed and pos == want                 # the cut itself, not just a position within
    assert len(calls) <= 5 and len(set(calls)) == len(calls) and 0 not in calls
    assert [p.position for p in probes] == calls and want in calls and want - 1 in calls
    assert all(p.cost == pytest.approx(path.cost(p.position, "params") / full) for p in probes)


def test_budget_search_says_when_its_bracket_stays_open():
    """A timing with plateaus (a step function of the estimate) can leave the bracket open after
    the passes: the position returned is measured within the goal, and `closed` says a less
    compressed one may be too."""
    curves = [curve(f"s{i}", np.linspace(0, 1, 30) ** 2, np.linspace(30, 1, 30)) for i in range(3)]
    path = walk(curves, CostModel(curves, {"params": 90}), "params", [1, 1, 1])
    full = path.start["params"]
    measured = [1.0] + [np.floor(10 * path.cost(k, "params") / full) / 10 for k in range(1, len(path.steps) + 1)]
    pos, probes, met, closed = search_budget(path, "params", 0.65, lambda k: measured[k], passes=2, tolerance=0.0)
    want = next(k for k in range(len(measured)) if measured[k] <= 0.65)
    assert met and measured[pos] <= 0.65 and len(probes) == 2
    assert not closed and pos >= want                       # two timings cannot close this bracket
    last_over = max((p.position for p in probes if not p.passed), default=0)
    assert pos - last_over > 1


def test_densify_puts_back_every_size_a_move_jumped_over():
    """A non-convex curve makes the walk jump (look-ahead along the lower convex hull); the dense
    path has every grid size in between as a position, each one a consistent allocation."""
    jumpy = curve("a", [0, 0.5, 0.55, 0.6, 0.62, 2.0], [10, 9, 8, 7, 6, 5])     # 0 -> 4 in one move
    smooth = curve("b", np.linspace(0, 1, 6) ** 2, np.linspace(12, 2, 6))
    curves = [jumpy, smooth]
    costs = CostModel(curves, {"params": 22})
    path = walk(curves, costs, "params", [1.0, 2.0])
    dense = densify(path, curves, costs, [1.0, 2.0])
    assert any(s.site == 0 and s.index == 4 for s in path.steps) and not any(s.site == 0 and s.index == 2
                                                                             for s in path.steps)
    assert len(dense.steps) > len(path.steps)
    allocations = [tuple(dense.at(n)) for n in range(len(dense.steps) + 1)]
    assert all(tuple(path.at(n)) in allocations for n in range(len(path.steps) + 1))
    for n in range(1, len(dense.steps) + 1):
        a, b = allocations[n - 1], allocations[n]
        moved = [i for i in range(2) if a[i] != b[i]]
        assert len(moved) == 1 and b[moved[0]] == a[moved[0]] + 1    # one grid size at a time
        assert dense.cost(n, "params") == pytest.approx(costs.total("params", list(b)))
        assert dense.error(n) == pytest.approx(1.0 * jumpy.error[b[0]] + 2.0 * smooth.error[b[1]])


def test_budget_search_reports_a_goal_no_position_meets():
    curves = [curve("a", np.linspace(0, 1, 40), np.linspace(40, 20, 40))]
    path = walk(curves, CostModel(curves, {"params": 40}), "params", [1])
    calls = []
    pos, probes, met, _ = search_budget(path, "params", 0.3, lambda k: (calls.append(k), 0.9)[1], passes=4)
    assert not met and pos == len(path.steps) and len(path.steps) in calls and len(calls) <= 4
    assert search_budget(path, "params", 1.0, lambda k: 1 / 0) == (0, [], True, True)   # the original is within


@pytest.mark.parametrize("text, want", [("cosine>=0.99", ("cosine", ">=", 0.99)), ("top1>=0.9", ("top1", ">=", 0.9)),
                                        ("rel_l2<=0.05", ("rel_l2", "<=", 0.05)), (" Cosine >= 1 ", ("cosine", ">=", 1.0))])
def test_parse_target(text, want):
    t = parse_target(text)
    assert (t.metric, t.op, t.value) == want


@pytest.mark.parametrize("text", ["cosine", "cosine<=0.9", "rel_l2>=0.1", "top1>=1.5", "psnr>=30", "cosine>=x"])
def test_parse_target_refuses(text):
    with pytest.raises(ValueError):
        parse_target(text)
