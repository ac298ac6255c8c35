"""Graph surgery for block dropping: y := x for every dropped block, then the nodes and
initializers nothing reads any more are removed.

Works on tensor names only (the Add's output y and the skip x), so it composes with the
rewrites of the methods that ran before it (they keep the names of the residual stream): every
reader of y reads x instead (through chains: a dropped block whose x is another dropped block's
y reads that block's x); a graph output y becomes Identity(x). Only nodes that were live before
and are dead after are removed, so whatever the input model left unused stays as it was.
"""
from __future__ import annotations

import onnx
from onnx import helper

from ...ops.surgery import drop_value_info, fresh_name


def drop_blocks(model: onnx.ModelProto, pairs: list[tuple[str, str]]) -> onnx.ModelProto:
    """A copy of `model` with each (y, x) in `pairs` dropped: y = x + f(x) becomes x."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    alias = dict(pairs)

    def resolve(t: str) -> str:
        seen = set()
        while t in alias and t not in seen:
            seen.add(t)
            t = alias[t]
        return t

    live_before = _live(graph)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in alias:
                node.input[k] = resolve(name)
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | \
            {vi.name for vi in graph.input}
    for out in graph.output:
        if out.name in alias:
            graph.node.append(helper.make_node("Identity", [resolve(out.name)], [out.name],
                                               name=fresh_name(f"{out.name}/dropped_block", taken)))
    live_after = _live(graph)
    dead = [n for k, n in enumerate(graph.node) if k in live_before[0] and k not in live_after[0]]
    removed_tensors = {o for n in dead for o in n.output}
    keep = [n for k, n in enumerate(graph.node) if not (k in live_before[0] and k not in live_after[0])]
    del graph.node[:]
    graph.node.extend(keep)
    unread = {t.name for t in graph.initializer if t.name in live_before[1] and t.name not in live_after[1]}
    kept_inits = [t for t in graph.initializer if t.name not in unread]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    drop_value_info(graph, removed_tensors | unread | set(alias))
    return new


def _live(graph: onnx.GraphProto) -> tuple[set[int], set[str]]:
    """(indices of the nodes the graph outputs depend on, names those nodes read), subgraph
    reads included."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    nodes: set[int] = set()
    names: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        t = stack.pop()
        if t in names:
            continue
        names.add(t)
        k = producer.get(t)
        if k is None or k in nodes:
            continue
        nodes.add(k)
        stack.extend(n for n in _reads(graph.node[k]) if n)
    return nodes, names


def _reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs and every name read inside its subgraphs (If/Loop/Scan bodies)."""
    out = list(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                out.extend(_reads(n))
    return out
