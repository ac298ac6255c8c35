"""Low-rank splits on graphs built in code: every split kind by structure and by number, the
statistics they read, the rank rules and the reasons layers are left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Config, Plan, compress
from onnxcompress.api import shapes_at
from onnxcompress.core.calibrate import calibrate
from onnxcompress.core.stats import PatchGram, TokenCounts, patch_rows
from onnxcompress.core.graph import GraphIndex
from onnxcompress.methods.lowrank.layers import find_layers, weight_matrix
from onnxcompress.methods.lowrank.solvers import svd
from onnxcompress.core.plan import LayerPlan
from onnxcompress.methods.lowrank.rewrite import split

RNG = np.random.default_rng(0)


def model(nodes, inputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))
    onnx.checker.check_model(m, full_check=True)
    return m


def f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def gemm(trans_a=0, trans_b=0, bias=True):
    w = f32(12, 20) if trans_b else f32(20, 12)
    inits = {"w": w, **({"c": f32(12)} if bias else {})}
    node = helper.make_node("Gemm", ["x", "w", "c"] if bias else ["x", "w"], ["y"], name="fc",
                            transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    shape = [20, 5] if trans_a else [5, 20]
    return model([node], [("x", TensorProto.FLOAT, shape)], inits), {"x": f32(*shape)}


def matmul_right():
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return model([node], [("x", TensorProto.FLOAT, [2, 3, 16])], {"w": f32(16, 10)}), {"x": f32(2, 3, 16)}


def matmul_left():
    node = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")
    return model([node], [("x", TensorProto.FLOAT, [2, 16, 7])], {"w": f32(10, 16)}), {"x": f32(2, 16, 7)}


def conv(**attrs):
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs)
    return (model([node], [("x", TensorProto.FLOAT, [2, 6, 9, 8])], {"w": f32(10, 6, 3, 2), "b": f32(10)}),
            {"x": f32(2, 6, 9, 8)})


def gather():
    node = helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")
    ids = RNG.integers(-40, 40, size=(2, 9)).astype(np.int64)
    return model([node], [("ids", TensorProto.INT64, [2, 9])], {"table": f32(40, 12)}), {"ids": ids}


KINDS = {
    "gemm": gemm, "gemm_transA_transB": lambda: gemm(1, 1), "gemm_no_bias": lambda: gemm(0, 1, bias=False),
    "matmul": matmul_right, "matmul_left": matmul_left, "conv": conv,
    "conv_strided_padded_dilated": lambda: conv(strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2]),
    "conv_same_upper": lambda: conv(auto_pad="SAME_UPPER", strides=[2, 2]),
    "gather": gather,
}


def run(m, feed):
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def layer_of(m, feed):
    g = GraphIndex(m, *shapes_at(m, feed))
    found = find_layers(g)
    assert len(found.layers) == 1, found.skipped
    return g, found.layers[0]


def plan_at(layer, w, rank):
    a, b = svd(w).factors(rank)
    return Plan("svd", "id", (LayerPlan(layer.key, layer.kind, layer.out, layer.inputs, rank, a, b),))


def with_weight(m, g, layer, w):
    """The original model with W (out x in, the `weight_matrix` view) put back in the node's layout."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    old = g.const(layer.weight)
    if layer.kind == "gemm":
        w = (w / g.attr(layer.node, "alpha", 1.0)).T
        value = w.T if g.attr(layer.node, "transB", 0) else w
    elif layer.kind in ("matmul", "gather"):
        value = w.T
    else:
        value = w.reshape(old.shape)
    for t in out.graph.initializer:
        if t.name == layer.weight:
            t.CopyFrom(numpy_helper.from_array(value.astype(old.dtype), layer.weight))
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_full_rank_split_reproduces_outputs(kind):
    m, feed = KINDS[kind]()
    g, layer = layer_of(m, feed)
    w = weight_matrix(g, layer)
    new = split(m, g, {layer.key: layer}, plan_at(layer, w, min(w.shape)))
    onnx.checker.check_model(new, full_check=True)
    assert len(new.graph.node) == 2 and new.graph.node[1].output[0] == "y"
    assert layer.weight not in {t.name for t in new.graph.initializer}
    np.testing.assert_allclose(run(new, feed), run(m, feed), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_low_rank_split_computes_the_factored_weight(kind):
    m, feed = KINDS[kind]()
    g, layer = layer_of(m, feed)
    w = weight_matrix(g, layer)
    rank = 2
    plan = plan_at(layer, w, rank)
    new = split(m, g, {layer.key: layer}, plan)
    lp = plan.layers[0]
    shapes = sorted(tuple(t.dims) for t in new.graph.initializer if "lowrank" in t.name)
    assert sum(int(np.prod(s)) for s in shapes) == rank * (layer.out + layer.inputs)
    reference = with_weight(m, g, layer, lp.left @ lp.right)
    got, ref, orig = run(new, feed), run(reference, feed), run(m, feed)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(got - orig).max() > 1e-2   # rank 2 really is an approximation


@pytest.mark.parametrize("attrs", [dict(pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
                                   dict(auto_pad="SAME_UPPER", strides=[2, 2]),
                                   dict(auto_pad="SAME_LOWER", strides=[1, 2]), dict(auto_pad="VALID")])
def test_patch_rows_are_what_the_conv_multiplies(attrs):
    m, feed = conv(**attrs)
    g, layer = layer_of(m, feed)
    assert isinstance(layer.request, PatchGram) and layer.statistic == "patches"
    z = patch_rows(feed["x"].astype(np.float64), layer.request, 0, RNG)
    y = run(m, feed) - g.const("b").reshape(1, -1, 1, 1)
    np.testing.assert_allclose(z @ weight_matrix(g, layer).T, np.moveaxis(y, 1, -1).reshape(-1, 10),
                               rtol=1e-4, atol=1e-4)


def test_conv_beyond_max_patch_uses_the_channel_gram():
    m, feed = conv()
    g = GraphIndex(m, *shapes_at(m, feed))
    layer = find_layers(g, max_patch=10).layers[0]
    assert layer.statistic == "channels" and layer.request.channels == 6


def test_token_counts_fold_negative_indices():
    m, feed = gather()
    g, layer = layer_of(m, feed)
    counts = calibrate(m, [layer.request], [feed])[layer.request]
    assert isinstance(layer.request, TokenCounts)
    np.testing.assert_array_equal(counts, np.bincount(feed["ids"].ravel() % 40, minlength=40))


def tied_embedding():
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="emb"),
             helper.make_node("MatMul", ["h", "proj"], ["h2"], name="narrow"),
             helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "tt"], ["logits"], name="logits"),
             helper.make_node("Mul", ["logits", "h2"], ["y"])]
    return model(nodes, [("ids", TensorProto.INT64, [1, 5])], {"table": f32(30, 8), "proj": f32(8, 1)})


