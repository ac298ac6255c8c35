"""Normalize a loaded model so analysis sees one vocabulary.

* Constant nodes holding a tensor (every Paddle export keeps its weights there) become
  initializers of the same name, so a weight is always an initializer.
* Small nodes whose inputs are all constants (a Reshape of a bias, a Cast, an Unsqueeze, ...)
  are folded into initializers, so per-channel parameters look like constants.
* Nodes are put in topological order; repeated node names are made unique.
* `static_shapes` infers every tensor shape for one concrete feed, on a weightless skeleton of the
  model (large initializers replaced by typed graph inputs), so it works for any model size; where
  inference fails it degrades to "unknown" rather than failing.

Opsets, untouched nodes and subgraphs (If/Loop/Scan bodies) stay as they were.
"""
from __future__ import annotations

import functools
import logging
from collections import defaultdict, deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import weights
from .errors import ModelError

log = logging.getLogger(__name__)

_CONSTANT_ATTRS = ("value", "value_float", "value_floats", "value_int", "value_ints")


def normalize(model: onnx.ModelProto, *, copy: bool = True) -> onnx.ModelProto:
    """Return a normalized copy of `model` (the argument is not changed), or with `copy=False`
    normalize `model` itself and return it (no second copy of the weights, for large models).
    Raises `ModelError` for a model ONNX Runtime cannot run (see `check_known_ops`)."""
    check_known_ops(model)
    out = model
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    renamed = unique_node_names(out.graph)
    if renamed:
        log.info("normalize: %d nodes renamed to make node names unique", renamed)
    n = constants_to_initializers(out.graph, needs_input=out.ir_version < 4)
    if n:
        log.info("normalize: %d Constant nodes became initializers", n)
    topological_sort(out.graph)
    if out.ir_version >= 4:
        folded = fold_constants(out.graph, _opset(out))
        if folded:
            log.info("normalize: %d nodes on constants folded", folded)
    return out


def unique_node_names(graph: onnx.GraphProto) -> int:
    """Give every node after the first of a repeated (non-empty) name the name `<name>_<k>`, unique
    in the graph: ONNX Runtime refuses a graph with two nodes of one name. Returns the number of
    nodes renamed."""
    names = [node.name for node in graph.node]
    taken, seen, renamed = set(names), set(), 0
    for node in graph.node:
        if node.name and node.name in seen:
            k = 1
            while f"{node.name}_{k}" in taken:
                k += 1
            node.name = f"{node.name}_{k}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


def check_known_ops(model: onnx.ModelProto) -> None:
    """Raise `ModelError` naming the first node (of any subgraph) whose op is in a domain other
    than ONNX's that neither ONNX Runtime nor the model's own functions define: calibration and
    validation run the model in ONNX Runtime, so such a model cannot be compressed."""
    local = {(f.domain, f.name) for f in model.functions}
    unknown = [node for node in _all_nodes(model.graph)
               if node.domain not in ("", "ai.onnx") and (node.domain, node.op_type) not in local
               and (node.domain, node.op_type) not in _runtime_ops()]
    if unknown:
        node = unknown[0]
        more = f" (and {len(unknown) - 1} more such nodes)" if len(unknown) > 1 else ""
        raise ModelError(f"normalize: node {node.name or node.op_type!r} uses op {node.domain}:{node.op_type}, "
                         f"which ONNX Runtime does not know{more}; onnxcompress runs the model to "
                         "calibrate and validate, so it cannot compress it")


@functools.lru_cache(maxsize=1)
def _runtime_ops() -> frozenset:
    """(domain, op) of every op ONNX Runtime has a schema for."""
    from onnxruntime.capi import _pybind_state
    return frozenset((s.domain, s.name) for s in _pybind_state.get_all_operator_schema())


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _all_nodes(g)


FOLDABLE = set("Reshape Unsqueeze Squeeze Cast Transpose Identity Flatten Concat Add Sub Mul Div Neg "
               "Sqrt Reciprocal Pow Abs Exp Log".split())
