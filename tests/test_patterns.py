"""Group patterns of issue 15: Concat along the channels, ConvTranspose, gated FFNs.

Each pattern: the structure found (`find_groups`), the outputs at keep 1.0 and with exactly
duplicated channels at keep 0.5 (the original's, to float precision), the maths at a partial
keep (the compressed model computes what the plan's selection and interpolation say), and a
variant that must be left alone, with its reason. Every output passes the full ONNX checker and
runs in ONNX Runtime (`assert_valid_output`).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import graphs
from checks import assert_valid_output, kept, reasons, run, save
from onnxcompress import Config, compress
from onnxcompress.api import shapes_at
from onnxcompress.core.graph import GraphIndex
from onnxcompress.core.normalize import normalize
from onnxcompress.methods.id.groups import find_groups
from onnxcompress.ops.edits import SetAttr

IMG = [("x", (3, 8, 8))]
SEQ = [("x", (5, 16))]


def feeds(spec, n, seed):
    return graphs.sample_inputs(spec, n, seed)


def squeeze(tmp_path, model, spec, *, keep, **cfg):
    path = save(tmp_path, model)
    val = feeds(spec, 8, 2)
    out = tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=keep, force=True, **cfg), calib=feeds(spec, 96, 1), val=val)
    return path, out, report, val


def analyse(model, spec, n=2):
    norm = normalize(model)
    return find_groups(GraphIndex(norm, *shapes_at(norm, feeds(spec, n, 0))))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return m


def tensor_of(model, op_type: str, name: str | None = None) -> str:
    return next(n.output[0] for n in model.graph.node if n.op_type == op_type and (name is None or n.name == name))


def weight_of(path, node_name: str, pos: int = 1) -> np.ndarray:
    m = onnx.load(str(path))
    node = next(n for n in m.graph.node if n.name == node_name)
    return next(onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == node.input[pos])


# ---- Concat along the channels ----

def test_concat_neck_is_one_group_in_the_concatenated_space():
    """conv_a (8) and conv_b (6) meet at the Concat: one group of 14 channels, with the
    squeeze-and-excitation expand conv joined to conv_a's window. The head reads the whole space;
    se.reduce reads conv_a's window [0, 8) through the GlobalAveragePool."""
    model = graphs.concat_neck()
    a = analyse(model, IMG)
    by_producer = {p: grp for grp in a.groups for p in grp.producers}
    grp = by_producer["conv_a"]
    assert grp.channels == 14 and set(grp.producers) == {"conv_a", "conv_b", "se.expand"}
    windows = {e.tensor: (e.offset, e.width) for e in grp.exits}
    assert windows == {tensor_of(model, "Concat"): (0, 0), tensor_of(model, "GlobalAveragePool"): (0, 8)}
    conv_b = next(n for n in model.graph.node if n.name == "conv_b")
    assert {(e.offset, e.width) for e in grp.edits if getattr(e, "tensor", "") == conv_b.input[1]} == {(8, 6)}


@pytest.mark.parametrize("se", [True, False])
@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_concat_neck_reproduces_outputs(tmp_path, se, keep, dup):
    path, out, report, val = squeeze(tmp_path, graphs.concat_neck(dup=dup, se=se), IMG, keep=keep)
    assert kept(report)["conv_a"] == (round(14 * keep), 14)
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_concat_neck_partial_keep_matches_the_maths(tmp_path):
    """At keep 0.5 the head computes Conv(Z[:, S] T) with Z the original concatenation, S the
    kept channels and T the plan's interpolation matrix; each producer keeps its own S-window."""
    model = graphs.concat_neck(se=False)
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=0.5)
    gp = next(g for g in report.plan.groups if g.group == "conv_a")
    cat = tensor_of(model, "Concat")
    keep, t = np.asarray(gp.keep), gp.interpolation[cat]
    assert weight_of(out, "conv_a").shape[0] == int(np.sum(keep < 8))
    assert weight_of(out, "conv_b").shape[0] == int(np.sum(keep >= 8))
    z = run(with_outputs(model, [cat]), val)[1].astype(np.float64)
    approx = np.einsum("nchw,ck->nkhw", z[:, keep], t).astype(np.float32)
    head = next(n for n in model.graph.node if n.name == "head")
    b = graphs.Builder()
    b.inits = [i for i in model.graph.initializer if i.name in head.input[1:]]
    b.nodes = [helper.make_node("Conv", ["z", *head.input[1:]], ["y"], pads=[1, 1, 1, 1])]
    expected = run(b.model([("z", ["N", 14, 8, 8])], ["y"]), {"z": approx})[0]
    np.testing.assert_allclose(run(out, val)[0], expected, rtol=1e-4, atol=1e-4)


