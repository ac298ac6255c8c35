"""The ID maths and the streamed statistics, against direct computations."""
from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.core.stats import GramAccumulator
from onnxcompress.methods.id.interpolate import (best_residual, interpolation_matrix, pivot_order, relative_error,
                                      selection_matrix)


def low_rank(rows=200, channels=12, rank=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, channels))


def schur_trace(g, s):
    s = list(s)
    if not s:
        return float(np.trace(g))
    return float(np.trace(g - g[:, s] @ np.linalg.solve(g[np.ix_(s, s)], g[s, :])))


def test_residual_curve_matches_schur_complements():
    z = np.random.default_rng(1).standard_normal((300, 10)) * np.arange(1, 11)
    g = z.T @ z
    order, residual = pivot_order(g)
    assert sorted(order) == list(range(10))
    for k in range(11):
        assert residual[k] == pytest.approx(schur_trace(g, order[:k]), rel=1e-8, abs=1e-8 * np.trace(g))
    assert np.all(np.diff(residual) <= 1e-9)


def test_first_pivot_is_the_largest_column():
    z = np.random.default_rng(2).standard_normal((100, 6))
    z[:, 3] *= 10
    order, _ = pivot_order(z.T @ z)
    assert order[0] == 3


def test_exact_for_a_low_rank_activation():
    z = low_rank(rank=5)
    g = z.T @ z
    order, residual = pivot_order(g)
    assert residual[5] < 1e-9 * residual[0]
    keep = np.sort(order[:5])
    t = interpolation_matrix(g, keep)
    np.testing.assert_allclose(z[:, keep] @ t, z, atol=1e-8 * np.abs(z).max())
    np.testing.assert_array_equal(t[:, keep], np.eye(5))


def test_dead_and_duplicated_channels():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((100, 4))
    z = np.concatenate([base, np.zeros((100, 2)), base[:, :2] * 3.0], axis=1)  # 4 live, 2 dead, 2 copies
    g = z.T @ z
    order, residual = pivot_order(g)
    assert not set(order[:4]) & {4, 5}  # dead channels are never picked
    assert residual[4] < 1e-10 * residual[0]
    keep = np.sort(order[:4])
    t = interpolation_matrix(g, keep)
    np.testing.assert_allclose(z[:, keep] @ t, z, atol=1e-9)
    np.testing.assert_allclose(t[:, 4:6], 0.0, atol=1e-12)
    t = interpolation_matrix(g, np.arange(4))  # copies are rebuilt from their originals
    np.testing.assert_allclose(t[:2, 6:], 3.0 * np.eye(2), atol=1e-9)


def test_interpolation_is_least_squares():
    z = np.random.default_rng(4).standard_normal((80, 7))
    keep = np.array([0, 2, 5])
    t = interpolation_matrix(z.T @ z, keep, ridge=0.0)
    direct = np.linalg.lstsq(z[:, keep], z, rcond=None)[0]
    np.testing.assert_allclose(t, direct, atol=1e-8)


def test_selection_never_beats_the_best_rank_k():
    z = np.random.default_rng(5).standard_normal((200, 9)) @ np.diag(np.linspace(3, 0.1, 9))
    g = z.T @ z
    _, residual = pivot_order(g)
    best = best_residual(g)
    assert np.all(best <= residual + 1e-9)
    assert best[0] == pytest.approx(np.trace(g))


def test_relative_error_and_selection_matrix():
    assert relative_error(np.array([4.0, 1.0, 0.0])).tolist() == [1.0, 0.5, 0.0]
    t = selection_matrix(4, np.array([1, 3]))
    np.testing.assert_array_equal(t, [[0, 1, 0, 0], [0, 0, 0, 1]])


def test_gram_accumulator_streams_to_the_direct_result():
    rng = np.random.default_rng(6)
    blocks = [rng.standard_normal((n, 5)).astype(np.float32) for n in (3, 50, 1, 17)]
    acc = GramAccumulator(5)
    for b in blocks:
        acc.add(b)
    stats = acc.result()
    z = np.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(stats.gram, z.T @ z, rtol=1e-12)
    np.testing.assert_allclose(stats.sums, z.sum(0), rtol=1e-12)
    assert stats.rows == len(z)
    np.testing.assert_array_equal(stats.gram, stats.gram.T)


def test_channel_rows_caps_large_maps_with_real_positions():
    from onnxcompress.core.stats import channel_rows
    value = np.random.default_rng(7).standard_normal((2, 3, 10, 10)).astype(np.float32)
    every = channel_rows(value, -3, 0, np.random.default_rng(0))
    assert every.shape == (200, 3)
    np.testing.assert_array_equal(every[0], value[0, :, 0, 0])
    some = channel_rows(value, -3, 50, np.random.default_rng(0))
    assert some.shape == (50, 3)
    positions = {tuple(r) for r in every.tolist()}
    assert all(tuple(r) in positions for r in some.tolist())
    assert len({tuple(r) for r in some.tolist()}) == 50  # without replacement


