"""Per-op knowledge, in one table of handlers with one interface.

A channel group (see `groups.py`) is a set of tensors sharing one channel axis whose channels can
be removed together. Each handler answers three questions about its op:

* `produce(g, i)`: does node i create channels from a constant weight (Gemm, MatMul with a
  constant right operand, Conv with group=1, Gather on a table)? Returns `Produce`, a reason
  string why not, or None when the op is never a producer.
* `consume(g, i, pos, m)`: node i reads group member `m` at input `pos`. Returns `Through` (the
  channels pass to its outputs unchanged, maybe slicing per-channel constants), `Exit` (the node
  is linear in the channels: its weight absorbs the interpolation matrix) or `Stop` (why the group
  must be left alone).
* `layer(g, i, max_patch)`: can a low-rank split replace node i (see `layers.py`)? Returns a
  `Layer` (its weight viewed as W (out x in), the input statistic it needs), a reason string, or
  None when the op is never a layer.

The shape and layout ops (Transpose, Reshape, Flatten, Squeeze, Concat, ...) live in
`layout.py`; the shared vocabulary in `edits.py`.

Beyond one channel per channel: a Concat along the channels places its inputs' channels at
offsets in one index space (`Enter`); GroupNormalization and grouped Convs (same width per group)
let channels through in whole blocks (`Through.block`); attention heads are blocks of channels
split by a Reshape, carried through the score and context products (`_attention_matmul`) and
merged back into the output projection. ConvTranspose is a producer and an exit.
"""
from __future__ import annotations

import numpy as np

from ..core.stats import ChannelGram, PatchGram, TokenCounts
from .edits import (Exit, Handler, Layer, Member, Mix, Produce, SetAttr, Shift, Slice, Stop, Through,
                    computed_weight, const_channel_edit, flat_only, through_to, unused_extra_outputs)
from ..core.graph import GraphIndex
from .layout import Concat, Flatten, Reshape, Resize, ShapeOf, Softmax, Squeeze, Transpose


class Unary(Handler):
    """Elementwise ops of one tensor input; other inputs must be constants not varying along the
    channels (Clip bounds, Dropout ratio, ...)."""

    heads = True

    def consume(self, g, i, pos, m, channels):
        if pos != 0:
            return Stop(f"{g.nodes[i].op_type} reads the channels as a parameter")
        edits = []
        for name in g.nodes[i].input[1:]:
            if not name:
                continue
            e = const_channel_edit(g, name, m, channels, i)
            if e is None:
                return Stop(f"{g.nodes[i].op_type} has a non-constant parameter {name!r}")
            if isinstance(e, Stop):
                return e
            edits.extend(e)
        same_values = g.nodes[i].op_type in VALUE_PRESERVING
        if m.spatial > 1 and (edits or not same_values):
            return flat_only(m, g.nodes[i].op_type)
        stop = unused_extra_outputs(g, i)
        if stop:
            return stop
        # the output's own values feed the exits' Grams, except through ops that copy them
        out = (Member(g.nodes[i].output[0], m.axis, m.spatial, m.source, m.source_axis) if same_values and not m.heads
               else m.follow(g.nodes[i].output[0]))
        return Through(outputs=(out,), edits=tuple(edits))


