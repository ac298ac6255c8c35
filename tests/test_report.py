"""The report: its schema (docs/report-schema.md) against real reports, versions, op counts, the
size rule applied, accuracy against labels, warnings and progress."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import checks
import graphs
from onnxcompress import Config, Plan, compress

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def documented_keys() -> set[str]:
    """The first column of every table row in docs/report-schema.md."""
    rows = re.findall(r"^\| `([^`]+)` \|", (ROOT / "docs" / "report-schema.md").read_text(), flags=re.M)
    assert rows, "no table rows found"
    return set(rows)


def flatten(value, prefix: str, wild: set[str]) -> set[str]:
    """Key paths of a JSON value: `a.b` for objects, `a[].b` inside lists of objects; the keys of
    an object documented as `prefix.*` become `prefix.*`."""
    keys = {prefix} if prefix else set()
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.*" if f"{prefix}.*" in wild else (f"{prefix}.{k}" if prefix else k)
            keys |= flatten(v, path, wild)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for v in value:
            keys |= {k for k in flatten(v, prefix + "[]", wild) if k != prefix + "[]"}
    return keys


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    """Real reports covering every field: ID with a gate and labels, low rank on a CNN, a target,
    ID on a model with external data (block by block), --spread with --quantize, sparse quantized factors, a
    codebook table and float16 block scales, a latency target."""
    tmp = tmp_path_factory.mktemp("reports")
    a = compress(MODELS / "digits_mlp.onnx", tmp / "a.onnx", config=Config(min_agreement=0.5, best=True),
                 calib=MODELS / "digits_calib.npz", val=MODELS / "digits_val.npz",
                 val_labels=MODELS / "digits_val_labels.npy")
    b = compress(MODELS / "digits_cnn.onnx", tmp / "b.onnx", config=Config(method="aasvd", keep=0.6),
                 calib=MODELS / "digits_cnn_calib.npz")
    c = compress(MODELS / "digits_cnn.onnx", tmp / "c.onnx", config=Config(target="top1>=0.98", probe_feeds=4),
                 calib=MODELS / "digits_cnn_calib.npz", val=MODELS / "digits_cnn_val.npz")
    ext = tmp / "ext" / "mlp.onnx"  # external data: calibrated a block at a time (calibration_passes)
    ext.parent.mkdir()
    onnx.save(onnx.load(str(MODELS / "digits_mlp.onnx")), str(ext), save_as_external_data=True,
              location="mlp.onnx.data", size_threshold=0)
    d = compress(ext, tmp / "d.onnx", config=Config(keep=0.5, stats_memory=1), calib=MODELS / "digits_calib.npz")
    e = compress(MODELS / "digits_mlp.onnx", tmp / "e.onnx", config=Config(keep=0.6, spread=True, quantize="int8", probe_feeds=4),
                 calib=MODELS / "digits_calib.npz")
    f = compress(MODELS / "digits_mlp.onnx", tmp / "f.onnx", config=Config(method="sqf", size_target=0.6, probe_feeds=4),
                 calib=MODELS / "digits_calib.npz")
    enc = checks.save(tmp, graphs.post_ln_encoder(), "enc.onnx")   # a dropped residual block
    rng = np.random.default_rng(0)
    enc_data = [{"x": rng.standard_normal((1, 5, 8)).astype(np.float32), "mask": np.zeros((1, 1, 1, 5), np.float32)}
                for _ in range(8)]
    g = compress(enc, tmp / "g.onnx", config=Config(method="block", params_target=0.9, probe_feeds=4),
                 calib=enc_data, val=enc_data)
    assert g.sections.get("blocks")
    from test_codebook import _feeds, embed_two_layers  # a codebook table and float16 block scales
    table = checks.save(tmp, embed_two_layers(), "table.onnx")
    h = compress(table, tmp / "h.onnx", config=Config(method="quant", size_target=0.115, probe_feeds=4),
                 calib=_feeds(8, vocab=8192))
    lat = compress(MODELS / "digits_mlp.onnx", tmp / "lat.onnx", config=Config(latency_target=0.8, probe_feeds=4),
                   calib=MODELS / "digits_calib.npz")   # timed by the tests' stand-in (conftest)
    for r in (a, b, c, lat):  # what --report writes
        r.save(tmp / "r.json")
    return [a.to_dict(), b.to_dict(), c.to_dict(), json.loads((tmp / "r.json").read_text()), d.to_dict(), e.to_dict(), f.to_dict(), g.to_dict(), h.to_dict()]


def test_every_key_is_documented_and_every_documented_key_present(reports):
    documented = documented_keys()
    wild = {k for k in documented if k.endswith(".*")}
    found = set().union(*(flatten(r, "", wild) for r in reports))
    assert found - documented == set(), "keys in the report but not in docs/report-schema.md"
    assert documented - found == set(), "keys documented but in no report"


def test_config_records_the_size_rule_applied(reports, tmp_path):
    mlp, cnn = reports[0], reports[1]
    assert mlp["config"]["keep"] == 0.75  # defaulted
    assert cnn["config"]["keep"] == 0.6
    report = compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", config=Config(flops_target=0.5),
                      calib=MODELS / "digits_calib.npz")
    assert report.config["keep"] is None and report.config["flops_target"] == 0.5


def test_versions_and_op_counts(reports):
    import numpy
    import onnxruntime

    import onnxcompress
    mlp, cnn = reports[0], reports[1]
    assert mlp["versions"]["onnxcompress"] == onnxcompress.__version__
    assert mlp["versions"]["onnxruntime"] == onnxruntime.__version__
    assert mlp["versions"]["onnx"] == onnx.__version__ and mlp["versions"]["numpy"] == numpy.__version__
    model = onnx.load(str(MODELS / "digits_cnn.onnx"))
    counted = {}
    for node in model.graph.node:
        counted[node.op_type] = counted.get(node.op_type, 0) + 1
    assert cnn["ops"]["before"] == counted
    after = cnn["ops"]["after"]
    split = len(cnn["layers"])
    assert sum(after.values()) == sum(counted.values()) + split  # each split layer: one node -> two
    assert after["Conv"] - counted["Conv"] == sum(x["kind"] == "conv" for x in cnn["layers"])
    assert mlp["ops"]["before"] == mlp["ops"]["after"]  # ID keeps the structure


def test_table_names_the_nodes_that_changed(tmp_path):
    report = compress(MODELS / "digits_cnn.onnx", tmp_path / "o.onnx", config=Config(method="svd", keep=0.6),
                      calib=MODELS / "digits_cnn_calib.npz")
    ops = report.ops
    line = next(x for x in report.table().splitlines() if x.startswith("nodes"))
    assert f"Conv {ops['before']['Conv']} -> {ops['after']['Conv']}" in line
    assert "best:" not in report.table() and "optimum:" in report.table()


def test_the_floor_is_computed_on_request_only(reports, tmp_path):
    """`--best` fills each group's best_error (a floor: never above the selection's error); without
    it the figure is null, the ratio too, and the table shows "-"."""
    with_best, without = reports[0]["groups"], reports[4]["groups"]
    assert with_best and without
    for grp in with_best:
        assert 0 <= grp["best_error"] <= grp["error"] + 1e-9
        assert grp["error_ratio"] is None or grp["error_ratio"] >= 1 - 1e-6
    assert all(grp["best_error"] is None and grp["error_ratio"] is None for grp in without)
    report = compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", config=Config(keep=0.5),
                      calib=MODELS / "digits_calib.npz")
    rows = [line.split() for line in report.table().splitlines()]
    assert report.groups and sum(1 for r in rows if len(r) == 4 and "/" in r[1] and r[3] == "-") == len(report.groups)
    assert "(--best)" in report.table()


def test_accuracy_against_labels_matches_a_direct_count(reports):
    acc = reports[0]["agreement"][0]["accuracy"]
    x = np.load(MODELS / "digits_val.npz")["input"]
    labels = np.load(MODELS / "digits_val_labels.npy")
    (logits,) = checks.run(str(MODELS / "digits_mlp.onnx"), {"input": x})
    assert acc["samples"] == len(labels)
    assert acc["original"] == float(np.mean(np.argmax(logits, axis=1) == labels))
    assert 0 < acc["compressed"] <= 1


def test_labels_need_val_and_must_match_its_samples(tmp_path):
    from onnxcompress import DataError, UsageError
    with pytest.raises(UsageError, match="--val-labels needs --val"):
        compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", calib=MODELS / "digits_calib.npz",
                 val_labels=MODELS / "digits_val_labels.npy")
    np.save(tmp_path / "short.npy", np.zeros(10, np.int64))
    with pytest.raises(DataError, match="holds 10 labels"):
        compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", calib=MODELS / "digits_calib.npz",
                 val=MODELS / "digits_val.npz", val_labels=tmp_path / "short.npy")
    np.save(tmp_path / "float.npy", np.zeros(256, np.float32))
    with pytest.raises(DataError, match="expected a 1-D integer array"):
        compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", calib=MODELS / "digits_calib.npz",
                 val=MODELS / "digits_val.npz", val_labels=tmp_path / "float.npy")
    assert not (tmp_path / "o.onnx").exists()


def test_low_agreement_warns_without_a_gate(tmp_path):
    report = compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", config=Config(keep=0.02),
                      calib=MODELS / "digits_calib.npz", val=MODELS / "digits_val.npz")
    worst = min(a["top1"] for a in report.agreement)
    assert worst < 0.5
    assert [w for w in report.warnings if "barely agrees" in w and f"{worst:.4f}" in w]
    fine = compress(MODELS / "digits_mlp.onnx", tmp_path / "p.onnx", config=Config(keep=0.75),
                    calib=MODELS / "digits_calib.npz", val=MODELS / "digits_val.npz")
    assert not [w for w in fine.warnings if "barely agrees" in w]


def test_random_inputs_warning_prints_once_and_a_plan_is_named(tmp_path):
    model = checks.save(tmp_path, graphs.mlp())

    def run(*args):
        return subprocess.run([sys.executable, "-m", "onnxcompress", str(model), *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    r = run(tmp_path / "a.onnx", "--save-plan", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("random inputs") == 1 and "choice of channels" in r.stderr
    r = run(tmp_path / "b.onnx", "--plan", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("random inputs") == 1
    assert "the plan fixed the channels" in r.stderr and "choice of channels" not in r.stderr
    np.savez(tmp_path / "v.npz", **graphs.sample_inputs([("x", (16,))], 20))
    r = run(tmp_path / "c.onnx", "--plan", tmp_path / "p.json", "--val", tmp_path / "v.npz")
    assert r.returncode == 0 and "random inputs" not in r.stdout + r.stderr


def test_progress_reports_decide(tmp_path):
    seen = []
    compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", calib=MODELS / "digits_calib.npz",
             progress=lambda stage, done, total: seen.append((stage, done, total)))
    decide = [s for s in seen if s[0] == "decide"]
    groups = 2  # fc1 and fc2 of the MLP
    assert decide == [("decide", k, groups) for k in range(1, groups + 1)]  # one tick per site's curve
    assert {s[0] for s in seen} == {"calibrate", "decide", "validate"}
    seen.clear()
    compress(MODELS / "digits_mlp.onnx", tmp_path / "p.onnx", calib=MODELS / "digits_calib.npz",
             config=Config(method="svd"), progress=lambda *a: seen.append(a))
    assert [s for s in seen if s[0] == "decide"][-1] == ("decide", 3, 3)  # 3 layers


def test_plan_keeps_size_rules_null(tmp_path):
    report = compress(MODELS / "digits_mlp.onnx", tmp_path / "o.onnx", calib=MODELS / "digits_calib.npz",
                      plan=Plan(method="id", select="id", entries=()))
    assert all(report.config[k] is None for k in ("keep", "tolerance", "flops_target", "params_target"))


def test_fewer_calibration_rows_than_channels_is_warned(tmp_path, caplog):
    model = checks.save(tmp_path, graphs.mlp())  # groups of 32 and 24 channels
    for n, warned in ((12, True), (200, False)):
        np.savez(tmp_path / "c.npz", **graphs.sample_inputs([("x", (16,))], n))
        caplog.clear()
        with caplog.at_level("WARNING", logger="onnxcompress"):
            compress(model, tmp_path / "o.onnx", calib=tmp_path / "c.npz", config=Config(force=True, holdout=0))
        hits = [r.getMessage() for r in caplog.records if "fewer calibration rows than channels" in r.getMessage()]
        assert bool(hits) == warned, (n, hits)
        if warned:
            assert "2 of 2 channel groups" in hits[0] and f"{n} rows, 32 channels" in hits[0]
