"""Per-op knowledge, in one table of handlers with one interface.

A channel group (see `groups.py`) is a set of tensors sharing one channel axis whose channels can
be removed together. Each handler answers two questions about its op:

* `produce(g, i)`: does node i create channels from a constant weight (Gemm, MatMul with a
  constant right operand, Conv with group=1, Gather on a table)? Returns `Produce`, a reason
  string why not, or None when the op is never a producer.
* `consume(g, i, pos, m)`: node i reads group member `m` at input `pos`. Returns `Through` (the
  channels pass to its outputs unchanged, maybe slicing per-channel constants), `Exit` (the node
  is linear in the channels: its weight absorbs the interpolation matrix) or `Stop` (why the group
  must be left alone).

Channel axes are negative (counted from the right), which survives broadcasting. `spatial` > 1
marks a tensor whose channel axis was flattened channel-major with `spatial` trailing elements per
channel (Flatten/Reshape before a Gemm); only exits may read such a tensor.

Edits say what the rewrite does with channel selection S (k kept of C) and interpolation T (k x C):
`Slice` keeps entries S along an axis, `Mix` replaces the C-long input axis (C*spatial, channel-
major) of a weight by T applied to it, `SetAttr` sets an attribute to k, `ShapeEntry` sets entry
`index` of a shape constant to k*spatial, `Shift` folds a constant intercept into a bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import GraphIndex


@dataclass(frozen=True)
class Slice:
    tensor: str
    axis: int
    node: int


@dataclass(frozen=True)
class Mix:
    tensor: str
    axis: int
    spatial: int
    source: str  # the group tensor whose Gram gives this exit's interpolation matrix
    node: int


@dataclass(frozen=True)
class Shift:
    """Add the consumer's response to a constant input c0 (C,) to its bias:
    bias[o] += scale * sum over every axis but `out_axis` of W[..., c*spatial + s, ...] c0[c],
    computed from the original weight. Exact only where every output sees the whole kernel
    (no padding), which the handlers check."""
    tensor: str       # the bias
    weight: str
    in_axis: int
    out_axis: int
    spatial: int
    source: str
    node: int
    scale: float = 1.0


@dataclass(frozen=True)
class SetAttr:
    node: int
    name: str


@dataclass(frozen=True)
class ShapeEntry:
    tensor: str
    index: int
    spatial: int
    node: int


@dataclass(frozen=True)
class Member:
    """A tensor of a group: its negative channel axis, the block size per channel, and the
    unflattened tensor its values come from (itself unless spatial > 1)."""
    tensor: str
    axis: int
    spatial: int = 1
    source: str = ""
    source_axis: int = 0

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.tensor)
            object.__setattr__(self, "source_axis", self.axis)


@dataclass(frozen=True)
class Produce:
    output: str
    axis: int
    channels: int
    edits: tuple
    weight: Slice  # the main weight, for norm-based selection


@dataclass(frozen=True)
class Through:
    outputs: tuple = ()        # Members
    edits: tuple = ()
    joins: tuple = ()          # other activations that must belong to the same group (name, axis)


@dataclass(frozen=True)
class Exit:
    edits: tuple
    source: str
    axis: int


@dataclass(frozen=True)
class Stop:
    reason: str


class Handler:
    """Default: never a producer, and a group reaching it stops."""

    def produce(self, g: GraphIndex, i: int):
        return None

    def consume(self, g: GraphIndex, i: int, pos: int, m: Member, channels: int):
        return Stop(f"{g.nodes[i].op_type} is not understood")


def _flat_only(m: Member, op: str) -> Stop | None:
    return Stop(f"flattened channels reach {op}") if m.spatial > 1 else None


def _const_channel_edit(g: GraphIndex, name: str, m: Member, channels: int, i: int):
    """Edits for a constant broadcast against member m: none if it does not vary along the
    channels, a Slice if it has exactly `channels` entries there, else a Stop."""
    c = g.const(name)
    if c is None:
        return None
    pos = c.ndim + m.axis
    if pos < 0 or c.shape[pos] == 1:
        return ()
    if c.shape[pos] == channels and m.spatial == 1:
        return (Slice(name, pos, i),)
    return Stop(f"constant {name!r} does not broadcast along the channels")


def _out(g: GraphIndex, i: int, m: Member, axis: int | None = None) -> Through:
    return Through(outputs=(Member(g.nodes[i].output[0], m.axis if axis is None else axis),))


def _unused_extra_outputs(g: GraphIndex, i: int) -> Stop | None:
    for extra in g.nodes[i].output[1:]:
        if extra and (g.users(extra) or extra in g.graph_outputs):
            return Stop(f"second output {extra!r} of {g.nodes[i].op_type} is used")
    return None


class Unary(Handler):
    """Elementwise ops of one tensor input; other inputs must be constants not varying along the
    channels (Clip bounds, Dropout ratio, ...)."""

    def consume(self, g, i, pos, m, channels):
        if pos != 0:
            return Stop(f"{g.nodes[i].op_type} reads the channels as a parameter")
        edits = []
        for name in g.nodes[i].input[1:]:
            if not name:
                continue
            e = _const_channel_edit(g, name, m, channels, i)
            if e is None:
                return Stop(f"{g.nodes[i].op_type} has a non-constant parameter {name!r}")
            if isinstance(e, Stop):
                return e
            edits.extend(e)
        if m.spatial > 1 and edits:
            return _flat_only(m, g.nodes[i].op_type)
        stop = _unused_extra_outputs(g, i)
        if stop:
            return stop
        return Through(outputs=(Member(g.nodes[i].output[0], m.axis, m.spatial, m.source, m.source_axis),),
                       edits=tuple(edits))


class Binary(Unary):
    """Add/Sub/Mul/Div/...: with a constant the constant is sliced (or left if it does not vary
    along the channels); with another activation both must be in the same group (residual joins,
    x * sigmoid(x), squeeze-and-excitation gates)."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        if m.spatial > 1:
            return _flat_only(m, node.op_type)
        other = node.input[1 - pos] if pos in (0, 1) and len(node.input) == 2 else None
        if other is None:
            return Stop(f"{node.op_type} with {len(node.input)} inputs")
        if g.const(other) is None:
            return Through(outputs=(Member(node.output[0], m.axis),), joins=((other, m.axis),))
        e = _const_channel_edit(g, other, m, channels, i)
        if isinstance(e, Stop):
            return e
        return Through(outputs=(Member(node.output[0], m.axis),), edits=e)


