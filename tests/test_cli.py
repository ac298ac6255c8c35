"""The command-line contract: exit codes, one-line errors, reports, no output on failure."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphs


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxcompress", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


@pytest.fixture()
def mlp_files(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(), str(model))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **graphs.sample_inputs([("x", (16,))], 64))
    return model, calib


def test_success_writes_default_output_and_report(mlp_files, tmp_path):
    model, calib = mlp_files
    r = cli(model, "--calib", calib, "--keep", "0.5", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "mlp.compressed.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("input", "output", "config", "params", "flops", "file_size", "groups", "skipped",
                "agreement", "seconds"):
        assert key in report
    assert report["params"]["after"] < report["params"]["before"]
    assert report["agreement"][0]["top1"] is not None  # logits from a Gemm look like scores
    assert "logits" not in r.stdout and "fc1" in r.stdout  # the table names groups


def test_existing_output_needs_force(mlp_files, tmp_path):
    model, calib = mlp_files
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    r = cli(model, out, "--calib", calib)
    assert r.returncode == 1
    assert "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    assert cli(model, out, "--calib", calib, "--force", "-q").returncode == 0
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("args", [
    ["--keep", "0.5", "--tolerance", "0.1"],
    ["--keep", "1.5"],
    ["--flops-target", "0"],
    ["--select", "bogus"],
    ["--exclude", "("],
    ["--no-such-flag"],
])
def test_bad_usage_exits_2(mlp_files, tmp_path, args):
    model, calib = mlp_files
    r = cli(model, tmp_path / "o.onnx", "--calib", calib, *args)
    assert r.returncode == 2, r.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_failed_gate_exits_3_and_writes_no_model(mlp_files, tmp_path):
    model, calib = mlp_files
    out = tmp_path / "o.onnx"
    r = cli(model, out, "--calib", calib, "--keep", "0.05", "--min-agreement", "0.9999",
            "--report", tmp_path / "r.json")
    assert r.returncode == 3, r.stderr
    assert "agreement gate" in r.stderr
    assert not out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["gate"]["passed"] is False and report["output"] is None


def test_failed_gate_with_keep_failed_writes_the_model(mlp_files, tmp_path):
    model, calib = mlp_files
    out = tmp_path / "o.onnx"
    r = cli(model, out, "--calib", calib, "--keep", "0.05", "--min-agreement", "0.9999", "--keep-failed")
    assert r.returncode == 3
    assert out.exists()


def test_passed_gate_exits_0(mlp_files, tmp_path):
    model, calib = mlp_files
    r = cli(model, tmp_path / "o.onnx", "--calib", calib, "--keep", "1.0", "--min-agreement", "0.999")
    assert r.returncode == 0, r.stderr


def test_missing_model_is_one_line_exit_1(tmp_path):
    r = cli(tmp_path / "nope.onnx")
    assert r.returncode == 1
    assert "nope.onnx" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_not_onnx_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    r = cli(bad)
    assert r.returncode == 1 and "bad.onnx" in r.stderr and "Traceback" not in r.stderr


def test_calibration_missing_an_input_names_it(mlp_files, tmp_path):
    model, _ = mlp_files
    calib = tmp_path / "wrong.npz"
    np.savez(calib, y=np.zeros((4, 16), np.float32))
    r = cli(model, tmp_path / "o.onnx", "--calib", calib)
    assert r.returncode == 1 and "'x'" in r.stderr and "Traceback" not in r.stderr


def test_no_calibration_warns_loudly(mlp_files, tmp_path):
    model, _ = mlp_files
    r = cli(model, tmp_path / "o.onnx", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "random inputs" in r.stderr
    assert any("random inputs" in w for w in json.loads((tmp_path / "r.json").read_text())["warnings"])


def test_save_plan_then_apply_plan(mlp_files, tmp_path):
    model, calib = mlp_files
    assert cli(model, tmp_path / "a.onnx", "--calib", calib, "--keep", "0.5", "--save-plan", tmp_path / "p.json", "-q").returncode == 0
    r = cli(model, tmp_path / "b.onnx", "--calib", calib, "--plan", tmp_path / "p.json", "-q")
    assert r.returncode == 0, r.stderr
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert [tuple(t.dims) for t in a.graph.initializer] == [tuple(t.dims) for t in b.graph.initializer]
