"""`onnxcompress inspect`: groups and layers found, with sizes, FLOPs and reasons, no calibration."""
from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

import checks
import graphs
from onnxcompress import Config, compress
from onnxcompress.cli import main
from onnxcompress.inspect import inspect_model


def test_mlp_groups_layers_and_flops(tmp_path):
    path = checks.save(tmp_path, graphs.mlp())
    found = inspect_model(path)
    assert {g["group"]: g["channels"] for g in found.groups} == {"fc1": 32, "fc2": 24}
    assert {x["layer"]: (x["out"], x["inputs"]) for x in found.layers} == {"fc1": (32, 16), "fc2": (24, 32),
                                                                            "fc3": (10, 24)}
    # at batch 1: 2 * (16*32 + 32*24 + 24*10) FLOPs; fc2's FLOPs shrink with both groups
    assert found.flops == 2 * (16 * 32 + 32 * 24 + 24 * 10)
    fc1 = next(g for g in found.groups if g["group"] == "fc1")
    assert fc1["flops"] == 2 * (16 * 32 + 32 * 24)
    assert fc1["params"] == 16 * 32 + 32 + 32 * 24  # w1, b1 and the input columns of w2
    fc3 = next(x for x in found.layers if x["layer"] == "fc3")
    assert fc3["max_rank"] == (10 * 24 - 1) // (10 + 24)
    assert found.skipped["id"][0]["node"] == "fc3" and "graph output" in found.skipped["id"][0]["reason"]
    assert found.ops == {"Gemm": 3, "Relu": 2}


def test_flops_match_what_compress_reports(tmp_path):
    path = checks.save(tmp_path, graphs.mlp())
    calib = graphs.sample_inputs([("x", (16,))], 40)
    np.savez(tmp_path / "c.npz", **calib)
    found = inspect_model(path, calib=tmp_path / "c.npz")
    report = compress(path, tmp_path / "o.onnx", calib=tmp_path / "c.npz", config=Config(keep=0.5))
    assert found.at_input_shapes == report.flops["at_input_shapes"]
    assert found.flops == report.flops["before"] and found.params == report.params["before"]
    assert [g["group"] for g in found.groups] == [g["group"] for g in report.groups]


def test_a_group_left_alone_says_why(tmp_path):
    found = inspect_model(checks.save(tmp_path, graphs.layernorm_after()))
    assert found.groups == []
    reasons = {s["node"]: s["reason"] for s in found.skipped["id"]}
    assert "LayerNormalization" in reasons["fc1"]


def test_cli_prints_the_table_and_writes_json(tmp_path):
    path = checks.save(tmp_path, graphs.mlp())
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(main, ["inspect", str(path), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0, r.output
    assert "channel groups (--method id): 2" in r.output and "fc3 (Gemm): reaches graph output" in r.output
    assert json.loads((tmp_path / "i.json").read_text())["groups"][0]["channels"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["i.json"])  # no model written


def test_cli_inspect_of_a_missing_model_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"onnxcompress: error: load: {tmp_path / 'nope.onnx'}: no such file"]