def test_window_exit_absorbs_the_windows_interpolation(tmp_path):
    """se.reduce reads conv_a's window: its new weight is W T_w^T, T_w the rows of T for the
    kept channels inside [0, 8) and its columns [0, 8) (and its own output channels are pruned by
    its own group)."""
    model = graphs.concat_neck()
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=0.5, intercept=False)
    gp = next(g for g in report.plan.groups if g.group == "conv_a")
    keep = np.asarray(gp.keep)
    t = gp.interpolation[tensor_of(model, "GlobalAveragePool")]
    tw = t[keep < 8][:, :8]
    assert np.allclose(t[keep >= 8][:, :8], 0)
    own = next((g.keep for g in report.plan.groups if g.group == "se.reduce"), range(2))  # its own outputs
    w = weight_of(path, "se.reduce")[list(own)]
    np.testing.assert_allclose(weight_of(out, "se.reduce"), np.einsum("ocxy,kc->okxy", w, tw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second,why", [
    ("input", "joins 'x2', which is not in a channel group"),
    ("same", "at two different offsets"),
])
def test_concat_left_alone_with_its_reason(tmp_path, second, why):
    """A Concat input outside every group, one tensor concatenated twice, or a constant input:
    the groups reaching the Concat are skipped, and the model computes what it did."""
    model = graphs.concat_neck(se=False, second=second)
    spec = IMG + ([("x2", (6, 8, 8))] if second == "input" else [])
    path, out, report, val = squeeze(tmp_path, model, spec, keep=0.5)
    assert why in reasons(report)["conv_a"]
    assert "conv_a" not in kept(report)
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_nested_concat_and_a_depthwise_exit_in_a_window(tmp_path, keep, dup):
    """Concat(Concat(a4, b6), c5): one space of 15; the inner Concat's depthwise reader keeps
    the inner window's channels and its `group` attribute follows the count kept there."""
    model = graphs.nested_concat(dup=dup)
    a = analyse(model, IMG)
    grp = next(g for g in a.groups if "conv4" in g.producers)
    assert grp.channels == 15 and set(grp.producers) == {"conv4", "conv6", "conv5"}
    assert [(e.offset, e.width) for e in grp.edits if isinstance(e, SetAttr)] == [(0, 10)]
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=keep)
    gp = next(g for g in report.plan.groups if g.group == grp.id)
    dw = next(n for n in onnx.load(str(out)).graph.node if n.name == "dw")
    assert helper.get_attribute_value(next(x for x in dw.attribute if x.name == "group")) == \
        int(np.sum(np.asarray(gp.keep) < 10))
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_concat_into_a_residual_join(tmp_path, keep, dup):
    """Concat(a2, b4) joined by a residual Add with the conv reading it: one group of 6 whose
    producers are conv_a, conv_b (windows [0, 2) and [2, 6)) and the residual conv (all six),
    exits at the residual conv (the concatenation's Gram) and the head (the pooled sum's). With
    the copies lined up in both operands of the join, keep 0.5 keeps one channel of a's window
    and two of b's, and reproduces the outputs on held-out inputs."""
    model = graphs.concat_residual(dup=dup)
    grp = next(g for g in analyse(model, IMG).groups if "conv_a" in g.producers)
    assert grp.channels == 6 and set(grp.producers) == {"conv_a", "conv_b", "res"}
    assert {e.tensor: (e.offset, e.width) for e in grp.exits} == \
        {tensor_of(model, "Concat"): (0, 0), tensor_of(model, "Flatten"): (0, 0)}
    assert grp.windows == ((0, 2), (2, 4))
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=keep)
    assert kept(report)[grp.id] == (round(6 * keep), 6)
    assert weight_of(out, "conv_a").shape[0] == (1 if keep < 1 else 2)
    assert weight_of(out, "res").shape[:2] == (round(6 * keep),) * 2
    assert_valid_output(path, out, val, same=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [lambda: graphs.concat_neck(se=False), graphs.nested_concat, graphs.concat_residual])