class Binary(Unary):
    """Add/Sub/Mul/Div/...: with a constant the constant is sliced (or left if it does not vary
    along the channels); with another activation both must be in the same group (residual joins,
    x * sigmoid(x), squeeze-and-excitation gates)."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        if m.spatial > 1:
            return flat_only(m, node.op_type)
        other = node.input[1 - pos] if pos in (0, 1) and len(node.input) == 2 else None
        if other is None:
            return Stop(f"{node.op_type} with {len(node.input)} inputs")
        out = m.follow(node.output[0])
        if g.const(other) is None:
            shape = g.shape(other)
            if shape is not None and all(len(shape) + a < 0 or shape[len(shape) + a] == 1 for a in m.axes) \
                    and g.shape(node.output[0]) == g.shape(m.tensor):
                return Through(outputs=(out,))  # broadcast along the channels (a mask, a per-row scale)
            return Through(outputs=(out,), joins=((other, m.axis, m.head_axis) if m.heads else (other, m.axis),))
        e = const_channel_edit(g, other, m, channels, i)
        if isinstance(e, Stop):
            return e
        return Through(outputs=(out,), edits=e)


def positions(g: GraphIndex, output: str, per: int) -> float:
    """Output positions per feed (output elements / `per` channels), 0 when the shape is open."""
    shape = g.shape(output)
    if shape is None or None in shape:
        return 0.0
    return float(np.prod(shape, dtype=np.float64)) / per


def _weight_and_bias_slices(g: GraphIndex, i: int, axis: int):
    """A (transposed) convolution producing channels: Slice edits of its weight (output channels
    on `axis`: 0 for Conv, 1 for ConvTranspose) and of its bias, or the reason it cannot be."""
    node = g.nodes[i]
    edits = [Slice(node.input[1], axis, i)]
    if len(node.input) > 2 and node.input[2]:
        if g.const(node.input[2]) is None:
            return "bias is not a constant"
        edits.append(Slice(node.input[2], 0, i))
    return edits


def _conv_input_stop(g: GraphIndex, i: int, pos: int, m: Member, op: str) -> Stop | None:
    """Why a (transposed) convolution cannot take a group's channels as its input, or None."""
    node = g.nodes[i]
    w = g.const(node.input[1])
    if pos != 0:
        return Stop(f"{op} reads the channels as its weight")
    if w is None:
        return Stop(f"{op}'s " + (computed_weight(g, node.input[1]) or "weight is not a constant"))
    if m.spatial > 1 or m.axis != -(w.ndim - 1):
        return Stop(f"{op} does not read the channel axis as its input channels")
    return None


