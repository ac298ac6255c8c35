"""Static shapes for a concrete feed: shape computations (Shape -> Gather -> Unsqueeze -> Slice /
Concat -> Reshape, as PyTorch exports them) are folded, so no tensor is left open and no ONNX
Runtime probe is needed; the shapes equal what ONNX Runtime observes."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.core.normalize import static_shapes
from onnxcompress.core.runtime import observed_shapes


def dynamic_model() -> onnx.ModelProto:
    """x [B, S, 8] -> + pos[:, :S] (a Slice whose end is Shape(x)[1]) -> MatMul 8x8 -> Reshape to
    [B, S, 2, 4] with the shape built by Concat(Unsqueeze(Gather(Shape))) -> Transpose."""
    rng = np.random.default_rng(0)
    c = lambda v, n: numpy_helper.from_array(np.asarray(v), n)
    inits = [c(rng.standard_normal((1, 100, 8)).astype(np.float32), "pos"),
             c(rng.standard_normal((8, 8)).astype(np.float32), "W"),
             c(np.array(0, np.int64), "i0"), c(np.array(1, np.int64), "i1"),
             c(np.array([0], np.int64), "zero"), c(np.array([1], np.int64), "axis1"),
             c(np.array([0], np.int64), "ax0"), c(np.array([2, 4], np.int64), "heads")]
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Gather", ["sx", "i1"], ["seq"], axis=0),
             helper.make_node("Gather", ["sx", "i0"], ["batch"], axis=0),
             helper.make_node("Unsqueeze", ["seq", "ax0"], ["seq1"]),
             helper.make_node("Unsqueeze", ["batch", "ax0"], ["batch1"]),
             helper.make_node("Slice", ["pos", "zero", "seq1", "axis1"], ["p"]),
             helper.make_node("Add", ["x", "p"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"]),
             helper.make_node("Concat", ["batch1", "seq1", "heads"], ["shape"], axis=0),
             helper.make_node("Reshape", ["y", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["out"], perm=[0, 2, 1, 3])]
    g = helper.make_graph(nodes, "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 2, "S", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def test_shape_computations_are_folded_and_agree_with_onnx_runtime():
    m = dynamic_model()
    feed = {"x": np.zeros((3, 5, 8), np.float32)}
    shapes, types = static_shapes(m, {"x": feed["x"].shape})
    names = [o for n in m.graph.node for o in n.output]
    assert all(shapes.get(o) is not None and None not in shapes[o] for o in names), \
        {o: shapes.get(o) for o in names}
    assert shapes["p"] == (1, 5, 8) and shapes["r"] == (3, 5, 2, 4) and shapes["out"] == (3, 2, 5, 4)
    seen = observed_shapes(m, feed, names, types)
    assert len(seen) == len(names)
    assert {o: shapes[o] for o in names} == seen
    # the model itself is untouched (the folding works on a skeleton copy)
    assert [n.op_type for n in m.graph.node][:2] == ["Shape", "Gather"] and len(m.graph.initializer) == 8


def test_an_unknown_shape_stays_open_rather_than_guessed():
    m = dynamic_model()
    shapes, _ = static_shapes(m, {"x": (3, None, 8)})  # the sequence length is not fixed
    assert shapes["p"][1] is None and shapes["r"][1] is None
