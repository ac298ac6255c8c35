"""`--keep F --spread`: each kind of site keeps F of its parameters over the whole model, the
allocator deciding per site; the same size as plain `--keep F`."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from checks import assert_valid_output, kept, run, save
from onnxcompress import Config, compress
from onnxcompress.core.errors import UsageError
from onnxcompress.decide import kind
from onnxcompress.api import shapes_at
from onnxcompress.core.graph import GraphIndex
from onnxcompress.core.normalize import normalize
from onnxcompress.methods.base import Site
from onnxcompress.methods.id import IdMethod

WIDTH = 24


def two_groups(quiet: float = 0.02) -> onnx.ModelProto:
    """Two parallel ReLU MLPs of WIDTH hidden channels summed into one output; the second one's
    down projection scaled by `quiet`, so its channels barely reach the output."""
    model = graphs.parallel_mlps(2, WIDTH)
    for t in model.graph.initializer:
        if t.name == "b1":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(quiet), "b1"))
    return model


def feeds(n: int, seed: int) -> dict:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


def error(original, compressed, feed) -> float:
    ref, new = run(original, feed)[0], run(compressed, feed)[0]
    return float(np.linalg.norm(new - ref) / np.linalg.norm(ref))


def test_spread_moves_channels_to_the_group_that_reaches_the_output(tmp_path):
    src = save(tmp_path, two_groups())
    calib, val = feeds(400, 1), feeds(200, 2)
    runs = {}
    for name, spread in (("uniform", False), ("spread", True)):
        out = tmp_path / f"{name}.onnx"
        report = compress(src, out, config=Config(keep=0.5, spread=spread, round=1, force=True), calib=calib, val=val)
        runs[name] = (report, out)
    uniform, spread = (kept(runs[k][0]) for k in ("uniform", "spread"))
    assert uniform == {"up0": (12, WIDTH), "up1": (12, WIDTH)}
    # the same number of channels in all, the loud group keeping more of them
    assert sum(k for k, _ in spread.values()) == 2 * 12
    assert spread["up0"][0] > 12 > spread["up1"][0]
    assert runs["spread"][0].params == runs["uniform"][0].params
    rows = runs["spread"][0].allocation["spread"]
    assert [(r["kind"], r["sites"]) for r in rows] == [("channel group", 2)]
    assert rows[0]["params"] == pytest.approx(0.5) and rows[0]["reached"] == pytest.approx(0.5)
    assert rows[0]["estimated_error"] < rows[0]["uniform_estimated_error"]
    assert len(runs["spread"][0].allocation["sensitivity"]) == 2
    assert error(src, runs["spread"][1], val) < error(src, runs["uniform"][1], val)
    assert_valid_output(src, runs["spread"][1], val)


def test_spread_at_full_size_reproduces_the_outputs(tmp_path):
    src = save(tmp_path, two_groups())
    out = tmp_path / "out.onnx"
    report = compress(src, out, config=Config(keep=1.0, spread=True, force=True), calib=feeds(100, 1),
                      val=feeds(50, 2))
    assert kept(report) == {"up0": (WIDTH, WIDTH), "up1": (WIDTH, WIDTH)}   # entries at full size, as plain keep
    assert report.allocation["sensitivity"] is None                          # nothing to trade: no probe
    assert_valid_output(src, out, feeds(50, 3), same=True)


@pytest.mark.parametrize("model, spec, want", [
    (graphs.attention, [("x", (5, 16)), ("mask", (1, 1, 5))], "attention heads"),
    (graphs.group_norm, [("x", (3, 8, 8))], "channel group"),      # whole groups, but no heads
    (graphs.grouped_conv, [("x", (3, 8, 8))], "channel group"),
])
def test_heads_are_a_kind_of_their_own(model, spec, want):
    """Attention heads (whole heads through Q K^T and P V) are budgeted apart from other channel
    groups, GroupNormalization and grouped-Conv groups (kept in whole blocks too) among them."""
    norm = normalize(model())
    g = GraphIndex(norm, *shapes_at(norm, graphs.sample_inputs(spec, 2)))
    sites, _ = IdMethod().sites(g, Config())
    assert sites and {kind(g, s) for s in sites} == {want}
    assert kind(g, Site("lowrank", "fc2", "layer", frozenset(), object())) == "low rank"


def test_a_plan_fixes_the_sizes_spread_included(tmp_path):
    src = save(tmp_path, two_groups())
    report = compress(src, tmp_path / "a.onnx", config=Config(keep=0.5, round=1, force=True), calib=feeds(100, 1))
    with pytest.raises(UsageError, match="--plan fixes the sizes; --spread"):
        compress(src, tmp_path / "b.onnx", config=Config(spread=True, force=True), calib=feeds(100, 1),
                 plan=report.plan)


def test_spread_with_every_method(tmp_path):
    """`--method auto --spread`: the sites other methods lose to the channel groups (their weights
    are the groups') are neither traded nor probed; the groups keep their share; the model runs."""
    src = save(tmp_path, two_groups())
    out = tmp_path / "auto.onnx"
    report = compress(src, out, config=Config(method="auto", keep=0.6, spread=True, round=1, probe_feeds=8,
                                              force=True), calib=feeds(200, 1), val=feeds(50, 2))
    rows = {r["kind"]: r for r in report.allocation["spread"]}
    assert list(rows) == ["channel group"] and rows["channel group"]["sites"] == 2
    assert sorted(s["site"] for s in report.allocation["sensitivity"]) == ["id group up0", "id group up1"]
    for r in rows.values():
        assert r["reached"] <= r["params"] + 1e-9
    assert_valid_output(src, out, feeds(20, 3))


@pytest.mark.parametrize("rule", [{"params_target": 0.5}, {"tolerance": 0.1}, {"target": "cosine>=0.99"}])
def test_spread_needs_keep(rule):
    with pytest.raises(UsageError, match="--spread"):
        Config(spread=True, **rule)
    Config(spread=True)            # the default rule is keep 0.75
    Config(spread=True, keep=0.5)