class Conv(Handler):
    def layer(self, g: GraphIndex, i: int, max_patch: int):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if w is None:
            return "Conv with a computed weight"
        if g.attr(i, "group", 1) != 1:
            return "grouped or depthwise Conv" if w.shape[1] == 1 else "grouped Conv"
        kernel = tuple(int(k) for k in w.shape[2:])
        n = len(kernel)
        span = int(w.shape[1]) * int(np.prod(kernel, dtype=np.int64))
        strides = tuple(g.attr(i, "strides", [1] * n))
        dilations = tuple(g.attr(i, "dilations", [1] * n))
        pads = tuple(g.attr(i, "pads", [0] * 2 * n))
        auto_pad = g.attr(i, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if span <= max_patch:
            req = PatchGram(node.input[0], int(w.shape[1]), kernel, strides, pads, dilations, auto_pad)
        else:
            req = ChannelGram(node.input[0], -(n + 1), int(w.shape[1]))
        return Layer(g.key(i), i, "conv", node.input[1], int(w.shape[0]), span, req, kernel,
                     rows=positions(g, node.output[0], int(w.shape[0])))

    def produce(self, g, i):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if w is None:
            return computed_weight(g, node.input[1]) or "weight is not a constant"
        group = g.attr(i, "group", 1)
        if group != 1:
            if group == w.shape[0] and w.shape[1] == 1:
                return None  # depthwise: follows its input's channels
            return f"grouped convolution (group={group})"
        edits = _weight_and_bias_slices(g, i, 0)
        if isinstance(edits, str):
            return edits
        return Produce(node.output[0], -(w.ndim - 1), w.shape[0], tuple(edits), edits[0])

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        w = g.const(node.input[1])
        stop = _conv_input_stop(g, i, pos, m, "Conv")
        if stop:
            return stop
        group = g.attr(i, "group", 1)
        if group == 1 and w.shape[1] == channels:
            edits = [Mix(node.input[1], 1, 1, m.source, i)]
            unpadded = not any(g.attr(i, "pads", [0])) and g.attr(i, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
            if unpadded and len(node.input) > 2 and g.const(node.input[2]) is not None:
                edits.append(Shift(node.input[2], node.input[1], 1, 0, 1, m.source, i))
            return Exit(tuple(edits), m.source, m.source_axis)
        if group > 1 and channels % group == 0 and w.shape[0] == channels and w.shape[1] == channels // group:
            # output block b (C / group channels) reads input block b only: with whole blocks kept,
            # the kept outputs are computed from the kept inputs exactly as before (a depthwise
            # Conv is the case of blocks of one channel)
            block = channels // group
            edits = [Slice(node.input[1], 0, i), SetAttr(i, "group", per=block)]
            if len(node.input) > 2 and node.input[2]:
                edits.append(Slice(node.input[2], 0, i))
            return Through(outputs=(Member(node.output[0], m.axis),), edits=tuple(edits), block=block)
        if group > 1:
            return Stop(f"grouped convolution (group={group}) with {w.shape[0]} outputs for {channels} inputs")
        return Stop(f"grouped convolution (group={group})")


class ConvTranspose(Handler):
    """ConvTranspose, weight W (C_in, C_out / group, *kernel), y = sum_c x[c] * W[c] (scattered).

    Producer (group 1): its output channels are W's axis 1 (and the bias's entries), sliced by S.
    Exit (group 1): linear in its input channels, W's axis 0 absorbs T: W''[j] = sum_c T[j, c] W[c].
    No intercept: a constant input reaches an output position through a number of kernel taps
    that varies with the position (strides, padding), so it is no constant bias."""

    def produce(self, g, i):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if w is None:
            return computed_weight(g, node.input[1]) or "weight is not a constant"
        group = g.attr(i, "group", 1)
        if group != 1:
            return f"grouped transposed convolution (group={group})"
        edits = _weight_and_bias_slices(g, i, 1)
        if isinstance(edits, str):
            return edits
        return Produce(node.output[0], -(w.ndim - 1), w.shape[1], tuple(edits), edits[0])

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        w = g.const(node.input[1])
        stop = _conv_input_stop(g, i, pos, m, "ConvTranspose")
        if stop:
            return stop
        group = g.attr(i, "group", 1)
        if group != 1 or w.shape[0] != channels:
            return Stop(f"grouped transposed convolution (group={group})")
        return Exit((Mix(node.input[1], 0, 1, m.source, i),), m.source, m.source_axis)


class Gemm(Handler):
    def layer(self, g: GraphIndex, i: int, max_patch: int):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if w is None:
            return "Gemm with a computed right operand" if g.const(node.input[0]) is None else \
                "Gemm with a constant left operand"
        if w.ndim != 2:
            return "Gemm weight is not 2-D"
        n_in, n_out = w.shape[::-1] if g.attr(i, "transB", 0) else w.shape
        axis = -2 if g.attr(i, "transA", 0) else -1
        return Layer(g.key(i), i, "gemm", node.input[1], int(n_out), int(n_in),
                     ChannelGram(node.input[0], axis, int(n_in)), rows=positions(g, node.output[0], n_out))

    def produce(self, g, i):
        node = g.nodes[i]
        b = g.const(node.input[1])
        if b is None or b.ndim != 2:
            return (b is None and computed_weight(g, node.input[1])) or "weight is not a constant matrix"
        axis = 0 if g.attr(i, "transB", 0) else 1
        edits = [Slice(node.input[1], axis, i)]
        if len(node.input) > 2 and node.input[2]:
            c = g.const(node.input[2])
            if c is None:
                return "bias is not a constant"
            if c.size > 1:
                if c.shape[-1] != b.shape[axis] or c.size != c.shape[-1]:
                    return "bias is not per output channel"
                edits.append(Slice(node.input[2], c.ndim - 1, i))
        return Produce(node.output[0], -1, b.shape[axis], tuple(edits), edits[0])

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        b = g.const(node.input[1])
        if pos != 0 or g.attr(i, "transA", 0):
            return Stop("Gemm does not read the channels as its input features")
        if b is None:
            return Stop("Gemm's " + (computed_weight(g, node.input[1]) or "weight is not a constant"))
        axis = 1 if g.attr(i, "transB", 0) else 0
        if m.axis != -1 or b.shape[axis] != channels * m.spatial:
            return Stop("Gemm's weight does not match the channels")
        edits = [Mix(node.input[1], axis, m.spatial, m.source, i)]
        c = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        beta = g.attr(i, "beta", 1.0)
        if c is not None and c.size == b.shape[1 - axis] and c.size > 1 and beta != 0:
            edits.append(Shift(node.input[2], node.input[1], axis, 1 - axis, m.spatial, m.source, i,
                               g.attr(i, "alpha", 1.0) / beta))
        return Exit(tuple(edits), m.source, m.source_axis)


class MatMul(Handler):
    def layer(self, g: GraphIndex, i: int, max_patch: int):
        """X W (constant on the right: W^T is the layer, channels on X's last axis) or W X
        (constant on the left: channels on X's second-to-last axis)."""
        node = g.nodes[i]
        left, right = g.const(node.input[0]), g.const(node.input[1])
        if (left is None) == (right is None):
            return None if left is None else "MatMul of two constants"
        pos = 1 if left is None else 0
        w = right if left is None else left
        if w.ndim != 2:
            return "MatMul weight is not 2-D"
        n_in, n_out = w.shape if pos == 1 else w.shape[::-1]
        kind, axis = ("matmul", -1) if pos == 1 else ("matmul_left", -2)
        return Layer(g.key(i), i, kind, node.input[pos], int(n_out), int(n_in),
                     ChannelGram(node.input[1 - pos], axis, int(n_in)), rows=positions(g, node.output[0], n_out))

    def produce(self, g, i):
        node = g.nodes[i]
        a, w = g.const(node.input[0]), g.const(node.input[1])
        if w is None:
            return ("constant on the left" if a is not None else computed_weight(g, node.input[1])
                    or "no constant weight (product of two activations)")
        if w.ndim != 2:
            return "batched constant weight"
        return Produce(node.output[0], -1, w.shape[1], (Slice(node.input[1], 1, i),), Slice(node.input[1], 1, i))

    heads = True

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        if m.heads:
            return _attention_matmul(g, i, pos, m)
        w = g.const(node.input[1])
        reason = computed_weight(g, node.input[1]) if pos == 0 and w is None else None
        if reason:
            return Stop("MatMul's " + reason)
        if pos != 0 or w is None or w.ndim != 2:
            return Stop("MatMul multiplies the channels with another activation")
        if m.axis != -1 or w.shape[0] != channels * m.spatial:
            return Stop("MatMul's weight does not match the channels")
        edits = [Mix(node.input[1], 0, m.spatial, m.source, i)]
        bias = _following_bias(g, i, w.shape[1])
        if bias is not None:
            edits.append(Shift(bias[1], node.input[1], 0, 1, m.spatial, m.source, bias[0]))
        return Exit(tuple(edits), m.source, m.source_axis)


def _attention_matmul(g: GraphIndex, i: int, pos: int, m: Member):
    """A @ B of two activations with the heads on a batch axis of both (decomposed attention):

    * Q K^T: A split with the within-head channels on its last axis (contracted), B split with
      them on its second-to-last: the scores hold only the heads (one S x S map per head);
    * P V: A the per-head probabilities, B split with the within-head channels on its last
      axis: the output is split the same way.

    Keeping whole heads keeps every kept head's scores, probabilities and context as they were."""
    node = g.nodes[i]
    ranks = [g.rank(n) for n in node.input] + [g.rank(node.output[0])]
    if None in ranks or len(set(ranks)) != 1 or ranks[0] < 3:
        return Stop("MatMul of attention heads with unequal or unknown ranks")
    if m.head_axis >= -2:
        return Stop("MatMul with the attention heads on a matrix axis")
    other, h = node.input[1 - pos], m.head_axis
    if pos == 0 and not m.head_only and m.axis == -1:        # Q K^T
        return Through(outputs=(Member(node.output[0], h, heads=m.heads, head_axis=h),), joins=((other, -2, h),))
    if pos == 1 and not m.head_only and m.axis == -2:        # Q K^T, from K
        return Through(outputs=(Member(node.output[0], h, heads=m.heads, head_axis=h),), joins=((other, -1, h),))
    if pos == 0 and m.head_only:                             # P V, from P
        return Through(outputs=(Member(node.output[0], -1, heads=m.heads, head_axis=h),), joins=((other, -1, h),))
    if pos == 1 and not m.head_only and m.axis == -1:        # P V, from V
        return Through(outputs=(Member(node.output[0], -1, heads=m.heads, head_axis=h),), joins=((other, h, h),))
    return Stop("MatMul of attention heads in an unknown arrangement")


def _following_bias(g: GraphIndex, i: int, width: int) -> tuple[int, str] | None:
    """(Add node, bias name) when the only reader of node i's output is an Add of a constant
    vector of `width` entries (the bias of a Linear exported as MatMul + Add)."""
    users = g.users(g.nodes[i].output[0])
    if len(users) != 1 or g.nodes[i].output[0] in g.graph_outputs:
        return None
    j, pos = users[0]
    node = g.nodes[j]
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    c = g.const(node.input[1 - pos])
    if c is None or c.size != width or c.shape[-1] != width:
        return None
    return j, node.input[1 - pos]


class Gather(Handler):
    def layer(self, g: GraphIndex, i: int, max_patch: int):
        node = g.nodes[i]
        table = g.const(node.input[0])
        if table is None or table.ndim != 2 or g.const(node.input[1]) is not None:
            return None   # Gather on shapes or activations: not a layer
        if g.attr(i, "axis", 0) != 0:
            return "Gather along the embedding axis"
        vocab, d = table.shape
        return Layer(g.key(i), i, "gather", node.input[0], int(d), int(vocab),
                     TokenCounts(node.input[1], int(vocab)), rows=positions(g, node.output[0], d))

    def produce(self, g, i):
        node = g.nodes[i]
        table = g.const(node.input[0])
        if table is None or table.dtype.kind != "f":
            return None  # indexing a shape or an activation: not a layer
        if table.ndim != 2 or g.attr(i, "axis", 0) != 0:
            return "not an embedding lookup in a constant table"
        if g.const(node.input[1]) is not None:
            return "constant indices"
        return Produce(node.output[0], -1, table.shape[1], (Slice(node.input[0], 1, i),), Slice(node.input[0], 1, i))

    def consume(self, g, i, pos, m, channels):
        return Stop("Gather reads the channels")


class PerChannelNorm(Handler):
    """BatchNormalization / InstanceNormalization: channel axis 1, one parameter per channel."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        if pos != 0 or m.spatial > 1 or rank is None or m.axis != 1 - rank:
            return Stop(f"{node.op_type} does not normalize along the channel axis")
        edits = []
        for name in node.input[1:]:
            c = g.const(name)
            if c is None or c.shape != (channels,):
                return Stop(f"{node.op_type} parameter {name!r} is not a per-channel constant")
            edits.append(Slice(name, 0, i))
        return unused_extra_outputs(g, i) or Through(outputs=(Member(node.output[0], m.axis),), edits=tuple(edits))


class Pool(Handler):
    """Pooling over the axes after the channel axis (axis 1)."""

    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        if m.spatial > 1 or rank is None or m.axis != 1 - rank:
            return Stop(f"{g.nodes[i].op_type} does not pool along the spatial axes")
        return unused_extra_outputs(g, i) or through_to(g, i, m)


class Reduce(Handler):
    """Reductions over axes other than the channels."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        axes = g.attr(i, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.const(node.input[1])
        if pos != 0 or rank is None or axes is None or m.spatial > 1 or len(axes) == 0:
            return Stop(f"{node.op_type} over unknown axes")
        c = rank + m.axis
        axes = sorted(int(a) % rank for a in np.ravel(axes))
        if c in axes:
            return Stop(f"{node.op_type} reduces over the channels")
        if g.attr(i, "keepdims", 1):
            return through_to(g, i, m)
        newpos = c - sum(a < c for a in axes)
        return through_to(g, i, m, newpos - (rank - len(axes)))


class GroupNorm(Handler):
    """GroupNormalization(X, scale, bias, num_groups): mean and variance over each block of
    C / num_groups consecutive channels (with the spatial axes). Removing whole blocks leaves the
    other blocks' statistics unchanged, so the channels go through in whole blocks; the scale and
    bias (per channel, opset 21) keep the kept channels' entries, and num_groups becomes k / block.
    Opset 18's per-group parameters (deprecated by ONNX) are left alone."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        groups = g.attr(i, "num_groups")
        if pos != 0 or m.spatial > 1 or rank is None or m.axis != 1 - rank or not groups:
            return Stop("GroupNormalization does not normalize along the channel axis")
        if groups == 1 or channels % groups:
            return Stop(f"GroupNormalization normalizes all {channels} channels together (num_groups={groups})")
        block = channels // groups
        edits = [SetAttr(i, "num_groups", per=block)]
        for name in node.input[1:]:
            c = g.const(name)
            if c is None or c.shape != (channels,):
                return Stop(f"GroupNormalization parameter {name!r} is not a constant per channel")
            edits.append(Slice(name, 0, i))
        return unused_extra_outputs(g, i) or Through(outputs=(Member(node.output[0], m.axis),),
                                                     edits=tuple(edits), block=block)


class Mixes(Handler):
    """Ops known to combine channels non-linearly: the group stops with a precise reason."""

    def __init__(self, why: str):
        self.why = why

    def consume(self, g, i, pos, m, channels):
        return Stop(f"{g.nodes[i].op_type} {self.why}")


UNARY_OPS = ("Relu LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh Erf Gelu Softplus Elu Selu "
             "Celu Mish Softsign ThresholdedRelu Identity Abs Neg Exp Log Sqrt Reciprocal Sin Cos "
             "Floor Ceil Round Sign Clip Dropout Cast Swish").split()
BINARY_OPS = "Add Sub Mul Div Pow Max Min".split()
VALUE_PRESERVING = {"Identity", "Dropout"}  # output values are the input's (at inference)

NORMALIZATIONS = "LayerNormalization LpNormalization MeanVarianceNormalization".split()

HANDLERS: dict[str, Handler] = {
    **{op: Unary() for op in UNARY_OPS},
    **{op: Binary() for op in BINARY_OPS},
    "Conv": Conv(), "ConvTranspose": ConvTranspose(), "Gemm": Gemm(), "MatMul": MatMul(), "Gather": Gather(),
    "BatchNormalization": PerChannelNorm(), "InstanceNormalization": PerChannelNorm(),
    **{op: Pool() for op in "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()},
    **{op: Reduce() for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceL1 ReduceL2 ReduceProd".split()},
    "Transpose": Transpose(), "Resize": Resize(), "Upsample": Resize(), "Softmax": Softmax(),
    "LogSoftmax": Softmax(), "Flatten": Flatten(), "Reshape": Reshape(), "Squeeze": Squeeze(),
    "Unsqueeze": Squeeze(), "Concat": Concat(), "Shape": ShapeOf(),
    **{op: Mixes("normalizes across the channels") for op in NORMALIZATIONS},
    "GroupNormalization": GroupNorm(),
    **{op: Mixes("mixes the channels") for op in "LSTM GRU RNN Einsum".split()},
}

# What-if table (never used to compress): normalizations treated as if they let the channels
# through, slicing their per-channel parameters; `groups.py` uses it to say how much a group
# blocked by a LayerNormalization over its channels could act on.
NORM_THROUGH: dict[str, Handler] = {op: Unary() for op in NORMALIZATIONS}
