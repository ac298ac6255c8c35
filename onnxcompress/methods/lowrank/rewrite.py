"""Rewrite for low rank. For a split layer with W ~ A B (see `layers.py` for each kind's W),
`split` replaces the node by two, in its place, the second writing the original output name:

* Gemm:        op(X) B^T (MatMul, or Gemm with transA), then Gemm(., A^T, C, beta) or MatMul;
* MatMul:      MatMul(X, B^T) then MatMul(., A^T); with the constant on the left,
               MatMul(B, X) then MatMul(A, .);
* Conv:        Conv(X, B as (r, in, k...), same strides, pads, dilations, auto_pad), then
               Conv(., A as (out, r, 1...), bias);
* Gather:      Gather(B^T, idx) then MatMul(., A^T); with exact rows S (`LayerPlan.rows`), plus
               Gather(R0, Gather(map, idx)) added to it, where map (V, int32) sends token v to
               its row of R0 = [R; 0] (the residual rows of S, then a zero row for every other
               token): E[v] = (A B)^T[v] + R0[map[v]], exact for v in S. Negative indices
               count from the end in all three Gathers alike.

With `--decode load` (the default) a split table is then read the other way round,
Gather(B^T A^T [+ exact rows], idx), which a runtime forms once at load (`tables_at_load`).

The original weight is removed (`layers.py` only splits weights no other node reads).
Weights keep their dtype (the maths runs in float64). Stale `value_info` of every changed tensor is
dropped. The result is what `onnx.checker` and ONNX Runtime then verify.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ...core.plan import Plan
from ...ops.surgery import cast_weight, drop_value_info, fresh_name, writable
from ..quant.storage import DECODE_OPS


def split(model: onnx.ModelProto, g: GraphIndex, layers: dict, plan: Plan) -> onnx.ModelProto:
    """Return a new model with every `plan.layers` entry split in two nodes; `model` (the one `g`
    indexes) is not changed. `layers`: key -> `layers.Layer`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output} | \
        {vi.name for vi in out.graph.input}
    replace: dict[int, list[onnx.NodeProto]] = {}
    new_inits, dropped = [], set()
    for lp in plan.layers:
        layer = layers.get(lp.layer)
        if layer is None or (layer.out, layer.inputs) != (lp.out, lp.inputs):
            raise UsageError(f"plan: layer {lp.layer!r} does not match this model")
        dtype = g.const(layer.weight).dtype
        nodes, inits = _split_nodes(g, layer, lp, dtype, lambda base: fresh_name(base, taken))
        replace[layer.node] = nodes
        new_inits += inits
        dropped.add(layer.weight)
    nodes = []
    for i, node in enumerate(out.graph.node):
        nodes.extend(replace.get(i, [node]))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    kept = [t for t in out.graph.initializer if t.name not in dropped]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    drop_value_info(out.graph, dropped)
    return out


