"""Block dropping as a method of the shared allocator: which Adds are residual blocks (and why the
others are not), the rewrite (y := x, the body removed), the curve's error and costs, the probe
that puts it in the allocator's currency, plans, and how a block and the sites inside it exclude
each other."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphs
from checks import reasons, run
from onnxcompress import Config, Plan, compress
from onnxcompress.api import shapes_at
from onnxcompress.core.graph import GraphIndex
from onnxcompress.core.normalize import normalize
from onnxcompress.methods import REGISTRY
from onnxcompress.methods.block import BlockPlan, Energy, local_error

METHOD = REGISTRY["block"]


def index(model, feed) -> GraphIndex:
    norm = normalize(model)
    return GraphIndex(norm, *shapes_at(norm, feed))


def mlp_feeds(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(n)]


def enc_feeds(n=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.zeros((1, 1, 1, 5), np.float32)
        mask[..., rng.integers(3, 6):] = -1e4   # padded positions
        out.append({"x": rng.standard_normal((1, 5, 8)).astype(np.float32), "mask": mask})
    return out


def exact(model, feed) -> np.ndarray:
    """The first output with ONNX Runtime's graph fusions off (a fused Add + LayerNormalization
    rounds differently from the two ops), so "the same function" can be compared bit for bit."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def drop(model, feed, keys):
    g = index(model, feed)
    sites, _ = METHOD.sites(g, Config(method="block"))
    chosen = [s for s in sites if s.key in keys]
    assert len(chosen) == len(keys)
    return METHOD.rewrite(g.model, g, sites, [BlockPlan(s.key, s.target.skip, s.target.branch) for s in chosen])


# -- which Adds are blocks ------------------------------------------------------------------------


def test_identity_skip_block_is_found_with_its_body_and_weights():
    g = index(graphs.residual_blocks(), mlp_feeds(1)[0])
    sites, skipped = METHOD.sites(g, Config(method="block"))
    assert [s.key for s in sites] == ["join"] and not skipped
    block = sites[0].target
    assert {g.key(j) for j in block.nodes} >= {"fc1", "fc2"} and "stem" not in {g.key(j) for j in block.nodes}
    assert block.skip == g.nodes[g.index_of("stem")].output[0]
    assert sorted(n.split("_")[0] for n in block.weights) == ["b1", "b2", "w1", "w2"]
    assert sites[0].claims == frozenset(block.weights)


@pytest.mark.parametrize("kind, why", [
    ("projection", "the skip is not the identity: both operands are computed from node 'stem'"),
    ("parallel", "not a residual block: neither operand is computed from the other"),
    ("leak", "is also read by 'aux' outside it"),
])
def test_adds_that_are_not_droppable_blocks_are_left_alone_with_the_reason(kind, why, tmp_path):
    model = graphs.residual_blocks(kind)
    g = index(model, mlp_feeds(1)[0])
    sites, skipped = METHOD.sites(g, Config(method="block"))
    assert sites == [] and len(skipped) == 1
    assert skipped[0].node == "join" and why in skipped[0].reason
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    data = mlp_feeds()
    report = compress(src, tmp_path / "o.onnx", config=Config(method="block", params_target=0.5), calib=data, val=data)
    assert "blocks" not in report.sections
    assert why in reasons(report)["join"]
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert sorted(n.name for n in out.graph.node) == sorted(n.name for n in model.graph.node)   # left alone


def test_transformer_sub_blocks_are_found_and_the_mask_add_is_not():
    g = index(graphs.post_ln_encoder(), enc_feeds(1)[0])
    sites, skipped = METHOD.sites(g, Config(method="block"))
    assert [s.key for s in sites] == ["attn.add", "ffn.add"]
    attn, ffn = (s.target for s in sites)
    assert attn.skip == "x" and attn.side == ("mask",)
    assert {"scores", "context", "attn.q", "attn.o"} <= {g.key(j) for j in attn.nodes}
    ln = g.nodes[g.producer[ffn.skip]]
    assert ln.op_type == "LayerNormalization"    # post-LN: the FFN block starts at the LN after the attention
    assert [s.node for s in skipped] == ["masked"] and "not a residual block" in skipped[0].reason


