"""Embedding tables split with exact rows for the tokens calibration saw: E ~ A B + R_S, at no
more parameters than the plain split of the same rank (solver, rewrite, plan, report)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from checks import assert_valid_output, run, save
from onnxcompress import Config, Plan, compress
from onnxcompress.methods.lowrank import solvers as lr

VOCAB, WIDTH, SEEN = 300, 24, 40


def zipf_counts(rng, vocab=VOCAB, seen=SEEN) -> np.ndarray:
    counts = np.zeros(vocab)
    ids = rng.choice(vocab, size=seen, replace=False)
    counts[ids] = np.ceil(1000.0 / np.arange(1, seen + 1))
    return counts


def test_seen_rows_are_exact_within_the_plain_budget():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((VOCAB, WIDTH))
    counts = zipf_counts(rng)
    rank = 12
    split = lr.frequent_rows(e, counts, rank)
    seen = np.flatnonzero(counts)
    np.testing.assert_array_equal(split.rows, seen)
    approx = split.left @ split.right
    np.testing.assert_allclose(approx[seen] + split.residual, e[seen], atol=1e-12)
    low = split.right.shape[0]
    # rank r' = r - ceil(((|S| + 1) d + V) / (V + d)) for float32: the rows, a zero row and the int32
    # index map paid by lost ranks, in parameters and in bytes
    assert low == rank - math.ceil(((SEEN + 1) * WIDTH + VOCAB) / (VOCAB + WIDTH))
    assert low * (VOCAB + WIDTH) + (SEEN + 1) * WIDTH <= rank * (VOCAB + WIDTH)
    assert 4 * (low * (VOCAB + WIDTH) + (SEEN + 1) * WIDTH) + 4 * VOCAB <= 4 * rank * (VOCAB + WIDTH)
    # the Good-Turing estimate, by its formula: only the unseen rows count, with smoothed weights
    w = lr.token_weights(counts)
    d = np.sum((e - approx) ** 2, axis=1)
    d[seen] = 0.0
    assert split.error == pytest.approx(np.dot(w, d) / np.dot(w, np.sum(e * e, axis=1)))
    # the plain split of the same rank, measured the same way, loses more
    spec = lr.frequency_weighted(e, counts)
    a, b = spec.factors(rank)
    assert split.error < lr.smoothed_error(e, counts, None, a, b)


@pytest.mark.parametrize("itemsize, multiple", [(2, 1), (4, 4), (8, 1)])
def test_the_rows_fit_in_the_plain_split_bytes_at_any_precision_and_rounding(itemsize, multiple):
    rng = np.random.default_rng(4)
    e = rng.standard_normal((VOCAB, WIDTH))
    counts = zipf_counts(rng)
    found = 0
    for rank in range(1, WIDTH):
        split = lr.frequent_rows(e, counts, rank, itemsize=itemsize, multiple=multiple, floor=2)
        if split is None:
            continue
        found += 1
        low = split.right.shape[0]
        assert low >= 2 and low % multiple == 0
        params = low * (VOCAB + WIDTH) + (SEEN + 1) * WIDTH
        assert params <= rank * (VOCAB + WIDTH)
        assert params * itemsize + 4 * VOCAB <= rank * (VOCAB + WIDTH) * itemsize
    assert found


def test_no_room_for_the_rows_means_no_split():
    rng = np.random.default_rng(1)
    e = rng.standard_normal((VOCAB, WIDTH))
    assert lr.frequent_rows(e, zipf_counts(rng), 2) is None            # the rows alone cost more than rank 2
    assert lr.frequent_rows(e, np.zeros(VOCAB), 12) is None            # nothing seen: nothing to keep exact


def table_model(rng) -> onnx.ModelProto:
    """ids[B, S] -> Gather(table 300 x 24) -> MatMul(24 x 6) -> y."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="emb"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, WIDTH)).astype(np.float32), "table"),
             numpy_helper.from_array(rng.standard_normal((WIDTH, 6)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "table", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(2)
    src = save(tmp_path, table_model(rng))
    seen = rng.choice(VOCAB, size=SEEN, replace=False)
    calib = [{"ids": rng.choice(seen, size=(1, 10)).astype(np.int64)} for _ in range(40)]
    return src, seen, calib


@pytest.mark.parametrize("decode, ops", [
    ("run", ["Add", "Gather", "Gather", "Gather", "MatMul", "MatMul"]),       # B^T lookup, A^T, rows by slot
    ("load", ["Add", "Gather", "Gather", "MatMul", "MatMul"])])               # the table formed, then looked up
def test_the_split_table_reproduces_seen_tokens_and_replays(tmp_path, table, decode, ops):
    src, seen, calib = table
    out = tmp_path / "out.onnx"
    report = compress(src, out, config=Config(method="aasvd", keep=0.5, round=1, include="emb", force=True,
                                              decode=decode), calib=calib, val=calib[:8])
    row = next(r for r in report.layers if r["layer"] == "emb")
    used = np.unique(np.concatenate([f["ids"].ravel() for f in calib]))
    assert row["exact_rows"] == len(used)
    assert row["params_after"] <= VOCAB * WIDTH // 2
    model = onnx.load(str(out))
    assert sorted(n.op_type for n in model.graph.node) == ops
    if decode == "load":  # what ONNX Runtime runs is the original's graph: the table is folded at load
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(tmp_path / "optimized.onnx"))
        assert sorted(n.op_type for n in optimized.graph.node) == sorted(n.op_type for n in onnx.load(str(src)).graph.node)
    # seen tokens (negative indices too) give the original's output; an unseen one only approximately
    for ids in (used[None, :], used[None, :] - VOCAB):
        feed = {"ids": ids.astype(np.int64)}
        np.testing.assert_allclose(run(out, feed)[0], run(src, feed)[0], rtol=1e-4, atol=1e-4)
    unseen = np.setdiff1d(np.arange(VOCAB), used)[None, :20].astype(np.int64)
    assert not np.allclose(run(out, {"ids": unseen})[0], run(src, {"ids": unseen})[0], atol=1e-3)
    assert_valid_output(src, out, calib[:4])
    # the plan carries the rows: written, read back and applied, the same model
    plan = Plan.from_dict(report.plan.to_dict())
    again = tmp_path / "again.onnx"
    compress(src, again, config=Config(force=True, decode=decode), calib=calib, val=calib[:4], plan=plan)
    feed = {"ids": np.arange(VOCAB, dtype=np.int64)[None, :]}
    np.testing.assert_array_equal(run(again, feed)[0], run(out, feed)[0])


def test_plain_svd_and_the_sensitivity_probe_split_without_rows(tmp_path, table):
    src, _, calib = table
    report = compress(src, tmp_path / "svd.onnx", config=Config(method="svd", keep=0.5, round=1, include="emb",
                                                                force=True), calib=calib)
    assert next(r for r in report.layers if r["layer"] == "emb")["exact_rows"] == 0
    report = compress(src, tmp_path / "q.onnx", config=Config(method="aasvd", keep=0.5, round=1, include="emb",
                                                              quantize="int8", force=True), calib=calib)
    assert next(r for r in report.layers if r["layer"] == "emb")["exact_rows"] == 0   # rows would be rounded
    report = compress(src, tmp_path / "budget.onnx", config=Config(method="aasvd", params_target=0.6, round=1,
                                                                   probe_feeds=8, force=True), calib=calib)
    probe = next(s for s in report.allocation["sensitivity"] if s["site"].endswith("emb"))
    assert probe["local"] > 0 and probe["measured"] > 0   # the plain split: calibration tokens see its error


def test_a_plan_naming_split_nodes_by_position_still_replays(tmp_path):
    """Plans saved before split nodes were always named keyed the `--quantize` entries of an
    unnamed node's factors by position ("<Gather #0>", "<MatMul #1>" in the split model); they
    still replay, to the same model."""
    rng = np.random.default_rng(2)
    m = table_model(rng)
    for n in m.graph.node:
        n.name = ""
    src = save(tmp_path, m, "src.onnx")
    seen = rng.choice(VOCAB, size=SEEN, replace=False)
    calib = [{"ids": rng.choice(seen, size=(1, 10)).astype(np.int64)} for _ in range(40)]
    cfg = dict(method="aasvd", keep=0.5, round=1, force=True, decode="run")
    first = compress(src, tmp_path / "q.onnx", config=Config(quantize="int8", **cfg), calib=calib, val=calib[:8])
    d = first.plan.to_dict()
    splits_only = Plan.from_dict({**d, "entries": [e for e in d["entries"] if not e.get("after")]})
    compress(src, tmp_path / "split.onnx", config=Config(force=True, decode="run"), calib=calib, val=calib[:8],
             plan=splits_only)  # the model the `--quantize` entries were made for
    split = [n for n in onnx.load(str(tmp_path / "split.onnx")).graph.node]
    renamed = 0
    for e in d["entries"]:
        i = next((k for k, n in enumerate(split) if n.name == e["layer"]), None)
        if e.get("after") and i is not None:
            e["layer"], renamed = f"<{split[i].op_type} #{i}>", renamed + 1
    assert renamed == 4  # both factors of the table and of the MatMul
    again = tmp_path / "again.onnx"
    compress(src, again, config=Config(force=True, decode="run"), calib=calib, val=calib[:8], plan=Plan.from_dict(d))
    feed = {"ids": np.arange(VOCAB, dtype=np.int64)[None, :]}
    np.testing.assert_array_equal(run(again, feed)[0], run(tmp_path / "q.onnx", feed)[0])
