"""tools/bench_size.py: the acceptance checks it prints (compare at or below each ORT size) and
its OpenVINO comparison (agreement figures, and a refusal recorded with OpenVINO's reason)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxcompress.methods.lowrank.layers import weight_matrix
from onnxcompress.methods.quant import solvers as qs
from onnxcompress.methods.quant import storage
from test_quant import _layer, _model, run

TOOL = Path(__file__).resolve().parent.parent / "tools" / "bench_size.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_size", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(run_, who, size, cos):
    return {"run": run_, "who": who, "size": size, "cos": cos, "cos_f": cos}


def test_checks_compare_at_or_below_each_ort_size(bench):
    rows = [_row("ort-a", "ort", 0.25, 0.99), _row("ort-b", "ort", 0.16, 0.96),
            _row("ours-1", "ours", 0.26, 0.999),          # larger than ort-a: does not count for it
            _row("ours-2", "ours", 0.16, 0.985), _row("ours-3", "ours", 0.12, 0.97),
            {"run": "ours-x", "who": "ours", "failed": "boom"}]
    c = bench.checks_minilm(rows)
    per = {p["ort"]: p for p in c["per_ort_run"]}
    assert per["ort-a"]["ours"] == "ours-2" and per["ort-a"]["higher"] is False
    assert per["ort-b"]["ours"] == "ours-2" and per["ort-b"]["higher"] is True
    assert c["every_ort_size"] is False
    assert c["headline"] == {"ours": "ours-3", "size": 0.12, "cos": 0.97, "met": False}
    rows[3]["cos"] = 0.995
    assert bench.checks_minilm(rows)["every_ort_size"] is True


def test_openvino_agrees_or_says_why_it_refuses(bench, tmp_path):
    pytest.importorskip("openvino")
    model, feed = _model("matmul")                     # W: 24 x 64, blocks along the 64 inputs
    g, layer = _layer(model, feed)
    W = weight_matrix(g, layer)
    for fmt, fits in ((qs.Format(4, 32), True), (qs.Format(4, 128), False)):
        path = tmp_path / f"{fmt.block}.onnx"
        onnx.save(storage.store(model, layer, qs.rtn(W, np.eye(64), fmt)), str(path))
        got = bench.openvino_check(path, [feed], [run(onnx.load(str(path)), feed)])
        if fits:
            assert got["exact"]["max_abs_diff"] < 1e-4 and got["exact"]["min_cosine"] > 0.99999
            assert got["default"]["min_cosine"] > 0.99
        else:                                          # a partial block: OpenVINO's own message
            assert "block_size" in got["exact"]["error"] and "block_size" in got["default"]["error"]