def test_include_and_exclude_select_blocks_by_node_name():
    g = index(graphs.post_ln_encoder(), enc_feeds(1)[0])
    only, _ = METHOD.sites(g, Config(method="block", include="ffn"))
    assert [s.key for s in only] == ["ffn.add"]
    left, skipped = METHOD.sites(g, Config(method="block", exclude="attn"))
    assert [s.key for s in left] == ["ffn.add"] and "excluded by --exclude" in reasons_of(skipped)["attn.add"]


def reasons_of(skipped):
    return {s.node: s.reason for s in skipped}


# -- the rewrite -----------------------------------------------------------------------------------


def test_dropped_block_computes_the_graph_with_f_zero_exactly():
    feed = mlp_feeds(1)[0]
    new = drop(graphs.residual_blocks(), feed, ["join"])
    names = {n.name for n in new.graph.node}
    assert not names & {"fc1", "fc2", "join"} and {"stem", "head"} <= names
    assert not any(t.name.split("_")[0] in ("w1", "b1", "w2", "b2") for t in new.graph.initializer)
    onnx.checker.check_model(new, full_check=True)
    for f in mlp_feeds(5, seed=3):
        np.testing.assert_array_equal(exact(new, f), exact(graphs.residual_blocks(zero_branch=True), f))
        assert not np.allclose(run(new, f)[0], run(graphs.residual_blocks(), f)[0], atol=1e-3)


@pytest.mark.parametrize("which", ["attn", "ffn"])
def test_dropped_transformer_sub_block_keeps_the_layernorm_after_it(which):
    feed = enc_feeds(1)[0]
    new = drop(graphs.post_ln_encoder(), feed, [f"{which}.add"])
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("LayerNormalization") == 2
    assert ops.count("Softmax") == (0 if which == "attn" else 1) and ops.count("Relu") == (1 if which == "attn" else 0)
    assert [i.name for i in new.graph.input] == ["x", "mask"]   # graph inputs stay, even unread
    for f in enc_feeds(4, seed=5):
        np.testing.assert_array_equal(exact(new, f), exact(graphs.post_ln_encoder(zero=which), f))


def test_blocks_in_a_row_and_a_graph_output_y_are_dropped_through_each_other():
    feed = {"x": np.ones((2, 6), np.float32)}
    model = graphs.chain_blocks()
    for keys, zero in ((["add1"], (1,)), (["add2"], (2,)), (["add1", "add2"], (1, 2))):
        new = drop(model, feed, keys)
        assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
        assert sum(n.op_type == "Add" for n in new.graph.node) == 2 - len(keys)
        f = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)}
        np.testing.assert_array_equal(exact(new, f), exact(graphs.chain_blocks(zero), f))
    both = drop(model, feed, ["add1", "add2"])
    assert [n.op_type for n in both.graph.node] == ["Identity"] and not both.graph.initializer


# -- curve, costs, probe ----------------------------------------------------------------------------


def test_curve_error_is_the_energy_of_f_over_y_and_costs_are_what_dropping_removes():
    model = graphs.residual_blocks()
    data = mlp_feeds(8)
    g = index(model, data[0])
    site = METHOD.sites(g, Config(method="block"))[0][0]
    block = site.target
    probe = onnx.ModelProto()
    probe.CopyFrom(g.model)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in (block.branch, block.output)])
    ef = ey = 0.0
    for f in data:
        fb, yb = run(probe, f)[-2:]
        ef, ey = ef + float(np.sum(fb.astype(np.float64) ** 2)), ey + float(np.sum(yb.astype(np.float64) ** 2))
    from onnxcompress.core.calibrate import calibrate
    from onnxcompress.core.cost import node_flops
    stats = calibrate(g.model, METHOD.requests(site), data)
    assert stats[Energy(block.branch)][1] == stats[Energy(block.output)][1] == 2 * 8 * len(data)
    assert local_error(stats, block) == pytest.approx(ef / ey, rel=1e-9)
    flops = node_flops(g)
    curve = METHOD.curve(g, site, stats, Config(method="block"), flops)
    assert list(curve.sizes) == [1, 0] and curve.error[0] == 0 and curve.error[1] == pytest.approx(ef / ey)
    params = sum(c.base for c in curve.costs if c.metric == "params")
    assert params == 16 * 8 + 16 + 8 * 16 + 8
    assert sum(c.base for c in curve.costs if c.metric == "flops") == flops[g.index_of("fc1")] + flops[g.index_of("fc2")]
    assert all(list(c.factor) == [1.0, 0.0] for c in curve.costs)


