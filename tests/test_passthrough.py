"""Models that must pass through safely (issue 4, item 2).

Each model is compressed where the tool can and left as it was elsewhere, with a reason in the
report; the output always passes the full ONNX checker, runs in ONNX Runtime with the original's
output names, types and shapes, and where everything is kept (keep=1.0) or the pruned channels
are exact copies (`dup` builders at keep=0.5) it gives the original's outputs.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphs
from checks import assert_valid_output, kept, reasons, run, save, session
from onnxcompress import Config, ModelError, Plan, compress
from onnxcompress.core.graph import GraphIndex


def feeds_for(spec, n=48, seed=1, dtype=np.float32):
    return {k: v.astype(dtype) for k, v in graphs.sample_inputs(spec, n, seed).items()}


def squeeze(tmp_path, model, spec, *, keep, dtype=np.float32, calib=None, val=None, **cfg):
    """Compress `model` at `keep`; return (input path, output path, report, validation feed)."""
    path = save(tmp_path, model)
    calib = calib if calib is not None else feeds_for(spec, 128, 1, dtype)
    val = val if val is not None else feeds_for(spec, 16, 2, dtype)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=keep, force=True, **cfg), calib=calib, val=val)
    return path, out, report, val


X16 = [("x", (16,))]


# ---- If / Loop / Scan ----

@pytest.mark.parametrize("kind", ["If", "Loop", "Scan", "nested"])
def test_group_tensor_read_inside_a_subgraph_is_skipped(tmp_path, kind):
    """The body reads fc1's activation from the outer scope (for "nested", from an If inside
    an If's branch): fc1's group is left alone, fc2's group is pruned."""
    model = graphs.subgraph_reader(kind, reads="h")
    h = next(n.output[0] for n in model.graph.node if n.name == "relu1")
    assert h in GraphIndex(model).subgraph_uses()
    path, out, report, val = squeeze(tmp_path, model, X16, keep=0.5)
    assert f"tensor {h!r} is used inside a subgraph" in reasons(report)["fc1"]
    assert kept(report) == {"fc2": (12, 24)}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan", "nested"])
def test_weight_read_inside_a_subgraph_is_skipped(tmp_path, kind):
    """The body multiplies by fc1's weight: slicing it would break the body (it did: the
    output failed the checker)."""
    path, out, report, val = squeeze(tmp_path, graphs.subgraph_reader(kind, reads="w1"), X16, keep=0.5)
    assert "is also read inside a subgraph" in reasons(report)["fc1"]
    assert kept(report) == {"fc2": (12, 24)}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_models_keep_everything(tmp_path, kind):
    path, out, report, val = squeeze(tmp_path, graphs.subgraph_reader(kind, reads="h"), X16, keep=1.0)
    assert report.groups
    assert_valid_output(path, out, val, same=True)


# ---- recurrent cells ----

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_cell_stops_its_input_group_and_is_reported(tmp_path, cell):
    """x[S,B,8] -> MatMul -> Relu -> cell -> MatMul -> Relu -> MatMul: the group entering the
    cell is skipped (the cell mixes its input features), the cell itself is reported, the
    group after it is pruned exactly; sequence length and batch stay dynamic."""
    # one feed of S=64, B=8 (rarely active ReLU channels need many rows to be told apart)
    calib = [{"x": graphs.sample_inputs([("x", (8, 8))], 64, 1)["x"]}]
    val = [{"x": graphs.sample_inputs([("x", (b, 8))], s, 2)["x"]} for s, b in ((3, 2), (7, 5))]
    path = save(tmp_path, graphs.recurrent(cell, dup=True))
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=calib, val=val)
    why = reasons(report)
    assert f"{cell} mixes the channels" in why["pre"]
    assert "recurrent layer" in why["cell"]
    assert kept(report) == {"post": (10, 20)}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- ops of other domains ----