@pytest.mark.parametrize("target", [0.5, 0.75])
def test_the_allocator_counts_a_concat_group_by_what_each_window_keeps(tmp_path, build, target):
    """A producer before the Concat scales with the share of its own window that is kept, not
    with k / C: the allocator's FLOPs and parameters at its allocation are the written model's."""
    path = save(tmp_path, build())
    out = tmp_path / "out.onnx"
    for rule, metric in (("flops_target", "flops"), ("params_target", "params")):
        report = compress(path, out, config=Config(force=True, **{rule: target}), calib=feeds(IMG, 96, 1),
                          val=feeds(IMG, 8, 2))
        actual = getattr(report, metric)
        assert report.allocation["reached"] == pytest.approx(actual["after"] / actual["before"], rel=1e-9)


def test_concat_with_a_constant_is_left_alone():
    """(Analysis only: a constant of batch 1 fixes the batch.)"""
    model = graphs.concat_neck(se=False, second="const")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    a = analyse(model, [("x", (3, 8, 8))], n=1)
    why = {s.node: s.reason for s in a.skipped}
    assert "Concat along the channels with a constant" in why["conv_a"]


# ---- ConvTranspose ----

@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_conv_transpose_is_a_producer_and_an_exit(tmp_path, keep, dup):
    """conv1's group exits at up1 (its input channels, W axis 0 absorbs T); up1's output
    channels (W axis 1 and its bias) form a group that exits at up2."""
    path, out, report, val = squeeze(tmp_path, graphs.conv_transpose(dup=dup), IMG, keep=keep)
    assert kept(report) == {"conv1": (round(8 * keep), 8), "up1": (round(6 * keep), 6)}
    assert weight_of(out, "up1").shape[:2] == (round(8 * keep), round(6 * keep))
    assert weight_of(out, "up2").shape[0] == round(6 * keep)
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_grouped_conv_transpose_is_left_alone(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.conv_transpose(group=2), IMG, keep=0.5)
    why = reasons(report)
    assert "grouped transposed convolution (group=2)" in why["conv1"]
    assert "grouped transposed convolution (group=2)" in why["up1"]
    assert kept(report) == {}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- gated feed-forward blocks ----

@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_gated_ffn_shares_one_selection(tmp_path, act, keep, dup):
    """Mul(act(x W1), x W3) -> W2: W1 and W3 are one group (their columns S), W2 its exit."""
    model = graphs.gated_ffn(dup=dup, act=act)
    grp = next(iter(analyse(model, SEQ).groups))
    assert set(grp.producers) == {"ffn.gate", "ffn.up"} and grp.channels == 24
    path, out, report, val = squeeze(tmp_path, model, SEQ, keep=keep)
    assert kept(report) == {grp.id: (round(24 * keep), 24)}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_gated_ffn_partial_keep_matches_the_maths(tmp_path):
    """out = (Z[:, S] T) W2 + x with Z = act(x W1) * (x W3): W1 and W3 keep the same columns S."""
    model = graphs.gated_ffn()
    path, out, report, val = squeeze(tmp_path, model, SEQ, keep=0.5)
    gp = report.plan.groups[0]
    keep = np.asarray(gp.keep)
    np.testing.assert_array_equal(weight_of(out, "ffn.gate"), weight_of(path, "ffn.gate")[:, keep])
    np.testing.assert_array_equal(weight_of(out, "ffn.up"), weight_of(path, "ffn.up")[:, keep])
    z_name = next(n.input[0] for n in model.graph.node if n.name == "ffn.down")
    z = run(with_outputs(model, [z_name]), val)[1].astype(np.float64)
    t = gp.interpolation[z_name]
    expected = (z[..., keep] @ t + gp.intercept.get(z_name, 0.0)) @ weight_of(path, "ffn.down") + val["x"]
    np.testing.assert_allclose(run(out, val)[0], expected, rtol=1e-4, atol=1e-4)


def test_gate_from_outside_a_group_is_left_alone(tmp_path):
    """The gate multiplies a graph input: W1's channels cannot be removed from it."""
    spec = SEQ + [("x3", (5, 24))]
    path, out, report, val = squeeze(tmp_path, graphs.gated_ffn(up="input"), spec, keep=0.5)
    assert "which is not in a channel group" in reasons(report)["ffn.gate"]
    assert kept(report) == {}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


