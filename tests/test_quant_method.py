"""Quantization as a method of the shared allocator: sites, storage in the graph, plans that
replay, and mixing with ID under one budget."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from onnxcompress import Config, Plan, UsageError, compress

from checks import assert_valid_output, run
from test_mixed import feeds, path  # noqa: F401 (path: the embed_ffn model, a fixture)

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.mark.parametrize("decode", ["run", "load"])
def test_size_target_quantizes_weights_as_int8_with_dequantize(path, tmp_path, decode):
    """"run": each int8 weight feeds a DequantizeLinear; "load": a Cast of it (then a Mul by its
    scales), and no DequantizeLinear is left."""
    data = feeds(16)
    out = tmp_path / "q.onnx"
    report = compress(path, out, config=Config(method="quant", size_target=0.4, decode=decode), calib=data, val=data)
    new = onnx.load(str(out))
    ints = [t for t in new.graph.initializer if t.data_type == TensorProto.INT8]
    readers = {n.input[0]: n.op_type for n in new.graph.node if n.input}
    deq = [n for n in new.graph.node if n.op_type == "DequantizeLinear"]
    assert len(ints) == len(report.sections["quantized"]) >= 2
    assert len(deq) == (len(ints) if decode == "run" else 0)
    assert {readers[t.name] for t in ints} == {"DequantizeLinear" if decode == "run" else "Cast"}
    assert report.allocation["reached"] <= 0.4
    assert report.params["before"] <= report.params["after"] <= 1.1 * report.params["before"]  # codes + scales
    for row in report.sections["quantized"]:
        assert row["format"] == "int8/channel" and row["bytes_after"] < 0.4 * row["bytes_before"]
        assert 0 <= row["error"] < 0.05
    assert_valid_output(path, out, data[:3])  # values: the agreement below
    a = report.agreement[0]
    assert a["rel_l2"] < 0.02 and a["cosine"] > 0.999


def test_quantized_plan_replays_exactly(path, tmp_path):
    data = feeds(16)
    first = compress(path, tmp_path / "a.onnx", config=Config(method="quant", size_target=0.4), calib=data, val=data)
    plan_file = tmp_path / "plan.json"
    first.plan.save(plan_file)
    saved = json.loads(plan_file.read_text())
    assert {e["method"] for e in saved["entries"]} == {"quant"}
    compress(path, tmp_path / "b.onnx", plan=Plan.load(plan_file), calib=data, val=data)
    for a, b in zip(run(tmp_path / "a.onnx", data[0]), run(tmp_path / "b.onnx", data[0])):
        np.testing.assert_array_equal(a, b)


def test_one_budget_mixes_channel_pruning_and_quantization(tmp_path):
    """The example CNN at 12% of its bytes (below what int4 alone reaches): the allocator
    quantizes some layers and prunes or splits others, one method per weight."""
    out = tmp_path / "m.onnx"
    report = compress(MODELS / "digits_cnn.onnx", out, config=Config(method="auto", size_target=0.12),
                      calib=MODELS / "digits_cnn_calib.npz", val=MODELS / "digits_cnn_val.npz")
    methods = {e.method for e in report.plan.entries}
    assert "quant" in methods and len(methods) >= 2
    quantized = {x["layer"] for x in report.sections["quantized"]}
    shrunk = {p for g in report.groups if g["kept"] < g["channels"] for p in g["producers"]}
    shrunk |= {x["layer"] for x in report.layers}
    assert quantized and shrunk and not (quantized & shrunk)
    assert report.allocation["reached"] <= 0.12
    assert report.file_size["after"] < 0.15 * report.file_size["before"]
    onnx.checker.check_model(str(out), full_check=True)
    assert report.agreement[0]["top1"] >= 0.95


def test_a_malformed_quantized_entry_is_a_usage_error(path, tmp_path):
    data = feeds(8)
    report = compress(path, tmp_path / "a.onnx", config=Config(method="quant", size_target=0.4), calib=data, val=data)
    d = report.plan.to_dict()
    d["entries"][0]["bits"] = 5
    with pytest.raises(UsageError, match=r"entries\[0\]: 'bits' must be"):
        Plan.from_dict(d)
    d = report.plan.to_dict()
    d["entries"][0]["codes"]["shape"] = [1, 1]
    with pytest.raises(UsageError, match="wrong number of bytes"):
        Plan.from_dict(d)


def test_keep_does_not_quantize_and_says_why(path, tmp_path):
    data = feeds(8)
    report = compress(path, tmp_path / "k.onnx", config=Config(method="quant", keep=0.5), calib=data, val=data)
    assert report.sections.get("quantized", []) == []
    assert any("quantization is chosen by a budget or a target" in s["reason"] for s in report.skipped)


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _stored(model, weight: str) -> int:
    """Bytes of the codes and scales `storage.apply` wrote for `weight`."""
    return sum(len(t.raw_data) for t in model.graph.initializer if t.name.startswith(weight + "_"))


def test_int4_raises_the_opset_and_bytes_are_counted_as_stored(path, tmp_path):
    """Below int8's bytes (0.34 of this model's) only int4 helps: the opset-17 model is converted to 21 and every
    reported byte count is what the file holds (codes packed, float32 scales)."""
    data = feeds(16)
    out = tmp_path / "q4.onnx"
    report = compress(path, out, config=Config(method="quant", size_target=0.3), calib=data, val=data)
    new = onnx.load(str(out))
    onnx.checker.check_model(new, full_check=True)
    assert _opset(onnx.load(str(path))) == 17 and _opset(new) == 21
    rows = report.sections["quantized"]
    assert any(r["format"].startswith("int4") for r in rows)
    assert report.allocation["reached"] <= 0.3                  # int8 alone stops at 0.34
    from onnxcompress.core.graph import GraphIndex
    from onnxcompress.methods.lowrank.layers import find_layers
    weights = {x.key: x.weight for x in find_layers(GraphIndex(onnx.load(str(path)))).layers}
    for r in rows:
        assert _stored(new, weights[r["layer"]]) == r["bytes_after"], r
    assert_valid_output(path, out, data[:3])
    assert report.agreement[0]["cosine"] > 0.99


def test_formats_whole_blocks_once_by_decreasing_bytes():
    """MatMul 64 -> 8 (W 8 x 64): b32 and b64 fit (b64 is the whole row: per channel, offered
    once), b128 does not divide 64; b32 with float16 scales stores as many bytes as per channel
    (not offered), b64 with float16 scales fewer; the table (64 x 8, blocks along d = 8) only per
    channel."""
    from onnxcompress.core.graph import GraphIndex
    from onnxcompress.methods.quant import QuantMethod, solvers as qs
    from test_mixed import embed_ffn
    model = embed_ffn()
    g = GraphIndex(model)
    m = QuantMethod()
    sites, _ = m.sites(g, Config(method="quant"))
    by_kind = {}
    for s in sites:
        by_kind.setdefault(s.target.kind, []).append(s.target)
    fc2 = next(x for x in by_kind["matmul"] if x.inputs == 64)
    assert m.formats(g, fc2) == [qs.Format(8), qs.Format(4, 32), qs.Format(4), qs.Format(4, 64, half=True)]
    table = by_kind["gather"][0]
    assert m.formats(g, table) == [qs.Format(8), qs.Format(4)]


def test_a_refused_upgrade_offers_int8_only_and_says_why(path, tmp_path, monkeypatch, caplog):
    from onnxcompress.methods import quant
    monkeypatch.setattr(quant, "upgrade_opset", lambda model, opset: (None, "opset 17 -> 21 conversion failed: no"))
    data = feeds(16)
    out = tmp_path / "q8.onnx"
    with caplog.at_level("WARNING"):
        report = compress(path, out, config=Config(method="quant", size_target=0.3), calib=data, val=data)
    assert "only int8 per channel is offered: opset 17 -> 21 conversion failed: no" in caplog.text
    assert {r["format"] for r in report.sections["quantized"]} == {"int8/channel"}
    assert report.allocation["reached"] > 0.3                    # int8 alone cannot reach it
    assert _opset(onnx.load(str(out))) == 17


def test_float16_scales_count_two_bytes():
    from onnx import helper, numpy_helper
    from onnxcompress.core.graph import GraphIndex
    from onnxcompress.methods.quant import QuantMethod, solvers as qs, storage
    from onnxcompress.methods.lowrank.layers import find_layers
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "fp16",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4, 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    g = GraphIndex(model)
    layer = find_layers(g).layers[0]
    fmt = qs.Format(4, 32)
    q = qs.rtn(w.T.astype(np.float64), np.ones(64), fmt)
    new = storage.store(model, layer, q)
    onnx.checker.check_model(new, full_check=True)
    scale = next(t for t in new.graph.initializer if t.name.endswith("_scale"))
    assert scale.data_type == TensorProto.FLOAT16
    assert _stored(new, "w") == storage.layer_bytes(layer, fmt, scale_bytes=2) == 64 * 32 // 2 + 32 * 2 * 2
    assert QuantMethod._bytes(layer, fmt, 2) == _stored(new, "w")
    x = rng.standard_normal((4, 64)).astype(np.float16)
    y = run(new, {"x": x})[0]
    np.testing.assert_allclose(y, x.astype(np.float32) @ q.dequantized.T.astype(np.float32), rtol=0, atol=0.2)  # fp16 sums


def test_the_opset_is_converted_once_per_model(path, tmp_path, monkeypatch):
    """Sensitivity probes and the final rewrite reuse the one conversion (`allowed_opset`)."""
    from onnxcompress.methods import quant
    from onnxcompress.methods.quant import storage
    calls, original = [], storage.upgrade_opset

    def counted(model, opset):
        calls.append(opset)
        return original(model, opset)
    monkeypatch.setattr(quant, "upgrade_opset", counted)
    monkeypatch.setattr(storage, "upgrade_opset", counted)
    data = feeds(16)
    report = compress(path, tmp_path / "q.onnx", config=Config(method="quant", size_target=0.3), calib=data, val=data)
    assert any(r["format"].startswith("int4") for r in report.sections["quantized"])
    assert report.allocation.get("sensitivity")                 # probes ran
    assert calls == [21]


def test_a_float16_scale_entry_survives_the_plan_file():
    from onnxcompress.methods.quant import QuantPlan
    from onnxcompress.methods.quant import solvers as qs
    q = qs.gptq(np.random.default_rng(0).standard_normal((4, 64)), np.eye(64), qs.Format(4, 32, half=True))
    plan = QuantPlan("fc", "matmul", 4, 32, q.codes, q.scales, 0.1, half=True)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["half"] is True and d["format"] == "int4/b32/f16"
    QuantPlan.check(d, "entry 0")
    back = QuantPlan.from_dict(d)
    assert back.format == qs.Format(4, 32, half=True)
    np.testing.assert_array_equal(back.scales, q.scales)
    d["half"] = "yes"
    with pytest.raises(UsageError, match="half"):
        QuantPlan.check(d, "entry 0")
