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
