"""Find the layers a low-rank split can replace (design.md section 3, "Low rank"). Pure analysis.

Every `Layer` views one node's constant weight as a matrix W (out x in), y = W x at every
position, names the statistic of the node's input that the activation-aware solvers need, and
the cost of a rank-r split, r (in + out) parameters instead of in * out:

* Gemm(X, Wc[, C]), Wc constant: W = alpha op(Wc)^T; the input channels are X's columns
  (its rows when transA). Split: op(X) B^T, then (.) A^T + beta C.
* MatMul(X, Wc), Wc (in x out) constant: W = Wc^T, input channels on X's last axis.
  Split: MatMul(MatMul(X, B^T), A^T).
* MatMul(Wc, X), Wc (out x in) constant: W = Wc, input channels on X's second-to-last axis.
  Split: MatMul(A, MatMul(B, X)).
* Conv (group = 1), Wc (out, in, k1, k2, ...): W = Wc reshaped (out x in*k1*k2...), the input is
  the im2col patch (`PatchGram`), or only the channels (`ChannelGram`, G ~ kron(G_c, I_k)) when
  the patch is longer than `max_patch`. Split: Conv(in -> r, same kernel and geometry) then
  Conv 1x1 (r -> out, with the bias).
* Gather(E, idx), E (vocab x d) constant, axis 0: W = E^T (d x vocab), the input is one-hot, so
  its Gram is diag(token counts) (`TokenCounts`). Split: Gather(B^T, idx) then MatMul(., A^T).

Weights read by any other node (a tied output projection, shared Q/K weights) are skipped, with
the reason, as are layers no rank >= 1 makes smaller.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .calibrate import ChannelGram, PatchGram, Request, TokenCounts
from .graph import FLOAT_TYPES, GraphIndex
from .groups import Skipped


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


@dataclass(frozen=True)
class LayerAnalysis:
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]


def find_layers(g: GraphIndex, *, include: str | None = None, exclude: str | None = None,
                max_patch: int = 4096) -> LayerAnalysis:
    """Every Gemm / MatMul / Conv / Gather with a constant weight that a split can shrink."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    layers, skipped = [], []
    for i, node in enumerate(g.nodes):
        if node.op_type not in _VIEWS:
            continue
        key = g.key(i)
        if (inc and not inc.search(node.name)) or (exc and exc.search(node.name)):
            continue
        found = _VIEWS[node.op_type](g, i, max_patch)
        if isinstance(found, str):
            if found:
                skipped.append(Skipped(key, node.op_type, found))
            continue
        reason = _check(g, found)
        if reason:
            skipped.append(Skipped(key, node.op_type, reason))
        else:
            layers.append(found)
    return LayerAnalysis(tuple(layers), tuple(skipped))


def weight_matrix(g: GraphIndex, layer: Layer) -> np.ndarray:
    """W (out x inputs), float64, as defined in the module docstring."""
    w = g.const(layer.weight).astype(np.float64)
    if layer.kind == "gemm":
        if g.attr(layer.node, "transB", 0):
            w = w.T
        return float(g.attr(layer.node, "alpha", 1.0)) * w.T
    if layer.kind in ("matmul", "gather"):
        return w.T
    return w.reshape(layer.out, layer.inputs)


def _check(g: GraphIndex, layer: Layer) -> str:
    users = g.users(layer.weight)
    if len(users) > 1:
        others = ", ".join(sorted({g.key(j) for j, _ in users if j != layer.node}))
        return f"weight {layer.weight!r} is also read by {others or 'this node twice'}"
    if layer.weight in g.graph_outputs:
        return f"weight {layer.weight!r} is a graph output"
    if g.initializers[layer.weight].data_type not in FLOAT_TYPES:
        return f"weight {layer.weight!r} is not floating point"
    if layer.max_rank < 1:
        return f"no rank makes a {layer.out} x {layer.inputs} weight smaller"
    return ""


def _positions(g: GraphIndex, output: str, per: int) -> float:
    shape = g.shape(output)
    if shape is None or None in shape:
        return 0.0
    return float(np.prod(shape, dtype=np.float64)) / per


def _gemm(g: GraphIndex, i: int, max_patch: int):
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
                 ChannelGram(node.input[0], axis, int(n_in)), rows=_positions(g, node.output[0], n_out))


def _matmul(g: GraphIndex, i: int, max_patch: int):
    node = g.nodes[i]
    left, right = g.const(node.input[0]), g.const(node.input[1])
    if right is not None and left is None:
        if right.ndim != 2:
            return "MatMul weight is not 2-D"
        n_in, n_out = right.shape
        return Layer(g.key(i), i, "matmul", node.input[1], int(n_out), int(n_in),
                     ChannelGram(node.input[0], -1, int(n_in)), rows=_positions(g, node.output[0], n_out))
    if left is not None and right is None:
        if left.ndim != 2:
            return "MatMul weight is not 2-D"
        n_out, n_in = left.shape
        return Layer(g.key(i), i, "matmul_left", node.input[0], int(n_out), int(n_in),
                     ChannelGram(node.input[1], -2, int(n_in)), rows=_positions(g, node.output[0], n_out))
    return "" if left is None else "MatMul of two constants"


def _conv(g: GraphIndex, i: int, max_patch: int):
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
                 rows=_positions(g, node.output[0], int(w.shape[0])))


def _gather(g: GraphIndex, i: int, max_patch: int):
    node = g.nodes[i]
    table = g.const(node.input[0])
    if table is None or table.ndim != 2 or g.const(node.input[1]) is not None:
        return ""   # Gather on shapes or activations: not a layer
    if g.attr(i, "axis", 0) != 0:
        return "Gather along the embedding axis"
    vocab, d = table.shape
    return Layer(g.key(i), i, "gather", node.input[0], int(d), int(vocab),
                 TokenCounts(node.input[1], int(vocab)), rows=_positions(g, node.output[0], d))


_VIEWS = {"Gemm": _gemm, "MatMul": _matmul, "Conv": _conv, "Gather": _gather}
