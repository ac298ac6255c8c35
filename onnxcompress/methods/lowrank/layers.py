"""Find the layers a low-rank split can replace (docs/graph-rules.md, "Low-rank splits"). Pure analysis.

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
the reason, as are layers no rank >= 1 makes smaller. Per-op knowledge (which node is a layer,
its W and statistic) is the `layer` method of the op's handler in `ops/compute.py`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...ops.edits import Layer
from ...core.graph import FLOAT_TYPES, GraphIndex
from ...core.stats import gram_bytes, gram_too_big, over_total
from ..base import Skipped
from ...ops.compute import HANDLERS


@dataclass(frozen=True)
class LayerAnalysis:
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]


def find_layers(g: GraphIndex, *, include: str | None = None, exclude: str | None = None,
                max_patch: int = 4096) -> LayerAnalysis:
    """Every Gemm / MatMul / Conv / Gather with a constant weight that a split can shrink."""
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    layers, skipped, used = [], [], 0
    for i, node in enumerate(g.nodes):
        handler = HANDLERS.get(node.op_type)
        if handler is None or node.domain not in ("", "ai.onnx"):
            continue
        key = g.key(i)
        if (inc and not inc.search(node.name)) or (exc and exc.search(node.name)):
            continue
        found = handler.layer(g, i, max_patch)
        if found is None:
            continue
        reason = found if isinstance(found, str) else _check(g, found)
        if not reason:
            need = gram_bytes(found.request.width) if hasattr(found.request, "width") else 0
            reason = over_total(need, used) or ""
            used += 0 if reason else need
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
    too_big = gram_too_big(layer.request.width) if hasattr(layer.request, "width") else None
    if too_big:
        return f"input statistic of {too_big}"
    if not np.all(np.isfinite(g.const(layer.weight))):
        return f"weight {layer.weight!r} holds NaN or Inf values"
    return ""
