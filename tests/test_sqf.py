"""Sparse quantized factors (methods/sqf, seed 003): the special cases (low rank, vector
quantization), the constraints of the factors, their bytes, and storage through ONNX Runtime."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxcompress.methods.lowrank.layers import weight_matrix
from onnxcompress.methods.lowrank.solvers import activation_aware
from onnxcompress.methods.sqf import solvers as ss
from onnxcompress.methods.sqf import storage

from test_quant import _layer, _model, _with_weight, run


def _problem(seed=0, out=40, n=24):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, n)) @ rng.standard_normal((n, n))
    return rng.standard_normal((out, n)), x.T @ x


def test_full_rank_full_precision_is_the_activation_aware_optimum():
    W, G = _problem()
    for k in (3, 8):
        r = ss.sqf(W, G, ss.SQFFormat(k, k, None, None))
        spectrum = activation_aware(W, G)
        assert r.error == pytest.approx(spectrum.error[k], rel=1e-6)
        a, b = spectrum.factors(k)
        np.testing.assert_allclose(r.z @ r.c, a @ b, atol=1e-5 * np.abs(W).max())  # the start is ridged


def test_gradient_c_steps_descend_at_full_precision():
    W, G = _problem(1)
    r = ss.sqf(W, G, ss.SQFFormat(8, 3, None, None), c_step="gradient", iters=30)
    h = np.array(r.history)
    assert h[-1] < h[0]                                # sparsifying the start costs, steps recover
    assert r.error == pytest.approx(h.min())
    assert r.error >= activation_aware(W, G).error[8] - 1e-12  # never below the rank-8 optimum


def _clusters(seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2, 4)) * 6
    return np.concatenate([centres[0] + rng.standard_normal((3, 4)), centres[1] + rng.standard_normal((4, 4))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_one_sparse_is_g_weighted_kmeans(seed):
    W = _clusters(seed)
    rng = np.random.default_rng(10 + seed)
    x = rng.standard_normal((50, 4)) @ rng.standard_normal((4, 4))
    G = x.T @ x
    r = ss.sqf(W, G, ss.SQFFormat(2, 1, 0, None), iters=50)
    assert set(np.unique(r.z)) <= {0.0, 1.0} and np.all(r.z.sum(axis=1) == 1)
    labels = np.argmax(r.z, axis=1)
    # a Lloyd fixed point in the metric G: centroids are the means, rows go to the G-nearest one
    for j in np.unique(labels):
        np.testing.assert_allclose(r.c[j], W[labels == j].mean(axis=0), atol=1e-9)
    np.testing.assert_array_equal(ss.assign(W, r.c, G), r.z)
    # and, on separated clusters, the optimum over every partition
    def cost(lab):
        if len(set(lab)) < 2:
            return np.inf
        d = W - np.stack([W[np.array(lab) == lab[i]].mean(axis=0) for i in range(len(W))])
        return np.sum((d @ G) * d)
    best = min(cost(lab) for lab in itertools.product([0, 1], repeat=len(W)))
    assert r.error * np.sum((W @ G) * W) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("fmt", [ss.SQFFormat(8, 3, 8, 8), ss.SQFFormat(12, 2, 4, 4), ss.SQFFormat(6, 6, 8, 2)],
                         ids=lambda f: f.name)
def test_factors_obey_the_format(fmt):
    W, G = _problem(2)
    r = ss.sqf(W, G, fmt)
    assert np.all(np.count_nonzero(r.z, axis=1) <= fmt.nnz)
    np.testing.assert_allclose(r.z, r.z_codes * r.z_scales[:, None])
    np.testing.assert_allclose(r.c, r.c_codes * r.c_scales[:, None])
    for codes, bits in ((r.z_codes, fmt.z_bits), (r.c_codes, fmt.c_bits)):
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    assert r.error <= r.history[0] + 1e-12 and 0 < r.error < 1


def test_bytes_and_comparison_with_low_rank():
    fmt = ss.SQFFormat(32, 4, 8, 8)
    out, n = 200, 64
    z = fmt.z_bytes(out)
    assert z["index"] == out * 4 * (1 + 1) + out * 4 and z["dense"] == out * 32 + out * 4
    assert fmt.storage(out) == "index"
    assert fmt.bytes(out, n) == 32 * 64 + 32 * 4 + z["index"]
    assert ss.SQFFormat(4, 4, 8, 8).storage(out) == "dense"
    W, G = _problem(3, out=60, n=32)
    cmp = ss.versus_lowrank(W, G, ss.SQFFormat(16, 4, 8, 8))
    assert cmp.lowrank_bytes <= cmp.bytes < cmp.lowrank_bytes + 4 * (60 + 32)
    assert cmp.lowrank_error == pytest.approx(activation_aware(W, G).error[cmp.lowrank_rank])
    assert cmp.error < cmp.lowrank_error  # at equal bytes, quantized sparse factors fit better here


@pytest.mark.parametrize("kind", ["matmul", "matmul_left", "gemm", "gemm_t", "conv"])
@pytest.mark.parametrize("fmt", [ss.SQFFormat(12, 3, 8, 8), ss.SQFFormat(12, 12, 8, 4), ss.SQFFormat(8, 2, None, None),
                                 ss.SQFFormat(8, 1, 0, 8)], ids=lambda f: f.name)
def test_storage_round_trip(kind, fmt):
    model, feed = _model(kind)
    g, layer = _layer(model, feed)
    W = weight_matrix(g, layer)
    k = min(fmt.rank, layer.out)  # the conv has 6 output channels
    fmt = dataclasses.replace(fmt, rank=k, nnz=min(fmt.nnz, k))
    r = ss.sqf(W, np.eye(layer.inputs), fmt, iters=5)
    new = storage.store(model, layer, r)
    onnx.checker.check_model(new, full_check=True)
    assert layer.weight not in {t.name for t in new.graph.initializer}
    ops = [n.op_type for n in new.graph.node]
    assert ("ScatterElements" in ops) == (fmt.z_bits != 0 and fmt.storage(layer.out) == "index")
    assert ("Gather" in ops) == (fmt.z_bits == 0)
    ref = _with_weight(model, layer, type("Q", (), {"dequantized": r.z @ r.c})())
    np.testing.assert_allclose(run(new, feed)[0], run(ref, feed)[0], rtol=1e-4, atol=1e-4)


def test_factors_on_the_activation():
    model, feed = _model("matmul")
    g, layer = _layer(model, feed)
    r = ss.sqf(weight_matrix(g, layer), np.eye(layer.inputs), ss.SQFFormat(12, 3, 8, 8), iters=5)
    new = storage.store(model, layer, r, on_activation=True)
    onnx.checker.check_model(new, full_check=True)
    mm = [n for n in new.graph.node if n.op_type == "MatMul"]
    assert len(mm) == 2 and mm[0].input[0] == "x" and mm[1].output[0] == "y"
    ref = _with_weight(model, layer, type("Q", (), {"dequantized": r.z @ r.c})())
    np.testing.assert_allclose(run(new, feed)[0], run(ref, feed)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="MatMul"):
        storage.store(model, layer, ss.sqf(weight_matrix(g, layer), np.eye(64), ss.SQFFormat(8, 1, 0, 8), iters=2),
                      on_activation=True)


def test_index_storage_is_smaller_than_dense_codes():
    model, feed = _model("matmul")
    g, layer = _layer(model, feed)
    W = weight_matrix(g, layer)
    sizes = {}
    for fmt in (ss.SQFFormat(20, 2, 8, 8), ss.SQFFormat(20, 20, 8, 8)):
        new = storage.store(model, layer, ss.sqf(W, np.eye(64), fmt, iters=2))
        sizes[fmt.nnz] = sum(len(t.raw_data) for t in new.graph.initializer if t.data_type in
                             (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4))
    assert sizes[2] < sizes[20]


def test_row_weights_give_the_frequency_weighted_optimum():
    rng = np.random.default_rng(5)
    E = rng.standard_normal((60, 12)) @ np.diag(np.linspace(2, 0.1, 12))
    counts = rng.integers(0, 30, 60).astype(float)
    from onnxcompress.methods.lowrank.solvers import frequency_weighted, token_weights
    w = token_weights(counts)
    r = ss.sqf(E, np.eye(12), ss.SQFFormat(4, 4, None, None), row_weights=w)
    assert r.error == pytest.approx(frequency_weighted(E, counts).error[4], rel=1e-6)
    # vector quantization with row weights: every centroid is the weighted mean of its rows
    v = ss.sqf(E, np.eye(12), ss.SQFFormat(5, 1, 0, None), row_weights=w)
    labels = np.argmax(v.z, axis=1)
    for j in np.unique(labels):
        rows = labels == j
        np.testing.assert_allclose(v.c[j], (w[rows, None] * E[rows]).sum(0) / w[rows].sum(), atol=1e-9)
    with pytest.raises(ValueError, match="row_weights"):
        ss.sqf(E, np.eye(12), ss.SQFFormat(4, 4), row_weights=np.zeros(60))
