"""Rewrite: apply a Plan to a normalized model. The only stage that changes a graph.

For a group with kept channels S (k of C) and interpolation matrices T_e (k x C):

* `Slice` edits keep entries S along their axis (producer weights and biases, per-channel
  constants, BatchNormalization parameters, depthwise filters, PRelu slopes);
* `Mix` edits replace a consumer weight's input-channel axis: W' (..., C*spatial, ...) becomes
  W'' with W''[..., j*spatial + s, ...] = sum_c W'[..., c*spatial + s, ...] T_e[j, c], i.e.
  W' T_e^T on the channel axis (kron(T_e, I_spatial) for a channel-major flatten);
* `SetAttr` sets the depthwise Conv's `group` to k; `ShapeEntry` sets a Reshape/Resize shape entry
  to k*spatial;
* `Shift` adds W' c0 (the consumer's response to the intercept c0) to the consumer's bias. Shifts
  run first, on the original weights and full-width biases, so a bias later sliced by another
  group is sliced after its shift.

For a split layer (low rank) with W ~ A B (see `layers.py` for each kind's W), `split` replaces
the node by two, in its place, the second writing the original output name:

* Gemm:        op(X) B^T (MatMul, or Gemm with transA), then Gemm(., A^T, C, beta) or MatMul;
* MatMul:      MatMul(X, B^T) then MatMul(., A^T); with the constant on the left,
               MatMul(B, X) then MatMul(A, .);
* Conv:        Conv(X, B as (r, in, k...), same strides, pads, dilations, auto_pad), then
               Conv(., A as (out, r, 1...), bias);
* Gather:      Gather(B^T, idx) then MatMul(., A^T).

The original weight is removed (`layers.py` only splits weights no other node reads).
Weights keep their dtype (the maths runs in float64). Stale `value_info` of every changed tensor is
dropped. The result is what `onnx.checker` and ONNX Runtime then verify.
"""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UsageError
from .graph import GraphIndex
from .modelio import without_initializers
from .groups import Analysis
from .edits import Mix, SetAttr, ShapeEntry, Shift, Slice
from .plan import Plan