# ---- what a LayerNormalization over the channels blocks ----

def test_layernorm_block_says_what_is_at_stake():
    """fc1 -> LayerNormalization -> fc2: the reason gives the parameters (fc1's weight, the
    normalization's scale and bias, fc2's weight) and FLOPs (fc1 and fc2 at the analysed batch)
    that would scale with fc1's 32 channels."""
    model = graphs.layernorm_after()
    n = 4
    why = {s.node: s.reason for s in analyse(model, [("x", (16,))], n=n).skipped}["fc1"]
    assert "LayerNormalization normalizes across the channels" in why
    params = 32 * 16 + 32 + 32 + 8 * 32
    flops = 2 * n * 32 * 16 + 2 * n * 8 * 32
    assert f"at stake: {params} parameters and {flops:.3g} FLOPs of 1 producer(s) and 1 exit(s)" in why


def test_no_stake_figure_without_a_normalization(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.mlp(hidden_output=True), [("x", (16,))], keep=0.5)
    assert "reaches graph output" in reasons(report)["fc1"] and "at stake" not in reasons(report)["fc1"]


# ---- whole blocks: GroupNormalization and grouped convolutions ----

def attr_of(path, node_name: str, name: str):
    node = next(n for n in onnx.load(str(path)).graph.node if n.name == node_name)
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def whole_blocks(keep, block: int) -> bool:
    keep = np.asarray(keep)
    return len(keep) % block == 0 and all(np.array_equal(keep[i:i + block], np.arange(keep[i], keep[i] + block))
                                           and keep[i] % block == 0 for i in range(0, len(keep), block))


@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_group_norm_keeps_whole_groups(tmp_path, keep, dup):
    """Conv 8 -> GroupNormalization (4 groups of 2) -> Conv: the group goes through in blocks of
    2; num_groups follows the number of groups kept."""
    model = graphs.group_norm(dup=dup)
    grp = next(g for g in analyse(model, IMG).groups if "conv1" in g.producers)
    assert grp.block == 2
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=keep)
    gp = next(g for g in report.plan.groups if g.group == "conv1")
    assert gp.kept == round(8 * keep) and whole_blocks(gp.keep, 2)
    assert attr_of(out, "gn", "num_groups") == gp.kept // 2
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_group_norm_partial_keep_matches_the_maths(tmp_path):
    """Kept groups are normalized as before: the compressed model's GroupNormalization output is
    the original's at the kept channels."""
    model = graphs.group_norm()
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=0.5)
    keep = np.asarray(next(g for g in report.plan.groups if g.group == "conv1").keep)
    gn = tensor_of(model, "GroupNormalization")
    before = run(with_outputs(model, [gn]), val)[1]
    after = run(with_outputs(onnx.load(str(out)), [gn]), val)[1]
    np.testing.assert_allclose(after, before[:, keep], rtol=1e-4, atol=1e-5)