def test_custom_domain_op_is_refused_with_its_name(tmp_path):
    """An op of a made-up domain: ONNX Runtime cannot run the model, and calibration and
    validation both need it to, so the tool stops with a ModelError naming the node and the op
    (exit code 1 from the command line) and writes nothing. Running only the runnable part is
    not attempted: the statistics of tensors after the op could not be measured."""
    path = save(tmp_path, graphs.custom_op())
    out = tmp_path / "out.onnx"
    with pytest.raises(ModelError, match=r"node 'fancy' uses op com\.example:FancyScale"):
        compress(path, out, config=Config(keep=0.5), calib=feeds_for(X16))
    assert not out.exists()
    r = subprocess.run([sys.executable, "-m", "onnxcompress", str(path), str(out), "--keep", "0.5"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "com.example:FancyScale" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_op_defined_by_a_local_function_runs_and_stops_the_group(tmp_path):
    """The same op defined by the model as a local function: ONNX Runtime runs it, so the model
    is compressed where it can be; the group reaching the op is left alone with a reason."""
    path, out, report, val = squeeze(tmp_path, graphs.local_function_op(), X16, keep=0.5)
    assert "Double" in reasons(report)["fc1"] and "not understood" in reasons(report)["fc1"]
    assert report.groups == []
    assert_valid_output(path, out, val, same=True)
    assert [f.name for f in onnx.load(str(out)).functions] == ["Double"]


# ---- 16-bit floats ----

def _dtypes(path):
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_float16_model_is_compressed_in_float16(tmp_path, keep, dup):
    """Inputs, weights and outputs in float16: the groups are pruned, every weight stays
    float16 and the outputs agree to float16 precision."""
    spec = X16
    path, out, report, val = squeeze(tmp_path, graphs.half_mlp(dup=dup), spec, keep=keep, dtype=np.float16)
    assert kept(report) == {"fc1": (round(32 * keep), 32), "fc2": (round(24 * keep), 24)}
    assert set(_dtypes(out).values()) == {TensorProto.FLOAT16}
    assert_valid_output(path, out, val, same=True, rtol=1e-2, atol=4e-3)


@pytest.mark.parametrize("elem", [TensorProto.BFLOAT16, TensorProto.FLOAT16])
def test_16bit_weight_storage_cast_to_float(tmp_path, elem):
    """Weights stored as bfloat16/float16 and Cast to float before use. Large ones are not
    folded into float32 copies (the file would grow): their layers are left alone with a
    reason naming the Cast, and the 16-bit initializers are kept as they are."""
    spec = [("x", (64,))]
    path, out, report, val = squeeze(tmp_path, graphs.cast_weights(elem, big=True), spec, keep=0.5)
    why = reasons(report)
    assert "computed by Cast node" in why["fc1"] and "computed by Cast node" in why["fc2"]
    assert report.groups == []
    before, after = _dtypes(path), _dtypes(out)
    assert {n: t for n, t in after.items() if t == elem} == {n: t for n, t in before.items() if t == elem}
    assert len([t for t in after.values() if t == elem]) == 2
    assert_valid_output(path, out, val, same=True)


@pytest.mark.parametrize("elem", [TensorProto.BFLOAT16, TensorProto.FLOAT16])
def test_small_16bit_weights_are_folded_and_pruned(tmp_path, elem):
    """Small Cast weights are folded into float constants and pruned; the 16-bit originals no
    longer used are dropped rather than carried along as dead initializers."""
    spec = [("x", (64,))]
    path, out, report, val = squeeze(tmp_path, graphs.cast_weights(elem, big=False, dup=True), spec, keep=0.5)
    assert kept(report) == {"fc1": (16, 32), "fc2": (24, 48)}
    assert elem not in _dtypes(out).values()
    used = {name for node in onnx.load(str(out)).graph.node for name in node.input}
    assert set(_dtypes(out)) <= used
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- int8 QDQ ----

def test_qdq_model_is_left_alone_with_reasons(tmp_path):
    """Every weight is DequantizeLinear(int8): nothing is pruned, each layer says its weight is
    quantized, the int8 weights are written back unchanged (not dequantized into float)."""
    path, out, report, val = squeeze(tmp_path, graphs.qdq_mlp(), X16, keep=0.5)
    why = reasons(report)
    assert all("quantized (DequantizeLinear node" in why[n] for n in ("fc1", "fc2", "fc3"))
    assert report.groups == []
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    int8 = [n for n, v in before.items() if v.dtype == np.int8 and v.ndim == 2]
    assert len(int8) == 3
    for n in int8:
        np.testing.assert_array_equal(after[n], before[n])
    assert_valid_output(path, out, val, same=True, rtol=0, atol=0)


# ---- shared weights ----

def test_weight_shared_by_two_producers_of_one_group_is_edited_once(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.siamese(dup=True), X16, keep=0.5)
    assert [(g["producers"], g["kept"]) for g in report.groups] == [(["left", "right"], 16)]
    shapes = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert sorted(v for k, v in shapes.items() if k.startswith(("w_", "b_"))) == [(16,), (16, 16)]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_bias_shared_by_two_groups_is_skipped(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.shared_bias(), X16, keep=0.5)
    why = reasons(report)
    assert "shared by two groups" in why["branch0"] and "shared by two groups" in why["branch1"]
    assert report.groups == []
    assert_valid_output(path, out, val, same=True)


def test_weight_that_is_a_graph_output_is_skipped(tmp_path):
    """fc2's weight is also a graph output: neither group that edits it may change it."""
    model = graphs.mlp()
    w2 = next(n.input[1] for n in model.graph.node if n.name == "fc2")
    model.graph.output.append(helper.make_tensor_value_info(w2, TensorProto.FLOAT, [24, 32]))
    path, out, report, val = squeeze(tmp_path, model, X16, keep=0.5)
    why = reasons(report)
    assert "is also a graph output" in why["fc1"] and "is also a graph output" in why["fc2"]
    assert_valid_output(path, out, val, same=True)


# ---- node names ----

def _rename(model, names):
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


@pytest.mark.parametrize("style", ["none", "duplicate"])
def test_unnamed_and_duplicate_named_nodes(tmp_path, style):
    """Nodes without names get positional keys; repeated names (which ONNX Runtime refuses to
    load) are made unique, so the output runs even though the input did not. A plan made on
    such a model applies again."""
    model = graphs.residual(dup=True)
    reference = save(tmp_path, model, "reference.onnx")  # same function, original names
    n = len(model.graph.node)
    _rename(model, [""] * n if style == "none" else ["layer"] * n)
    spec = graphs.BUILDERS["residual"][1]
    path, out, report, val = squeeze(tmp_path, model, spec, keep=0.5)
    assert len(report.groups) == 1 and report.groups[0]["kept"] == 4
    producers = report.groups[0]["producers"]
    if style == "none":
        assert all(p.startswith("<Conv #") for p in producers)
        assert all(node.name == "" for node in onnx.load(str(out)).graph.node)
    else:
        names = [node.name for node in onnx.load(str(out)).graph.node]
        assert len(set(names)) == n and all(name.startswith("layer") for name in names)
        assert len(producers) == 2 and all(p in names for p in producers)
    assert_valid_output(reference, out, val, same=True, rtol=1e-3, atol=1e-4)
    plan_file = tmp_path / "plan.json"
    report.plan.save(plan_file)
    again = tmp_path / "again.onnx"
    compress(path, again, plan=Plan.load(plan_file), calib=val, val=val)
    for a, b in zip(run(out, val), run(again, val)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


# ---- opsets ----

def newest_runnable_opset() -> int:
    """The newest opset onnx defines for which ONNX Runtime runs the `versioned` model."""
    feed = feeds_for([("x", (3, 8, 8))], 2)
    for opset in range(onnx.defs.onnx_opset_version(), 17, -1):
        try:
            session(graphs.versioned(opset)).run(None, feed)
            return opset
        except Exception:
            continue
    return 17


@pytest.mark.parametrize("opset", [11, 13, 17, newest_runnable_opset()])
@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_opsets(tmp_path, opset, keep, dup):
    spec = [("x", (3, 8, 8))]
    path, out, report, val = squeeze(tmp_path, graphs.versioned(opset, dup=dup), spec, keep=keep)
    assert sorted(kept(report).values()) == sorted((round(c * keep), c) for c in (4, 6, 8))
    model = onnx.load(str(out))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-5)


# ---- dynamic dimensions ----

def _make_dynamic(model, dims: dict[int, str]) -> onnx.ModelProto:
    for axis, name in dims.items():
        model.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _seq_feeds(shapes, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(s).astype(np.float32)} for s in shapes]


@pytest.mark.parametrize("build", [graphs.gelu_ffn, graphs.ffn_flat])
def test_dynamic_batch_and_sequence(tmp_path, build):
    """Feeds of different batch sizes and sequence lengths (the first feed fixes the shapes the
    analysis sees); the output keeps the symbolic input dimensions."""
    calib = _seq_feeds([(4, 5, 16), (2, 11, 16), (1, 3, 16), (3, 7, 16)] * 4, 1)
    val = _seq_feeds([(2, 9, 16), (5, 1, 16), (1, 17, 16)], 2)
    path = save(tmp_path, build(dup=True))
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=calib, val=val)
    assert [g["kept"] for g in report.groups] == [16]
    dims = [d.dim_param for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[:2]]
    assert dims == ["B", "S"]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_dynamic_spatial_dimensions(tmp_path):
    model = _make_dynamic(graphs.conv_bn_relu(dup=True), {0: "N", 2: "H", 3: "W"})
    calib = _seq_feeds([(4, 3, 8, 8), (2, 3, 12, 5), (3, 3, 6, 9)] * 4, 1)
    val = _seq_feeds([(2, 3, 16, 16), (1, 3, 5, 7)], 2)
    path = save(tmp_path, model)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=calib, val=val)
    assert [g["kept"] for g in report.groups] == [4, 3]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- graph outputs inside a group ----

