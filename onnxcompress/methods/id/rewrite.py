"""Rewrite: apply a Plan to a normalized model. The only stage that changes a graph.

For a group with kept channels S (k of C) and interpolation matrices T_e (k x C):

* `Slice` edits keep entries S along their axis (producer weights and biases, per-channel
  constants, BatchNormalization parameters, depthwise filters, PRelu slopes);
* `Mix` edits replace a consumer weight's input-channel axis: W' (..., C*spatial, ...) becomes
  W'' with W''[..., j*spatial + s, ...] = sum_c W'[..., c*spatial + s, ...] T_e[j, c], i.e.
  W' T_e^T on the channel axis (kron(T_e, I_spatial) for a channel-major flatten);
* `SetAttr` sets the depthwise Conv's `group` to k; `ShapeEntry` sets a Reshape/Resize shape entry
  to k*spatial (k / per for a count of heads), in a copy of the constant for that node alone;
* `Shift` adds W' c0 (the consumer's response to the intercept c0) to the consumer's bias. Shifts
  run first, on the original weights and full-width biases, so a bias later sliced by another
  group is sliced after its shift.

An edit with a window (a tensor before a Concat along the channels, `edits.window_keep`) works
on the kept channels inside its window: S_w, and T_e's rows S_w and columns of the window (and
the window of the intercept c0).

Weights keep their dtype (the maths runs in float64). Stale `value_info` of every changed tensor is
dropped. The result is what `onnx.checker` and ONNX Runtime then verify.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...core.errors import RewriteError, UsageError
from ...core.graph import GraphIndex
from ...core.modelio import without_initializers
from ...core.plan import Plan
from ...ops.edits import Mix, SetAttr, ShapeEntry, Shift, Slice, window_keep
from ...ops.surgery import cast_weight, drop_value_info, fresh_name, set_int_attr, store_tensor
from .groups import Analysis


def rewrite(model: onnx.ModelProto, g: GraphIndex, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """Return a new model with `plan` applied; `model` (the one `g` indexes) is not changed."""
    groups = {grp.id: grp for grp in analysis.groups}
    out = without_initializers(model)  # initializers are added at the end, edited or copied
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type) for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}
    done: set[tuple] = set()
    changed: set[str] = set()
    shapes: dict[tuple[int, str], np.ndarray] = {}
    for gp in plan.groups:
        grp = groups.get(gp.group)
        exits = {e.tensor for e in grp.exits} if grp is not None else set()
        if grp is None or grp.channels != gp.channels or set(gp.interpolation) != exits \
                or not set(gp.intercept) <= exits:
            raise UsageError(f"plan: group {gp.group!r} does not match this model")
        for e in grp.edits:
            if isinstance(e, Shift) and e.source in gp.intercept:
                base = values.get(e.tensor, g.const(e.tensor))
                c0 = gp.intercept[e.source]
                values[e.tensor] = shift(base, g.const(e.weight), e,
                                         c0[e.offset:e.offset + e.width] if e.width else c0)
    for gp in plan.groups:
        grp = groups[gp.group]
        keep = np.asarray(gp.keep, dtype=np.int64)
        changed.update(grp.tensors)
        for e in grp.edits:
            if isinstance(e, Shift):
                continue
            local = window_keep(keep, e.offset, e.width)[1]
            if e.width and len(local) == 0:
                raise RewriteError(f"rewrite: group {grp.id!r} keeps no channel of the window "
                                   f"[{e.offset}, {e.offset + e.width}) that {getattr(e, 'tensor', e.node)!r} holds")
            if getattr(e, "per", 1) > 1 and len(local) % e.per:
                raise RewriteError(f"rewrite: group {grp.id!r} keeps {len(local)} channels where only whole "
                                   f"blocks of {e.per} can be kept")
            if isinstance(e, SetAttr):
                set_int_attr(out.graph.node[e.node], e.name, len(local) // e.per)
                continue
            if isinstance(e, ShapeEntry):  # edited in a copy of its own: shape constants are often shared
                slot = (e.node, e.tensor)
                shapes[slot] = _apply(e, shapes.get(slot, g.const(e.tensor)), keep, gp.interpolation, dtypes[e.tensor])
                continue
            key = (e.tensor, type(e).__name__, getattr(e, "axis", getattr(e, "index", None)), e.offset)
            if key in done:
                continue  # a constant shared by two nodes of the group is edited once
            done.add(key)
            value = values.get(e.tensor)
            if value is None:
                value = g.const(e.tensor)
            values[e.tensor] = _apply(e, value, keep, gp.interpolation, dtypes[e.tensor])
    changed |= set(values)
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | \
        {vi.name for vi in model.graph.input}
    for (i, name), value in sorted(shapes.items()):
        node = out.graph.node[i]
        fresh = fresh_name(f"{name}_{node.name or i}", taken)
        node.input[list(node.input).index(name)] = fresh
        out.graph.initializer.append(numpy_helper.from_array(cast_weight(value, dtypes[name]), fresh))
    read = {n for node in out.graph.node for n in node.input} | {o.name for o in out.graph.output}
    orphans = {name for _, name in shapes} - read  # shape constants every reader now has a copy of
    for t in model.graph.initializer:
        if t.name in orphans:
            continue
        if t.name in values:  # each new value is released as soon as it is stored
            store_tensor(out.graph.initializer.add(), t, cast_weight(values.pop(t.name), dtypes[t.name]))
        else:
            out.graph.initializer.add().CopyFrom(t)
    drop_value_info(out.graph, changed)
    return out


def _apply(e, value: np.ndarray, keep: np.ndarray, interpolation: dict, dtype) -> np.ndarray:
    rows, local = window_keep(keep, e.offset, e.width)
    if isinstance(e, Slice):
        return np.take(value, local, axis=e.axis)
    if isinstance(e, Mix):
        t = interpolation[e.source]
        if e.width:
            t = t[rows, e.offset:e.offset + e.width]
        return mix(value, e.axis, e.spatial, t, dtype)
    if isinstance(e, ShapeEntry):
        value = value.copy()
        value[e.index] = len(local) // e.per * e.spatial
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
