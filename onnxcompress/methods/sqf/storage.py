"""Store sparse quantized factors (solvers.SQF) in ONNX with standard ops; the product is formed
in the graph.

Factors, W ~ Z C with Z (out x k), C (k x in), W in the orientation of `lowrank.layers`:

* C: codes (k x in, int8, or int4 packed for 2/4-bit codes at opset 21) + DequantizeLinear with a
  scale per row (axis 0); float32 at full precision.
* Z, 'dense': codes (out x k) + DequantizeLinear (axis 0). 'index': the s non-zeros per row as
  codes (out x s) + DequantizeLinear (axis 0) and their columns (out x s, uint8/uint16) -> Cast
  -> ScatterElements into ConstantOfShape(out, k) along axis 1. On the {0, 1} grid (vector
  quantization) there are no values: W = Gather(C, column) directly.

Then the weight the layer reads is formed from W = MatMul(Z, C): transposed (MatMul(X, Wc), Gemm
with transB = 0), as is (MatMul(Wc, X), Gemm with transB = 1), reshaped (Conv). Gemm's alpha is
divided out of Z's scales. With `on_activation` (MatMul(X, Wc) only), the node becomes
MatMul(MatMul(X, C^T), Z^T) instead: cheaper than the weight when rows * (in + out) < out * in.
Gather tables are not handled here (their statistic weighs rows, not columns).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ops.edits import Layer
from ...ops.surgery import cast_weight, fresh_name
from ..quant.storage import BLOCKED_OPSET, _splice, copy_at_opset, find_node, int_tensor
from .solvers import SQF, stored_bits


def required_opset(result: SQF) -> int:
    bits = [b for b in (result.format.z_bits, result.format.c_bits) if b]
    return BLOCKED_OPSET if any(stored_bits(b) == 4 for b in bits) else 13


class _Builder:
    def __init__(self, graph: onnx.GraphProto, stem: str, dtype):
        self.taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
            {i.name for i in graph.input}
        self.stem, self.dtype = stem, dtype
        self.nodes, self.inits = [], []

    def name(self, what: str) -> str:
        return fresh_name(f"{self.stem}_sqf_{what}", self.taken)

    def init(self, what: str, value: np.ndarray, bits: int | None = None) -> str:
        name = self.name(what)
        tensor = int_tensor(name, value, bits) if bits else numpy_helper.from_array(cast_weight(value, value.dtype), name)
        self.inits.append(tensor)
        return name

    def node(self, op: str, inputs, what: str, **attrs) -> str:
        out = self.name(what)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=out, **attrs))
        return out

    def dequantized(self, what: str, codes, scales, bits: int | None, values) -> str:
        """A float tensor from codes + per-row scales (axis 0), or `values` at full precision."""
        if bits is None:
            return self.init(what, np.ascontiguousarray(values, dtype=self.dtype))
        q = self.init(f"{what}_quantized", np.ascontiguousarray(codes), stored_bits(bits))
        s = self.init(f"{what}_scale", np.asarray(scales, dtype=self.dtype))
        return self.node("DequantizeLinear", [q, s], what, axis=0)


def _z(b: _Builder, r: SQF, scale: float, c: str) -> tuple[str | None, str | None]:
    """(Z as a dense float tensor, None) or (None, W) when Z is one-hot and W = Gather(C, col)."""
    fmt = r.format
    out, k = r.z.shape
    width = np.uint8 if k <= 256 else np.uint16
    if fmt.z_bits == 0:
        cols = b.init("z_columns", np.argmax(r.z, axis=1).astype(width))
        idx = b.node("Cast", [cols], "z_columns64", to=TensorProto.INT64)
        if scale != 1.0:
            c = b.node("Mul", [c, b.init("alpha", np.asarray(scale, dtype=b.dtype))], "c_scaled")
        return None, b.node("Gather", [c, idx], "weight", axis=0)
    zs = None if r.z_scales is None else r.z_scales * scale
    if fmt.storage(out) == "dense":
        return b.dequantized("z", r.z_codes, zs, fmt.z_bits, r.z * scale), None
    cols = np.argsort(r.z == 0, axis=1, kind="stable")[:, :fmt.nnz]  # non-zeros first
    rows = np.arange(out)[:, None]
    codes = None if r.z_codes is None else r.z_codes[rows, cols]
    vals = b.dequantized("z_values", codes, zs, fmt.z_bits, r.z[rows, cols] * scale)
    idx = b.node("Cast", [b.init("z_columns", cols.astype(width))], "z_columns64", to=TensorProto.INT64)
    zero = helper.make_tensor("zero", helper.np_dtype_to_tensor_dtype(np.dtype(b.dtype)), [1], [0])
    dense = b.node("ConstantOfShape", [b.init("z_shape", np.array([out, k], np.int64))], "z_zeros", value=zero)
    return b.node("ScatterElements", [dense, idx, vals], "z", axis=1), None


def store(model: onnx.ModelProto, layer: Layer, result: SQF, *, on_activation: bool = False) -> onnx.ModelProto:
    """A new model with `layer`'s constant weight replaced by `result`'s factors (module docstring)."""
    need = required_opset(result)
    out = copy_at_opset(model, need, "use 8-bit factors instead")
    graph = out.graph
    index = find_node(graph, layer)
    node = graph.node[index]
    inits = {t.name: t for t in graph.initializer}
    if layer.weight not in inits:
        raise ValueError(f"layer {layer.key!r}: weight {layer.weight!r} is not an initializer")
    if layer.kind == "gather":
        raise ValueError(f"layer {layer.key!r}: Gather tables are not stored as factors here")
    if on_activation and (layer.kind != "matmul" or result.format.z_bits == 0):
        raise ValueError(f"layer {layer.key!r}: factors on the activation are built for MatMul(X, W) "
                         "with a valued Z only")
    dtype = helper.tensor_dtype_to_np_dtype(inits[layer.weight].data_type)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    scale = 1.0 / float(attrs.get("alpha", 1.0)) if layer.kind == "gemm" else 1.0
    b = _Builder(graph, layer.weight, dtype)
    c = b.dequantized("c", result.c_codes, result.c_scales, result.format.c_bits, result.c)
    z, w = _z(b, result, scale, c)
    if on_activation:
        inner = b.node("MatMul", [node.input[0], b.node("Transpose", [c], "c_t", perm=[1, 0])], "inner")
        zt = b.node("Transpose", [z], "z_t", perm=[1, 0])
        node.CopyFrom(helper.make_node("MatMul", [inner, zt], list(node.output), name=node.name))
        _splice(graph, {index: b.nodes}, {layer.weight}, b.inits)
        return out
    if w is None:
        w = b.node("MatMul", [z, c], "weight")
    transpose = layer.kind == "matmul" or (layer.kind == "gemm" and not attrs.get("transB", 0))
    if transpose:
        w = b.node("Transpose", [w], "weight_t", perm=[1, 0])
    elif layer.kind == "conv":
        shape = b.init("weight_shape", np.array([layer.out, -1, *layer.kernel], np.int64))
        w = b.node("Reshape", [w, shape], "weight_conv")
    for k, x in enumerate(node.input):
        if x == layer.weight:
            node.input[k] = w
    _splice(graph, {index: b.nodes}, {layer.weight}, b.inits)
    return out