def test_shared_and_tiny_weights_are_left_alone_with_reasons():
    m = tied_embedding()
    g = GraphIndex(m, *shapes_at(m, {"ids": np.zeros((1, 5), np.int64)}))
    found = find_layers(g)
    reasons = {s.node: s.reason for s in found.skipped}
    assert "emb" in reasons and "also read by" in reasons["emb"]
    assert "narrow" in reasons and "no rank" in reasons["narrow"]   # 1 x 8: r (1 + 8) < 8 for no r >= 1
    assert found.layers == ()


def test_include_selects_layers_by_name():
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="enc/a"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="head/b")]
    m = model(nodes, [("x", TensorProto.FLOAT, [4, 32])], {"w1": f32(32, 32), "w2": f32(32, 32)})
    g = GraphIndex(m, *shapes_at(m, {"x": f32(4, 32)}))
    assert [x.key for x in find_layers(g, include="enc").layers] == ["enc/a"]
    assert [x.key for x in find_layers(g, exclude="enc").layers] == ["head/b"]


def mlp():
    """A 32 -> 64 -> 48 -> 2 MLP whose inputs live in an 8-dimensional subspace."""
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
             helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3")]
    inits = {"w1": f32(32, 64), "w2": f32(48, 64) / 8, "b2": f32(48), "w3": f32(48, 2)}
    m = model(nodes, [("x", TensorProto.FLOAT, ["batch", 32])], inits)
    basis = RNG.standard_normal((8, 32))
    data = [{"x": (RNG.standard_normal((16, 8)) @ basis).astype(np.float32)} for _ in range(8)]
    return m, data


@pytest.mark.parametrize("method", ["svd", "aasvd", "lp"])
def test_compress_splits_and_reports_against_the_optimum(tmp_path, method):
    m, data = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(m, str(path))
    report = compress(path, tmp_path / "out.onnx", config=Config(method=method, keep=0.5),
                      calib=data[:6], val=data[6:])
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    assert {x["layer"] for x in report.layers} == {"fc1", "fc2"}          # fc3 (48 x 2) cannot shrink at 0.5
    assert report.params["after"] < report.params["before"]
    for x in report.layers:
        assert x["params_after"] <= 0.5 * x["params_before"]
        assert x["error"] >= x["best_error"] * (1 - 1e-3)
        if method == "aasvd":   # the method is the optimum: its factors' error is the optimum's
            assert x["error"] == pytest.approx(x["best_error"], rel=1e-3)
        else:
            assert x["error"] > x["best_error"] * 1.01
    assert any(s["node"] == "fc3" for s in report.skipped)


def test_activation_aware_is_exact_on_a_low_dimensional_input(tmp_path):
    """fc1's input spans 8 dimensions: a rank-8 activation-aware split of it loses nothing on
    that data, while plain SVD at the same rank does."""
    m, data = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(m, str(path))
    agree = {}
    for method in ("aasvd", "svd"):
        out = tmp_path / f"{method}.onnx"
        rep = compress(path, out, config=Config(method=method, include="fc1", tolerance=1e-4),
                       calib=data[:6], val=data[6:])
        agree[method] = rep
    aa = agree["aasvd"].layers[0]
    assert aa["rank"] <= 8 and aa["error"] < 1e-4
    assert agree["aasvd"].agreement[0]["rel_l2"] < 1e-3
    sv = agree["svd"]
    assert not sv.layers or sv.layers[0]["rank"] > 8


def test_params_target_allocates_ranks_and_plan_round_trips(tmp_path):
    m, data = mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(m, str(path))
    report = compress(path, tmp_path / "a.onnx", config=Config(method="aasvd", params_target=0.6),
                      calib=data[:6], val=data[6:])
    assert report.params["after"] <= 0.6 * report.params["before"]
    plan_path = tmp_path / "plan.json"
    report.plan.save(plan_path)
    again = compress(path, tmp_path / "b.onnx", config=Config(method="aasvd"), calib=data[:6], val=data[6:],
                     plan=Plan.load(plan_path))
    assert [x["rank"] for x in again.layers] == [x["rank"] for x in report.layers]
    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "b.onnx")), data[7]),
                               run(onnx.load(str(tmp_path / "a.onnx")), data[7]), rtol=1e-5, atol=1e-5)
