"""`onnxcompress sweep`: every point compressed, validated and measured; CSV, JSON and the plot."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

import checks
import graphs
from onnxcompress import RewriteError
from onnxcompress.cli import main
from onnxcompress.sweep import default_points, run_sweep


def _files(tmp_path):
    model = checks.save(tmp_path, graphs.mlp(dup=True))
    np.savez(tmp_path / "calib.npz", **graphs.sample_inputs([("x", (16,))], 60))
    np.savez(tmp_path / "val.npz", **graphs.sample_inputs([("x", (16,))], 20, seed=1))
    return model, tmp_path / "calib.npz", tmp_path / "val.npz"


def test_sweep_measures_every_point_and_the_references(tmp_path):
    model, calib, val = _files(tmp_path)
    points = default_points(("id", "aasvd"), (0.75, 0.5))
    rows = run_sweep(model, tmp_path / "out", calib=calib, val=val, points=points, repeats=2)
    assert [r.series for r in rows] == ["original", "quantize_dynamic", "id", "id", "aasvd", "aasvd"]
    assert all(r.error is None for r in rows), [r.error for r in rows]
    original, quantized, id75, id50 = rows[:4]
    assert original.agreement == 1.0 and original.file_ratio == 1.0
    # dup=True: half of each hidden layer copies the other half, so ID at keep 0.5 is exact
    assert id50.agreement > 0.999 and id50.outputs[0]["rel_l2"] < 1e-4
    assert id50.params_ratio < id75.params_ratio < 1.0
    assert quantized.file_ratio < 1.0 and quantized.flops_ratio is None
    for r in rows:
        assert r.latency_ms > 0 and math.isfinite(r.latency_ratio)
    table = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [t["label"] for t in table] == [r.label for r in rows]
    assert float(table[3]["file_ratio"]) == id50.file_ratio
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())[3]["outputs"][0]["output"] == id50.worst_output
    try:  # the plot needs the optional matplotlib; the table and JSON never do
        import matplotlib  # noqa: F401
        plotted = ["sweep.png"]
    except ImportError:
        plotted = []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sweep.csv", "sweep.json", *plotted]


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import onnxcompress.api
    real = onnxcompress.api.compress

    def compress(model, output, *, config, **kw):
        if config.keep == 0.3:
            raise RewriteError("rewrite: the compressed model does not run (injected)")
        return real(model, output, config=config, **kw)

    monkeypatch.setattr(onnxcompress.api, "compress", compress)
    model, calib, _ = _files(tmp_path)
    rows = run_sweep(model, tmp_path / "out", calib=calib, points=default_points(("id",), (0.3, 0.5)),
                     repeats=1, quantize=False)
    assert [r.label for r in rows] == ["original", "id keep 0.3", "id keep 0.5"]
    assert rows[1].error.endswith("(injected)") and rows[1].agreement is None
    assert rows[2].error is None and rows[2].params_ratio < 1.0
    assert "(injected)" in (tmp_path / "out" / "sweep.csv").read_text()


def test_cli_sweep_and_bad_sizes(tmp_path):
    model, calib, val = _files(tmp_path)
    r = CliRunner().invoke(main, ["sweep", str(model), "--calib", str(calib), "--val", str(val), "--out",
                                  str(tmp_path / "o"), "--methods", "id", "--sizes", "0.5", "--repeats", "1",
                                  "--no-quantize", "--feeds", "10"])
    assert r.exit_code == 0, r.output
    assert "id keep 0.5: agreement" in r.stderr
    assert len(list(csv.DictReader(open(tmp_path / "o" / "sweep.csv")))) == 2
    r = CliRunner().invoke(main, ["sweep", str(model), "--calib", str(calib), "--out", str(tmp_path / "p"),
                                  "--sizes", "half"])
    assert r.exit_code == 2 and "--sizes must be comma-separated numbers" in r.stderr


def test_the_core_never_imports_matplotlib():
    code = ("import sys, onnxcompress, onnxcompress.cli, onnxcompress.inspect, onnxcompress.sweep; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