def _split_nodes(g: GraphIndex, layer, lp, dtype, fresh) -> tuple[list, list]:
    """The two nodes replacing `layer`'s node, and their new initializers."""
    node = g.nodes[layer.node]
    a, b = lp.left, lp.right
    r = lp.rank
    stem = layer.weight
    mid = fresh(f"{node.output[0]}.lowrank")
    names = (fresh(f"{stem}.lowrank_in"), fresh(f"{stem}.lowrank_out"))
    first_name, second_name = f"{layer.key}/lowrank_in", f"{layer.key}/lowrank_out"  # (`tables_at_load` reads them)

    def init(name, value):
        return numpy_helper.from_array(np.ascontiguousarray(cast_weight(value, dtype)), name)

    kind = layer.kind
    if kind in ("gemm", "matmul"):
        w1, w2 = init(names[0], b.T), init(names[1], a.T)
        trans_a = kind == "gemm" and g.attr(layer.node, "transA", 0)
        first = (helper.make_node("Gemm", [node.input[0], names[0]], [mid], name=first_name, transA=1)
                 if trans_a else helper.make_node("MatMul", [node.input[0], names[0]], [mid], name=first_name))
        bias = node.input[2] if kind == "gemm" and len(node.input) > 2 and node.input[2] else ""
        second = (helper.make_node("Gemm", [mid, names[1], bias], list(node.output), name=second_name,
                                   beta=float(g.attr(layer.node, "beta", 1.0)))
                  if bias else helper.make_node("MatMul", [mid, names[1]], list(node.output), name=second_name))
    elif kind == "matmul_left":
        w1, w2 = init(names[0], b), init(names[1], a)
        first = helper.make_node("MatMul", [names[0], node.input[1]], [mid], name=first_name)
        second = helper.make_node("MatMul", [names[1], mid], list(node.output), name=second_name)
    elif kind == "conv":
        k = layer.kernel
        w1 = init(names[0], b.reshape(r, layer.inputs // int(np.prod(k)), *k))
        w2 = init(names[1], a.reshape(layer.out, r, *[1] * len(k)))
        attrs = {x.name: helper.get_attribute_value(x) for x in node.attribute if x.name != "kernel_shape"}
        first = helper.make_node("Conv", [node.input[0], names[0]], [mid], name=first_name, **attrs)
        second = helper.make_node("Conv", [mid, names[1], *node.input[2:3]], list(node.output), name=second_name)
    elif kind == "gather":
        w1, w2 = init(names[0], b.T), init(names[1], a.T)
        first = helper.make_node("Gather", [names[0], node.input[1]], [mid], name=first_name, axis=0)
        if lp.rows is not None:
            return _with_rows(node, lp, (first, w1, w2), mid, names, init, fresh)
        second = helper.make_node("MatMul", [mid, names[1]], list(node.output), name=second_name)
    else:
        raise TypeError(f"unknown layer kind {kind!r}")
    return [first, second], [w1, w2]


def _with_rows(node, lp, split, mid, names, init, fresh) -> tuple[list, list]:
    """The table's low-rank lookup plus its exact rows: MatMul(Gather(B^T, idx), A^T) +
    Gather(R0, Gather(map, idx)) (see the module docstring)."""
    first, w1, w2 = split
    vocab, rows = lp.inputs, np.asarray(lp.rows, dtype=np.int64)
    if rows.ndim != 1 or len(np.unique(rows)) != len(rows) or (len(rows) and not 0 <= rows.min() <= rows.max() < vocab) \
            or np.shape(lp.residual) != (len(rows), lp.out):
        raise UsageError(f"plan: layer {lp.layer!r}: its exact rows do not match a {vocab} x {lp.out} table")
    index = np.full(vocab, len(rows), dtype=np.int32)
    index[rows] = np.arange(len(rows), dtype=np.int32)
    table = np.concatenate([np.asarray(lp.residual, dtype=np.float64), np.zeros((1, lp.out))])
    names = (*names, fresh(f"{names[0]}.rows_index"), fresh(f"{names[0]}.rows"))
    low, slot, fix = fresh(f"{node.output[0]}.lowrank_part"), fresh(f"{node.output[0]}.row_slot"), \
        fresh(f"{node.output[0]}.exact_part")
    stem = first.name.removesuffix("/lowrank_in")
    nodes = [first,
             helper.make_node("MatMul", [mid, names[1]], [low], name=f"{stem}/lowrank_out"),
             helper.make_node("Gather", [names[2], node.input[1]], [slot], name=f"{stem}/row_slot", axis=0),
             helper.make_node("Gather", [names[3], slot], [fix], name=f"{stem}/exact_rows", axis=0),
             helper.make_node("Add", [low, fix], list(node.output), name=f"{stem}/lowrank_sum")]
    return nodes, [w1, w2, numpy_helper.from_array(index, names[2]), init(names[3], table)]


def tables_at_load(model: onnx.ModelProto, keep=(), *, nodes=(), copy: bool = True) -> onnx.ModelProto:
    """`model` with each split lookup table (`_split_nodes`, kind "gather") formed from its
    factors before the lookup instead of after it:

        MatMul(Gather(B^T, idx), A^T)                             -> Gather(MatMul(B^T, A^T), idx)
        MatMul(Gather(B^T, idx), A^T) + Gather(R0, Gather(map, idx))
                                   -> Gather(MatMul(B^T, A^T) + Gather(R0, map), idx)

    Both are the same rows (a row lookup commutes with a product on the right, and a lookup of a
    lookup is one lookup through the composed index). The table is then computed from constants
    only, so a runtime forms it once when it loads the model (ONNX Runtime folds constants), and
    the lookup costs what the original's does: the file holds the factors, the session the full
    table. A split is recognized by the names `_split_nodes` gives its nodes (KEY/lowrank_in,
    KEY/lowrank_out, and with exact rows KEY/row_slot, KEY/exact_rows, KEY/lowrank_sum) and by its
    factors: constants the tool wrote (initializers not named in `keep`, the input model's, or
    their decoding by `quant.storage.decode_at_load`), read by no other node nor subgraph, and by
    its lookup not being one of `nodes` (the input model's node names: a file this tool wrote
    with `--decode run` keeps its splits as they are). A model's own factorized table (ALBERT's
    embedding and projection) is left as it is. The rewrite is in a copy, or with `copy=False` in
    `model` itself; `model` is returned unchanged when there is no split table."""
    graph = model.graph
    keep = set(keep)
    made = {t.name for t in graph.initializer if t.name not in keep}
    for n in graph.node:  # constants the tool wrote, and their decoding alone
        if n.input and all(x in made for x in n.input if x) and n.op_type in DECODE_OPS:
            made.update(n.output)
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(graph.node):
        for x in n.input:
            readers.setdefault(x, []).append(i)
    outer = _subgraph_reads(graph)
    outputs = {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}

    def only_reader(tensor: str, name: str):
        """The node reading `tensor`, when it is the only reader and is named `name`."""
        r = readers.get(tensor, [])
        if len(r) != 1 or tensor in outputs or tensor in outer or graph.node[r[0]].name != name:
            return None
        return graph.node[r[0]]

    def lookup(node, name: str):
        """(table, idx) when `node` is Gather(a constant the tool wrote, idx) along axis 0, named `name`."""
        if node is None or node.op_type != "Gather" or node.name != name or node.input[0] not in made or \
                any(a.name == "axis" and a.i != 0 for a in node.attribute):
            return None
        return node.input[0], node.input[1]

    taken = {t.name for t in graph.initializer} | set(producers) | {i.name for i in graph.input}
    theirs = set(nodes)
    found = []  # (nodes replaced, new nodes)
    for first in graph.node:
        if first.name in theirs:
            continue
        key = first.name.removesuffix("/lowrank_in")
        got = lookup(first, first.name) if key != first.name else None
        second = only_reader(first.output[0], f"{key}/lowrank_out") if got else None
        if second is None or second.op_type != "MatMul" or second.input[0] != first.output[0] or \
                second.input[1] not in made:
            continue
        factor_in, idx = got
        replaced, end = [first, second], second.output[0]
        table = fresh_name(f"{end}.table", taken)
        made_nodes = [helper.make_node("MatMul", [factor_in, second.input[1]], [table], name=f"{key}/table")]
        add = only_reader(end, f"{key}/lowrank_sum")
        if add is not None and add.op_type == "Add":
            other = add.input[1] if add.input[0] == end else add.input[0]
            exact = lookup(producers.get(other), f"{key}/exact_rows")
            slot = lookup(producers.get(exact[1]), f"{key}/row_slot") if exact else None
            if slot is not None and slot[1] == idx and only_reader(other, add.name) is add and \
                    only_reader(exact[1], producers[other].name) is producers[other]:
                rows, total = fresh_name(f"{end}.exact_rows", taken), fresh_name(f"{end}.table_sum", taken)
                made_nodes += [helper.make_node("Gather", [exact[0], slot[0]], [rows], name=f"{key}/exact_rows", axis=0),
                          helper.make_node("Add", [table, rows], [total], name=f"{key}/table_sum")]
                table = total
                replaced += [add, producers[other], producers[exact[1]]]
                end = add.output[0]
        made_nodes.append(helper.make_node("Gather", [table, idx], [end], name=key, axis=0))
        found.append((replaced, made_nodes))
    if not found:
        return model
    out = writable(model, copy)
    position = {id(n): i for i, n in enumerate(graph.node)}
    gone = {position[id(n)] for replaced, _ in found for n in replaced}
    # in place of the last node replaced: every input (the indices, a decoded factor) is made by then
    at = {max(position[id(n)] for n in replaced): new_nodes for replaced, new_nodes in found}
    new = []
    for i, node in enumerate(out.graph.node):
        if i in at:
            new.extend(at[i])
        elif i not in gone:
            new.append(node)
    stale = {n.output[0] for replaced, _ in found for n in replaced}
    del out.graph.node[:]
    out.graph.node.extend(new)
    drop_value_info(out.graph, stale)
    return out


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Names read inside the subgraphs (If / Loop / Scan bodies, at any depth) of `graph`'s nodes:
    a tensor of the outer scope read there has readers `graph.node` does not list."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                names.update(x for n in sub.node for x in n.input)
                names |= _subgraph_reads(sub)
    return names