def rewrite(model: onnx.ModelProto, g: GraphIndex, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """Return a new model with `plan` applied; `model` (the one `g` indexes) is not changed."""
    groups = {grp.id: grp for grp in analysis.groups}
    out = without_initializers(model)  # initializers are added at the end, edited or copied
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    done: set[tuple] = set()
    changed: set[str] = set()
    for gp in plan.groups:
        grp = groups.get(gp.group)
        if grp is None or grp.channels != gp.channels:
            raise UsageError(f"plan: group {gp.group!r} does not match this model")
        for e in grp.edits:
            if isinstance(e, Shift) and e.source in gp.intercept:
                base = values.get(e.tensor, g.const(e.tensor))
                values[e.tensor] = shift(base, g.const(e.weight), e, gp.intercept[e.source])
    for gp in plan.groups:
        grp = groups[gp.group]
        keep = np.asarray(gp.keep, dtype=np.int64)
        changed.update(grp.tensors)
        for e in grp.edits:
            if isinstance(e, Shift):
                continue
            if isinstance(e, SetAttr):
                _set_attr(out.graph.node[e.node], e.name, len(keep))
                continue
            key = (e.tensor, type(e).__name__, getattr(e, "axis", getattr(e, "index", None)))
            if key in done:
                continue  # a constant shared by two nodes of the group is edited once
            done.add(key)
            value = values.get(e.tensor)
            if value is None:
                value = g.const(e.tensor)
            values[e.tensor] = _apply(e, value, keep, gp.interpolation, dtypes[e.tensor])
    changed |= set(values)
    for t in model.graph.initializer:
        if t.name in values:  # each new value is released as soon as it is stored
            _store(out.graph.initializer.add(), t, values.pop(t.name).astype(dtypes[t.name], copy=False))
        else:
            out.graph.initializer.add().CopyFrom(t)
    _drop_value_info(out.graph, changed)
    return out


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
        nodes, inits = _split_nodes(g, layer, lp, dtype, lambda base: _fresh(base, taken))
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
    _drop_value_info(out.graph, dropped)
    return out


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _split_nodes(g: GraphIndex, layer, lp, dtype, fresh) -> tuple[list, list]:
    """The two nodes replacing `layer`'s node, and their new initializers."""
    node = g.nodes[layer.node]
    a, b = lp.left, lp.right
    r = lp.rank
    stem = layer.weight
    mid = fresh(f"{node.output[0]}.lowrank")
    names = (fresh(f"{stem}.lowrank_in"), fresh(f"{stem}.lowrank_out"))
    first_name = f"{node.name}/lowrank_in" if node.name else ""
    second_name = f"{node.name}/lowrank_out" if node.name else ""

    def init(name, value):
        return numpy_helper.from_array(np.ascontiguousarray(value).astype(dtype), name)

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
        second = helper.make_node("MatMul", [mid, names[1]], list(node.output), name=second_name)
    else:
        raise TypeError(f"unknown layer kind {kind!r}")
    return [first, second], [w1, w2]


def _apply(e, value: np.ndarray, keep: np.ndarray, interpolation: dict, dtype) -> np.ndarray:
    if isinstance(e, Slice):
        return np.take(value, keep, axis=e.axis)
    if isinstance(e, Mix):
        return mix(value, e.axis, e.spatial, interpolation[e.source], dtype)
    if isinstance(e, ShapeEntry):
        value = value.copy()
        value[e.index] = len(keep) * e.spatial
        return value
    raise TypeError(f"unknown edit {e!r}")


_BLOCK = 2**22  # elements of a weight converted to float64 at a time


def shift(bias: np.ndarray, w: np.ndarray, e: Shift, c0: np.ndarray) -> np.ndarray:
    """bias + scale * (W contracted with c0 over its input-channel axis, summed over every axis
    but the output axis), in float64 (a block of W at a time), in the bias's shape."""
    c = len(c0)
    moved = np.moveaxis(np.asarray(w), e.in_axis, -1)
    out_axis = e.out_axis if e.out_axis < e.in_axis else e.out_axis - 1
    step = max(1, _BLOCK // max(1, moved[:1].size))
    response = np.concatenate([
        np.einsum("...cs,c->...", block.astype(np.float64).reshape(*block.shape[:-1], c, e.spatial), c0)
        for block in (moved[i:i + step] for i in range(0, moved.shape[0], step))])
    response = np.moveaxis(response, out_axis, 0).reshape(response.shape[out_axis], -1).sum(axis=1)
    return np.asarray(bias, dtype=np.float64) + e.scale * response.reshape(np.shape(bias))


def mix(w: np.ndarray, axis: int, spatial: int, t: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Apply T (k x C) to the channel-major (C*spatial) axis `axis` of w: computed in float64 a
    block of rows at a time, returned in `dtype`."""
    k, c = t.shape
    moved = np.moveaxis(np.asarray(w), axis, -1)
    lead = moved.shape[:-1]
    rows = moved.reshape(-1, c * spatial)
    out = np.empty((rows.shape[0], k * spatial), dtype=dtype)
    step = max(1, _BLOCK // max(1, c * spatial))
    for i in range(0, rows.shape[0], step):
        block = rows[i:i + step].astype(np.float64).reshape(-1, c, spatial)
        mixed = np.tensordot(block, t, axes=([1], [1]))          # (rows, spatial, k)
        out[i:i + step] = np.swapaxes(mixed, 1, 2).reshape(-1, k * spatial)
    return np.moveaxis(out.reshape(*lead, k * spatial), -1, axis)


def _store(dst: onnx.TensorProto, like: onnx.TensorProto, value: np.ndarray) -> None:
    """Set `dst` to `value` with the name and element type of `like`, copying the data once into
    the model (numpy_helper.from_array would make a second, temporary proto of it)."""
    if sys.byteorder != "little":
        dst.CopyFrom(numpy_helper.from_array(value, like.name))
        return
    dst.name, dst.data_type = like.name, like.data_type
    dst.dims.extend(value.shape)
    dst.raw_data = np.ascontiguousarray(value).tobytes()


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [vi for vi in graph.value_info if vi.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