@pytest.mark.parametrize("how", ["id", "norm", "general"])
def test_selection_error_is_the_weighted_residual(how):
    """`selection_error` against the residual computed from the activations themselves, for the
    LS interpolation, the plain selection, and a T whose kept columns are not the identity."""
    from onnxcompress.methods.id.select import GroupStats, selection_error
    rng = np.random.default_rng(6)
    z = rng.standard_normal((120, 8)) @ rng.standard_normal((8, 8))
    d = rng.uniform(0.5, 2.0, 8)
    g = z.T @ z
    keep = np.array([1, 4, 6])
    t = {"id": interpolation_matrix(g, keep, ridge=0.0), "norm": selection_matrix(8, keep),
         "general": rng.standard_normal((3, 8))}[how]
    state = GroupStats(None, g, {"x": d}, {"x": g}, {}, np.arange(8), np.zeros(9))
    direct = np.linalg.norm((z - z[:, keep] @ t) * d) / np.linalg.norm(z * d)
    assert selection_error(state, keep, {"x": t}) == pytest.approx(direct, rel=1e-9)


def test_deferred_flushes_give_the_same_gram_to_the_bit(monkeypatch):
    """A deferred accumulator only buffers in `add` (its caller runs the updates, side by side
    with other accumulators') and makes the same dsyrk updates as one that updates itself: one
    every `capacity` rows, wherever the added blocks begin and end, then the rest. The Gram is
    identical, and equal to Z^T Z."""
    import onnxcompress.core.stats as stats_mod
    monkeypatch.setattr(stats_mod, "_BUFFER_ELEMENTS", 60)  # an update every 12 rows of 5
    updates = []
    dsyrk = stats_mod.blas.dsyrk

    def counted(alpha, a, **kw):
        updates.append(a.shape[1])  # rows in this update
        return dsyrk(alpha, a, **kw)
    monkeypatch.setattr(stats_mod.blas, "dsyrk", counted)
    rng = np.random.default_rng(7)
    blocks = [rng.standard_normal((n, 5)).astype(np.float32) for n in (7, 9, 3, 12, 5, 8, 30)]
    auto, deferred = GramAccumulator(5), GramAccumulator(5, deferred=True)
    assert auto.capacity == 12
    by_caller = 0
    for b in blocks:
        auto.add(b)
        before = len(updates)
        deferred.add(b)
        assert len(updates) == before                       # no update inside a deferred add
        if deferred.due:
            deferred.flush()
            by_caller += 1
        assert not auto.due and not deferred.due
    a, d = auto.result(), deferred.result()
    total = sum(len(b) for b in blocks)
    assert by_caller >= 4
    assert updates.count(12) == 2 * (total // 12) and sum(updates) == 2 * total   # full updates, then the rest
    np.testing.assert_array_equal(a.gram, d.gram)
    z = np.concatenate(blocks).astype(np.float64)
    np.testing.assert_allclose(d.gram, z.T @ z, rtol=1e-12)
    np.testing.assert_array_equal(d.gram, d.gram.T)
    assert a.rows == d.rows == total
    np.testing.assert_allclose(d.sums, z.sum(axis=0), rtol=1e-12)


def test_a_deferred_buffer_grows_by_half_past_capacity_not_block_by_block(monkeypatch):
    """The buffer is allocated at `capacity` rows by the first block (lazily mapped, not grown
    by doubling: each growth faults in and copies it). Before its caller's flush, a deferred
    accumulator takes block after block past `capacity`: the buffer then grows by half its size
    at a time, not once per block."""
    import onnxcompress.core.stats as stats_mod
    monkeypatch.setattr(stats_mod, "_BUFFER_ELEMENTS", 400)  # capacity 100 rows of 4
    acc = GramAccumulator(4, deferred=True)
    grows = []
    grow = acc._grow
    monkeypatch.setattr(acc, "_grow", lambda rows: grows.append(rows) or grow(rows))
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal((5, 4)) for _ in range(60)]            # 300 rows, no flush
    for b in blocks:
        acc.add(b)
    assert acc.due and acc._buffered == 300
    assert grows[0] == 100                     # the first block allocates the whole capacity
    assert all(b >= a + a // 2 for a, b in zip(grows, grows[1:]))   # then by half at a time
    assert len(grows) <= 4
    result = acc.result()
    z = np.concatenate(blocks)
    np.testing.assert_allclose(result.gram, z.T @ z, rtol=1e-12)
