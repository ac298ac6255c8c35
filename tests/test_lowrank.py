"""Low-rank solvers against direct computations, planted structure and independent optima."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from onnxcompress.methods.lowrank import solvers as lr


def rng(seed):
    return np.random.default_rng(seed)


def gram_problem(out=5, inp=4, n=50, seed=0):
    """W (out x in), calibration rows X (n x in) with unequal channel scales, G = X^T X."""
    r = rng(seed)
    w = r.standard_normal((out, inp))
    x = r.standard_normal((n, inp)) @ r.standard_normal((inp, inp)) * np.array([3.0, 1.0, 0.3, 0.1])[:inp]
    return w, x, x.T @ x


def projector_distance(a, b):
    """Spectral norm of the difference of the orthogonal projectors: sin of the largest angle."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


def spectra():
    w, x, g = gram_problem(out=6, inp=4, seed=1)
    e = rng(2).standard_normal((9, 4))
    counts = np.array([50, 0, 3, 7, 0, 1, 20, 4, 9])
    wide = rng(3).standard_normal((4, 9))                  # vocabulary smaller than d: SVD path
    xw = rng(4).standard_normal((30, 6))                   # out < in
    return {"svd": (lr.svd(w), w), "activation_aware": (lr.activation_aware(w, g), w),
            "activation_aware_wide": (lr.activation_aware(w.T, xw.T @ xw), w.T),
            "frequency_weighted": (lr.frequency_weighted(e, counts), e),
            "frequency_weighted_wide": (lr.frequency_weighted(wide, [5, 0, 1, 2]), wide)}


@pytest.mark.parametrize("name", ["svd", "activation_aware", "activation_aware_wide", "frequency_weighted",
                                  "frequency_weighted_wide"])
def test_spectrum_full_rank_and_error_curve(name):
    spec, w = spectra()[name]
    m = min(w.shape)
    assert spec.left.shape == (w.shape[0], m) and spec.right.shape == (m, w.shape[1])
    a, b = spec.factors(m)
    np.testing.assert_allclose(a @ b, w, atol=1e-12 * np.abs(w).max())
    assert spec.error.shape == (m + 1,) and spec.error[0] == 1.0
    assert spec.error[-1] < 1e-12
    assert np.all(np.diff(spec.error) <= 0)
    assert spec.factors(0)[0].shape == (w.shape[0], 0)
    with pytest.raises(ValueError):
        spec.factors(m + 1)
    assert spec.rank_for(0.0) <= m and spec.error[spec.rank_for(0.3)] <= 0.3


def test_svd_error_is_the_frobenius_error():
    w = rng(3).standard_normal((7, 5))
    spec = lr.svd(w)
    for r in range(6):
        a, b = spec.factors(r)
        assert spec.error[r] == pytest.approx(np.sum((w - a @ b) ** 2) / np.sum(w ** 2), abs=1e-12)


def test_zero_weight_has_nothing_to_lose():
    spec = lr.svd(np.zeros((3, 4)))
    assert np.all(spec.error == 0) and np.all(spec.factors(2)[0] == 0)
    assert lr.output_error(np.zeros((3, 4)), np.zeros((3, 1)), np.zeros((1, 4)), np.eye(4)) == 0.0


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_activation_aware_is_the_optimum(rank):
    """Independent optimum: tr(D G D^T) = ||W X^T - A B X^T||_F^2, and A B X^T can be any rank-r
    (out x n) matrix whose rows lie in the column space of X, which is where the rows of W X^T
    already lie; so by Eckart-Young the optimum is the tail of the singular values of W X^T
    (an SVD of the n-row output matrix, no Cholesky, no ridge). A local optimizer from random
    starts on the raw (A, B) objective must not find anything better either."""
    w, x, g = gram_problem()
    spec = lr.activation_aware(w, g)
    a, b = spec.factors(rank)
    ours = lr.output_error(w, a, b, g)
    sigma = np.linalg.svd(w @ x.T, compute_uv=False)
    best = np.sum(sigma[rank:] ** 2) / np.sum(sigma ** 2)
    assert ours <= best + 1e-9
    assert ours == pytest.approx(best, rel=1e-4, abs=1e-9)
    assert spec.error[rank] == pytest.approx(ours, rel=1e-9, abs=1e-14)
    plain = lr.output_error(w, *lr.svd(w).factors(rank), g)
    assert ours <= plain + 1e-12 and ours < 0.9 * plain

    out, inp = w.shape
    def objective(theta):
        aa, bb = theta[:out * rank].reshape(out, rank), theta[out * rank:].reshape(rank, inp)
        return lr.output_error(w, aa, bb, g)
    r = rng(10 + rank)
    for _ in range(5):
        found = scipy.optimize.minimize(objective, r.standard_normal(rank * (out + inp)), method="BFGS")
        assert found.fun >= ours - 1e-9


