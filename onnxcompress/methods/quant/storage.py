"""Store quantized weights in ONNX: integer initializers + DequantizeLinear feeding the layer.

A `Quantized` (solvers.py) holds codes and scales in the solver's orientation: W (out x in) for
Gemm / MatMul / Conv (W as `lowrank.layers.weight_matrix` defines it), the table E (vocab x d)
itself for a Gather (`solvers.quantize_embedding`). The stored constant Wc relates to them as

* MatMul(X, Wc):   Wc = W^T (in x out); per channel: axis 1; blocks: axis 0, scale (in/B, out)
* MatMul(Wc, X):   Wc = W (out x in);   per channel: axis 0; blocks: axis 1, scale (out, in/B)
* Gemm, transB=0:  Wc = W^T / alpha; transB=1: Wc = W / alpha (the scales absorb 1/alpha)
* Conv:            Wc = W as (out, in, k...); per channel: axis 0; blocks of input channels at
                   each kernel offset: axis 1, scale (out, in/B, k...)
* Gather(Wc, idx): Wc = E (vocab x d); per token: axis 0; blocks along d: axis 1, scale (vocab, d/B)
* `Format.half`: the scales are a float16 initializer and a Cast to the weight's type feeds
                   DequantizeLinear (exact: the scales are float16 numbers, `solvers.scales_for`)
* Gather, codebook format (`Format.dim` = p): Wc = the table decoded from uint8 codes (vocab x d/p)
                   and stacked codebooks (d/p 2^bits x p) by Cast, Add, Gather, Reshape
                   (`codebook.nodes`); no DequantizeLinear

Per-axis int8 DequantizeLinear needs opset 13; int4 and block_size need opset 21 (IR 10).
`upgrade_opset` converts a model with onnx's version converter and accepts the result only if it
passes the full checker and loads in ONNX Runtime; otherwise it says why, and the caller keeps
int8 per channel. The input model is never modified; every function returns a new ModelProto.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ops.edits import Layer
from ...ops.surgery import cast_weight, drop_value_info, fresh_name, writable
from . import codebook
from .solvers import Format, Quantized

#: opsets at which DequantizeLinear takes per-axis scales, and int4 / block_size
PER_AXIS_OPSET, BLOCKED_OPSET, BLOCKED_IR = 13, 21, 10


@dataclass(frozen=True)
class QuantEdit:
    """Replace `layer`'s constant weight by `quantized` (codes and scales, solver orientation)."""
    layer: Layer
    quantized: Quantized


def format_opset(fmt: Format) -> int:
    """The opset DequantizeLinear needs for `fmt`: int8 per channel 13; int4 or blocks 21; a
    codebook (Cast, Add, Gather, Reshape: `codebook.nodes`) 13."""
    return PER_AXIS_OPSET if fmt.dim or (fmt.bits == 8 and not fmt.block) else BLOCKED_OPSET


