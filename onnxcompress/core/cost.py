"""Parameter and FLOP counts, and how they scale with the width of each channel group.

FLOPs are counted for Conv, ConvTranspose, Gemm and MatMul nodes (2 per multiply-add) at the
shapes of one concrete feed; parameters are the elements of floating-point initializers.

A weight edited by groups A and B (a Conv reading group A and producing group B) scales with
k_A / C_A * k_B / C_B, so costs are kept as `Item`s: a full-width cost and the groups it scales
with. `scaled_total` evaluates them at any widths.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import onnx

from .graph import FLOAT_TYPES, GraphIndex
from ..methods.id.groups import Analysis
from ..ops.edits import Mix, SetAttr, Slice


@dataclass(frozen=True)
class Item:
    cost: float
    groups: tuple[str, ...]


def count_params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
                   if t.data_type in FLOAT_TYPES))


def node_flops(g: GraphIndex) -> dict[int, float]:
    """FLOPs per linear node whose shapes are known at the shapes in `g.shapes`."""
    out = {}
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        y = g.shape(node.output[0])
        a, b = g.shape(node.input[0]), g.shape(node.input[1])
        if y is None or a is None or b is None or None in y or None in a or None in b:
            continue
        if node.op_type == "Conv":
            f = np.prod(y, dtype=np.float64) * np.prod(b[1:], dtype=np.float64)
        elif node.op_type == "ConvTranspose":
            f = np.prod(a, dtype=np.float64) * np.prod(b[1:], dtype=np.float64)
        elif node.op_type == "Gemm":
            k = a[0] if g.attr(i, "transA", 0) else a[-1]
            f = np.prod(y, dtype=np.float64) * k
        else:
            f = np.prod(y, dtype=np.float64) * (a[-1] if len(a) > 1 else 1)
        out[i] = 2.0 * float(f)
    return out


def cost_items(g: GraphIndex, analysis: Analysis, flops: dict[int, float]) -> tuple[list[Item], list[Item]]:
    """(param items, flop items) of everything the groups can shrink."""
    tensor_groups: dict[str, set[str]] = defaultdict(set)
    node_groups: dict[int, set[str]] = defaultdict(set)
    for grp in analysis.groups:
        for e in grp.edits:
            if isinstance(e, (Slice, Mix)):
                tensor_groups[e.tensor].add(grp.id)
                node = g.nodes[e.node]
                weight_pos = 0 if node.op_type == "Gather" else 1
                if len(node.input) > weight_pos and node.input[weight_pos] == e.tensor:
                    node_groups[e.node].add(grp.id)
            elif isinstance(e, SetAttr):
                node_groups[e.node].add(grp.id)
    params = [Item(float(g.const(t).size), tuple(sorted(s))) for t, s in tensor_groups.items()]
    fl = [Item(flops[i], tuple(sorted(s))) for i, s in node_groups.items() if i in flops]
    return params, fl


def scaled_total(items: list[Item], fraction: dict[str, float]) -> float:
    """Sum of item costs with each scaled by the product of its groups' kept fractions."""
    total = 0.0
    for it in items:
        f = it.cost
        for gid in it.groups:
            f *= fraction.get(gid, 1.0)
        total += f
    return total


def shrinkable(items: list[Item]) -> float:
    return float(sum(it.cost for it in items))



Step = tuple[float, str, int, float]   # (added error per unit saved, key, new size, cost saved)


def cheapest_first(current: float, goal: float, steps: Callable[[], Iterable[Step]],
                   take: Callable[[str, int], None]) -> float:
    """Seed 000's greedy allocation: while `current` is above `goal`, take the candidate step with
    the least added error per unit of cost saved (`take(key, new size)`). Returns the total
    reached, above `goal` only when no step is left."""
    while current > goal:
        best = min(steps(), key=lambda step: step[0], default=None)
        if best is None:
            break
        _, key, new, saved = best
        take(key, new)
        current -= saved
    return current