def rank_deficient_problem(seed=4):
    """Inputs 0..4: channel 2 dead (always zero), channel 4 duplicates channel 1."""
    r = rng(seed)
    x = r.standard_normal((60, 5))
    x[:, 2] = 0.0
    x[:, 4] = x[:, 1]
    return r.standard_normal((6, 5)), x, x.T @ x


def test_activation_aware_with_dead_and_duplicated_inputs():
    w, x, g = rank_deficient_problem()
    spec = lr.activation_aware(w, g)
    assert np.all(np.isfinite(spec.left)) and np.all(np.isfinite(spec.right))
    assert np.abs(spec.right).max() < 1e3 and np.abs(spec.left).max() < 1e3 * np.abs(w).max()
    a, b = spec.factors(3)       # 3 = numerical rank of the data
    np.testing.assert_allclose(a @ b @ x.T, w @ x.T, atol=1e-5 * np.abs(w @ x.T).max())
    assert spec.error[3] < 1e-10 and spec.error[2] > 1e-3
    a, b = spec.factors(5)
    np.testing.assert_allclose(a @ b, w, atol=1e-8)


def test_activation_aware_without_data_is_plain_svd():
    w = rng(5).standard_normal((4, 3))
    spec, plain = lr.activation_aware(w, np.zeros((3, 3))), lr.svd(w)
    np.testing.assert_allclose(spec.error, plain.error, atol=1e-12)
    np.testing.assert_allclose(np.matmul(*spec.factors(2)), np.matmul(*plain.factors(2)), atol=1e-12)
    with pytest.raises(ValueError):
        lr.activation_aware(w, np.eye(4))


def embedding_problem(seed=6):
    """20 frequent rows in a 2-D subspace (counts 1000), 80 rare random rows (counts 0 or 1) that
    are larger, so the plain SVD is dominated by the rare ones."""
    r = rng(seed)
    basis = np.linalg.qr(r.standard_normal((8, 2)))[0]
    frequent = r.standard_normal((20, 2)) @ basis.T
    rare = 2.0 * r.standard_normal((80, 8))
    counts = np.r_[np.full(20, 1000), r.integers(0, 2, 80)]
    return np.vstack([frequent, rare]), counts


def test_frequency_weighting_keeps_frequent_rows():
    e, counts = embedding_problem()
    a, b = lr.frequency_weighted(e, counts).factors(2)
    pa, pb = lr.svd(e).factors(2)
    def rel(approx):
        return np.linalg.norm(approx[:20] - e[:20]) / np.linalg.norm(e[:20])
    assert rel(a @ b) < 0.03 and rel(pa @ pb) > 0.3
    unseen = counts == 0
    assert unseen.any() and np.all(np.isfinite(a[unseen]))
    np.testing.assert_allclose(a, e @ b.T, atol=1e-12)          # every row projected, seen or not
    assert np.all(lr.token_weights(counts) > 0)
    spec = lr.frequency_weighted(e, counts)
    w = lr.token_weights(counts)
    for r in range(9):
        aa, bb = spec.factors(r)
        direct = np.sum(w * np.sum((e - aa @ bb) ** 2, axis=1)) / np.sum(w * np.sum(e ** 2, axis=1))
        assert spec.error[r] == pytest.approx(direct, abs=1e-12)


def test_unseen_rows_only_steer_the_subspace_through_smoothing():
    e, counts = embedding_problem()
    counts[20:] = 0
    a, b = lr.frequency_weighted(e, counts, smoothing=0.0).factors(2)
    np.testing.assert_allclose(a[:20] @ b, e[:20], atol=1e-10)   # frequent rows exact
    assert np.all(np.isfinite(a)) and np.abs(a[20:]).max() > 0.1  # unseen rows still projected
    a, b = lr.frequency_weighted(e, counts, smoothing=1.0).factors(2)
    assert np.linalg.norm(a[:20] @ b - e[:20]) > 0.05 * np.linalg.norm(e[:20])


def test_default_smoothing_is_good_turing():
    counts = np.array([3, 1, 1, 0, 0, 5])                   # N = 10, two singletons: alpha = 0.2
    np.testing.assert_allclose(lr.token_weights(counts), counts + 0.2 * 10 / 6)
    well_sampled = np.array([100, 200, 0, 300])             # no singletons: alpha = MIN_SMOOTHING
    np.testing.assert_allclose(lr.token_weights(well_sampled), well_sampled + lr.MIN_SMOOTHING * 150)
    np.testing.assert_allclose(lr.token_weights(counts, 0.5), counts + 0.5 * 10 / 6)
    np.testing.assert_allclose(lr.token_weights(np.zeros(4)), np.ones(4))


