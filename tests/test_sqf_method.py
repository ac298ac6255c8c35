"""Sparse quantized factors as a method of the shared allocator (methods/sqf/__init__.py): the
stored form in the graph and its values, the reported error against the calibration data, the
bytes the allocator counts against the bytes written, plans that replay, and what it leaves alone."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress import Config, Plan, UsageError, compress
from onnxcompress.core.modelio import serialized_size
from onnxcompress.methods import CHOICES, REGISTRY
from onnxcompress.methods import sqf as method
from onnxcompress.methods.lowrank.layers import weight_matrix
from onnxcompress.methods.sqf import solvers as ss
from onnxcompress.methods.sqf import storage

from checks import run
from test_mixed import feeds, path  # noqa: F401 (path: the embed_ffn model, a fixture)
from test_quant import _layer, _model


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """embed_ffn at half its bytes with --method sqf: (input path, output path, report, data)."""
    tmp = tmp_path_factory.mktemp("sqf")
    from test_mixed import embed_ffn
    src = tmp / "embed_ffn.onnx"
    onnx.save(embed_ffn(), str(src))
    data = feeds(16)
    out = tmp / "s.onnx"
    report = compress(src, out, config=Config(method="sqf", size_target=0.5, decode="run"), calib=data, val=data)
    return src, out, report, data


def _inits(p) -> dict:
    return {t.name: t for t in onnx.load(str(p)).graph.initializer}


def test_layers_are_stored_as_factors_in_the_graph(result):
    src, out, report, _ = result
    rows = {x["layer"]: x for x in report.sections["sqf"]}
    assert set(rows) == {"fc1", "fc2"}  # both MatMuls; the Gather table is left alone (below)
    new = onnx.load(str(out))
    onnx.checker.check_model(new, full_check=True)
    names = {t.name for t in new.graph.initializer}
    assert not {"W1", "W2"} & names
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("DequantizeLinear") == 4  # Z and C of each layer
    for row, x in zip(rows.values(), ("x", "h")):
        assert row["product"] == "activation"  # k (in + out) < in out: X C^T Z^T
        inner = next(n for n in new.graph.node if n.op_type == "MatMul" and n.input[0] == x)
        outer = next(n for n in new.graph.node if n.op_type == "MatMul" and n.input[0] == inner.output[0])
        assert [p.op_type for p in new.graph.node if p.output[0] in (inner.input[1], outer.input[1])] == \
            ["Transpose", "Transpose"]


def test_output_is_the_model_with_z_c_in_place_of_w(result):
    src, out, report, data = result
    ref = onnx.load(str(src))
    for e in report.plan.entries:
        d = e.result()
        assert np.all(np.count_nonzero(d.z, axis=1) <= e.nnz)
        init = next(t for t in ref.graph.initializer if t.name == {"fc1": "W1", "fc2": "W2"}[e.layer])
        init.CopyFrom(numpy_helper.from_array((d.z @ d.c).T.astype(np.float32), init.name))  # MatMul(X, W^T)
    for feed in data[:3]:
        np.testing.assert_allclose(run(out, feed)[0], run(ref, feed)[0], rtol=1e-4, atol=1e-4)


def test_reported_error_is_the_calibration_output_error(result):
    """error^2 = tr(D G D^T) / tr(W G W^T), G the Gram of the layer's input over the calibration
    feeds, D = W - Z C; the low-rank figure is the activation-aware optimum at no more bytes."""
    src, _, report, data = result
    m = onnx.load(str(src))
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    x = np.concatenate([f["x"] for f in data]).astype(np.float64)
    h = np.maximum(x @ w["W1"] + w["b1"], 0)
    for e in report.plan.entries:
        inp, weight = (x, w["W1"].T) if e.layer == "fc1" else (h, w["W2"].T)
        G = inp.T @ inp
        d = weight - e.result().z @ e.result().c
        assert e.error ** 2 == pytest.approx(np.trace(d @ G @ d.T) / np.trace(weight @ G @ weight.T), rel=1e-6)
        from onnxcompress.methods.lowrank.solvers import activation_aware
        assert e.lowrank_error ** 2 == pytest.approx(activation_aware(weight, G).error[e.lowrank_rank], rel=1e-6)
        row = next(r for r in report.sections["sqf"] if r["layer"] == e.layer)
        assert e.lowrank_rank * 4 * sum(weight.shape) <= row["bytes_after"] < (e.lowrank_rank + 1) * 4 * sum(weight.shape)
        assert row["error"] == pytest.approx(e.error)


def test_size_target_counts_the_bytes_as_written(result):
    src, out, report, _ = result
    before, after = _inits(src), _inits(out)
    written = sum(len(t.raw_data) for k, t in after.items() if k not in before)
    rows = report.sections["sqf"]
    assert written == sum(r["bytes_after"] for r in rows)  # the curve's bytes are the stored bytes
    removed = sum(r["bytes_before"] for r in rows)
    assert report.allocation["reached"] <= 0.5
    total = serialized_size(onnx.load(str(src)))  # the allocator's total: the serialized input model
    assert report.allocation["reached"] == pytest.approx((total - removed + written) / total, rel=1e-9)


def test_gather_is_left_alone_with_the_reason(result):
    _, out, report, _ = result
    assert "E" in _inits(out)
    reasons = [s["reason"] for s in report.skipped if s["node"] == "embed"]
    assert reasons and "Gather tables are not stored as factors" in reasons[0]


def test_plan_replays_exactly_and_malformed_entries_are_usage_errors(result, tmp_path):
    src, out, report, data = result
    plan_file = tmp_path / "plan.json"
    report.plan.save(plan_file)
    assert {e["method"] for e in json.loads(plan_file.read_text())["entries"]} == {"sqf"}
    compress(src, tmp_path / "b.onnx", plan=Plan.load(plan_file), calib=data, val=data)
    for a, b in zip(run(out, data[0]), run(tmp_path / "b.onnx", data[0])):
        np.testing.assert_array_equal(a, b)
    d = report.plan.to_dict()
    d["entries"][0]["bits"] = 5
    with pytest.raises(UsageError, match=r"entries\[0\]: 'bits' must be 4 or 8"):
        Plan.from_dict(d)
    d = report.plan.to_dict()
    e = d["entries"][0]
    z = np.ones(e["z_codes"]["shape"], dtype=np.int8)  # every row full: more than nnz non-zeros
    e["nnz"] = 1
    e["z_codes"]["int8"] = __import__("base64").b64encode(z.tobytes()).decode("ascii")
    with pytest.raises(UsageError, match="more than 1 non-zeros"):
        Plan.from_dict(d)


def test_keep_says_why_and_auto_leaves_sqf_out():
    m = REGISTRY["sqf"]
    assert "budget or a target" in m.keep_index(None, 0.5)
    assert "sqf" in CHOICES["sqf"] and "sqf" not in CHOICES["auto"]


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
@pytest.mark.parametrize("fmt", [ss.SQFFormat(6, 1, 8, 8), ss.SQFFormat(6, 6, 8, 8), ss.SQFFormat(6, 1, 4, 4),
                                 ss.SQFFormat(6, 6, 4, 4)], ids=lambda f: f.name)
def test_stored_bytes_are_the_initializer_bytes_written(kind, fmt):
    """`stored_bytes` (the curve's bytes cost) against `storage.store`, dense and index Z, int8
    and packed int4, with the Conv's reshape shape."""
    model, feed = _model(kind)
    g, layer = _layer(model, feed)
    r = ss.sqf(weight_matrix(g, layer), np.eye(layer.inputs), fmt, iters=2)
    new = storage.store(model, layer, r, on_activation=method.on_activation(fmt, layer))
    old = {t.name for t in model.graph.initializer}
    written = sum(len(t.raw_data) for t in new.graph.initializer if t.name not in old)
    assert written == method.stored_bytes(fmt, layer, 4)
    params = sum(int(np.prod(t.dims)) for t in new.graph.initializer if t.name not in old and t.data_type in
                 (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4))
    assert params == method.stored_params(fmt, layer)


def test_grid_has_four_bits_only_where_onnx_has_int4():
    assert {f.z_bits for f in method.formats(64, 24, 17)} == {8}
    grid = method.formats(64, 24, 21)
    assert {f.z_bits for f in grid} == {8, 4} and {f.rank for f in grid} == {12, 6, 3}
    assert all(1 <= f.nnz <= f.rank for f in grid)


def test_table_shows_the_error_next_to_low_rank(result):
    _, _, report, _ = result
    lines = report.table().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("sparse quantized factors"))
    assert "low rank" in lines[head]
    for row, line in zip(report.sections["sqf"], lines[head + 1:head + 3]):
        assert line.split()[:2] == [row["layer"], row["format"]]
        assert float(line.split()[-1]) == pytest.approx(row["lowrank_error"], abs=1e-4)


def test_half_weights_below_opset_19_are_left_alone_with_the_reason(tmp_path):
    """DequantizeLinear takes float16 scales from opset 19 only: at 17 every layer is skipped
    and the model is written unchanged; at 19 the same layers are stored as factors."""
    import graphs
    from onnx import version_converter
    src = tmp_path / "half.onnx"
    onnx.save(graphs.half_mlp(), str(src))
    report = compress(src, tmp_path / "h.onnx", config=Config(method="sqf", size_target=0.6))
    assert report.sections.get("sqf", []) == []
    assert {s["node"] for s in report.skipped} == {"fc1", "fc2", "fc3"}
    assert all("float16 weight needs DequantizeLinear of opset 19" in s["reason"] for s in report.skipped)
    assert _inits(tmp_path / "h.onnx").keys() == _inits(src).keys()
    onnx.save(version_converter.convert_version(graphs.half_mlp(), 19), str(src))
    report = compress(src, tmp_path / "h19.onnx", config=Config(method="sqf", size_target=0.6))
    assert {x["layer"] for x in report.sections["sqf"]} == {"fc1", "fc2", "fc3"}
    onnx.checker.check_model(str(tmp_path / "h19.onnx"), full_check=True)
