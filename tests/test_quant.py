"""Activation-aware quantization (methods/quant): the GPTQ solver against round-to-nearest and
against exhaustive search on tiny layers, and integer + DequantizeLinear storage through ONNX
Runtime on tiny graphs built here."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.api import shapes_at
from onnxcompress.core.graph import GraphIndex
from onnxcompress.methods.lowrank.layers import find_layers, weight_matrix
from onnxcompress.methods.quant import solvers as qs
from onnxcompress.methods.quant import storage

import onnxruntime as ort


def run(model, feed, accuracy_level: str = "0"):
    """ONNX Runtime outputs. ORT fuses DequantizeLinear + MatMul into MatMulNBits and, at its
    default `session.qdq_matmulnbits_accuracy_level` (4), quantizes the activations to int8 there;
    level 0 keeps them float, which is the model's own meaning."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)


def _gram(rng, n, d, rank=None):
    x = rng.standard_normal((n, rank or d)) @ rng.standard_normal((rank or d, d))
    return x.T @ x


def _best(W, G, scales, fmt):
    """Exhaustive minimum of tr((W-Q) G (W-Q)^T) over every code of the grid (rows independent)."""
    cols = W.shape[1]
    codes = np.array(list(itertools.product(range(fmt.qmin, fmt.qmax + 1), repeat=cols)), float)
    total = 0.0
    for o in range(W.shape[0]):
        d = W[o] - codes * scales[o]
        total += float(np.min(np.einsum("ij,jk,ik->i", d, G, d)))
    return total / float(np.sum((W @ G) * W))


def test_gptq_against_rtn_and_brute_force():
    rng = np.random.default_rng(0)
    fmt = qs.Format(2)
    rows = []
    for _ in range(60):
        G, W = _gram(rng, 40, 3), rng.standard_normal((2, 3))
        r, q = qs.rtn(W, G, fmt), qs.gptq(W, G, fmt, damp=1e-9)
        best = _best(W, G, r.scales[:, r.group], fmt)
        rows.append((r.error, q.error, best))
    r, q, best = np.array(rows).T
    assert np.all(q >= best * (1 - 1e-9)) and np.all(r >= best * (1 - 1e-9))
    assert np.sum(q) < np.sum(r)                       # error feedback beats rounding overall
    assert np.mean(np.isclose(q, best)) > np.mean(np.isclose(r, best))  # optimal more often
    assert np.median(q / best) < np.median(r / best)


