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

Weights keep their dtype (the maths runs in float64). Stale `value_info` of every changed tensor is
dropped. The result is what `onnx.checker` and ONNX Runtime then verify.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UsageError
from .graph import GraphIndex
from .groups import Analysis
from .edits import Mix, SetAttr, ShapeEntry, Shift, Slice
from .plan import Plan


def rewrite(model: onnx.ModelProto, g: GraphIndex, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """Return a new model with `plan` applied; `model` (the one `g` indexes) is not changed."""
    groups = {grp.id: grp for grp in analysis.groups}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
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
            values[e.tensor] = _apply(e, value, keep, gp.interpolation)
    for name, value in values.items():
        original = inits[name]
        new = numpy_helper.from_array(value.astype(numpy_helper.to_array(original).dtype, copy=False), name)
        original.CopyFrom(new)
    _drop_value_info(out.graph, changed | set(values))
    return out


def _apply(e, value: np.ndarray, keep: np.ndarray, interpolation: dict) -> np.ndarray:
    if isinstance(e, Slice):
        return np.take(value, keep, axis=e.axis)
    if isinstance(e, Mix):
        return mix(value, e.axis, e.spatial, interpolation[e.source])
    if isinstance(e, ShapeEntry):
        value = value.copy()
        value[e.index] = len(keep) * e.spatial
        return value
    raise TypeError(f"unknown edit {e!r}")


def shift(bias: np.ndarray, w: np.ndarray, e: Shift, c0: np.ndarray) -> np.ndarray:
    """bias + scale * (W contracted with c0 over its input-channel axis, summed over every axis
    but the output axis), in float64, in the bias's shape."""
    c = len(c0)
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), e.in_axis, -1)
    out_axis = e.out_axis if e.out_axis < e.in_axis else e.out_axis - 1
    blocks = moved.reshape(*moved.shape[:-1], c, e.spatial)
    response = np.einsum("...cs,c->...", blocks, c0)
    response = np.moveaxis(response, out_axis, 0).reshape(response.shape[out_axis], -1).sum(axis=1)
    return np.asarray(bias, dtype=np.float64) + e.scale * response.reshape(np.shape(bias))


def mix(w: np.ndarray, axis: int, spatial: int, t: np.ndarray) -> np.ndarray:
    """Apply T (k x C) to the channel-major (C*spatial) axis `axis` of w (float64 result)."""
    k, c = t.shape
    moved = np.moveaxis(np.asarray(w, dtype=np.float64), axis, -1)
    lead = moved.shape[:-1]
    blocks = moved.reshape(*lead, c, spatial)
    mixed = np.tensordot(blocks, t, axes=([-2], [1]))          # (*lead, spatial, k)
    mixed = np.swapaxes(mixed, -1, -2).reshape(*lead, k * spatial)
    return np.moveaxis(mixed, -1, axis)


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
