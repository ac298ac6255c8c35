"""Block selection on the consumers' exact output error (`methods/id/search.py`), against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxcompress.methods.id.interpolate import block_pivot_order
from onnxcompress.methods.id.search import SubsetError, block_subsets


def channels(units, block):
    return (np.asarray(sorted(units), dtype=np.int64)[:, None] * block + np.arange(block)).ravel()


def direct(g, q, keep):
    """tr(Q (G - G[:,S] G[S,S]^-1 G[S,:])), computed the obvious way."""
    keep = list(keep)
    if not keep:
        return float(np.trace(q @ g))
    r = g - g[:, keep] @ np.linalg.solve(g[np.ix_(keep, keep)], g[keep, :])
    return float(np.trace(q @ r))


def instance(seed, n=5, block=2, out=3, rows=60):
    """A full-rank Gram of n blocks and a consumer with few outputs (Q far from diagonal)."""
    rng = np.random.default_rng(seed)
    c = n * block
    z = rng.standard_normal((rows, c)) @ rng.standard_normal((c, c))
    w = rng.standard_normal((out, c))
    return z.T @ z, w.T @ w


@pytest.mark.parametrize("keep", [[], [3], [0, 1, 2], [0, 2, 4, 5, 6, 7, 9], list(range(10))])
def test_subset_error_is_the_consumer_weighted_schur_trace(keep):
    """Both ways of evaluating E (kept channels when they are fewer, dropped channels
    otherwise) agree with the direct Schur complement."""
    g, q = instance(1)
    e = SubsetError(g, q, ridge=0.0)
    assert e(np.array(keep, dtype=np.int64)) == pytest.approx(direct(g, q, keep), rel=1e-7, abs=1e-9 * e.total)


def test_subset_error_of_a_rank_deficient_gram():
    """A channel that is the sum of two others costs nothing to drop when both are kept, in
    either domain (the ridge keeps the inverse finite)."""
    rng = np.random.default_rng(2)
    z = rng.standard_normal((50, 6))
    z[:, 5] = z[:, 0] + z[:, 1]
    g = z.T @ z
    e = SubsetError(g, np.eye(6), ridge=1e-9)
    assert e(np.arange(5)) < 1e-6 * e.total          # dropped domain: one channel dropped
    assert e(np.array([0, 1, 5])) == pytest.approx(direct(g, np.eye(6), [0, 1]), rel=1e-6)


def test_greedy_block_pivoting_can_miss_the_optimum_the_search_finds():
    """Keeping 3 of 5 blocks: greedy pivoting on D G D (D = consumer column norms) keeps a set
    whose consumer output error is far above the best set's; the exhaustive search and the
    greedy-plus-swap search both keep the best set (checked by brute force)."""
    g, q = instance(0)
    d = np.sqrt(np.diag(q))
    order, _ = block_pivot_order(g * np.outer(d, d), 2)
    greedy = sorted({int(c) // 2 for c in order[:6]})
    e = SubsetError(g, q, ridge=0.0)
    brute = min(itertools.combinations(range(5), 3), key=lambda s: direct(g, q, channels(s, 2)))
    assert direct(g, q, channels(greedy, 2)) > 1.5 * direct(g, q, channels(brute, 2))
    for limit in (256, 0):   # exhaustive; greedy growth and swaps
        sets, energy = block_subsets(e, e.total, 5, 2, limit=limit)
        assert sets[3] == brute
        assert energy[3] == pytest.approx(direct(g, q, channels(brute, 2)), rel=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_search_is_the_optimum_for_every_size(seed):
    """With every subset tried, sets[m] minimizes E over all sets of m blocks; the energy curve
    is non-increasing, starts at tr(Q G) and ends at 0."""
    g, q = instance(seed, n=6, block=2, out=4)
    e = SubsetError(g, q, ridge=0.0)
    sets, energy = block_subsets(e, e.total, 6, 2, limit=10**6)
    assert energy[0] == pytest.approx(np.trace(q @ g)) and energy[-1] == 0.0
    assert np.all(np.diff(energy) <= 0)
    for m in range(1, 6):
        best = min(direct(g, q, channels(s, 2)) for s in itertools.combinations(range(6), m))
        assert len(sets[m]) == m and energy[m] == pytest.approx(best, rel=1e-7)


def test_swap_search_never_does_worse_than_greedy_growth():
    """Where subsets are too many to try (limit 0), each size's set is at least as good as
    growing the previous size's set by its best block, and never better than the optimum."""
    g, q = instance(5, n=7, block=2, out=3)
    e = SubsetError(g, q, ridge=0.0)
    sets, energy = block_subsets(e, e.total, 7, 2, limit=0)
    for m in range(1, 7):
        grown = min(e(channels((*sets[m - 1], u), 2)) for u in range(7) if u not in sets[m - 1])
        best = min(e(channels(s, 2)) for s in itertools.combinations(range(7), m))
        assert best * (1 - 1e-9) <= energy[m] <= grown * (1 + 1e-9)