def _with_outputs(model, names):
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        model.graph.output[-1].type.tensor_type.ClearField("shape")
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _output_of(model, op_type, k=0):
    return [n.output[0] for n in model.graph.node if n.op_type == op_type][k]


@pytest.mark.parametrize("case", ["residual_join_input", "bn_of_second_conv", "flattened"])
def test_graph_output_inside_a_group(tmp_path, case):
    """A graph output taken from inside a group: that group is left alone (its width is part
    of the output), the others are pruned, and every output keeps its shape."""
    if case == "residual_join_input":  # the Relu feeding both conv2 and the residual Add
        base, spec = graphs.residual(dup=True), graphs.BUILDERS["residual"][1]
        extra, untouched = _output_of(base, "Relu", 0), []
        skipped = ["conv1", "conv2"]
    elif case == "bn_of_second_conv":
        base, spec = graphs.conv_bn_relu(dup=True), graphs.BUILDERS["conv_bn_relu"][1]
        extra, untouched, skipped = _output_of(base, "BatchNormalization", 1), ["conv1"], ["conv2"]
    else:
        base, spec = graphs.flatten_gemm(dup=True), graphs.BUILDERS["flatten_gemm"][1]
        extra, untouched, skipped = _output_of(base, "Flatten"), [], ["conv1"]
    model = _with_outputs(base, [extra])
    path, out, report, val = squeeze(tmp_path, model, spec, keep=0.5)
    why = reasons(report)
    for node in skipped:
        assert f"reaches graph output {extra!r}" in why[node]
    assert sorted(kept(report)) == untouched
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- nothing to compress ----

def _elementwise_only():
    b = graphs.Builder(21)
    h = b.op("Relu", [b.op("Mul", ["x", b.weight("scale", (16,), None, 1.0)])])
    return b.model([("x", ["N", 16])], [b.op("Softmax", [h], axis=-1)])


def _single_gemm():
    b = graphs.Builder(22)
    return b.model([("x", ["N", 16])], [b.op("Gemm", ["x", b.weight("w", (10, 16))], transB=1, name="only")])


@pytest.mark.parametrize("build", [_elementwise_only, _single_gemm])
def test_no_compressible_node_exits_0_with_a_message(tmp_path, build):
    path = save(tmp_path, build())
    calib = tmp_path / "calib.npz"
    np.savez(calib, **feeds_for(X16, 32))
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "onnxcompress", str(path), str(out), "--calib", str(calib),
                        "--keep", "0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no compressible channel group was found" in r.stderr  # a warning, logged once
    if build is _single_gemm:
        assert "only (Gemm): reaches graph output" in r.stdout
    assert_valid_output(path, out, feeds_for(X16, 8, 3), same=True, rtol=0, atol=0)