def test_group_norm_of_one_group_is_left_alone(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.group_norm(groups=1), IMG, keep=0.5)
    assert "GroupNormalization normalizes all 8 channels together (num_groups=1)" in reasons(report)["conv1"]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_grouped_conv_passes_whole_groups(tmp_path, keep, dup):
    """conv1 (8) -> grouped Conv (4 groups of 2 -> 2): output block b reads input block b only,
    so conv1's channels, kept in whole blocks, pass through it; its `group` follows."""
    model = graphs.grouped_conv(dup=dup)
    grp = next(g for g in analyse(model, IMG).groups if "conv1" in g.producers)
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    assert grp.block == 2 and [e.tensor for e in grp.exits] == [conv2.input[0]]
    path, out, report, val = squeeze(tmp_path, model, IMG, keep=keep)
    gp = next(g for g in report.plan.groups if g.group == "conv1")
    assert whole_blocks(gp.keep, 2) and attr_of(out, "grouped", "group") == gp.kept // 2
    assert weight_of(out, "grouped").shape[:2] == (gp.kept, 2)
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_grouped_conv_changing_the_width_is_left_alone(tmp_path):
    path, out, report, val = squeeze(tmp_path, graphs.grouped_conv(out_per_group=3), IMG, keep=0.5)
    assert "grouped convolution (group=4) with 12 outputs for 8 inputs" in reasons(report)["conv1"]
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_block_pivoting_keeps_blocks_that_explain_the_others():
    """Block ID: with block 2 a copy of block 0, two blocks leave no residual, and block 2 is
    never picked before the blocks it does not copy; sizes between blocks round up."""
    from onnxcompress.methods.id.interpolate import block_pivot_order
    rng = np.random.default_rng(0)
    z = rng.standard_normal((300, 12))
    z[:, 8:] = z[:, :4] @ rng.standard_normal((4, 4))
    order, residual = block_pivot_order(z.T @ z, 4)
    assert sorted(set(order[:8] // 4)) in ([0, 1], [1, 2])
    assert residual[8] <= 1e-9 * residual[0] and residual[4] > 0.1 * residual[0]
    assert residual[5] == residual[8] and residual[0] == np.trace(z.T @ z)


# ---- attention heads ----

ATT = [("x", (5, 16)), ("mask", (1, 1, 5))]


def att_feeds(n, seed):
    f = feeds([("x", (5, 16))], n, seed)
    f["mask"] = np.where(np.random.default_rng(seed).random((n, 1, 1, 5)) < 0.2, -1e4, 0).astype(np.float32)
    return f


def squeeze_att(tmp_path, model, *, keep, **cfg):
    path = save(tmp_path, model)
    val, out = att_feeds(8, 2), tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=keep, force=True, **cfg), calib=att_feeds(96, 1), val=val)
    return path, out, report, val


def test_attention_heads_are_one_group_of_whole_heads():
    """Q, K and V meet at the score and context products: one group of 16 channels in 4 heads
    of 4, exiting at the output projection; the Reshapes' head counts are shape edits."""
    model = graphs.attention()
    grp = next(iter(analyse(model, ATT).groups))
    assert set(grp.producers) == {"attn.q", "attn.k", "attn.v"} and (grp.channels, grp.block) == (16, 4)
    o = next(n for n in model.graph.node if n.name == "attn.o")
    assert [e.tensor for e in grp.exits] == [o.input[0]]
    assert {(e.index, e.per) for e in grp.edits if type(e).__name__ == "ShapeEntry"} == {(2, 4), (2, 1)}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("keep,dup", [(1.0, False), (0.5, True)])
def test_attention_heads_reproduce_outputs(tmp_path, keep, dup, dynamic):
    """At keep 1.0, and at keep 0.5 when heads 2 and 3 copy heads 0 and 1, the outputs are the
    original's; the split Reshape now names the kept heads (in its constant target, or in the
    constant pieces of a target computed at run time)."""
    path, out, report, val = squeeze_att(tmp_path, graphs.attention(dup=dup, dynamic=dynamic), keep=keep)
    gp = report.plan.groups[0]
    assert gp.kept == round(16 * keep) and whole_blocks(gp.keep, 4)
    assert weight_of(out, "attn.q").shape == (16, gp.kept) and weight_of(out, "attn.o").shape == (gp.kept, 16)
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_attention_partial_keep_matches_the_maths(tmp_path):
    """Kept heads keep their scores and context; the output projection reads
    ctx[:, S] T (+ c0): out = (ctx[:, S] T + c0) W_o + b_o + x."""
    model = graphs.attention()
    path, out, report, val = squeeze_att(tmp_path, model, keep=0.5)
    gp = report.plan.groups[0]
    keep = np.asarray(gp.keep)
    o = next(n for n in model.graph.node if n.name == "attn.o")
    ctx = run(with_outputs(model, [o.input[0]]), val)[1].astype(np.float64)
    bo = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("bo"))
    expected = (ctx[..., keep] @ gp.interpolation[o.input[0]] + gp.intercept.get(o.input[0], 0.0)) \
        @ weight_of(path, "attn.o") + bo + val["x"]
    np.testing.assert_allclose(run(out, val)[0], expected, rtol=1e-4, atol=1e-4)