def required_opset(q: Quantized) -> int:
    return format_opset(q.format)


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto | None, str]:
    """(model at >= `opset`, "") or (None, reason). The converted model must pass
    onnx.checker.check_model(full_check=True) and load in ONNX Runtime."""
    if model_opset(model) >= opset:
        return model, ""
    try:
        from onnx import version_converter
        new = version_converter.convert_version(model, opset)
        _keep_value_info(new, model)
        if opset >= BLOCKED_OPSET:
            new.ir_version = max(new.ir_version, BLOCKED_IR)
        onnx.checker.check_model(new, full_check=True)
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        ort.InferenceSession(new.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # the converter, the checker and ORT all raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"opset {model_opset(model)} -> {opset} conversion failed: {first}"
    return new, ""


def _keep_value_info(converted: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Drop the shapes onnx's version converter infers into `converted.graph.value_info` (keep
    those `model` had). ONNX Runtime fuses more with them, and not always to a faster model:
    on MiniLM they let it fuse each residual Add and LayerNormalization into a
    SkipLayerNormalization, which made the model 3 to 6% slower than the original on 2 cores."""
    had = {v.name for v in model.graph.value_info}
    kept = [v for v in converted.graph.value_info if v.name in had]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)


def copy_at_opset(model: onnx.ModelProto, need: int, instead: str, *, blocked_ir: bool = False) -> onnx.ModelProto:
    """A copy of `model` at opset `need` or newer (`upgrade_opset` when older: ValueError with
    its reason and what to do `instead` when that fails), at IR 10 when int4 / block_size
    (opset 21) or `blocked_ir` asks for it."""
    base = model
    if model_opset(model) < need:
        base, reason = upgrade_opset(model, need)
        if base is None:
            raise ValueError(f"{reason}; {instead}")
    out = onnx.ModelProto()
    out.CopyFrom(base)
    if need >= BLOCKED_OPSET or blocked_ir:
        out.ir_version = max(out.ir_version, BLOCKED_IR)
    return out


def find_node(graph: onnx.GraphProto, layer: Layer) -> int:
    """Index of `layer`'s node: `layer.node` if that node reads the weight (the usual case), else
    the only node reading it (an opset conversion may have moved nodes)."""
    if layer.node < len(graph.node) and layer.weight in graph.node[layer.node].input:
        return layer.node
    readers = [i for i, n in enumerate(graph.node) if layer.weight in n.input]
    if len(readers) != 1:
        raise ValueError(f"layer {layer.key!r}: weight {layer.weight!r} is read by {len(readers)} nodes")
    return readers[0]


def layout(node: onnx.NodeProto, layer: Layer, q: Quantized) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(codes as the stored tensor, scales shaped for DequantizeLinear, axis, block_size)."""
    blocked = bool(q.format.block)
    codes, scales = q.codes, q.scales
    transpose = False
    if layer.kind == "matmul":
        transpose = True
    elif layer.kind == "gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        transpose = not attrs.get("transB", 0)
        scales = scales / float(attrs.get("alpha", 1.0))
    elif layer.kind == "conv":
        k = layer.kernel
        codes = codes.reshape(layer.out, -1, *k)
        scales = scales.reshape(layer.out, -1, *k) if blocked else scales
    elif layer.kind not in ("matmul_left", "gather"):
        raise ValueError(f"unknown layer kind {layer.kind!r}")
    if transpose:
        codes, scales = codes.T, scales.T
        axis = 0 if blocked else 1
    else:
        axis = 1 if blocked else 0
    if not blocked:
        scales = scales.reshape(-1)
    return np.ascontiguousarray(codes), np.ascontiguousarray(scales), axis, q.format.block


def int_tensor(name: str, codes: np.ndarray, bits: int) -> TensorProto:
    """INT8 tensor, or INT4 packed two per byte (low nibble first, as the ONNX spec stores it)."""
    if bits == 8:
        return numpy_helper.from_array(codes.astype(np.int8), name)
    if bits != 4:
        raise ValueError(f"ONNX stores 4- and 8-bit integers, not {bits}-bit")
    flat = (codes.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if len(flat) % 2:
        flat = np.append(flat, np.uint8(0))
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=list(codes.shape))
    t.raw_data = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    return t


def dequantize_node(name: str, codes: str, scale: str, out: str, axis: int, block: int) -> onnx.NodeProto:
    attrs = {"axis": axis}
    if block:
        attrs["block_size"] = block
    return helper.make_node("DequantizeLinear", [codes, scale], [out], name=name, **attrs)


def ort_kernel(layer: Layer, fmt: Format) -> str | None:
    """The ONNX Runtime contrib op that can hold this edit (format="ort"), or None: MatMulNBits
    for MatMul(X, Wc) in 4- or 8-bit blocks of a power of two >= 16; GatherBlockQuantized for a
    Gather table in 4-bit blocks along d (power of two >= 16)."""
    b = fmt.block
    if not b or b < 16 or b & (b - 1):
        return None
    if layer.kind == "matmul" and fmt.bits in (4, 8):
        return "MatMulNBits"
    if layer.kind == "gather" and fmt.bits == 4:
        return "GatherBlockQuantized"
    return None


def _ort_nodes(node: onnx.NodeProto, layer: Layer, q: Quantized, names, dtype) -> tuple[onnx.NodeProto, list]:
    """The contrib node replacing `node` and its initializers. MatMulNBits: B (N, K/B, B*bits/8)
    uint8, the codes offset by the default zero point 2^(bits-1) and packed low nibble first
    along K (zero-padded to whole blocks), scales (N, K/B). GatherBlockQuantized: the int4
    codes of E (vocab x d) as they are, scales (vocab, d/B), quantize_axis 1."""
    bits, block = q.format.bits, q.format.block
    scales = np.ascontiguousarray(cast_weight(q.scales, dtype))
    if layer.kind == "gather":
        inits = [int_tensor(names[0], q.codes, 4), numpy_helper.from_array(scales, names[1])]
        new = helper.make_node("GatherBlockQuantized", [names[0], node.input[1], names[1]], list(node.output),
                               name=node.name, domain="com.microsoft", block_size=block, gather_axis=0,
                               quantize_axis=1)
        return new, inits
    n, k = q.codes.shape
    blocks = -(-k // block)
    u = np.full((n, blocks * block), 2 ** (bits - 1), dtype=np.uint8)
    u[:, :k] = (q.codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    packed = u.reshape(n, blocks, block * bits // 8)
    inits = [numpy_helper.from_array(packed, names[0]), numpy_helper.from_array(scales, names[1])]
    new = helper.make_node("MatMulNBits", [node.input[0], names[0], names[1]], list(node.output), name=node.name,
                           domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
    return new, inits


def apply(model: onnx.ModelProto, edits, format: str = "onnx") -> onnx.ModelProto:
    """A new model with every `QuantEdit`'s weight stored as integers + DequantizeLinear, at the
    opset the formats need (upgraded when necessary; ValueError with the reason when that fails).
    format="ort": where `ort_kernel` allows, ONNX Runtime's MatMulNBits / GatherBlockQuantized
    (com.microsoft domain; runs in ONNX Runtime only) instead; the rest as with "onnx"."""
    if format not in ("onnx", "ort"):
        raise ValueError(f"format must be 'onnx' or 'ort', got {format!r}")
    edits = list(edits)
    contrib = {id(e): format == "ort" and ort_kernel(e.layer, e.quantized.format) for e in edits}
    need = max((required_opset(e.quantized) for e in edits if not contrib[id(e)]), default=0)
    out = copy_at_opset(model, need, "quantize with int8 per channel (Format(8)) instead",
                        blocked_ir=any(contrib.values()))
    if any(contrib.values()) and not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    before: dict[int, list[onnx.NodeProto]] = {}
    dropped, new_inits = set(), []
    for e in edits:
        layer, q = e.layer, e.quantized
        index = find_node(graph, layer)
        node = graph.node[index]
        if layer.weight not in inits:
            raise ValueError(f"layer {layer.key!r}: weight {layer.weight!r} is not an initializer")
        dtype = helper.tensor_dtype_to_np_dtype(inits[layer.weight].data_type)
        if q.format.dim:
            if layer.kind != "gather":
                raise ValueError(f"layer {layer.key!r}: a codebook format is for Gather tables only")
            names = [fresh_name(f"{layer.weight}_{s}", taken) for s in ("codes", "codebooks", "offsets", "shape",
                                                                          "decoded")]
            new_nodes, inits_ = codebook.nodes(node.name or layer.key, q.codes, q.scales, dtype, names[:4], names[4])
            before.setdefault(index, []).extend(new_nodes)
            new_inits += inits_
            node.input[0] = names[4]
            dropped.add(layer.weight)
            continue
        names = [fresh_name(f"{layer.weight}_{s}", taken) for s in ("quantized", "scale", "dequantized")]
        if contrib[id(e)]:
            new, inits_ = _ort_nodes(node, layer, q, names, dtype)
            node.CopyFrom(new)
            new_inits += inits_
            dropped.add(layer.weight)
            continue
        codes, scales, axis, block = layout(node, layer, q)
        new_inits.append(int_tensor(names[0], codes, q.format.bits))
        scale = names[1]
        if q.format.half and dtype != np.float16:
            scale = fresh_name(f"{names[1]}_cast", taken)
            new_inits.append(numpy_helper.from_array(scales.astype(np.float16), names[1]))
            before.setdefault(index, []).append(helper.make_node(
                "Cast", [names[1]], [scale], name=f"{node.name or layer.key}/scale_cast",
                to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype))))
        else:
            new_inits.append(numpy_helper.from_array(cast_weight(scales, dtype), names[1]))
        before.setdefault(index, []).append(
            dequantize_node(f"{node.name or layer.key}/dequantize", names[0], scale, names[2], axis, block))
        for k, x in enumerate(node.input):
            if x == layer.weight:
                node.input[k] = names[2]
        dropped.add(layer.weight)
    _splice(graph, before, dropped, new_inits)
    return out


def _splice(graph: onnx.GraphProto, before: dict, dropped: set, new_inits: list) -> None:
    """Insert `before[i]` ahead of node i, drop the `dropped` initializers, add `new_inits`."""
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(before.get(i, []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    drop_value_info(graph, dropped)
    keep_inputs = [vi for vi in graph.input if vi.name not in dropped]
    if len(keep_inputs) != len(graph.input):
        del graph.input[:]
        graph.input.extend(keep_inputs)


def store(model: onnx.ModelProto, layer: Layer, q: Quantized, format: str = "onnx") -> onnx.ModelProto:
    """`apply` for one layer."""
    return apply(model, [QuantEdit(layer, q)], format)


def layer_bytes(layer: Layer, fmt: Format, format: str = "onnx", scale_bytes: int = 4) -> int:
    """Bytes `apply` stores for `layer` in `fmt` (codes + scales): a Gather table is quantized
    per token row (vocab x d), every other layer as W (out x in); MatMulNBits pads K to whole
    blocks. Scales are stored in the weight's float type: `scale_bytes` is its item size (4 for
    float32, 2 for float16), as is each parameter of the float original."""
    rows, cols, kernel = (layer.inputs, layer.out, ()) if layer.kind == "gather" else \
        (layer.out, layer.inputs, layer.kernel)
    if format == "ort" and layer.kind == "matmul" and ort_kernel(layer, fmt):
        blocks = -(-cols // fmt.block)
        return rows * blocks * fmt.block * fmt.bits // 8 + rows * blocks * scale_bytes
    return fmt.bytes(rows, cols, kernel, scale_bytes)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the stored constants (raw data of initializers, dense and sparse)."""
    def size(t: TensorProto) -> int:
        return t.ByteSize()
    return sum(size(t) for t in model.graph.initializer) + \
        sum(s.values.ByteSize() + s.indices.ByteSize() for s in model.graph.sparse_initializer)


#: the ops `decode_at_load` forms a weight with (every input a constant)
DECODE_OPS = ("Cast", "Mul", "Reshape", "Expand", "Slice")


def decode_at_load(model: onnx.ModelProto, keep=(), *, copy: bool = True) -> onnx.ModelProto:
    """`model` (a copy, or with `copy=False` the model itself) in which every DequantizeLinear of the main graph that reads an integer
    initializer x (not named in `keep`: the input model's own quantized weights stay as they are)
    becomes the same numbers from standard ops on constants:

        y = Cast(x, T) * s                          s scalar, per tensor
        y = Cast(x, T) * Reshape(s, e_axis)         s (n,), one scale per index of `axis`
        y = Cast(x, T) * Slice(Reshape(Expand(Reshape(s, (.., nb, 1, ..)), (.., nb, B, ..)),
                               (.., nb B, ..)), 0, n, axis)      s with nb = ceil(n / B) blocks

    T is the scale's float type (through a Cast feeding the scale: its `to`). Each value equals
    DequantizeLinear's (x - 0) * s exactly: x is an integer a float holds exactly, and there is
    one product. Every input is a constant, so ONNX Runtime folds the whole chain when it builds
    a session (it keeps DequantizeLinear itself, for its quantized kernels): the file holds the
    integers, the session the float weight, and the layer runs at float speed. A node with a zero
    point, or whose scale is not a constant, is left as it is. `model` itself is returned when no
    node is to be decoded."""
    keep = set(keep)

    def todo(graph: onnx.GraphProto) -> dict[int, int]:
        """{index of a node to decode: its scale's float type}"""
        inits = {t.name: t for t in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        found = {}
        for i, node in enumerate(graph.node):
            if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or \
                    node.input[0] in keep or node.input[0] not in inits or (len(node.input) > 2 and node.input[2]):
                continue
            dtype = _scale_type(node.input[1], inits, producers)
            if dtype is not None:
                found[i] = dtype
        return found

    found = todo(model.graph)
    if not found:
        return model
    out = writable(model, copy)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    nodes, new_inits = [], []
    for i, node in enumerate(graph.node):
        if i in found:
            nodes.extend(_decode_nodes(node, inits[node.input[0]], inits.get(node.input[1]), found[i], taken,
                                       new_inits))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return out


def _scale_type(scale: str, inits: dict, producers: dict) -> int | None:
    """The float element type of a constant scale: an initializer's, or a Cast's `to` when the
    Cast reads one; None for anything else."""
    if scale in inits:
        return inits[scale].data_type
    node = producers.get(scale)
    if node is not None and node.op_type == "Cast" and node.input[0] in inits:
        return next(a.i for a in node.attribute if a.name == "to")
    return None


def _decode_nodes(node: onnx.NodeProto, x: TensorProto, scale: TensorProto | None, dtype: int, taken: set,
                  new_inits: list) -> list[onnx.NodeProto]:
    """The nodes of `decode_at_load` for one DequantizeLinear (its output name is kept)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    shape = list(x.dims)
    rank = len(shape)
    axis = attrs.get("axis", 1) % max(rank, 1)
    block = attrs.get("block_size", 0)
    stem = node.name or node.output[0]

    def name(what: str) -> str:
        return fresh_name(f"{stem}/{what}", taken)

    def const(what: str, value) -> str:
        n = name(what)
        new_inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), n))
        return n

    made = []

    def op(kind: str, inputs: list, what: str, **kw) -> str:
        o = name(what)
        made.append(helper.make_node(kind, inputs, [o], name=o, **kw))
        return o

    values = op("Cast", [node.input[0]], "cast", to=dtype)
    s = node.input[1]
    per_tensor = scale is not None and int(np.prod(scale.dims, dtype=np.int64)) == 1 and not block
    if block:
        n = shape[axis]
        nb = -(-n // block)
        blocks = shape[:axis] + [nb, 1] + shape[axis + 1:]
        s = op("Reshape", [s, const("blocks", blocks)], "blocks")
        s = op("Expand", [s, const("expand", blocks[:axis + 1] + [block] + blocks[axis + 2:])], "expanded")
        s = op("Reshape", [s, const("shape", shape[:axis] + [nb * block] + shape[axis + 1:])], "spread")
        if nb * block != n:
            s = op("Slice", [s, const("start", [0]), const("end", [n]), const("axis", [axis])], "sliced")
    elif not per_tensor:
        s = op("Reshape", [s, const("axes", [-1 if k == axis else 1 for k in range(rank)])], "broadcast")
    made.append(helper.make_node("Mul", [values, s], list(node.output), name=stem))
    return made
