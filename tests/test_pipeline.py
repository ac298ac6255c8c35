"""End-to-end checks of ID channel pruning on graphs built in code: structure and numbers."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import graphs
from onnxcompress import Config, Plan, compress
from onnxcompress.core.errors import UsageError

PATTERNS = sorted(graphs.BUILDERS)


def run(model_or_path, feed):
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, feed)


def save(tmp_path, model, name="model.onnx"):
    p = tmp_path / name
    onnx.save(model, str(p))
    return p


def compress_pattern(tmp_path, name, *, dup, **cfg):
    build, spec = graphs.BUILDERS[name]
    path = save(tmp_path, build(dup=dup))
    calib = graphs.sample_inputs(spec, 64, seed=1)
    val = graphs.sample_inputs(spec, 16, seed=2)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(**cfg), calib=calib, val=val)
    return path, out, report, val


def assert_same_outputs(a, b, feed, rtol=1e-4, atol=1e-5):
    for x, y in zip(run(a, feed), run(b, feed)):
        np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


def weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("name", PATTERNS)
def test_keep_everything_reproduces_outputs(tmp_path, name):
    path, out, report, val = compress_pattern(tmp_path, name, dup=False, keep=1.0)
    assert report.groups, "each pattern has at least one group"
    assert all(g["kept"] == g["channels"] for g in report.groups)
    assert_same_outputs(path, out, val)


@pytest.mark.parametrize("name", PATTERNS)
def test_duplicated_channels_prune_to_half_exactly(tmp_path, name):
    """The second half of every group copies the first: ID keeps one of each pair and its
    interpolation matrix puts the copy back, so the outputs agree to float precision."""
    path, out, report, val = compress_pattern(tmp_path, name, dup=True, keep=0.5)
    dup_groups = [g for g in report.groups if g["kept"] * 2 == g["channels"]]
    assert dup_groups
    assert report.params["after"] < report.params["before"]
    assert report.flops["after"] < report.flops["before"]
    assert_same_outputs(path, out, val, rtol=1e-3, atol=1e-4)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


@pytest.mark.parametrize("name", ["mlp", "conv_bn_relu", "squeeze_excite", "residual"])
def test_norm_selection_loses_what_id_keeps(tmp_path, name):
    """Same size, no correction: dropping a channel that ID would have folded back changes the
    outputs (the baseline the ID correction is measured against)."""
    *_, report_id, _ = compress_pattern(tmp_path, name, dup=True, keep=0.5)
    (tmp_path / "norm").mkdir()
    *_, report_norm, _ = compress_pattern(tmp_path / "norm", name, dup=True, keep=0.5, select="norm")
    cos_id = min(a["cosine"] for a in report_id.agreement)
    cos_norm = min(a["cosine"] for a in report_norm.agreement)
    assert cos_id > 0.99999
    assert cos_norm < cos_id - 1e-3


def test_structure_of_pruned_conv_bn_chain(tmp_path):
    path, out, report, _ = compress_pattern(tmp_path, "conv_bn_relu", dup=True, keep=0.5)
    before, after = onnx.load(str(path)), onnx.load(str(out))
    assert [n.op_type for n in after.graph.node] == [n.op_type for n in before.graph.node]
    shapes = sorted(tuple(t.dims) for t in after.graph.initializer if len(t.dims) == 4)
    assert shapes == sorted([(4, 3, 3, 3), (3, 4, 3, 3), (4, 3, 1, 1)])  # conv1 8->4, conv2 6->3
    bn_params = [t for t in after.graph.initializer if t.name.startswith("bn_")]
    assert sorted({tuple(t.dims) for t in bn_params}) == [(3,), (4,)]


def test_depthwise_group_attribute_follows(tmp_path):
    _, out, _, _ = compress_pattern(tmp_path, "depthwise", dup=True, keep=0.5)
    dw = next(n for n in onnx.load(str(out)).graph.node if n.name == "dw")
    assert onnx.helper.get_attribute_value(next(a for a in dw.attribute if a.name == "group")) == 4


def test_squeeze_excite_gate_joins_the_group(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "squeeze_excite", dup=True, keep=0.5)
    group = next(g for g in report.groups if "conv1" in g["producers"])
    assert "se.expand" in group["producers"]
    assert group["kept"] == 4


def test_residual_join_merges_producers(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "residual", dup=True, keep=0.5)
    assert any(set(g["producers"]) == {"conv1", "conv2"} for g in report.groups)


def test_flatten_into_gemm_uses_kron(tmp_path):
    path, out, _, val = compress_pattern(tmp_path, "flatten_gemm", dup=True, keep=0.5)
    fc = next(v for k, v in weights(out).items() if k.startswith("fc_"))
    assert fc.shape == (10, 64)


def test_reshape_flatten_updates_the_shape_constant(tmp_path):
    path = save(tmp_path, graphs.flatten_gemm(dup=True, reshape=True))
    spec = graphs.BUILDERS["flatten_gemm"][1]
    val = graphs.sample_inputs(spec, 8, seed=3)
    out = tmp_path / "out.onnx"
    compress(path, out, config=Config(keep=0.5), calib=graphs.sample_inputs(spec, 64), val=val)
    assert_same_outputs(path, out, val, rtol=1e-3, atol=1e-4)


def test_gelu_op_at_opset_20(tmp_path):
    path = save(tmp_path, graphs.gelu_ffn(dup=True, use_gelu_op=True))
    feed = graphs.sample_inputs([("x", (5, 16))], 32)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=feed, val=feed)
    assert report.groups[0]["kept"] == 16
    assert_same_outputs(path, out, feed, rtol=1e-3, atol=1e-4)


def test_constant_node_weights_are_pruned(tmp_path):
    """Paddle exports keep weights in Constant nodes; they are pruned like initializers."""
    model = graphs.conv_bn_relu(dup=True, constant_nodes=True)
    assert any(n.op_type == "Constant" for n in model.graph.node)
    path = save(tmp_path, model)
    feed = graphs.sample_inputs([("x", (3, 8, 8))], 32)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=feed, val=feed)
    assert [g["kept"] for g in report.groups] == [4, 3]
    assert_same_outputs(path, out, feed, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("intercept", [True, False])
def test_intercept_folds_constant_offsets_into_the_bias(tmp_path, intercept):
    path = save(tmp_path, graphs.offset_copies())
    feed = graphs.sample_inputs([("x", (16,))], 64)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5, intercept=intercept), calib=feed, val=feed)
    assert report.groups[0]["kept"] == 16
    if intercept:
        assert_same_outputs(path, out, feed, rtol=1e-3, atol=1e-4)
        assert report.groups[0]["error"] < 1e-6
    else:
        assert report.agreement[0]["rel_l2"] > 1e-3  # without it the offsets are lost


def test_tolerance_finds_the_rank(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "mlp", dup=True, tolerance=1e-6)
    fc1 = next(g for g in report.groups if g["group"] == "fc1")
    assert fc1["kept"] == 16
    assert fc1["error"] < 1e-5


def test_params_target_is_met(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "conv_bn_relu", dup=False, params_target=0.6)
    assert report.params["after"] <= 0.6 * report.params["before"] + 1
    assert report.params["after"] > 0.3 * report.params["before"]


def test_flops_target_is_met(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "residual", dup=False, flops_target=0.5)
    assert report.flops["after"] <= 0.5 * report.flops["before"] * 1.001


# ---- left alone, with the reason ----

def skipped_reasons(report):
    return {s["node"]: s["reason"] for s in report.skipped}


def test_group_reaching_graph_output_is_skipped(tmp_path):
    path = save(tmp_path, graphs.mlp(hidden_output=True))
    feed = graphs.sample_inputs([("x", (16,))], 32)
    report = compress(path, tmp_path / "o.onnx", config=Config(keep=0.5), calib=feed, val=feed)
    assert "reaches graph output" in skipped_reasons(report)["fc1"]
    assert "fc1" not in [g["group"] for g in report.groups]
    assert_same_outputs(path, tmp_path / "o.onnx", {"x": feed["x"][:4]}, rtol=1.0, atol=1e9)  # runs


def test_shared_weight_is_skipped(tmp_path):
    path = save(tmp_path, graphs.mlp(shared=True))
    feed = graphs.sample_inputs([("x", (16,))], 32)
    report = compress(path, tmp_path / "o.onnx", config=Config(keep=0.5), calib=feed, val=feed)
    reasons = skipped_reasons(report)
    assert "shared" in reasons["fc2"] and "shared" in reasons["fc1"]
    assert not report.groups


def test_layernorm_over_channels_is_skipped(tmp_path):
    path = save(tmp_path, graphs.layernorm_after())
    feed = graphs.sample_inputs([("x", (16,))], 32)
    out = tmp_path / "o.onnx"
    report = compress(path, out, config=Config(keep=0.5), calib=feed, val=feed)
    assert "LayerNormalization" in skipped_reasons(report)["fc1"]
    assert report.warnings and "no compressible" in report.warnings[-1]
    assert_same_outputs(path, out, feed)


def test_exclude_leaves_matching_groups(tmp_path):
    *_, report, _ = compress_pattern(tmp_path, "mlp", dup=True, keep=0.5, exclude="fc2")
    reasons = skipped_reasons(report)
    assert "excluded" in reasons["fc2"] and "excluded" in reasons["fc1"]  # fc2 is fc1's exit


# ---- the plan is data ----

def test_plan_round_trips_through_json(tmp_path):
    path, out, report, val = compress_pattern(tmp_path, "residual", dup=False, keep=0.5)
    plan_file = tmp_path / "plan.json"
    report.plan.save(plan_file)
    plan = Plan.load(plan_file)
    assert [g.keep for g in plan.groups] == [g.keep for g in report.plan.groups]
    out2 = tmp_path / "again.onnx"
    compress(path, out2, plan=plan, calib=val, val=val)
    assert_same_outputs(out, out2, val, rtol=1e-6, atol=1e-6)


def test_plan_stores_only_the_dropped_columns_and_reads_older_full_matrices(tmp_path):
    import json

    from onnxcompress.core.plan import _encode

    *_, report, _ = compress_pattern(tmp_path, "residual", dup=False, keep=0.5)
    plan_file = tmp_path / "plan.json"
    report.plan.save(plan_file)
    saved = json.loads(plan_file.read_text())
    entry = saved["entries"][0]
    group = report.plan.groups[0]
    for name, m in entry["interpolation"].items():
        assert m["columns"] == "dropped" and m["shape"] == [group.kept, group.channels]
        assert len(m["float64"]) == 4 * (-(-8 * group.kept * (group.channels - group.kept) // 3))
    loaded = Plan.load(plan_file).groups[0]
    for name, t in group.interpolation.items():
        assert np.array_equal(loaded.interpolation[name], t)
    # a version-2 plan (the whole k x C matrix) still loads to the same T
    entry["interpolation"] = {k: _encode(v) for k, v in group.interpolation.items()}
    plan_file.write_text(json.dumps({**saved, "version": 2}))
    for name, t in group.interpolation.items():
        assert np.array_equal(Plan.load(plan_file).groups[0].interpolation[name], t)
    # dropped columns whose data is one value short are refused
    m = next(iter(saved["entries"][0]["interpolation"].values()))
    m.update(columns="dropped", float64=_encode(np.zeros(group.kept * (group.channels - group.kept) - 1))["float64"])
    plan_file.write_text(json.dumps(saved))
    with pytest.raises(UsageError, match="does not hold"):
        Plan.load(plan_file)


def test_input_file_is_untouched(tmp_path):
    build, spec = graphs.BUILDERS["conv_bn_relu"]
    path = save(tmp_path, build(constant_nodes=False))
    before = path.read_bytes()
    compress(path, config=Config(keep=0.5), calib=graphs.sample_inputs(spec, 16))
    assert path.read_bytes() == before
    assert (tmp_path / "model.compressed.onnx").exists()
