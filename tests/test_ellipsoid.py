"""The Löwner-ellipsoid l_p solver (`--solver ellipsoid`) against independent optima and IRLS."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import scipy.optimize

from onnxcompress import compress
from onnxcompress.core.config import Config
from onnxcompress.core.errors import UsageError
from onnxcompress.methods.lowrank import ellipsoid as el
from onnxcompress.methods.lowrank import solvers as lr


def rng(seed):
    return np.random.default_rng(seed)


def projector_distance(a, b):
    return float(np.linalg.norm(a @ a.T - b @ b.T, 2))


@pytest.mark.parametrize("seed,n,d", [(0, 12, 2), (1, 40, 3), (2, 25, 4), (3, 200, 5)])
def test_mvee_contains_every_row_within_the_volume_factor(seed, n, d):
    x = rng(seed).standard_normal((n, d)) * rng(seed + 10).uniform(0.2, 3.0, d)
    eps = 1e-2
    e = el.mvee(x, eps=eps)
    assert e.contains(x).all() and e.contains(-x).all()
    assert e.gap <= eps
    best = el.mvee(x, eps=1e-10)                       # high-precision reference
    excess = e.log_volume() - best.log_volume()
    assert -1e-9 <= excess <= 0.5 * d * np.log1p(eps)
    # at the optimum every support point is on the boundary (kappa_i = d where u_i > 0)
    kappa = np.sum(x * np.linalg.solve(best.shape, x.T).T, axis=1)
    assert np.allclose(kappa[best.weights > 1e-6], d, rtol=1e-6)


def test_mvee_matches_a_brute_force_solve_in_the_plane():
    """min -log det A over symmetric 2x2 A > 0 with y^T A y <= 1 for every +-row (SLSQP)."""
    x = rng(5).standard_normal((15, 2)) @ np.array([[2.0, 0.5], [0.0, 0.7]])

    def unpack(t):
        low = np.array([[np.exp(t[0]), 0.0], [t[1], np.exp(t[2])]])
        return low @ low.T

    res = scipy.optimize.minimize(lambda t: -2 * (t[0] + t[2]), np.array([-1.0, 0.0, -1.0]),
                                  constraints={"type": "ineq",
                                               "fun": lambda t: 1 - np.sum((x @ unpack(t)) * x, axis=1)},
                                  method="SLSQP", options={"ftol": 1e-12, "maxiter": 500})
    assert res.success
    a = unpack(res.x)
    e = el.mvee(x, eps=1e-8)
    assert np.allclose(np.linalg.inv(e.shape) / e.scale, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3, 5])
def test_mvee_of_known_shapes(d):
    cross = np.eye(d)                                  # +-e_i: the unit ball
    e = el.mvee(cross, eps=1e-9)
    assert np.allclose(e.shape * e.scale, np.eye(d), atol=1e-7)
    box = np.array([[1.0, 1.0], [1.0, -1.0]]) * np.array([3.0, 0.5])   # rectangle: semi-axes 3 sqrt2, 0.5 sqrt2
    e = el.mvee(box, eps=1e-9)
    assert np.allclose(np.sort(np.linalg.eigvalsh(e.shape * e.scale)), [0.5, 18.0], rtol=1e-6)


def test_mvee_rejects_points_that_do_not_span():
    with pytest.raises(ValueError, match="span"):
        el.mvee(np.array([[1.0, 2.0], [2.0, 4.0]]))


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0])
def test_lewis_weights_sandwich_the_lp_norm(p):
    x = rng(7).standard_normal((60, 4)) * np.array([5.0, 1.0, 1.0, 0.2])
    x[:3] *= 20                                        # outlying rows
    w = el.lewis_weights(x, p)
    assert w.sum() == pytest.approx(4, rel=1e-8)
    q = x.T @ (x * (w ** (1 - 2 / p))[:, None])
    assert np.allclose(np.einsum("ij,ij->i", x @ np.linalg.inv(q), x) ** (p / 2), w, rtol=1e-6)
    z = rng(8).standard_normal((4, 500))
    ell = np.sqrt(np.sum(z * (q @ z), axis=0))
    lp = np.sum(np.abs(x @ z) ** p, axis=0) ** (1 / p)
    assert np.all(ell <= lp * (1 + 1e-8))
    assert np.all(lp <= 4 ** (1 / p - 0.5) * ell * (1 + 1e-8))
    if p == 2:                                          # leverage scores
        assert np.allclose(w, np.einsum("ij,ij->i", x @ np.linalg.inv(x.T @ x), x))


def test_p2_is_the_svd_subspace():
    x = rng(9).standard_normal((50, 6)) * np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    v = el.subspace(x, 3, 2.0).basis
    assert projector_distance(v, lr.svd(x).right[:3].T) < 1e-8


def planted(seed, n=300, d=20, k=3, outliers=10, scale=30.0):
    """Rows near a k-dimensional subspace, and a few rows far off it."""
    r = rng(seed)
    x = r.standard_normal((n, k)) @ r.standard_normal((k, d)) + 0.05 * r.standard_normal((n, d))
    x[:outliers] += scale * r.standard_normal((outliers, d))
    return x, k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("p", [1.0, 1.5])
def test_ellipsoid_cost_within_the_bound_of_irls_on_planted_outliers(seed, p):
    x, k = planted(seed)
    sub = el.subspace(x, k, p)
    v = sub.basis
    assert np.allclose(v.T @ v, np.eye(k), atol=1e-10)
    cost = lr.lp_objective(x, v, p)
    irls = lr.lp_objective(x, lr.lp_subspace(x, k, p), p)
    d = x.shape[1]
    assert sub.bound == pytest.approx((d * (d - k)) ** (1 - p / 2))
    assert cost <= sub.bound * irls                    # optimum <= IRLS, so this is implied by the bound
    assert sub.ellipsoid.gap <= 1e-3
    if p == 1:                                         # robust: the outliers do not pull it as they pull l_2
        assert cost < lr.lp_objective(x, lr.svd(x).right[:k].T, p)


def test_row_weights_are_rescaled_rows():
    x, k = planted(4, n=80, d=8)
    om = rng(5).integers(0, 5, len(x)).astype(float)
    a = el.subspace(x, k, 1.0, row_weights=om).basis
    b = el.subspace(x * om[:, None], k, 1.0).basis     # p = 1: omega dist = dist(omega x)
    assert projector_distance(a, b) < 1e-8


def test_wide_and_deficient_rows():
    x = rng(6).standard_normal((5, 12))                # 5 rows in R^12
    a, b = el.lp_factors(x, 5, 1.0)
    assert np.allclose(a @ b, x, atol=1e-9)            # rank = number of rows: exact
    a, b = el.lp_factors(x, 2, 1.0)
    assert a.shape == (5, 2) and b.shape == (2, 12)
    assert np.allclose(b @ b.T, np.eye(2), atol=1e-10)
    a, b = el.lp_factors(np.zeros((4, 3)), 2, 1.0)
    assert np.allclose(a @ b, 0)
    with pytest.raises(ValueError):
        el.subspace(x, 2, 2.5)


def test_config_validates_the_solver():
    assert Config(method="lp", solver="ellipsoid").solver == "ellipsoid"
    assert Config().solver == "irls"
    with pytest.raises(UsageError, match="--solver"):
        Config(method="lp", solver="simplex")
    with pytest.raises(UsageError, match="--solver"):
        Config(method="svd", solver="ellipsoid")


def test_cli_rejects_an_unknown_solver(tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnxcompress", str(tmp_path / "m.onnx"), "--method", "lp",
                        "--solver", "nope"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--solver" in r.stderr


def test_compress_with_the_ellipsoid_solver(tmp_path):
    from test_lowrank_graph import mlp
    m, data = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(m, str(path))
    report = compress(path, tmp_path / "out.onnx", config=Config(method="lp", solver="ellipsoid", keep=0.5),
                      calib=data[:6], val=data[6:])
    onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
    assert report.config["solver"] == "ellipsoid"
    assert {x["layer"] for x in report.layers} == {"fc1", "fc2"}
    for x in report.layers:
        assert x["params_after"] <= 0.5 * x["params_before"]
        assert x["error"] >= x["best_error"] * (1 - 1e-3)
    assert report.agreement[0]["cosine"] > 0.5
