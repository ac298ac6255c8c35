"""Parameter and FLOP counts of a model.

FLOPs are counted for Conv, ConvTranspose, Gemm and MatMul nodes (2 per multiply-add) at the
shapes of one concrete feed (one sample: batch 1), MatMuls of two activations included (the
attention scores Q K^T, [B, H, S, d] @ [B, H, d, S]: 2 B H S^2 d; the context P V, the same);
parameters are the elements of floating-point initializers and of
quantized weights' integer codes. How
they scale with each site's size is the sites' `Cost` items (`methods/base.py`, `allocate.py`).
"""
from __future__ import annotations

import numpy as np
import onnx

from .graph import FLOAT_TYPES, GraphIndex


WEIGHT_CODES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers and of the integer codes of quantized weights
    (8 and 4 bits; int64 shape constants and the like are not parameters)."""
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
                   if t.data_type in FLOAT_TYPES or t.data_type in WEIGHT_CODES))


#: ops whose constant inputs do not make a constant output: random draws, DequantizeLinear
#: (ONNX Runtime keeps it, for its quantized kernels: it runs at every call)
_NOT_FOLDED = ("Bernoulli", "Multinomial", "DequantizeLinear")


def load_time(g: GraphIndex) -> set[str]:
    """Tensors computed from constants alone: initializers (from IR 4 on, not those also listed as
    graph inputs, which a caller may feed), Constant nodes, and the outputs of every node whose inputs all are such tensors,
    except random draws, DequantizeLinear and nodes with subgraphs (a body may read any tensor
    of the outer scope). A runtime computes them once, when it loads the model (ONNX Runtime
    folds them), not at every call: a weight decoded from integer codes by Cast and Mul, a
    lookup table formed from its two factors (`--decode load`)."""
    fed = {vi.name for vi in g.graph.input} if g.model.ir_version >= 4 else set()  # below IR 4 they are constants
    folded = set(g.initializers) - fed
    for node in g.nodes:
        if node.op_type.startswith("Random") or node.op_type in _NOT_FOLDED or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if all(x in folded for x in node.input if x) and (node.input or node.op_type == "Constant"):
            folded.update(node.output)
    return folded


def node_flops(g: GraphIndex) -> dict[int, float]:
    """FLOPs per linear node whose shapes are known at the shapes in `g.shapes`; a node that
    reads only tensors computed at load (`load_time`) costs nothing per call and is left out."""
    out = {}
    folded = load_time(g)
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        if all(x in folded for x in node.input if x):
            continue
        y = g.shape(node.output[0])
        a, b = g.shape(node.input[0]), g.shape(node.input[1])
        if y is None or a is None or b is None or None in y or None in a or None in b:
            continue
        if node.op_type == "Conv":
            f = np.prod(y, dtype=np.float64) * np.prod(b[1:], dtype=np.float64)
        elif node.op_type == "ConvTranspose":
            f = np.prod(a, dtype=np.float64) * np.prod(b[1:], dtype=np.float64)
        elif node.op_type == "Gemm":
            k = a[0] if g.attr(i, "transA", 0) else a[-1]
            f = np.prod(y, dtype=np.float64) * k
        else:
            f = np.prod(y, dtype=np.float64) * (a[-1] if len(a) > 1 else 1)
        out[i] = 2.0 * float(f)
    return out