def test_budget_drops_the_cheapest_block_and_the_probe_measures_its_real_error(tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(graphs.post_ln_encoder(), str(src))
    data = enc_feeds(24)
    report = compress(src, tmp_path / "o.onnx", config=Config(method="block", params_target=0.9, probe_feeds=8),
                      calib=data, val=data)
    rows = report.sections["blocks"]
    assert len(rows) == 1 and rows[0]["nodes"] > 0
    probes = {s["site"]: s for s in report.allocation["sensitivity"]}
    assert set(probes) == {"block Add attn.add", "block Add ffn.add"}
    # the probe's measured error is the real model's with that block dropped, on the probe feeds
    for key, p in probes.items():
        dropped = drop(graphs.post_ln_encoder(), data[0], [key.split()[-1]])
        num = den = 0.0
        for f in data[:8]:
            y, y2 = run(graphs.post_ln_encoder(), f)[0].astype(np.float64), run(dropped, f)[0].astype(np.float64)
            num, den = num + float(np.sum((y - y2) ** 2)), den + float(np.sum(y * y))
        assert p["measured"] == pytest.approx(num / den, rel=1e-5)
        assert p["weight"] * p["local"] == pytest.approx(p["measured"], rel=1e-9)
    # either block alone meets the budget, so the walk drops the one whose probe measured less error
    sizes = {"attn.add": 4 * (8 * 8 + 8) + 1, "ffn.add": 2 * 8 * 32 + 32 + 8}   # + the scale 1/sqrt(d)
    assert all(n >= 0.1 * report.params["before"] for n in sizes.values())
    assert rows[0]["block"] == min(probes, key=lambda k: probes[k]["measured"]).split()[-1]
    assert report.params["after"] == report.params["before"] - sizes[rows[0]["block"]]
    assert report.flops["after"] < report.flops["before"]
    table = report.table()
    assert "dropped block (y := x)" in table and rows[0]["block"] in table


def test_plan_with_two_dropped_blocks_replays(tmp_path):
    src = tmp_path / "enc.onnx"
    onnx.save(graphs.post_ln_encoder(), str(src))
    data = enc_feeds(12)
    a = compress(src, tmp_path / "a.onnx", config=Config(method="block", tolerance=0.95), calib=data, val=data)
    assert len(a.sections["blocks"]) == 2
    saved = tmp_path / "plan.json"
    a.plan.save(saved)
    assert [e["method"] for e in json.loads(saved.read_text())["entries"]] == ["block", "block"]
    plan = Plan.load(saved)
    compress(src, tmp_path / "b.onnx", config=Config(method="block"), plan=plan, val=data)
    for f in data[:3]:
        np.testing.assert_array_equal(run(onnx.load(str(tmp_path / "a.onnx")), f)[0],
                                      run(onnx.load(str(tmp_path / "b.onnx")), f)[0])


# -- blocks and the sites inside them ---------------------------------------------------------------


def all_curves(model, data, config):
    """Every registered method's sites and curves on `model`, as `compress` makes them."""
    from onnxcompress.core.calibrate import calibrate
    from onnxcompress.core.cost import node_flops
    g = index(model, data[0])
    methods = {name: m for name, m in REGISTRY.items()}
    sites = [s for m in methods.values() for s in m.sites(g, config)[0]]
    stats = calibrate(g.model, [r for s in sites for r in methods[s.method].requests(s)], data)
    flops = node_flops(g)
    return g, methods, [methods[s.method].curve(g, s, stats, config, flops) for s in sites]


def test_a_dropped_block_voids_the_sites_inside_it():
    """An allocation that drops a block: the channel groups, splits and quantized weights inside
    it make no entry (their nodes are gone) and say why; sites outside it are untouched; the
    rewrite of every method in turn gives the model with that block's f = 0."""
    from onnxcompress.decide import _realize
    data = enc_feeds(12)
    config = Config(method="auto", params_target=0.5)
    g, methods, curves = all_curves(graphs.post_ln_encoder(), data, config)
    ids = [c.id for c in curves]
    idx = [0] * len(curves)
    idx[ids.index("block Add attn.add")] = 1
    idx[ids.index("id group ffn.1")] = 8             # a group outside the block shrinks as well
    entries, left = _realize(g, methods, curves, idx, config, {})
    assert sorted((e.method, e.site) for e in entries) == [("block", "attn.add"), ("id", "ffn.1")]
    why = {s.node: s.reason for s in left}
    for node in ("attn.q", "attn.k", "attn.v", "attn.o"):
        assert "its weights are compressed by block Add attn.add" in why[node], node
    assert "ffn.2" not in why or "block" not in why["ffn.2"]
    new = g.model
    for name, m in methods.items():
        new = m.rewrite(new, g, [c.site for c in curves if c.site.method == name], [e for e in entries if e.method == name])
    assert not any(n.name.startswith("attn.") for n in new.graph.node)
    assert sum(n.op_type == "MatMul" for n in new.graph.node) == 2     # the FFN's, one of them narrower
    f = data[0]
    dropped_only = drop(graphs.post_ln_encoder(), f, ["attn.add"])
    assert not np.allclose(exact(new, f), exact(dropped_only, f))  # the FFN group did shrink ...
    np.testing.assert_allclose(exact(new, f), exact(dropped_only, f), atol=0.5)  # ... a little


def test_walk_drops_a_block_whose_move_is_cheapest_and_freezes_the_sites_inside():
    from onnxcompress.allocate import CostModel, walk
    from onnxcompress.methods.base import Cost, Curve, Site
    block = Curve(Site("block", "b", "Add", frozenset({"w"}), None), np.array([1, 0]), np.array([0.0, 0.01]),
                  (Cost("params", "w", 100.0, np.array([1.0, 0.0])),), steps=np.array([0, 1]))
    inner = Curve(Site("id", "g", "group", frozenset({"w"}), None), np.array([4, 3, 2, 1]),
                  np.array([0.0, 0.05, 0.2, 0.4]), (Cost("params", "w", 100.0, np.array([1, .75, .5, .25])),))
    curves = [block, inner]
    path = walk(curves, CostModel(curves, {"params": 100.0}), "params", [1.0, 1.0])
    assert [(s.site, s.index) for s in path.steps] == [(0, 1)]
    assert path.steps[0].cost["params"] == 0.0


def test_a_block_whose_inner_site_took_its_weights_stays_whole(tmp_path):
    """Per-site rules: the earlier method in the registry (ID) takes the weights inside the block
    first; the block is left whole with the reason."""
    src = tmp_path / "enc.onnx"
    onnx.save(graphs.post_ln_encoder(), str(src))
    data = enc_feeds(12)
    report = compress(src, tmp_path / "o.onnx", config=Config(method="auto", tolerance=0.95), calib=data, val=data)
    assert "blocks" not in report.sections
    why = reasons(report)
    assert "its weights are compressed by id group" in why["attn.add"]
    assert "its weights are compressed by id group" in why["ffn.add"]


def test_walk_never_moves_a_block_and_a_site_sharing_its_weights():
    from onnxcompress.allocate import CostModel, walk
    from onnxcompress.methods.base import Cost, Curve, Site
    block = Curve(Site("block", "b", "Add", frozenset({"w"}), None), np.array([1, 0]), np.array([0.0, 0.3]),
                  (Cost("params", "w", 100.0, np.array([1.0, 0.0])),), steps=np.array([0, 1]))
    inner = Curve(Site("id", "g", "group", frozenset({"w"}), None), np.array([4, 3, 2, 1]),
                  np.array([0.0, 0.01, 0.05, 0.4]), (Cost("params", "w", 100.0, np.array([1, .75, .5, .25])),))
    other = Curve(Site("id", "h", "group", frozenset({"v"}), None), np.array([2, 1]), np.array([0.0, 0.5]),
                  (Cost("params", "v", 100.0, np.array([1.0, 0.5])),))
    curves = [block, inner, other]
    path = walk(curves, CostModel(curves, {"params": 200.0}), "params", [1.0, 1.0, 1.0])
    for n in range(len(path.steps) + 1):   # at no position are both moved
        at = path.at(n)
        assert not (at[0] and at[1])
    assert path.steps[0].site == 1   # the cheap first step inside the block comes first ...
    drop = next(s for s in path.steps if s.site == 0)
    assert drop.resets == (1,)       # ... and dropping the block later puts the group back whole
