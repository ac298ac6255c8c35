"""Find residual blocks: pure analysis of a normalized graph.

A residual block is an `Add(x, f)` node, y = x + f(x), where

* f depends on x: x is read by a node in the cone of f (the nodes f is computed from);
* the block's body B is the part of that cone computed from x (cone(f) and the descendants of
  x), and nothing outside the block reads a tensor B computes (only the Add reads f; no body
  tensor is a graph output or read inside a subgraph);
* the skip is the identity: the Add reads x itself, so dropping the block (y := x) leaves the
  rest of the graph computing on tensors of the same shape (shape(x) == shape(y)).

Other activations the body reads (an attention mask computed from a graph input) are side
inputs: they are not computed from x, and stay in the graph unless nothing else reads them.
Examples: a transformer's attention or FFN sub-block (post-LN: the LayerNormalization after the
Add is outside the block and stays; pre-LN: the one inside is part of f), a ResNet block with an
identity skip. An Add of two activations that is not such a block comes back as `Skipped` with
the reason: a non-residual Add (neither operand computed from the other), a skip that is not
the identity (both operands computed from a common tensor, e.g. a 1x1 projection on the skip),
or a body tensor read outside the block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ...core.graph import GraphIndex
from ..base import Skipped


@dataclass(frozen=True)
class Block:
    """One residual block y = x + f(x) at Add node `key` (its display name).

    skip: x; branch: f; output: y; nodes: the body's node indices (topological order, the Add
    not included); weights: initializers read only by body nodes (removed with it); side: other
    activations the body reads; shape: shape(x) = shape(y) at the calibration sample."""
    key: str
    add: int
    skip: str
    branch: str
    output: str
    nodes: tuple[int, ...]
    weights: tuple[str, ...]
    side: tuple[str, ...]
    shape: tuple


@dataclass(frozen=True)
class Found:
    blocks: tuple[Block, ...]
    skipped: tuple[Skipped, ...]


def cone(g: GraphIndex, tensor: str) -> set[int]:
    """Indices of the nodes `tensor` is computed from (its producer included)."""
    out: set[int] = set()
    stack = [tensor]
    while stack:
        i = g.producer.get(stack.pop())
        if i is None or i in out:
            continue
        out.add(i)
        stack.extend(n for n in g.nodes[i].input if n)
    return out


def _activation(g: GraphIndex, name: str) -> bool:
    return bool(name) and g.const(name) is None


def find_blocks(g: GraphIndex, *, include: str | None = None, exclude: str | None = None) -> Found:
    """Every Add of two activations: a `Block` when it is a residual block (module docstring),
    else `Skipped` with the reason. `include` / `exclude`: regular expressions on node names; a
    block is kept only if its Add or a body node matches `include` and none matches `exclude`."""
    blocks, skipped = [], []
    nested = g.subgraph_uses()
    for i, node in enumerate(g.nodes):
        if node.op_type != "Add" or len(node.input) != 2 or not all(_activation(g, n) for n in node.input):
            continue
        found = _match(g, i, nested)
        if isinstance(found, str):
            skipped.append(Skipped(g.key(i), "Add", f"block: {found}"))
            continue
        names = [g.key(i)] + [g.key(j) for j in found.nodes]
        if exclude and any(re.search(exclude, n) for n in names):
            skipped.append(Skipped(g.key(i), "Add", "block: excluded by --exclude"))
        elif include and not any(re.search(include, n) for n in names):
            skipped.append(Skipped(g.key(i), "Add", "block: not matched by --include"))
        else:
            blocks.append(found)
    return Found(tuple(blocks), tuple(skipped))


def _match(g: GraphIndex, i: int, nested: set[str]) -> Block | str:
    """The block at Add node i, or why it is none."""
    a, b = g.nodes[i].input
    cones = {a: cone(g, a), b: cone(g, b)}
    for x, f in ((a, b), (b, a)):
        if x == f:
            return "adds a tensor to itself"
        reads = {n for j in cones[f] for n in g.nodes[j].input}
        if x not in reads:
            continue
        body = _descendants(g, x, cones[f])
        if g.producer.get(f) not in body:
            continue
        why = _closed(g, i, f, body, nested)
        if why:
            return f"as a block around {x!r}: {why}"
        y = g.nodes[i].output[0]
        if y in nested:
            return f"its output {y!r} is read inside a subgraph"
        sx, sy = g.shape(x), g.shape(y)
        if sx is None or sy is None or None in sx or None in sy:
            return f"the shapes of {x!r} and {y!r} are unknown"
        if tuple(sx) != tuple(sy):
            return f"the Add broadcasts {x!r} {list(sx)} to {list(sy)}: dropping f would change the shape"
        nodes = tuple(sorted(body))
        inside = set(nodes)
        weights = sorted({n for j in nodes for n in g.nodes[j].input if n and g.const(n) is not None
                          and all(u in inside for u, _ in g.users(n)) and n not in nested
                          and n not in g.graph_outputs})
        produced = {o for j in nodes for o in g.nodes[j].output}
        side = sorted({n for j in nodes for n in g.nodes[j].input
                       if _activation(g, n) and n != x and n not in produced})
        return Block(g.key(i), i, x, f, y, nodes, tuple(weights), tuple(side), tuple(sx))
    common = cones[a] & cones[b]
    if common:
        last = max(common)
        return (f"the skip is not the identity: both operands are computed from node {g.key(last)!r}, "
                f"neither from the other (a projection or other op on the skip path)")
    return "not a residual block: neither operand is computed from the other"


def _descendants(g: GraphIndex, x: str, within: set[int]) -> set[int]:
    """The nodes of `within` computed from tensor x (nodes are in topological order)."""
    reached, tensors = set(), {x}
    for j in sorted(within):
        if any(n in tensors for n in g.nodes[j].input):
            reached.add(j)
            tensors.update(o for o in g.nodes[j].output if o)
    return reached


def _closed(g: GraphIndex, add: int, f: str, body: set[int], nested: set[str]) -> str | None:
    """Why a tensor computed in the body is needed outside the block, or None."""
    for j in sorted(body):
        for out in g.nodes[j].output:
            if not out:
                continue
            if out in g.graph_outputs:
                return f"{out!r}, computed inside the block, is a graph output"
            if out in nested:
                return f"{out!r}, computed inside the block, is read inside a subgraph"
            for u, _ in g.users(out):
                if u not in body and not (u == add and out == f):
                    return (f"{out!r}, computed inside the block by {g.key(j)!r}, is also read by "
                            f"{g.key(u)!r} outside it")
    return None


def block_flops(block: Block, flops: dict) -> dict[int, float]:
    """FLOPs of the body's nodes that `flops` counts (`core.cost.node_flops`)."""
    return {j: flops[j] for j in block.nodes if j in flops}


def weight_sizes(g: GraphIndex, block: Block) -> list[tuple[str, int, int]]:
    """(initializer, parameters, bytes) of every initializer the block removes: parameters count
    floating-point and 8-bit elements as `core.cost.count_params` does (0 for shape constants)."""
    out = []
    for name in block.weights:
        value = g.const(name)
        params = int(value.size) if value.dtype.kind == "f" or value.dtype.itemsize == 1 else 0
        out.append((name, params, int(value.nbytes)))
    return out