def test_infinite_smoothing_is_plain_svd():
    e, counts = embedding_problem()
    spec, plain = lr.frequency_weighted(e, counts, smoothing=np.inf), lr.svd(e)
    np.testing.assert_allclose(spec.error, plain.error, atol=1e-12)
    for r in (1, 3, 8):
        np.testing.assert_allclose(np.matmul(*spec.factors(r)), np.matmul(*plain.factors(r)), atol=1e-10)
    with pytest.raises(ValueError):
        lr.frequency_weighted(e, counts[:-1])
    with pytest.raises(ValueError):
        lr.token_weights(-counts)


def outlier_problem(seed=7, d=10, k=2, n=200, outliers=6):
    """Inliers in a k-dim subspace plus noise 0.01, a few rows of norm 20 in random directions."""
    r = rng(seed)
    basis = np.linalg.qr(r.standard_normal((d, k)))[0]
    inliers = r.standard_normal((n, k)) @ basis.T + 0.01 * r.standard_normal((n, d))
    far = r.standard_normal((outliers, d))
    far *= 20.0 / np.linalg.norm(far, axis=1, keepdims=True)
    return np.vstack([inliers, far]), basis, n


@pytest.mark.parametrize("rows", [206, 7])   # tall (Gram route) and wide (SVD route)
def test_lp2_is_the_weighted_svd_subspace(rows):
    x = outlier_problem()[0][:rows]
    w = rng(8).uniform(0.1, 3.0, len(x))
    for weights in (None, w):
        sw = np.ones(len(x)) if weights is None else np.sqrt(weights)
        vt = np.linalg.svd(sw[:, None] * x)[2]
        v = lr.lp_subspace(x, 3, 2.0, row_weights=weights)
        assert projector_distance(v, vt[:3].T) < 1e-10
        np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)


def test_l1_recovers_inliers_where_l2_does_not():
    x, basis, n = outlier_problem()
    v1 = lr.lp_subspace(x, 2, 1.0)
    v2 = lr.lp_subspace(x, 2, 2.0)
    assert projector_distance(v1, basis) < 0.05
    assert projector_distance(v2, basis) > 0.3
    assert lr.lp_objective(x, v1, 1.0) < lr.lp_objective(x, v2, 1.0)
    a, b = lr.lp_factors(x, 2, 1.0)
    assert a.shape == (len(x), 2) and b.shape == (2, 10)
    np.testing.assert_allclose(a @ b, x @ v1 @ v1.T, atol=1e-12)


def test_irls_objective_never_increases():
    x, _, _ = outlier_problem(seed=9)
    for p in (1.0, 1.5):
        v, history = lr._lp_irls(x, 2, p)
        assert len(history) > 2
        assert np.all(np.diff(history) <= 0) and history[-1] < history[0]
        assert history[-1] == pytest.approx(lr.lp_objective(x, v, p), rel=1e-12)


def test_row_weights_combine_with_lp():
    x, basis, n = outlier_problem()
    w = np.r_[np.ones(n), np.zeros(len(x) - n)]
    assert projector_distance(lr.lp_subspace(x, 2, 2.0, row_weights=w), basis) < 0.05
    assert projector_distance(lr.lp_subspace(x, 2, 1.5, row_weights=w), basis) < 0.05
    assert lr.lp_objective(x, basis, 1.0, row_weights=w) == pytest.approx(lr.lp_objective(x[:n], basis, 1.0))
    assert lr.lp_objective(x, basis, 1.0, row_weights=2 * w) == pytest.approx(2 * lr.lp_objective(x[:n], basis, 1.0))


@pytest.mark.parametrize("p, rank", [(0.5, 2), (2.5, 2), (1.0, -1), (1.0, 11), (1.0, 1.5)])
def test_lp_rejects_bad_arguments(p, rank):
    x, _, _ = outlier_problem()
    with pytest.raises(ValueError):
        lr.lp_subspace(x, rank, p)


def test_lp_edge_ranks():
    x, _, _ = outlier_problem()
    assert lr.lp_subspace(x, 0, 1.0).shape == (10, 0)
    v = lr.lp_subspace(x, 10, 1.0)
    assert lr.lp_objective(x, v, 1.0) < 1e-10
    with pytest.raises(ValueError):
        lr.lp_subspace(x, 2, 1.0, row_weights=np.ones(3))
