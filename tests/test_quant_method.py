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


def test_size_target_quantizes_weights_as_int8_with_dequantize(path, tmp_path):
    data = feeds(16)
    out = tmp_path / "q.onnx"
    report = compress(path, out, config=Config(method="quant", size_target=0.4), calib=data, val=data)
    new = onnx.load(str(out))
    ints = [t for t in new.graph.initializer if t.data_type == TensorProto.INT8]
    deq = [n for n in new.graph.node if n.op_type == "DequantizeLinear"]
    assert len(ints) == len(deq) == len(report.sections["quantized"]) >= 2
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
    """The example CNN at 20% of its bytes: the allocator quantizes the convolutions and prunes
    the hidden units of the head, one method per weight."""
    out = tmp_path / "m.onnx"
    report = compress(MODELS / "digits_cnn.onnx", out, config=Config(method="auto", size_target=0.2),
                      calib=MODELS / "digits_cnn_calib.npz", val=MODELS / "digits_cnn_val.npz")
    methods = {e.method for e in report.plan.entries}
    assert {"id", "quant"} <= methods
    quantized = {x["layer"] for x in report.sections["quantized"]}
    shrunk = {p for g in report.groups if g["kept"] < g["channels"] for p in g["producers"]}
    assert quantized and shrunk and not (quantized & shrunk)
    assert report.allocation["reached"] <= 0.2
    assert report.file_size["after"] < 0.25 * report.file_size["before"]
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
