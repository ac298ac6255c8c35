"""Several methods in one plan (`--method auto`), the shared allocator end to end, the plan's
round trip, and `--target` on small models built in code."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import AgreementError, Config, Plan, compress
from onnxcompress.cli import main

from checks import assert_valid_output, run

VOCAB, IN, HIDDEN, OUT = 64, 16, 64, 8


def embed_ffn(seed: int = 0) -> onnx.ModelProto:
    """y = MatMul 8 (Relu(MatMul 64 (x[B,16]) + b)) + Gather(E: 64 x 8, ids[B]).

    The table has rank 2, so any split of rank >= 2 is exact; hidden units 32..63 copy units
    0..31, so ID removes them exactly. The table is a low-rank site no channel group can take
    (its output meets the FFN's at the graph output); the hidden units are an ID group whose
    weights the low-rank sites fc1 and fc2 also claim."""
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((VOCAB, 2)) @ rng.standard_normal((2, OUT))).astype(np.float32)
    w1 = rng.standard_normal((IN, HIDDEN // 2)).astype(np.float32)
    w1 = np.concatenate([w1, w1], axis=1)
    b1 = np.tile(rng.standard_normal(HIDDEN // 2).astype(np.float32), 2)
    w2 = (rng.standard_normal((HIDDEN, OUT)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             helper.make_node("Relu", ["h1"], ["h"], name="act"),
             helper.make_node("MatMul", ["h", "W2"], ["f"], name="fc2"),
             helper.make_node("Gather", ["E", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("Add", ["f", "e"], ["y"], name="join")]
    inits = [numpy_helper.from_array(v, k) for k, v in (("E", table), ("W1", w1), ("b1", b1), ("W2", w2))]
    g = helper.make_graph(nodes, "embed_ffn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", IN]),
                           helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", OUT])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, IN)).astype(np.float32),
             "ids": rng.integers(0, VOCAB, size=8, dtype=np.int64)} for _ in range(n)]


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "embed_ffn.onnx"
    onnx.save(embed_ffn(), str(p))
    return p


def test_auto_finds_both_kinds_of_site_and_full_size_reproduces(path, tmp_path):
    """keep 1.0: the group keeps every unit (an ID entry), the table is split at the largest
    rank that saves anything; outputs agree closely since the table has rank 4."""
    data = feeds(12)
    report = compress(path, tmp_path / "full.onnx", config=Config(method="auto", keep=1.0), calib=data, val=data)
    assert [g["kept"] for g in report.groups] == [HIDDEN]
    assert [x["layer"] for x in report.layers] == ["embed"]
    assert {s["node"] for s in report.skipped} >= {"fc1", "fc2"}   # claimed by the group
    assert {e.method for e in report.plan.entries} == {"id", "lowrank"}
    assert_valid_output(path, tmp_path / "full.onnx", data[:3], same=True, rtol=1e-4, atol=1e-4)


def test_budget_mixes_id_and_low_rank_and_both_are_exact_here(path, tmp_path):
    """At 45% of the parameters the allocator needs both free moves: the exact split of the
    table (rank 2) and the removal of the 32 copied units. Both are exact, so the outputs stay."""
    data = feeds(16)
    out = tmp_path / "mixed.onnx"
    report = compress(path, out, config=Config(method="auto", params_target=0.45), calib=data, val=data)
    assert report.params["after"] <= 0.45 * report.params["before"]
    assert [g["kept"] for g in report.groups] == [HIDDEN // 2]
    assert [(x["layer"], x["rank"]) for x in report.layers] == [("embed", 2)]
    new = onnx.load(str(out))
    assert sorted(n.op_type for n in new.graph.node) == sorted(["MatMul", "Add", "Relu", "MatMul", "Gather", "MatMul", "Add"])
    assert_valid_output(path, out, data[:4], same=True, rtol=1e-3, atol=1e-3)
    sens = report.allocation["sensitivity"]
    assert {s["site"] for s in sens} == {"id group fc1", "lowrank MatMul fc1", "lowrank MatMul fc2", "lowrank Gather embed",
                                         "quant MatMul fc1", "quant MatMul fc2", "quant Gather embed"}
    assert all(s["weight"] >= 0 and s["local"] >= 0 for s in sens)
    assert report.allocation["estimated_error"] == pytest.approx(0.0, abs=1e-8)
    assert report.allocation["measured_error"] < 1e-8


def test_mixed_plan_round_trips_through_save_plan_and_plan(path, tmp_path):
    data = feeds(16)
    out, plan_file = tmp_path / "a.onnx", tmp_path / "plan.json"
    assert main([str(path), str(out), "--calib", str(_npz(tmp_path, data)), "--method", "auto",
                 "--params-target", "0.45", "--save-plan", str(plan_file), "-q"], standalone_mode=False) is None
    saved = json.loads(plan_file.read_text())
    assert saved["version"] == 3 and {e["method"] for e in saved["entries"]} == {"id", "lowrank"}
    plan = Plan.load(plan_file)
    again = compress(path, tmp_path / "b.onnx", plan=plan, calib=data, val=data)
    assert [e.site for e in again.plan.entries] == [e.site for e in plan.entries]
    for a, b in zip(run(tmp_path / "a.onnx", data[0]), run(tmp_path / "b.onnx", data[0])):
        np.testing.assert_array_equal(a, b)


def test_target_meets_its_target_and_reports_every_probe(tmp_path):
    """The mlp of tests/graphs.py with copied units: the search keeps the cosine it was asked for
    on the validation feeds, with at most 8 validation passes, each in the report."""
    import graphs
    p = tmp_path / "mlp.onnx"
    onnx.save(graphs.mlp(dup=True), str(p))
    spec = graphs.BUILDERS["mlp"][1]
    calib, val = graphs.sample_inputs(spec, 256, 0), graphs.sample_inputs(spec, 128, 1)
    report = compress(p, tmp_path / "t.onnx", config=Config(target="cosine>=0.995"), calib=calib, val=val)
    probes = report.allocation["probes"]
    assert 1 <= len(probes) <= 8
    assert report.config["method"] == "auto"
    assert min(a["cosine"] for a in report.agreement) >= 0.995
    passed = [pr for pr in probes if pr["passed"]]
    assert passed and all(pr["score"] >= 0.995 for pr in passed)
    chosen = max(passed, key=lambda pr: pr["position"])
    assert report.file_size["after"] < report.file_size["before"]
    assert chosen["cost"]["bytes"] == min(pr["cost"]["bytes"] for pr in passed)
    assert "probe" in report.table()


def test_unreachable_target_exits_3_and_writes_nothing(path, tmp_path):
    data = feeds(8)
    out = tmp_path / "never.onnx"
    with pytest.raises(AgreementError) as e:
        compress(path, out, config=Config(target="rel_l2<=0", sensitivity=False), calib=data, val=data)
    assert "no compressed model meets --target rel_l2<=0" in str(e.value)
    assert e.value.exit_code == 3 and not out.exists()
    assert e.value.report.allocation["probes"]


def test_target_on_an_output_without_that_figure_is_a_usage_error(path, tmp_path):
    data = feeds(8)
    with pytest.raises(Exception) as e:
        compress(path, tmp_path / "x.onnx", config=Config(target="top1>=0.9"), calib=data, val=data)
    assert "no output of this model has that figure" in str(e.value)
    assert getattr(e.value, "exit_code", None) == 2


def _npz(tmp_path, data):
    f = tmp_path / "calib.npz"
    np.savez(f, x=np.concatenate([d["x"] for d in data]), ids=np.concatenate([d["ids"] for d in data]))
    return f