FOLD_LIMIT = 2**20  # elements: larger results stay computed at run time
GROW_LIMIT = 4096   # elements: a result stored in more bytes than its inputs (a Cast of float16
                    # weights to float) is only folded when this small, so weights keep their dtype


def fold_constants(graph: onnx.GraphProto, opset: int) -> int:
    """Replace FOLDABLE nodes whose inputs are all initializers (and whose outputs are not graph
    outputs) by initializers holding their results; initializers only those nodes read are
    dropped. Returns the number of nodes folded."""

    values = {t.name: t for t in graph.initializer}
    outputs = {vi.name for vi in graph.output}
    keep, folded, used_by_folded = [], 0, set()
    for node in graph.node:
        inputs = [n for n in node.input if n]
        if (node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx") or not inputs
                or any(n not in values for n in inputs) or any(o in outputs for o in node.output)
                or sum(np.prod(values[n].dims, dtype=np.int64) for n in inputs) > FOLD_LIMIT):
            keep.append(node)
            continue
        feed = {n: np.array(weights.array(values[n])) for n in inputs}
        results = _evaluate(node, feed, opset)
        if results is None:
            keep.append(node)
            continue
        size = sum(r.size for r in results)
        if size > GROW_LIMIT and sum(r.nbytes for r in results) > sum(v.nbytes for v in feed.values()):
            keep.append(node)
            continue
        for name, value in zip(node.output, results):
            t = numpy_helper.from_array(value, name)
            graph.initializer.append(t)
            values[name] = t
        used_by_folded.update(inputs)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
        _drop_unused_initializers(graph, used_by_folded)
    return folded


def _evaluate(node: onnx.NodeProto, feed: dict, opset: int) -> list[np.ndarray] | None:
    """The node's outputs for constant inputs `feed` (onnx's reference evaluator), or None for an
    op the reference cannot evaluate (the node then stays as it is)."""
    from onnx.reference import ReferenceEvaluator
    try:
        return [np.asarray(v) for v in ReferenceEvaluator(node, opsets={"": opset}).run(None, feed)]
    except Exception:
        return None


def _drop_unused_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers among `names` that no node (of any subgraph), graph input or
    graph output refers to any more."""
    used = {vi.name for vi in graph.input} | {vi.name for vi in graph.output}
    for node in graph.node:
        used.update(node.input)
        used.update(_subgraph_inputs(node))
    dead = names - used
    if dead:
        keep = [t for t in graph.initializer if t.name not in dead]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def constants_to_initializers(graph: onnx.GraphProto, *, needs_input: bool = False) -> int:
    """Move tensor-valued Constant nodes of `graph` (not of subgraphs) into initializers."""
    keep, moved = [], 0
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        if needs_input:
            graph.input.append(helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    attrs = {a.name: a for a in node.attribute}
    if "value" in attrs:
        t = onnx.TensorProto()
        t.CopyFrom(attrs["value"].t)
        return t
    for name, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                        ("value_int", np.int64), ("value_ints", np.int64)):
        if name in attrs:
            value = helper.get_attribute_value(attrs[name])
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` topologically (stable: ties keep their original order).

    Names used inside subgraphs but produced in this graph count as inputs of the node holding
    the subgraph.
    """
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    deps = [set() for _ in nodes]
    for i, node in enumerate(nodes):
        for name in list(node.input) + _subgraph_inputs(node):
            j = producer.get(name)
            if j is not None and j != i:
                deps[i].add(j)
    users = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    indegree = [len(d) for d in deps]
    ready = deque(i for i, k in enumerate(indegree) if k == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in sorted(users[i]):
            indegree[u] -= 1
            if indegree[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i, k in enumerate(indegree) if k > 0)
        raise ModelError(f"normalize: the graph has a cycle through node {stuck.name or stuck.op_type!r}")
    if order != list(range(len(nodes))):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    names = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names.extend(sub.input)
                names.extend(_subgraph_inputs(sub))
    return names


def static_shapes(model: onnx.ModelProto, feed_shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
    """Shapes and element types of the tensors of the main graph for inputs of `feed_shapes`.

    Returns (shapes, types): name -> tuple whose entries are ints, or None for a dimension
    inference could not fix; name -> TensorProto element type. Tensors inference knows nothing
    about are absent. Never raises: a model that defeats shape inference yields only the
    initializer and input shapes.
    """
    skeleton = _skeleton(model, feed_shapes)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    shapes.update({k: tuple(v) for k, v in feed_shapes.items()})
    types = {init.name: init.data_type for init in model.graph.initializer}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input})
    opset = _opset(model)
    for _ in range(SHAPE_ROUNDS):
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
        except Exception as e:  # custom ops, broken value_info, ...
            log.warning("normalize: shape inference failed (%s); continuing without shapes", str(e).splitlines()[0])
            return shapes, types
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            if tt.elem_type:
                types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        if not _fold_shape_values(skeleton, shapes, types, opset):
            break
    return shapes, types


