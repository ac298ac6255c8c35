"""The vocabulary shared by the handlers (`compute.py`, `layout.py`), the group search
(`groups.py`) and the rewrite: group members, handler results and rewrite edits.

Channel axes are negative (counted from the right), which survives broadcasting. `spatial` > 1
marks a tensor whose channel axis was flattened channel-major with `spatial` trailing elements per
channel (Flatten/Reshape before a Gemm); only exits may read such a tensor.

Edits say what the rewrite does with channel selection S (k kept of C) and interpolation T (k x C):
`Slice` keeps entries S along an axis, `Mix` replaces the C-long input axis (C*spatial, channel-
major) of a weight by T applied to it, `SetAttr` sets an attribute to k, `ShapeEntry` sets entry
`index` of a shape constant to k*spatial, `Shift` folds a constant intercept into a bias.

Windows (Concat along the channels): a group's channel index space is the concatenation of its
producers' channels. A tensor before the Concat holds channels [offset, offset + width) of that
space; every edit on it carries the window (`width` 0: the whole space). With kept channels S,
the window keeps S_w = {s - offset : s in S, offset <= s < offset + width}; a `Mix` there uses the
rows of T for S_w and its columns [offset, offset + width) (see `window_keep`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.stats import ChannelGram, PatchGram, Request, TokenCounts
from ..core.graph import GraphIndex


@dataclass(frozen=True)
class Slice:
    tensor: str
    axis: int
    node: int
    offset: int = 0
    width: int = 0


@dataclass(frozen=True)
class Mix:
    tensor: str
    axis: int
    spatial: int
    source: str  # the group tensor whose Gram gives this exit's interpolation matrix
    node: int
    offset: int = 0
    width: int = 0


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
    offset: int = 0
    width: int = 0


@dataclass(frozen=True)
class SetAttr:
    """Set integer attribute `name` of `node` to k (times `per`: a grouped Conv's `group` counts
    whole groups of `per` channels)."""
    node: int
    name: str
    offset: int = 0
    width: int = 0
    per: int = 1


@dataclass(frozen=True)
class ShapeEntry:
    tensor: str
    index: int
    spatial: int
    node: int
    offset: int = 0
    width: int = 0
    per: int = 1   # the entry counts whole blocks of `per` channels (attention heads)


@dataclass(frozen=True)
class Member:
    """A tensor of a group: its negative channel axis, the block size per channel, and the
    unflattened tensor its values come from (itself unless spatial > 1).

    Attention heads (`heads` H > 0; the group's C channels are H heads of C / H): either the
    channel axis is split, channel h * C/H + j at index h of `head_axis` and j of `axis` (Q, K, V
    after their Reshape), or the tensor only has the head axis (`axis` == `head_axis`: attention
    scores and probabilities, one per head)."""
    tensor: str
    axis: int
    spatial: int = 1
    source: str = ""
    source_axis: int = 0
    heads: int = 0
    head_axis: int = 0

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.tensor)
            object.__setattr__(self, "source_axis", self.axis)

    @property
    def axes(self) -> set[int]:
        """The negative axes that carry channels (or heads)."""
        return {self.axis, self.head_axis} if self.heads else {self.axis}

    @property
    def head_only(self) -> bool:
        return bool(self.heads) and self.axis == self.head_axis

    def follow(self, tensor: str, axis: int | None = None, head_axis: int | None = None) -> "Member":
        """The same layout (heads included) on `tensor`, with the axes moved where given."""
        axis = self.axis if axis is None else axis
        if not self.heads:
            return Member(tensor, axis)
        return Member(tensor, axis, heads=self.heads, head_axis=self.head_axis if head_axis is None else head_axis)


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
    joins: tuple = ()          # other activations that must belong to the same group: (name, axis) or,
                               # for attention heads, (name, axis, head_axis)
    block: int = 1             # the channels may only be removed in whole blocks of this many


@dataclass(frozen=True)
class Exit:
    edits: tuple
    source: str
    axis: int


@dataclass(frozen=True)
class Enter:
    """The member's channels become channels [offset, offset + channels) of `output`, a Concat
    along the channel axis (`axis`) of `total` channels: the group continues in the
    concatenated index space (see `groups.py`)."""
    output: str
    axis: int
    offset: int
    total: int
    node: int


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass(frozen=True)
class Layer:
    key: str                # the node's display name (GraphIndex.key)
    node: int
    kind: str               # "gemm" | "matmul" | "matmul_left" | "conv" | "gather"
    weight: str             # the constant's name
    out: int                # rows of W
    inputs: int             # columns of W (in * prod(kernel) for a Conv)
    request: Request        # the input statistic
    kernel: tuple[int, ...] = ()
    rows: float = 0.0       # positions per feed (output elements / out), for FLOPs

    @property
    def params(self) -> int:
        return self.out * self.inputs

    def split_params(self, rank: int) -> int:
        return rank * (self.out + self.inputs)

    @property
    def max_rank(self) -> int:
        """The largest rank whose split is smaller than the layer (0: none is)."""
        return min((self.params - 1) // (self.out + self.inputs), self.out, self.inputs)

    @property
    def statistic(self) -> str:
        return {ChannelGram: "channels", PatchGram: "patches", TokenCounts: "counts"}[type(self.request)]


def window_keep(keep, offset: int, width: int):
    """Positions (into `keep`) and local indices of the kept channels inside a window
    (all of them when width is 0)."""
    keep = np.asarray(keep, dtype=np.int64)
    if not width:
        return np.arange(len(keep)), keep
    rows = np.flatnonzero((keep >= offset) & (keep < offset + width))
    return rows, keep[rows] - offset


def windowed(e, offset: int, width: int):
    """Edit e placed at a window of the group's channel space."""
    return replace(e, offset=e.offset + offset, width=e.width or width)


class Handler:
    """Default: never a producer, never a layer to split, and a group reaching it stops.
    `heads`: whether `consume` understands members split into attention heads."""

    heads = False

    def layer(self, g: GraphIndex, i: int, max_patch: int):
        """A `Layer` if node i is a constant-weight layer a low-rank split can replace, a reason
        string if it is such an op but cannot be split, None if the op is never one."""
        return None

    def produce(self, g: GraphIndex, i: int):
        return None

    def consume(self, g: GraphIndex, i: int, pos: int, m: Member, channels: int):
        return Stop(f"{g.nodes[i].op_type} is not understood")


def flat_only(m: Member, op: str) -> Stop | None:
    return Stop(f"flattened channels reach {op}") if m.spatial > 1 else None


def const_channel_edit(g: GraphIndex, name: str, m: Member, channels: int, i: int):
    """Edits for a constant broadcast against member m: none if it does not vary along the
    channels, a Slice if it has exactly `channels` entries there, else a Stop."""
    c = g.const(name)
    if c is None:
        return None
    if m.heads:
        if any(c.ndim + a >= 0 and c.shape[c.ndim + a] != 1 for a in m.axes):
            return Stop(f"constant {name!r} varies along the attention heads")
        return ()
    pos = c.ndim + m.axis
    if pos < 0 or c.shape[pos] == 1:
        return ()
    if c.shape[pos] == channels and m.spatial == 1:
        return (Slice(name, pos, i),)
    return Stop(f"constant {name!r} does not broadcast along the channels")


def through_to(g: GraphIndex, i: int, m: Member, axis: int | None = None, head_axis: int | None = None) -> Through:
    return Through(outputs=(m.follow(g.nodes[i].output[0], axis, head_axis),))


def unused_extra_outputs(g: GraphIndex, i: int) -> Stop | None:
    for extra in g.nodes[i].output[1:]:
        if extra and (g.users(extra) or extra in g.graph_outputs):
            return Stop(f"second output {extra!r} of {g.nodes[i].op_type} is used")
    return None


def computed_weight(g: GraphIndex, name: str, what: str = "weight") -> str | None:
    """Why `name`, a weight slot that holds no constant, is left alone when it is computed from
    constants only (a DequantizeLinear of quantized weights, a Cast of float16 storage, ...);
    None when it is an activation or a graph input."""
    i = g.producer.get(name)
    if i is None or not all(g.const(n) is not None for n in g.nodes[i].input if n):
        return None
    op = g.nodes[i].op_type
    if op == "DequantizeLinear":
        return f"{what} is quantized (DequantizeLinear node {g.key(i)}); quantized weights are left as they are"
    return f"{what} is computed by {op} node {g.key(i)}, not stored as a constant"