def test_attention_keeps_the_heads_with_the_least_output_error(tmp_path):
    """4 of 8 heads: the kept heads are, of all 70 sets, the one minimizing the output
    projection's calibration error tr(Q R_S), R_S the Schur complement of the centered context
    Gram in the kept heads' channels and Q = W_o W_o^T (brute force over the calibration
    activations); the model's outputs are (ctx[:, S] T + c0) W_o + b_o + x."""
    import itertools
    model = graphs.attention(heads=8, size=2)
    path = save(tmp_path, model)
    calib, val, out = att_feeds(96, 1), att_feeds(8, 2), tmp_path / "out.onnx"
    report = compress(path, out, config=Config(keep=0.5, force=True), calib=calib, val=val)
    gp = report.plan.groups[0]
    o = next(n for n in model.graph.node if n.name == "attn.o")
    z = run(with_outputs(model, [o.input[0]]), calib)[1].astype(np.float64).reshape(-1, 16)
    g = z.T @ z - np.outer(z.sum(0), z.sum(0)) / len(z)
    wo = weight_of(path, "attn.o").astype(np.float64)
    q = wo @ wo.T

    def error(heads):
        s = (np.asarray(heads)[:, None] * 2 + np.arange(2)).ravel()
        return np.trace(q @ (g - g[:, s] @ np.linalg.solve(g[np.ix_(s, s)], g[s, :])))

    best = min(itertools.combinations(range(8), 4), key=error)
    assert tuple(np.asarray(gp.keep)[::2] // 2) == best
    keep = np.asarray(gp.keep)
    ctx = run(with_outputs(model, [o.input[0]]), val)[1].astype(np.float64)
    bo = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("bo"))
    expected = (ctx[..., keep] @ gp.interpolation[o.input[0]] + gp.intercept[o.input[0]]) @ wo + bo + val["x"]
    np.testing.assert_allclose(run(out, val)[0], expected, rtol=1e-4, atol=1e-4)


def test_attention_score_and_context_flops_are_counted_per_sample_and_shrink_with_the_heads(tmp_path):
    """FLOPs per sample (batch 1, S = 5, C = 16 in 4 heads of d = 4): the projections
    4 x 2 S C^2 = 10240, Q K^T and P V 2 H S^2 d = 800 each. The head group's cost items scale
    both products with the kept heads, and keeping 2 of 4 heads halves them in the model."""
    from onnxcompress.core.cost import node_flops
    from onnxcompress.methods.id import group_costs
    model = graphs.attention()
    norm = normalize(model)
    g = GraphIndex(norm, *shapes_at(norm, feeds(ATT, 1, 0)))
    flops = node_flops(g)
    scores, context = \
        [i for i, n in enumerate(g.nodes) if n.op_type == "MatMul" and all(g.const(x) is None for x in n.input)]
    assert flops[scores] == flops[context] == 2 * 4 * 5 * 5 * 4
    assert sum(flops.values()) == 4 * 2 * 5 * 16 * 16 + 2 * 800
    grp = next(iter(find_groups(g).groups))
    fraction = np.array([1.0, 0.5])
    items = {c.item: c for c in group_costs(g, grp, fraction, flops) if c.metric == "flops"}
    for i in (scores, context):
        assert items[g.key(i)].base == 800 and list(items[g.key(i)].factor) == [1.0, 0.5]
    path, out, report, val = squeeze_att(tmp_path, model, keep=0.5)
    assert report.flops["before"] == 4 * 2 * 5 * 16 * 16 + 2 * 800      # the val feeds hold 8 samples
    assert report.flops["per"] == "sample"
    assert report.flops["after"] == 3 * 2 * 5 * 16 * 8 + 2 * 5 * 8 * 16 + 2 * 400


def test_heads_not_merged_back_are_left_alone(tmp_path):
    path, out, report, val = squeeze_att(tmp_path, graphs.attention(merge="split"), keep=0.5)
    assert "Reshape of attention heads other than merging them back" in reasons(report)["attn.q"]
    assert kept(report) == {}
    assert_valid_output(path, out, val, same=True, rtol=1e-3, atol=1e-4)


def test_every_window_keeps_a_channel():
    """A producer before a Concat never loses all its channels: with k = 1 each of the windows
    [0, 4), [4, 10) and [10, 15) of the nested Concat keeps its first channel in the order."""
    grp = next(g for g in analyse(graphs.nested_concat(), IMG).groups if "conv4" in g.producers)
    assert set(grp.windows) == {(0, 4), (4, 6), (10, 5), (0, 10)}
    assert grp.kept_channels(np.arange(15)[::-1], 1).tolist() == [3, 9, 14]
    assert grp.kept_channels(np.arange(15)[::-1], 4).tolist() == [3, 9, 13, 14]