# ---- the consumer as the error sees it: through a post-LN residual join ----

def test_layer_norm_after_a_residual_join_reweighs_the_consumer():
    """In a post-LN block the error W e of an exit's consumer lands in LN(x + W e + b); to first
    order that moves the output by Gamma (P - u u^T) W e / sigma (P removes the mean over the
    outputs, u is the token's normalized x / sqrt(C)), so both the attention and the FFN group
    weigh their consumer by Gamma P W (the per-token 1 / sigma and u u^T left out); in `attention`,
    whose residual Add is the graph output, the consumer is W itself."""
    from onnxcompress.api import shapes_at
    from onnxcompress.core.graph import GraphIndex
    from onnxcompress.core.normalize import normalize
    from onnxcompress.methods.id.groups import find_groups
    from onnxcompress.methods.id.select import consumer_gram, consumer_norms
    import graphs

    def index(model, feed):
        norm = normalize(model)
        return GraphIndex(norm, *shapes_at(norm, feed))

    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((1, 5, 8)).astype(np.float32), "mask": np.zeros((1, 1, 1, 5), np.float32)}
    g = index(graphs.post_ln_encoder(), feed)
    groups = find_groups(g).groups
    assert len(groups) == 2
    for grp in groups:
        (e,) = grp.exits
        (mix,) = grp.mixes(e.tensor)
        w = np.moveaxis(g.const(mix.tensor), mix.axis, -1).astype(np.float64)      # out x C
        lns = [n for n in g.nodes if n.op_type == "LayerNormalization"]   # after attn.add, after ffn.add
        ln = lns[0] if "attn.q" in grp.producers else lns[1]
        gamma = g.const(ln.input[1]).astype(np.float64)
        seen = gamma[:, None] * (w - w.mean(axis=0))
        np.testing.assert_allclose(consumer_gram(g, grp, e.tensor), seen.T @ seen, rtol=1e-10)
        np.testing.assert_allclose(consumer_norms(g, grp, e.tensor), np.linalg.norm(seen, axis=0), rtol=1e-10)
    feed = {"x": rng.standard_normal((1, 5, 16)).astype(np.float32), "mask": np.zeros((1, 1, 1, 5), np.float32)}
    g = index(graphs.attention(), feed)
    (grp,) = find_groups(g).groups
    (e,) = grp.exits
    (mix,) = grp.mixes(e.tensor)
    w = np.moveaxis(g.const(mix.tensor), mix.axis, -1).astype(np.float64)
    np.testing.assert_allclose(consumer_gram(g, grp, e.tensor), w.T @ w, rtol=1e-10)


def test_layer_norm_moves_by_gamma_p_w_e_over_sigma_to_first_order():
    """The linearization the reweighting rests on: LN(x + d) - LN(x) = Gamma (P - u u^T) d /
    sigma(x) + O(|d|^2), u = (x - mean) / (sigma sqrt(C)) (LayerNormalization over the last
    axis, no epsilon); u is orthogonal to the means, so the rank-one term only removes the
    component of P d along the token's own normalized x."""
    rng = np.random.default_rng(1)
    x, d, gamma = rng.standard_normal(16) * 3 + 1, rng.standard_normal(16) * 1e-5, rng.standard_normal(16)

    def ln(v):
        return gamma * (v - v.mean()) / v.std()

    u = (x - x.mean()) / (x.std() * np.sqrt(16))
    pd = d - d.mean()
    np.testing.assert_allclose(ln(x + d) - ln(x), gamma * (pd - u * (u @ pd)) / x.std(), rtol=1e-3, atol=1e-12)


def test_a_fixed_size_searches_only_that_size():
    """With `search` = {3}, size 3 gets the optimum and every other size the first blocks of the
    given order, each with its own E (so the curve says what each kept set costs)."""
    g, q = instance(0)
    e = SubsetError(g, q, ridge=0.0)
    order = np.array([4, 1, 3, 0, 2])
    sets, energy = block_subsets(e, e.total, 5, 2, limit=256, order=order, search={3})
    brute = min(itertools.combinations(range(5), 3), key=lambda s: direct(g, q, channels(s, 2)))
    assert sets[3] == brute
    for m in (1, 2, 4):
        assert sets[m] == tuple(sorted(order[:m]))
        assert energy[m] == pytest.approx(direct(g, q, channels(order[:m], 2)), rel=1e-7)