SHAPE_OPS = FOLDABLE | set("Shape Size Gather Slice Equal Where Range ConstantOfShape Expand Greater Less Not "
                           "Min Max ReduceProd Floor Ceil Mod".split())
SHAPE_VALUE_LIMIT = 64  # elements: a computed shape (or index) value, never an activation
SHAPE_ROUNDS = 8        # inference passes, each after folding what the last one fixed


def _fold_shape_values(skel: onnx.ModelProto, shapes: dict, types: dict, opset: int) -> int:
    """Fold the shape computations of `skel` for its fixed input shapes: a Shape (or Size) of a
    tensor whose shape inference fixed, and a SHAPE_OPS node whose inputs are all such values or
    small constants, become initializers of their values (at most SHAPE_VALUE_LIMIT elements
    each). The next inference then reads the Reshape, Slice, Expand ... arguments as constants,
    which data propagation alone does not always do (a Slice `ends` from Shape -> Gather ->
    Unsqueeze). Records the folded tensors' shapes and types; returns how many nodes were folded."""
    graph = skel.graph
    values = {t.name: weights.array(t) for t in graph.initializer if np.prod(t.dims, dtype=np.int64) <= SHAPE_VALUE_LIMIT}
    protected = {vi.name for vi in graph.output}
    keep, folded = [], 0
    for node in graph.node:
        result = None
        inputs = [n for n in node.input if n]
        if node.domain in ("", "ai.onnx") and not protected.intersection(node.output):
            if node.op_type in ("Shape", "Size") and inputs:
                shape = shapes.get(inputs[0])
                if shape is not None and None not in shape:
                    if node.op_type == "Size":
                        result = [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
                    else:
                        attrs = {a.name: a.i for a in node.attribute}  # start / end: Python's slice rules
                        result = [np.array(shape, dtype=np.int64)[attrs.get("start", 0):attrs.get("end")]]
            elif node.op_type in SHAPE_OPS and inputs and all(n in values for n in inputs):
                result = _evaluate(node, {n: values[n] for n in inputs}, opset)
        if result is None or len(result) != len(node.output) or any(r.size > SHAPE_VALUE_LIMIT for r in result):
            keep.append(node)
            continue
        for name, value in zip(node.output, result):
            t = numpy_helper.from_array(value, name)
            graph.initializer.append(t)
            values[name] = value
            shapes[name], types[name] = tuple(value.shape), t.data_type
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(keep)
    return folded


def _skeleton(model: onnx.ModelProto, feed_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """A copy of `model` without large weights (they become graph inputs of the same type and
    shape) and with the graph inputs fixed to `feed_shapes`."""
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g = skel.graph
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    for vi in model.graph.input:
        if vi.name in feed_shapes:
            elem = vi.type.tensor_type.elem_type
            g.input.append(helper.make_tensor_value_info(vi.name, elem, list(feed_shapes[vi.name])))
        else:
            g.input.append(vi)
    inputs = {vi.name for vi in g.input}
    for init in model.graph.initializer:
        if np.prod(init.dims, dtype=np.int64) <= 64:
            g.initializer.append(init)  # small constants (shapes, axes) drive inference
        elif init.name not in inputs:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return skel
