"""Property-based tests (issue 4, item 4): random MLP and CNN chains.

Graphs are drawn as plain specs (widths, ops, activations, BatchNormalization, depthwise convs,
residual joins, squeeze-and-excitation gates, pooling, heads, input shapes) and built in code, so
a failing example shrinks to a small readable spec. Two properties:

* keeping every channel (keep=1.0) reproduces the original outputs to float precision;
* compressing at a random size (a random keep fraction or a random FLOPs target) always gives a
  model that passes the full ONNX checker, loads and runs in ONNX Runtime (at a batch size the
  calibration never used), and has the original's outputs (names, types, shapes), all finite.

The default profile (`ci`, tests/conftest.py) runs 30 derandomized examples per property; run
`python -m pytest --hypothesis-profile=long tests/test_properties.py` for hundreds of random ones.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import event, example, given, note
from hypothesis import strategies as st

from checks import assert_valid_output, run, save
from graphs import Builder
from onnxcompress import Config, compress

ACTS = [None, "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Softplus",
        "Clip", "Gelu", "SiLU", "Identity"]


def activation(b: Builder, x: str, act: str | None) -> str:
    if act is None:
        return x
    if act == "Clip":
        return b.op("Clip", [x, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))])
    if act == "Gelu":  # the Div-Erf-Add-Mul-Mul pattern of a PyTorch export
        e = b.op("Erf", [b.op("Div", [x, b.const("sqrt2", np.float32(np.sqrt(2)))])])
        return b.op("Mul", [b.op("Mul", [x, b.op("Add", [e, b.const("one", np.float32(1))])]),
                            b.const("half", np.float32(0.5))])
    if act == "SiLU":
        return b.op("Mul", [x, b.op("Sigmoid", [x])])
    if act == "LeakyRelu":
        return b.op("LeakyRelu", [x], alpha=0.1)
    return b.op(act, [x])


# ---- specs ----

acts = st.sampled_from(ACTS)
same_or = lambda hi: st.none() | st.integers(1, hi)  # None: keep the current width (residuals)
MLP_EXTRAS = [None, "affine", "prelu", "div", "dropout", "layernorm", "unsqueeze"]
CNN_EXTRAS = [None, "affine", "prelu", "instancenorm", "nhwc", "reduce"]


@st.composite
def mlp_specs(draw):
    seq = draw(st.booleans())  # [B, S, C] through MatMul, or [N, C]
    ops = ["matmul", "matmul_bias"] if seq else ["gemm", "gemm_nt", "gemm_scaled", "matmul", "matmul_bias"]
    layer = st.fixed_dictionaries({"width": same_or(12), "op": st.sampled_from(ops), "act": acts,
                                   "bn": st.just(False) if seq else st.booleans(), "residual": st.booleans(),
                                   "extra": st.sampled_from(MLP_EXTRAS)})
    return {"kind": "mlp", "seq": seq, "inputs": draw(st.integers(1, 12)),
            "layers": draw(st.lists(layer, min_size=1, max_size=4)), "out": draw(st.integers(1, 6)),
            "head": draw(st.sampled_from(["gemm", "matmul"])), "softmax": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**16))}


@st.composite
def cnn_specs(draw):
    block = st.one_of(
        st.fixed_dictionaries({"type": st.just("conv"), "width": same_or(8), "k": st.sampled_from([1, 3]),
                               "pad": st.sampled_from(["none", "same", "auto"]), "stride": st.sampled_from([1, 2]),
                               "dilation": st.sampled_from([1, 2]), "bias": st.booleans(), "bn": st.booleans(),
                               "act": acts, "extra": st.sampled_from(CNN_EXTRAS)}),
        st.fixed_dictionaries({"type": st.just("dw"), "bias": st.booleans(), "bn": st.booleans(), "act": acts}),
        st.fixed_dictionaries({"type": st.just("residual"), "bn": st.booleans(), "act": acts}),
        st.fixed_dictionaries({"type": st.just("pool"), "op": st.sampled_from(["MaxPool", "AveragePool"])}),
        st.fixed_dictionaries({"type": st.just("se"), "reduce": st.integers(1, 4),
                               "gate": st.sampled_from(["Sigmoid", "HardSigmoid"])}),
        st.fixed_dictionaries({"type": st.just("branch"), "width": st.integers(1, 6)}),
    )
    return {"kind": "cnn", "channels": draw(st.integers(1, 4)), "hw": (draw(st.integers(3, 9)), draw(st.integers(3, 9))),
            "blocks": draw(st.lists(block, min_size=1, max_size=5)),
            "head": draw(st.sampled_from(["gap", "flatten", "reshape", "conv"])), "out": draw(st.integers(1, 6)),
            "constant_nodes": draw(st.booleans()), "seed": draw(st.integers(0, 2**16))}


specs = st.one_of(mlp_specs(), cnn_specs())


# ---- builders ----
# With dup, every width drawn is doubled and the second half of each group's channels copies the
# first (producer rows, biases and every per-channel parameter), so keep=0.5 loses nothing. After
# a Concat of two branches the group's channels are two windows, one per branch, each holding its
# own copies: the per-channel parameters that follow (residual conv rows, depthwise filters,
# BatchNormalization, gates) copy within each window too, or the copies would not line up.

def build(spec, dup: bool = False) -> tuple[onnx.ModelProto, tuple]:
    """The model of `spec` and the shape of one input sample (without the batch axis)."""
    return build_mlp(spec, dup) if spec["kind"] == "mlp" else build_cnn(spec, dup)


def _linear(b: Builder, x: str, op: str, n_in: int, n_out: int, dup: bool) -> str:
    d0, d1, db = (0 if dup else None), (1 if dup else None), (0 if dup else None)
    bias = lambda: b.weight("b", (n_out,), db, 0.5)
    if op in ("gemm", "gemm_scaled"):
        attrs = {"alpha": 0.7, "beta": 1.3} if op == "gemm_scaled" else {}
        return b.op("Gemm", [x, b.weight("w", (n_out, n_in), d0), bias()], transB=1, **attrs)
    if op == "gemm_nt":
        return b.op("Gemm", [x, b.weight("w", (n_in, n_out), d1, 1 / np.sqrt(n_in)), bias()])
    y = b.op("MatMul", [x, b.weight("w", (n_in, n_out), d1, 1 / np.sqrt(n_in))])
    return b.op("Add", [y, bias()]) if op == "matmul_bias" else y


def _per_channel(b: Builder, x: str, extra: str | None, c: int, shape: tuple, dup: bool) -> str:
    """A channel-wise op on x; `shape` is how a (c,) parameter broadcasts against it."""
    d = 0 if dup else None
    param = lambda base, offset: b.const(base, (offset + 0.3 * b.random((c,), d, 1.0)).reshape(shape))
    if extra == "affine":
        return b.op("Add", [b.op("Mul", [x, param("scale", 1.0)]), param("shift", 0.0)])
    if extra == "prelu":
        return b.op("PRelu", [x, param("slope", 0.2)])
    if extra == "div":
        return b.op("Div", [x, b.const("den", np.float32(1.5))])
    if extra == "dropout":
        return b.op("Dropout", [x])
    if extra == "layernorm":
        return b.op("LayerNormalization", [x, param("ln_g", 1.0), param("ln_b", 0.0)], axis=-1)
    if extra == "unsqueeze":  # a new leading axis and back
        axes = b.const("axes", np.array([0], dtype=np.int64))
        return b.op("Squeeze", [b.op("Relu", [b.op("Unsqueeze", [x, axes])]), axes])
    if extra == "nhwc":  # a per-channel scale applied in NHWC layout
        scale = b.const("nhwc", 1 + 0.3 * b.random((c,), d, 1.0))
        y = b.op("Mul", [b.op("Transpose", [x], perm=[0, 2, 3, 1]), scale])
        return b.op("Transpose", [y], perm=[0, 3, 1, 2])
    if extra == "reduce":  # mean over the width, kept as an axis of size 1, broadcast back
        return b.op("Add", [x, b.op("ReduceMean", [x], axes=[3], keepdims=1)])
    if extra == "instancenorm":
        return b.op("InstanceNormalization", [x, b.const("in_g", 1 + 0.3 * b.random((c,), d, 1.0)),
                                              b.const("in_b", 0.3 * b.random((c,), d, 1.0))])
    return x


def _copies(b: Builder, shape: tuple, windows: list[int], dup: bool, scale: float | None = None) -> np.ndarray:
    """Random values with the channels on axis 0; with dup, the second half of each window of
    `windows` (their widths, summing to shape[0]) copies its first half."""
    if not dup or len(windows) == 1:
        return b.random(shape, 0 if dup else None, scale)
    return np.concatenate([b.random((w, *shape[1:]), 0, scale) for w in windows])


def _bn(b: Builder, x: str, windows: list[int], dup: bool) -> str:
    """BatchNormalization whose parameters copy within each window (`Builder.bn` for one)."""
    c = sum(windows)
    if not dup or len(windows) == 1:
        return b.bn(x, c, dup)
    scale = b.const("bn_scale", 1 + 0.1 * _copies(b, (c,), windows, dup, 1.0))
    bias = b.const("bn_bias", 0.1 * _copies(b, (c,), windows, dup, 1.0))
    mean = b.const("bn_mean", 0.1 * _copies(b, (c,), windows, dup, 1.0))
    var = b.const("bn_var", (1 + 0.1 * np.abs(_copies(b, (c,), windows, dup, 1.0))).astype(np.float32))
    return b.op("BatchNormalization", [x, scale, bias, mean, var])


def _width(drawn: int | None, current: int, dup: bool) -> int:
    """A producer's width: the drawn one (doubled with dup) or the current one (made even with
    dup, so that every group can be planted with copies)."""
    if drawn:
        return 2 * drawn if dup else drawn
    return current + (current % 2) if dup else current


def build_mlp(spec, dup=False):
    b = Builder(spec["seed"])
    cur, width = "x", spec["inputs"]
    for layer in spec["layers"]:
        w = _width(layer["width"], width, dup)
        h = _linear(b, cur, layer["op"], width, w, dup)
        if layer["bn"]:
            h = b.bn(h, w, dup)
        h = _per_channel(b, activation(b, h, layer["act"]), layer["extra"], w, (w,), dup)
        if layer["residual"] and w == width:
            h = b.op("Add", [h, cur])
        cur, width = h, w
    y = _linear(b, cur, "gemm" if spec["head"] == "gemm" and not spec["seq"] else "matmul_bias", width, spec["out"], False)
    if spec["softmax"]:
        y = b.op("Softmax", [y], axis=-1)
    shape = ["B", "S", spec["inputs"]] if spec["seq"] else ["N", spec["inputs"]]
    return b.model([("x", shape)], [y]), tuple(([5] if spec["seq"] else []) + [spec["inputs"]])


def build_cnn(spec, dup=False):
    b = Builder(spec["seed"], constant_nodes=spec["constant_nodes"])
    c, (h, w) = spec["channels"], spec["hw"]
    d = 0 if dup else None
    cur, windows = "x", [c]  # windows: the widths of the Concat inputs the current channels come from
    for blk in spec["blocks"]:
        t = blk["type"]
        if t == "conv":
            n, k = _width(blk["width"], c, dup), blk["k"]
            dil = blk["dilation"] if k == 3 and blk["pad"] != "auto" else 1  # ORT: no dilated SAME_UPPER
            reach = dil * (k - 1)  # the kernel's extent minus one
            stride = blk["stride"] if min(h, w) >= 2 else 1
            pad = reach // 2 if blk["pad"] == "same" or min(h, w) <= reach else 0
            attrs = {"strides": [stride] * 2, "dilations": [dil] * 2}
            if blk["pad"] == "auto":
                attrs["auto_pad"] = "SAME_UPPER"
                oh, ow = -(-h // stride), -(-w // stride)
            else:
                attrs["pads"] = [pad] * 4
                oh, ow = (h + 2 * pad - reach - 1) // stride + 1, (w + 2 * pad - reach - 1) // stride + 1
            inputs = [cur, b.weight("conv", (n, c, k, k), d)] + ([b.weight("cb", (n,), d, 0.5)] if blk["bias"] else [])
            y = b.op("Conv", inputs, **attrs)
            (h, w), c, windows = (oh, ow), n, [n]
            if blk["bn"]:
                y = b.bn(y, c, dup)
            cur = _per_channel(b, activation(b, y, blk["act"]), blk["extra"], c, (c, 1, 1), dup)
        elif t == "dw":
            inputs = [cur, b.const("dw", _copies(b, (c, 1, 3, 3), windows, dup))] + \
                ([b.const("dwb", _copies(b, (c,), windows, dup, 0.5))] if blk["bias"] else [])
            y = b.op("Conv", inputs, group=c, pads=[1, 1, 1, 1])
            cur = activation(b, _bn(b, y, windows, dup) if blk["bn"] else y, blk["act"])
        elif t == "residual":
            rc = b.const("rc", _copies(b, (c, c, 3, 3), windows, dup, 0.5 / np.sqrt(9 * c)))
            y = b.op("Conv", [cur, rc], pads=[1, 1, 1, 1])
            cur = activation(b, b.op("Add", [_bn(b, y, windows, dup) if blk["bn"] else y, cur]), blk["act"])
        elif t == "pool":
            if min(h, w) >= 2:
                cur = b.op(blk["op"], [cur], kernel_shape=[2, 2], strides=[2, 2])
                h, w = h // 2, w // 2
        elif t == "se":
            r = blk["reduce"] * (2 if dup else 1)
            s = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [cur]), b.weight("se1", (r, c, 1, 1), d),
                                            b.weight("se1b", (r,), d, 0.5)])])
            se2, se2b = b.const("se2", _copies(b, (c, r, 1, 1), windows, dup)), b.const("se2b", _copies(b, (c,), windows, dup, 0.5))
            gate = b.op(blk["gate"], [b.op("Conv", [s, se2, se2b])])
            cur = b.op("Mul", [cur, gate])
        else:  # two convs on the same input, concatenated along the channels
            n = blk["width"] * (2 if dup else 1)
            parts = [b.op("Relu", [b.op("Conv", [cur, b.weight("br", (n, c, 1, 1), d)])]) for _ in range(2)]
            cur, c, windows = b.op("Concat", parts, axis=1), 2 * n, [n, n]
    if spec["head"] == "conv":
        y = b.op("Conv", [cur, b.weight("head", (spec["out"], c, 1, 1)), b.weight("hb", (spec["out"],), None, 0.5)])
    else:
        if spec["head"] == "gap":
            flat, n_in = b.op("Flatten", [b.op("GlobalAveragePool", [cur])], axis=1), c
        elif spec["head"] == "flatten":
            flat, n_in = b.op("Flatten", [cur], axis=1), c * h * w
        else:
            flat, n_in = b.op("Reshape", [cur, b.const("flat", np.array([0, -1], dtype=np.int64))]), c * h * w
        y = b.op("Gemm", [flat, b.weight("head", (spec["out"], n_in)), b.weight("hb", (spec["out"],), None, 0.5)], transB=1)
    return b.model([("x", ["N", spec["channels"], *spec["hw"]])], [y]), (spec["channels"], *spec["hw"])


# ---- properties ----

def _data(sample_shape, n, seed):
    return {"x": np.random.default_rng(seed).standard_normal((n, *sample_shape)).astype(np.float32)}


def _compress(tmp: Path, spec, config: Config, *, dup: bool = False, same_data: bool = False):
    model, sample = build(spec, dup)
    note(f"nodes: {[n.op_type for n in model.graph.node]}")
    path = save(tmp, model)
    out = tmp / "out.onnx"
    calib = _data(sample, 24, 1)
    report = compress(path, out, config=config, calib=calib, val=calib if same_data else _data(sample, 8, 2))
    note(f"groups: {[(g['group'], g['kept'], g['channels']) for g in report.groups]}")
    note(f"skipped: {[(s['node'], s['reason']) for s in report.skipped]}")
    event(f"{spec['kind']}: {'some' if report.groups else 'no'} group compressed")
    for s in report.skipped:
        event("skipped: " + re.sub(r"'[^']*'|node \S+|\d+", "_", s["reason"]))
    return path, out, report, sample


@given(spec=specs)
def test_keep_everything_reproduces_outputs(spec):
    with tempfile.TemporaryDirectory() as tmp:
        _keep_everything(Path(tmp), spec)


def _keep_everything(tmp, spec):
    path, out, report, sample = _compress(tmp, spec, Config(keep=1.0))
    assert all(g["kept"] == g["channels"] for g in report.groups)
    assert report.params["after"] == report.params["before"]
    assert_valid_output(path, out, _data(sample, 3, 3), same=True, rtol=1e-5, atol=1e-5)


sizes = st.one_of(st.builds(lambda k: Config(keep=k), st.floats(0.01, 1.0)),
                  st.builds(lambda f: Config(flops_target=f), st.floats(0.05, 1.0)),
                  st.builds(lambda k: Config(keep=k, intercept=False, weighted=False), st.floats(0.01, 1.0)),
                  st.builds(lambda k: Config(keep=k, select="norm"), st.floats(0.01, 1.0)))


@given(spec=specs, config=sizes)
def test_any_size_gives_a_valid_model(spec, config):
    with tempfile.TemporaryDirectory() as tmp:
        _any_size(Path(tmp), spec, config)


def _any_size(tmp, spec, config):
    path, out, report, sample = _compress(tmp, spec, config)
    assert report.params["after"] <= report.params["before"]
    assert report.flops["after"] <= report.flops["before"] * (1 + 1e-9)
    feed = _data(sample, 3, 3)
    assert_valid_output(path, out, feed)
    for ref, new in zip(run(path, feed), run(out, feed)):
        assert np.all(np.isfinite(new)) or not np.all(np.isfinite(ref))


# A Concat of two branches then a residual conv: its rows must copy within each branch's window
# (the copies of the Concat's channels), not across the halves of the concatenation.
BRANCH_RESIDUAL = {"kind": "cnn", "channels": 1, "hw": (3, 3),
                   "blocks": [{"type": "branch", "width": 1}, {"type": "residual", "bn": False, "act": None}],
                   "head": "gap", "out": 1, "constant_nodes": False, "seed": 0}


@given(spec=specs)
@example(spec=BRANCH_RESIDUAL)
def test_planted_duplicates_prune_exactly(spec):
    """Every group's second half copies its first: at keep=0.5 each compressed group keeps half
    its channels and the outputs on the calibration inputs are the original's (on other inputs
    they need not be: a channel never active in calibration is rebuilt as zero)."""
    with tempfile.TemporaryDirectory() as tmp:
        _planted(Path(tmp), spec)


def _planted(tmp, spec):
    path, out, report, sample = _compress(tmp, spec, Config(keep=0.5), dup=True, same_data=True)
    assert all(2 * g["kept"] == g["channels"] or g["channels"] == 1 for g in report.groups)
    assert_valid_output(path, out, _data(sample, 24, 1), same=True, rtol=1e-3, atol=1e-4)