@pytest.mark.parametrize("fmt", qs.DEFAULT_FORMATS, ids=lambda f: f.name)
def test_gptq_codes_scales_and_error(fmt):
    rng = np.random.default_rng(1)
    G, W = _gram(rng, 500, 96, rank=40), rng.standard_normal((24, 96))
    q = qs.gptq(W, G, fmt)
    assert q.codes.dtype == np.int8 and q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    ngroups = 1 if not fmt.block else -(-96 // fmt.block)
    assert q.scales.shape == (24, ngroups)
    np.testing.assert_allclose(q.dequantized, q.scales[:, q.group] * q.codes)
    assert q.error == pytest.approx(qs.relative_error(W, q.dequantized, G))
    assert q.error < qs.rtn(W, G, fmt).error


def test_gptq_orders_and_dead_inputs():
    rng = np.random.default_rng(2)
    G, W = _gram(rng, 300, 40), rng.standard_normal((8, 40))
    G[:, 5] = G[5, :] = 0  # a dead input channel: its weights cannot matter, nor break the solve
    fmt = qs.Format(4, 8)
    for kw in ({"act_order": False}, {"act_order": True}, {"batch": 3}):
        q = qs.gptq(W, G, fmt, **kw)
        assert np.all(np.isfinite(q.dequantized)) and q.error < qs.rtn(W, G, fmt).error
    a, b = qs.gptq(W, G, fmt, batch=3), qs.gptq(W, G, fmt, batch=64)
    np.testing.assert_array_equal(a.codes, b.codes)  # lazy batching changes nothing but speed


def test_conv_groups_block_channels_at_each_offset():
    group = qs.column_groups(4 * 9, 2, (3, 3))  # 4 channels, 3x3 kernel, blocks of 2 channels
    j = np.arange(36)
    np.testing.assert_array_equal(group, (j // 9 // 2) * 9 + j % 9)
    assert group.max() + 1 == 18


def test_clip_search_never_worse_on_diagonal_weights():
    rng = np.random.default_rng(3)
    W, G = rng.standard_normal((16, 64)) ** 3, _gram(rng, 200, 64)
    fmt = qs.Format(4, 32)
    assert qs.rtn(W, np.diag(G), fmt, clip=16).error <= qs.rtn(W, np.diag(G), fmt).error


def test_embedding_is_weighted_rounding():
    rng = np.random.default_rng(4)
    E = rng.standard_normal((50, 16))
    counts = rng.integers(0, 20, 50).astype(float)
    q = qs.quantize_embedding(E, counts, qs.Format(4, 8))
    w = qs.token_weights(counts)
    d = E - q.dequantized
    assert q.error == pytest.approx(np.sum(w[:, None] * d * d) / np.sum(w[:, None] * E * E))
    np.testing.assert_array_equal(q.codes, qs.rtn(E, np.ones(16), qs.Format(4, 8)).codes)
    # a diagonal Gram couples no columns: error feedback has nothing to propagate
    W = rng.standard_normal((8, 50))
    np.testing.assert_array_equal(qs.gptq(W, np.diag(w), qs.Format(4), damp=0).codes,
                                  qs.rtn(W, np.diag(w), qs.Format(4)).codes)


def test_error_curve_bytes_and_order():
    rng = np.random.default_rng(5)
    G, W = _gram(rng, 300, 64), rng.standard_normal((32, 64))
    curve = qs.error_curve(W, G)
    assert [p.format for p in curve] == list(qs.DEFAULT_FORMATS)
    by = {p.format.name: p for p in curve}
    assert by["int8/channel"].bytes == 32 * 64 + 32 * 4
    assert by["int4/b32"].bytes == 32 * 64 // 2 + 32 * 2 * 4
    assert by["int4/b32"].error > by["int8/b32"].error
    assert by["int4/b32"].error <= by["int4/b64"].error * 1.5


# ---------------------------------------------------------------------------------------------
# storage round trips


def _model(kind: str, opset: int = 17, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    rank = {"gemm": 2, "gemm_t": 2, "conv": 4}.get(kind, 3)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(rank)])
    if kind == "matmul":
        inits, node, feed = [f(64, 24)], helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), f(2, 5, 64)
    elif kind == "matmul_left":
        inits, node, feed = [f(24, 64)], helper.make_node("MatMul", ["w", "x"], ["y"], name="mm"), f(2, 64, 5)
    elif kind in ("gemm", "gemm_t"):
        t = kind == "gemm_t"
        inits = [f(24, 64) if t else f(64, 24), f(24)]
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm", transB=int(t), alpha=0.5)
        feed = f(7, 64)
    elif kind == "conv":
        inits, feed = [f(6, 64, 3, 3), f(6)], f(1, 64, 6, 6)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])
    elif kind == "gather":
        x = helper.make_tensor_value_info("x", TensorProto.INT64, None)
        inits, node = [f(40, 64)], helper.make_node("Gather", ["w", "x"], ["y"], name="emb", axis=0)
        feed = rng.integers(0, 40, (2, 9)).astype(np.int64)
    x = helper.make_tensor_value_info("x", x.type.tensor_type.elem_type, feed.shape)
    names = ["w", "b"][:len(inits)]
    graph = helper.make_graph([node], kind, [x], [y],
                              [numpy_helper.from_array(v, n) for v, n in zip(inits, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, {"x": feed}


def _layer(model, feed):
    g = GraphIndex(model, *shapes_at(model, feed))
    layers = find_layers(g).layers
    assert len(layers) == 1
    return g, layers[0]


def _with_weight(model, layer, q):
    """The float model with the dequantized weight in place of the original, built directly."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    init = next(t for t in ref.graph.initializer if t.name == layer.weight)
    old = numpy_helper.to_array(init)
    node = ref.graph.node[layer.node]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    w = q.dequantized
    if layer.kind == "gemm":
        w = (w if attrs.get("transB", 0) else w.T) / attrs.get("alpha", 1.0)
    elif layer.kind == "matmul":
        w = w.T
    init.CopyFrom(numpy_helper.from_array(w.reshape(old.shape).astype(old.dtype), layer.weight))
    return ref


@pytest.mark.parametrize("kind", ["matmul", "matmul_left", "gemm", "gemm_t", "conv", "gather"])
@pytest.mark.parametrize("fmt", [qs.Format(8), qs.Format(8, 16), qs.Format(4, 32), qs.Format(4), qs.Format(4, 64),
                                 qs.Format(4, 128)], ids=lambda f: f.name)
def test_storage_round_trip(kind, fmt):
    model, feed = _model(kind)
    g, layer = _layer(model, feed)
    if kind == "gather":
        q = qs.quantize_embedding(g.const(layer.weight), np.ones(layer.inputs), fmt)
    else:
        W = weight_matrix(g, layer)
        q = qs.gptq(W, np.eye(layer.inputs), fmt, kernel=layer.kernel)
    new = storage.store(model, layer, q)
    onnx.checker.check_model(new, full_check=True)
    assert storage.model_opset(model) == 17                      # the input is untouched
    assert storage.model_opset(new) == storage.required_opset(q) if fmt != qs.Format(8) else 17
    assert layer.weight not in {t.name for t in new.graph.initializer}
    dq = [n for n in new.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1
    ints = [t for t in new.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.INT8)]
    assert len(ints) == 1 and ints[0].data_type == (TensorProto.INT4 if fmt.bits == 4 else TensorProto.INT8)
    got = run(new, feed)[0]
    want = run(_with_weight(model, layer, q), feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, run(model, feed)[0], rtol=1e-6, atol=1e-6)  # it is quantized


def test_int4_storage_is_packed():
    model, feed = _model("matmul")
    g, layer = _layer(model, feed)
    W = weight_matrix(g, layer)
    sizes = {}
    for fmt in (qs.Format(8), qs.Format(4, 32)):
        new = storage.store(model, layer, qs.rtn(W, np.eye(64), fmt))
        codes = next(t for t in new.graph.initializer if t.name.endswith("_quantized"))
        sizes[fmt.bits] = len(codes.raw_data)
    assert sizes == {8: 64 * 24, 4: 64 * 24 // 2}


def test_upgrade_refused_with_a_reason(monkeypatch):
    model, feed = _model("matmul")
    g, layer = _layer(model, feed)
    q = qs.rtn(weight_matrix(g, layer), np.eye(64), qs.Format(4, 32))
    from onnx import version_converter

    def broken(m, v):
        raise RuntimeError("adapter missing")
    monkeypatch.setattr(version_converter, "convert_version", broken)
    converted, reason = storage.upgrade_opset(model, 21)
    assert converted is None and "17 -> 21" in reason and "adapter missing" in reason
    with pytest.raises(ValueError, match="int8 per channel"):
        storage.store(model, layer, q)
    # int8 per channel needs no conversion and still works
    new = storage.store(model, layer, qs.rtn(weight_matrix(g, layer), np.eye(64), qs.Format(8)))
    assert storage.model_opset(new) == 17


@pytest.mark.parametrize("kind,fmt,op", [("matmul", qs.Format(4, 32), "MatMulNBits"),
                                         ("matmul", qs.Format(8, 16), "MatMulNBits"),
                                         ("gather", qs.Format(4, 16), "GatherBlockQuantized"),
                                         ("gemm", qs.Format(4, 32), "DequantizeLinear"),
                                         ("matmul", qs.Format(8), "DequantizeLinear")])
def test_ort_format(kind, fmt, op):
    model, feed = _model(kind)
    g, layer = _layer(model, feed)
    if kind == "gather":
        q = qs.quantize_embedding(g.const(layer.weight), np.ones(layer.inputs), fmt)
    else:
        W = weight_matrix(g, layer)
        W[:, 3] = 0  # a dead input column: codes 0, stored as the zero point
        q = qs.gptq(W, np.eye(layer.inputs), fmt)
    new = storage.store(model, layer, q, format="ort")
    onnx.checker.check_model(new, full_check=True)
    assert op in [n.op_type for n in new.graph.node]
    np.testing.assert_allclose(run(new, feed)[0], run(_with_weight(model, layer, q), feed)[0], rtol=1e-4, atol=1e-4)


def test_layer_bytes_match_the_stored_initializers():
    for kind, fmt, fmt_name in (("matmul", qs.Format(4, 32), "onnx"), ("conv", qs.Format(8, 16), "onnx"),
                                ("gather", qs.Format(4, 16), "onnx"), ("matmul", qs.Format(8, 16), "ort")):
        model, feed = _model(kind)
        g, layer = _layer(model, feed)
        q = (qs.quantize_embedding(g.const(layer.weight), np.ones(layer.inputs), fmt) if kind == "gather"
             else qs.rtn(weight_matrix(g, layer), np.eye(layer.inputs), fmt, kernel=layer.kernel))
        new = storage.store(model, layer, q, format=fmt_name)
        added = [t for t in new.graph.initializer if t.name.startswith(layer.weight + "_")]
        assert sum(len(t.raw_data) for t in added) == storage.layer_bytes(layer, fmt, fmt_name)


@pytest.mark.parametrize("fmt,cols", [(qs.Format(4), 3), (qs.Format(4, 2), 4)], ids=["int4/channel", "int4/b2"])
def test_int4_gptq_against_brute_force(fmt, cols):
    """The allocator's int4 formats: GPTQ is never below the exhaustive optimum on the same grid
    and beats rounding to nearest overall."""
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(12):
        G, W = _gram(rng, 50, cols, rank=cols - 1), rng.standard_normal((1, cols))
        r, q = qs.rtn(W, G, fmt), qs.gptq(W, G, fmt, damp=1e-9)
        rows.append((r.error, q.error, _best(W, G, r.scales[:, r.group], fmt)))
    r, q, best = np.array(rows).T
    assert np.all(q >= best * (1 - 1e-9)) and np.all(r >= best * (1 - 1e-9))
    assert np.sum(q) < np.sum(r)


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv", "gather"])
@pytest.mark.parametrize("fmt", [qs.Format(4, 32, half=True), qs.Format(4, 64, half=True)], ids=lambda f: f.name)
def test_float16_scales_are_stored_as_float16_and_cast(kind, fmt):
    """`half`: the scales the solver uses are float16 numbers, stored as a float16 initializer
    and cast to float32 ahead of DequantizeLinear; ONNX Runtime gives the dequantized weight's
    outputs, and the bytes are those of 2-byte scales."""
    model, feed = _model(kind)
    g, layer = _layer(model, feed)
    if kind == "gather":
        q = qs.quantize_embedding(g.const(layer.weight), np.ones(layer.inputs), fmt)
    else:
        q = qs.gptq(weight_matrix(g, layer), np.eye(layer.inputs), fmt, kernel=layer.kernel, clip=4)
    np.testing.assert_array_equal(q.scales, q.scales.astype(np.float16).astype(np.float64))
    new = storage.store(model, layer, q)
    onnx.checker.check_model(new, full_check=True)
    halves = [t for t in new.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert len(halves) == 1 and [n.op_type for n in new.graph.node][:2] == ["Cast", "DequantizeLinear"]
    codes = next(t for t in new.graph.initializer if t.data_type == TensorProto.INT4)
    assert len(codes.raw_data) + 2 * int(np.prod(halves[0].dims)) == storage.layer_bytes(layer, fmt)
    assert storage.layer_bytes(layer, fmt) < storage.layer_bytes(layer, qs.Format(4, fmt.block))
    got = run(new, feed)[0]
    np.testing.assert_allclose(got, run(_with_weight(model, layer, q), feed)[0], rtol=1e-4, atol=1e-4)
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(new.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"})
    np.testing.assert_allclose(compiled(feed)[0], got, rtol=1e-4, atol=1e-4)


def test_upgrade_adds_no_value_info():
    """onnx's version converter infers shapes into value_info; the upgraded model keeps only the
    entries the input had (with them ONNX Runtime fuses differently from the original)."""
    from onnx import TensorProto, helper, numpy_helper, version_converter
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("MatMul", ["b", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w],
                              value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert {v.name for v in version_converter.convert_version(model, 21).graph.value_info} == {"a", "b"}
    converted, reason = storage.upgrade_opset(model, 21)
    assert reason == "" and storage.model_opset(converted) == 21
    assert [v.name for v in converted.graph.value_info] == ["a"]