class Conv(Handler):
    def produce(self, g, i):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if w is None:
            return "weight is not a constant"
        group = g.attr(i, "group", 1)
        if group != 1:
            if group == w.shape[0] and w.shape[1] == 1:
                return None  # depthwise: follows its input's channels
            return f"grouped convolution (group={group})"
        edits = [Slice(node.input[1], 0, i)]
        if len(node.input) > 2 and node.input[2]:
            if g.const(node.input[2]) is None:
                return "bias is not a constant"
            edits.append(Slice(node.input[2], 0, i))
        return Produce(node.output[0], -(w.ndim - 1), w.shape[0], tuple(edits), edits[0])

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if pos != 0 or w is None:
            return Stop("Conv reads the channels as its weight")
        if m.spatial > 1 or m.axis != -(w.ndim - 1):
            return Stop("Conv does not read the channel axis as its input channels")
        group = g.attr(i, "group", 1)
        if group == 1 and w.shape[1] == channels:
            edits = [Mix(node.input[1], 1, 1, m.source, i)]
            unpadded = not any(g.attr(i, "pads", [0])) and g.attr(i, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
            if unpadded and len(node.input) > 2 and g.const(node.input[2]) is not None:
                edits.append(Shift(node.input[2], node.input[1], 1, 0, 1, m.source, i))
            return Exit(tuple(edits), m.source, m.source_axis)
        if group == channels and w.shape[0] == channels and w.shape[1] == 1:
            edits = [Slice(node.input[1], 0, i), SetAttr(i, "group")]
            if len(node.input) > 2 and node.input[2]:
                edits.append(Slice(node.input[2], 0, i))
            return Through(outputs=(Member(node.output[0], m.axis),), edits=tuple(edits))
        return Stop(f"grouped convolution (group={group})")


class Gemm(Handler):
    def produce(self, g, i):
        node = g.nodes[i]
        b = g.const(node.input[1])
        if b is None or b.ndim != 2:
            return "weight is not a constant matrix"
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
        if pos != 0 or b is None or g.attr(i, "transA", 0):
            return Stop("Gemm does not read the channels as its input features")
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
    def produce(self, g, i):
        node = g.nodes[i]
        a, w = g.const(node.input[0]), g.const(node.input[1])
        if w is None:
            return "constant on the left" if a is not None else "no constant weight (product of two activations)"
        if w.ndim != 2:
            return "batched constant weight"
        return Produce(node.output[0], -1, w.shape[1], (Slice(node.input[1], 1, i),), Slice(node.input[1], 1, i))

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        w = g.const(node.input[1])
        if pos != 0 or w is None or w.ndim != 2:
            return Stop("MatMul multiplies the channels with another activation")
        if m.axis != -1 or w.shape[0] != channels * m.spatial:
            return Stop("MatMul's weight does not match the channels")
        edits = [Mix(node.input[1], 0, m.spatial, m.source, i)]
        bias = _following_bias(g, i, w.shape[1])
        if bias is not None:
            edits.append(Shift(bias[1], node.input[1], 0, 1, m.spatial, m.source, bias[0]))
        return Exit(tuple(edits), m.source, m.source_axis)


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
        return _unused_extra_outputs(g, i) or Through(outputs=(Member(node.output[0], m.axis),), edits=tuple(edits))


class Pool(Handler):
    """Pooling over the axes after the channel axis (axis 1)."""

    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        if m.spatial > 1 or rank is None or m.axis != 1 - rank:
            return Stop(f"{g.nodes[i].op_type} does not pool along the spatial axes")
        return _unused_extra_outputs(g, i) or _out(g, i, m)


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
            return _out(g, i, m)
        newpos = c - sum(a < c for a in axes)
        return _out(g, i, m, newpos - (rank - len(axes)))


class Transpose(Handler):
    def consume(self, g, i, pos, m, channels):
        perm = g.attr(i, "perm")
        rank = g.rank(m.tensor) if perm is None else len(perm)
        if m.spatial > 1 or rank is None:
            return Stop("Transpose of unknown rank")
        perm = list(perm) if perm is not None else list(range(rank))[::-1]
        return _out(g, i, m, perm.index(rank + m.axis) - rank)


class Resize(Handler):
    """Resize/Upsample with scale 1 (or size = channels) along the channel axis."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        if pos != 0 or m.spatial > 1 or rank is None:
            return Stop(f"{node.op_type} of unknown rank")
        c = rank + m.axis
        names = list(node.input[1:])
        scales_name = names[-1] if node.op_type == "Upsample" else (names[1] if len(names) > 1 else "")
        sizes_name = names[2] if node.op_type == "Resize" and len(names) > 2 else ""
        if sizes_name:
            sizes = g.const(sizes_name)
            if sizes is None or len(sizes) != rank:
                return Stop(f"{node.op_type} sizes are not constant")
            if g.attr(i, "axes") is not None:
                return Stop(f"{node.op_type} with axes")
            return Through(outputs=(Member(node.output[0], m.axis),),
                           edits=(ShapeEntry(sizes_name, c, 1, i),))
        scales = g.const(scales_name) if scales_name else g.attr(i, "scales")
        if scales is None or len(scales) != rank or float(np.ravel(scales)[c]) != 1.0:
            return Stop(f"{node.op_type} scales the channel axis or its scales are not constant")
        return _out(g, i, m)


class Softmax(Handler):
    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        default = -1 if g.opset >= 13 else 1
        axis = g.attr(i, "axis", default)
        if rank is None or m.spatial > 1:
            return Stop("Softmax of unknown rank")
        if g.opset < 13 and axis % rank <= rank + m.axis:
            return Stop("Softmax (opset < 13) flattens across the channels")
        if axis % rank == rank + m.axis:
            return Stop("Softmax over the channels")
        return _out(g, i, m)


class Flatten(Handler):
    """Flatten at the channel axis: the channels become channel-major blocks of the last axis."""

    def consume(self, g, i, pos, m, channels):
        shape = g.shape(m.tensor)
        if shape is None or m.spatial > 1:
            return Stop("Flatten of unknown shape")
        rank = len(shape)
        c = rank + m.axis
        axis = g.attr(i, "axis", 1) % max(rank, 1)
        if axis != c:
            return Stop("Flatten does not start at the channel axis")
        spatial = shape[c + 1:]
        if any(d is None for d in spatial):
            return Stop("Flatten of unknown spatial size")
        flat = int(np.prod(spatial, dtype=np.int64))
        return Through(outputs=(Member(g.nodes[i].output[0], -1, flat, m.source if flat > 1 else "", m.axis),))


class Reshape(Handler):
    """Reshape that keeps the channel axis whole (merging or splitting only other axes), or that
    flattens it channel-major with the axes after it."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        src, dst, target = g.shape(m.tensor), g.shape(node.output[0]), g.const(node.input[1])
        if pos != 0 or src is None or dst is None or None in src or None in dst or m.spatial > 1:
            return Stop("Reshape of unknown shape")
        if target is None:
            return Stop("Reshape to a computed shape")
        c = len(src) + m.axis
        before = int(np.prod(src[:c], dtype=np.int64))
        after = int(np.prod(src[c + 1:], dtype=np.int64))
        for j in range(len(dst)):
            if int(np.prod(dst[:j], dtype=np.int64)) != before:
                continue
            tail = int(np.prod(dst[j + 1:], dtype=np.int64))
            if dst[j] == channels and tail == after:
                return self._through(node, i, j, len(dst), int(target[j]), channels, 1, m, j == c)
            if dst[j] == channels * after and j == len(dst) - 1:
                return self._through(node, i, j, len(dst), int(target[j]), channels, after, m, False)
        return Stop("Reshape splits the channel axis")

    @staticmethod
    def _through(node, i, j, rank, entry, channels, spatial, m, same_axis):
        """Output channel axis at position j of `rank`; the target entry j names the channels
        (edited), is -1 (inferred) or 0 copying the channel axis itself."""
        edits = ()
        if entry == channels * spatial:
            edits = (ShapeEntry(node.input[1], j, spatial, i),)
        elif not (entry == -1 or (entry == 0 and same_axis)):
            return Stop("Reshape target does not name the channels")
        source = m.source if spatial > 1 else ""
        return Through(outputs=(Member(node.output[0], j - rank, spatial, source, m.axis),), edits=edits)


class Squeeze(Handler):
    """Squeeze/Unsqueeze of axes other than the channels."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        src, dst = g.rank(m.tensor), g.rank(node.output[0])
        if pos != 0 or src is None or dst is None or m.spatial > 1:
            return Stop(f"{node.op_type} of unknown rank")
        axes = g.attr(i, "axes")
        if axes is None and len(node.input) > 1:
            axes = g.const(node.input[1])
        if axes is None:
            return Stop(f"{node.op_type} over unknown axes")
        c = src + m.axis
        if node.op_type == "Squeeze":
            axes = sorted(int(a) % src for a in np.ravel(axes))
            if c in axes:
                return Stop("Squeeze removes the channel axis")
            newpos = c - sum(a < c for a in axes)
        else:
            axes = sorted(int(a) % dst for a in np.ravel(axes))
            newpos = c
            for a in axes:
                if a <= newpos:
                    newpos += 1
        return _out(g, i, m, newpos - dst)


class Concat(Handler):
    """Concatenation along an axis other than the channels joins its inputs into one group."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        if rank is None or m.spatial > 1:
            return Stop("Concat of unknown rank")
        if g.attr(i, "axis") % rank == rank + m.axis:
            return Stop("Concat along the channels")
        joins = tuple((n, m.axis) for k, n in enumerate(node.input) if k != pos and n)
        if any(g.const(n) is not None for n, _ in joins):
            return Stop("Concat with a constant")
        return Through(outputs=(Member(node.output[0], m.axis),), joins=joins)


class ShapeOf(Handler):
    """Shape: harmless when only dimensions other than the channels are read from it."""

    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        if rank is None or g.attr(i, "start") is not None or g.attr(i, "end") is not None:
            return Stop("its shape is read by a Shape node")
        c = rank + m.axis
        for j, p in g.users(g.nodes[i].output[0]):
            idx = g.const(g.nodes[j].input[1]) if g.nodes[j].op_type == "Gather" and p == 0 else None
            if idx is None or any(int(k) % rank == c for k in np.ravel(idx)):
                return Stop("its channel count is read by a Shape node")
        if g.nodes[i].output[0] in g.graph_outputs:
            return Stop("its shape is a graph output")
        return Through()


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

HANDLERS: dict[str, Handler] = {
    **{op: Unary() for op in UNARY_OPS},
    **{op: Binary() for op in BINARY_OPS},
    "Conv": Conv(), "Gemm": Gemm(), "MatMul": MatMul(), "Gather": Gather(),
    "BatchNormalization": PerChannelNorm(), "InstanceNormalization": PerChannelNorm(),
    **{op: Pool() for op in "MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool".split()},
    **{op: Reduce() for op in "ReduceMean ReduceSum ReduceMax ReduceMin ReduceL1 ReduceL2 ReduceProd".split()},
    "Transpose": Transpose(), "Resize": Resize(), "Upsample": Resize(), "Softmax": Softmax(),
    "LogSoftmax": Softmax(), "Flatten": Flatten(), "Reshape": Reshape(), "Squeeze": Squeeze(),
    "Unsqueeze": Squeeze(), "Concat": Concat(), "Shape": ShapeOf(),
    **{op: Mixes("normalizes across the channels") for op in
       "LayerNormalization GroupNormalization LpNormalization MeanVarianceNormalization".split()},
    **{op: Mixes("mixes the channels") for op in "ConvTranspose LSTM GRU RNN Einsum".split()},
}
