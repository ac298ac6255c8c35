"""Graph surgery shared by every method's rewrite: storing a new initializer, setting an
attribute, fresh names, and dropping the stale `value_info` of changed tensors."""
from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper


def store_tensor(dst: onnx.TensorProto, like: onnx.TensorProto, value: np.ndarray) -> None:
    """Set `dst` to `value` with the name and element type of `like`, copying the data once into
    the model (numpy_helper.from_array would make a second, temporary proto of it)."""
    if sys.byteorder != "little":
        dst.CopyFrom(numpy_helper.from_array(value, like.name))
        return
    dst.name, dst.data_type = like.name, like.data_type
    dst.dims.extend(value.shape)
    dst.raw_data = np.ascontiguousarray(value).tobytes()

def cast_weight(value: np.ndarray, dtype) -> np.ndarray:
    """`value` in `dtype` (no copy when it already is), float32 and float64 subnormals (nonzero
    |x| < finfo.tiny, 1.2e-38 for float32) set to zero. A factor or a correction computed in
    float64 can hold such values where the exact result is zero (a dead channel's row), and a
    CPU computes with a subnormal operand many times slower: one 480 x 192 factor with 1,350
    of them made a recognition model 2.3 times slower. No model tells such a value from zero.
    float16 keeps its subnormals (computed as float32 normals on a CPU); bfloat16 is not flushed
    (numpy has no such type of its own)."""
    out = np.asarray(value).astype(dtype, copy=False)
    blocks = _subnormal_blocks(out) if out.dtype in (np.float32, np.float64) else []
    if not blocks:
        return out
    flushed = np.array(out, order="C")   # a new array (`value` may be read-only or shared), C order: `flat` is a view
    flat = flushed.reshape(-1)
    for start in blocks:
        part = flat[start:start + _BLOCK]
        part[_subnormal(part)] = 0
    return flushed


_BLOCK = 2**22   # elements scanned at a time: no full-size temporary for a large weight


def _subnormal(part: np.ndarray) -> np.ndarray:
    return (np.abs(part) < np.finfo(part.dtype).tiny) & (part != 0)


def _subnormal_blocks(a: np.ndarray) -> list[int]:
    """Start offsets (into the flattened array) of the blocks of `a` holding a subnormal."""
    flat = a.reshape(-1)
    return [start for start in range(0, flat.size, _BLOCK) if _subnormal(flat[start:start + _BLOCK]).any()]


def writable(model: onnx.ModelProto, copy: bool) -> onnx.ModelProto:
    """`model` itself, or with `copy` a copy of it to rewrite."""
    if not copy:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def set_int_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))

def fresh_name(base: str, taken: set[str]) -> str:
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name

def drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    keep = [vi for vi in graph.value_info if vi.name not in names]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)
