"""Tiny ONNX graphs built in code for the tests.

Every builder takes `dup`: when true, the second half of the channels of each prunable group is
an exact copy of the first half (producer filters, biases and per-channel parameters repeated),
so pruning to half the width must reproduce the outputs to float precision.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, seed: int = 0, constant_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.constant_nodes = constant_nodes
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, value) -> str:
        name = self.name(base)
        value = np.asarray(value)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        else:
            self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, base: str, shape, dup_axis: int | None = None, scale: float | None = None) -> str:
        w = self.random(shape, dup_axis, scale)
        return self.const(base, w)

    def random(self, shape, dup_axis=None, scale=None):
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        w = self.rng.standard_normal(shape) * (scale if scale is not None else 1 / np.sqrt(fan_in))
        if dup_axis is not None:
            half = shape[dup_axis] // 2
            src = np.take(w, range(half), axis=dup_axis)
            idx = [slice(None)] * len(shape)
            idx[dup_axis] = slice(half, 2 * half)
            w[tuple(idx)] = src
        return w.astype(np.float32)

    def op(self, op_type: str, inputs, n_out: int = 1, name: str | None = None, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name or self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def bn(self, x: str, c: int, dup: bool) -> str:
        d = 0 if dup else None
        scale = self.const("bn_scale", 1 + 0.1 * self.random((c,), d, 1.0))
        bias = self.const("bn_bias", 0.1 * self.random((c,), d, 1.0))
        mean = self.const("bn_mean", 0.1 * self.random((c,), d, 1.0))
        var = self.const("bn_var", (1 + 0.1 * np.abs(self.random((c,), d, 1.0))).astype(np.float32))
        return self.op("BatchNormalization", [x, scale, bias, mean, var])

    def model(self, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        outs = []
        for n in outputs:  # a name (shape left to inference) or (name, shape)
            name, shape = n if isinstance(n, tuple) else (n, None)
            outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            if shape is None:
                outs[-1].type.tensor_type.ClearField("shape")
        graph = helper.make_graph(self.nodes, "test", ins, outs, initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        m = onnx.shape_inference.infer_shapes(m)
        onnx.checker.check_model(m, full_check=True)
        return m


def mlp(dup: bool = False, hidden_output: bool = False, shared: bool = False) -> onnx.ModelProto:
    """x[N,16] -> Gemm 32 -> Relu -> Gemm 24 -> Relu -> Gemm 10. With dup, the second half of
    each hidden layer copies the first (ReLU keeps them copies); with hidden_output the first hidden activation is
    also a graph output; with shared the two hidden Gemms share one weight (32x32 both)."""
    b = Builder(1)
    d = 0 if dup else None
    w1 = b.weight("w1", (32, 16), d)
    h = b.op("Relu", [b.op("Gemm", ["x", w1, b.weight("b1", (32,), d, 0.1)], transB=1, name="fc1")])
    if shared:
        w2 = b.weight("w2", (32, 32))
        h2 = b.op("Relu", [b.op("Gemm", [h, w2], transB=1, name="fc2")])
        h2 = b.op("Relu", [b.op("Gemm", [h2, w2], transB=1, name="fc2b")])
        width = 32
    else:
        w2 = b.weight("w2", (24, 32), d)
        h2 = b.op("Relu", [b.op("Gemm", [h, w2, b.weight("b2", (24,), d, 0.1)], transB=1, name="fc2")])
        width = 24
    y = b.op("Gemm", [h2, b.weight("w3", (10, width)), b.weight("b3", (10,), None, 0.1)], transB=1, name="fc3")
    outs = [y, h] if hidden_output else [y]
    return b.model([("x", ["N", 16])], outs)


def gelu_ffn(dup: bool = False, use_gelu_op: bool = False) -> onnx.ModelProto:
    """x[B,S,16] -> MatMul 32 -> Add b -> GELU (the Div-Erf-Add-Mul-Mul pattern of a PyTorch
    export, or a Gelu node at opset 20) -> MatMul 16 -> Add b -> Add x (residual)."""
    b = Builder(2)
    d = 1 if dup else None
    h = b.op("Add", [b.op("MatMul", ["x", b.weight("w1", (16, 32), d, 0.3)], name="ffn.fc1"),
                     b.const("b1", b.random((32,), 0 if dup else None, 0.1))])
    if use_gelu_op:
        a = b.op("Gelu", [h])
    else:
        e = b.op("Erf", [b.op("Div", [h, b.const("sqrt2", np.float32(np.sqrt(2)))])])
        a = b.op("Mul", [b.op("Mul", [h, b.op("Add", [e, b.const("one", np.float32(1))])]), b.const("half", np.float32(0.5))])
    y = b.op("Add", [b.op("MatMul", [a, b.weight("w2", (32, 16), None, 0.2)], name="ffn.fc2"), b.const("b2", b.random((16,), None, 0.1))])
    return b.model([("x", ["B", "S", 16])], [b.op("Add", [y, "x"])], opset=20 if use_gelu_op else 17)


def conv_bn_relu(dup: bool = False, constant_nodes: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 (3x3) -> BN -> Relu -> Conv 6 (3x3) -> BN -> Relu -> Conv 4 (1x1)."""
    b = Builder(3, constant_nodes)
    d = 0 if dup else None
    h = b.op("Relu", [b.bn(b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d), b.weight("c1b", (8,), d, 0.1)],
                                pads=[1, 1, 1, 1], name="conv1"), 8, dup)])
    h = b.op("Relu", [b.bn(b.op("Conv", [h, b.weight("c2", (6, 8, 3, 3), d)], pads=[1, 1, 1, 1], name="conv2"), 6, dup)])
    y = b.op("Conv", [h, b.weight("c3", (4, 6, 1, 1))], name="conv3")
    return b.model([("x", ["N", 3, 8, 8])], [y])


def depthwise(dup: bool = False) -> onnx.ModelProto:
    """x[N,4,8,8] -> Conv 1x1 8 -> BN -> HardSwish -> depthwise 3x3 -> BN -> HardSwish -> Conv 1x1 4."""
    b = Builder(4)
    d = 0 if dup else None
    h = b.op("HardSwish", [b.bn(b.op("Conv", ["x", b.weight("pw", (8, 4, 1, 1), d)], name="pw1"), 8, dup)])
    h = b.op("Conv", [h, b.weight("dw", (8, 1, 3, 3), d), b.weight("dwb", (8,), d, 0.1)], group=8, pads=[1, 1, 1, 1], name="dw")
    h = b.op("HardSwish", [b.bn(h, 8, dup)])
    return b.model([("x", ["N", 4, 8, 8])], [b.op("Conv", [h, b.weight("pw2", (4, 8, 1, 1))], name="pw2")])


def squeeze_excite(dup: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 -> HardSwish = a; gate = HardSigmoid(Conv 8 (Relu(Conv 2 (GAP a))));
    Conv 1x1 4 (a * gate)."""
    b = Builder(5)
    d = 0 if dup else None
    a = b.op("HardSwish", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1")])
    s = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [a]), b.weight("se1", (2, 8, 1, 1), d), b.weight("se1b", (2,), d, 0.1)], name="se.reduce")])
    gate = b.op("HardSigmoid", [b.op("Conv", [s, b.weight("se2", (8, 2, 1, 1), d), b.weight("se2b", (8,), d, 0.1)], name="se.expand")])
    y = b.op("Conv", [b.op("Mul", [a, gate]), b.weight("c2", (4, 8, 1, 1))], name="conv2")
    return b.model([("x", ["N", 3, 8, 8])], [y])


def residual(dup: bool = False) -> onnx.ModelProto:
    """x -> Conv 8 -> BN -> Relu = h; r = BN(Conv 8 3x3 (h)); Relu(h + r) -> Conv 1x1 4."""
    b = Builder(6)
    d = 0 if dup else None
    h = b.op("Relu", [b.bn(b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1"), 8, dup)])
    r = b.bn(b.op("Conv", [h, b.weight("c2", (8, 8, 3, 3), d)], pads=[1, 1, 1, 1], name="conv2"), 8, dup)
    y = b.op("Conv", [b.op("Relu", [b.op("Add", [r, h])]), b.weight("c3", (4, 8, 1, 1))], name="conv3")
    return b.model([("x", ["N", 3, 8, 8])], [y])


def flatten_gemm(dup: bool = False, reshape: bool = False) -> onnx.ModelProto:
    """x[N,3,4,4] -> Conv 8 (3x3) -> Relu -> Flatten (or Reshape [0, 128]) -> Gemm 10."""
    b = Builder(7)
    d = 0 if dup else None
    h = b.op("Relu", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1")])
    if reshape:
        f = b.op("Reshape", [h, b.const("shape", np.array([0, 128], dtype=np.int64))])
    else:
        f = b.op("Flatten", [h], axis=1)
    y = b.op("Gemm", [f, b.weight("fc", (10, 128)), b.weight("fcb", (10,), None, 0.1)], transB=1, name="fc")
    return b.model([("x", ["N", 3, 4, 4])], [y])


def layernorm_after(dup: bool = False) -> onnx.ModelProto:
    """x[N,16] -> Gemm 32 -> LayerNormalization -> Gemm 8: the channels are normalized together."""
    b = Builder(8)
    h = b.op("Gemm", ["x", b.weight("w1", (32, 16))], transB=1, name="fc1")
    h = b.op("LayerNormalization", [h, b.const("g", np.ones(32, np.float32)), b.const("b", np.zeros(32, np.float32))], axis=-1)
    return b.model([("x", ["N", 16])], [b.op("Gemm", [h, b.weight("w2", (8, 32))], transB=1, name="fc2")])


def reshaped_bias(dup: bool = False, batch_dim=-1) -> onnx.ModelProto:
    """Paddle's SE style: x[-1,3,8,8] -> Conv 8 -> Add(Reshape(Constant bias, [1,8,1,1])) -> Relu
    -> Conv 4. The bias only looks per-channel once the Reshape of constants is folded; the
    input declares its batch dimension as -1, as Paddle exports do."""
    b = Builder(9, constant_nodes=True)
    d = 0 if dup else None
    h = b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1")
    bias = b.op("Reshape", [b.const("bias", b.random((8,), d, 0.1)), b.const("shape", np.array([1, 8, 1, 1]))])
    y = b.op("Conv", [b.op("Relu", [b.op("Add", [h, bias])]), b.weight("c2", (4, 8, 1, 1))], name="conv2")
    m = b.model([("x", [1, 3, 8, 8])], [y])
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch_dim
    del m.graph.value_info[:]
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return m


def offset_copies() -> onnx.ModelProto:
    """x[N,16] -> Gemm 32 -> Identity -> Gemm 10: units 16..31 are units 0..15 plus 1.0, an exact
    linear combination only with an intercept (the constant is folded into the next bias)."""
    b = Builder(10)
    w1, b1 = b.random((32, 16), 0), b.random((32,), 0, 0.1)
    b1[16:] += 1.0
    h = b.op("Identity", [b.op("Gemm", ["x", b.const("w1", w1), b.const("b1", b1)], transB=1, name="fc1")])
    y = b.op("Gemm", [h, b.weight("w2", (10, 32)), b.weight("b2", (10,), None, 0.1)], transB=1, name="fc2")
    return b.model([("x", ["N", 16])], [y])


BUILDERS = {
    "mlp": (mlp, [("x", (16,))]),
    "gelu_ffn": (gelu_ffn, [("x", (5, 16))]),
    "conv_bn_relu": (conv_bn_relu, [("x", (3, 8, 8))]),
    "depthwise": (depthwise, [("x", (4, 8, 8))]),
    "squeeze_excite": (squeeze_excite, [("x", (3, 8, 8))]),
    "residual": (residual, [("x", (3, 8, 8))]),
    "flatten_gemm": (flatten_gemm, [("x", (3, 4, 4))]),
    "reshaped_bias": (reshaped_bias, [("x", (3, 8, 8))]),
}


def sample_inputs(spec, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((n, *shape)).astype(np.float32) for name, shape in spec}


# ---- models that must pass through safely (test_passthrough.py) ----

def _vi(name, shape=None, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def subgraph_reader(kind: str, reads: str = "h") -> onnx.ModelProto:
    """mlp (fc1 -> Relu = h -> fc2 -> Relu = h2 -> fc3 = y) plus a control-flow node whose body
    reads `reads` from the outer scope (`h`, the hidden activation of fc1's group, or `w1`,
    fc1's weight). kind: "If", "Loop", "Scan", or "nested" (an If inside an If's branch). The
    control-flow result is a second graph output `z` of shape [N, 1]."""
    b = Builder(11)
    w1 = b.weight("w1", (32, 16), 0)
    h = b.op("Relu", [b.op("Gemm", ["x", w1, b.weight("b1", (32,), 0, 0.1)], transB=1, name="fc1")], name="relu1")
    h2 = b.op("Relu", [b.op("Gemm", [h, b.weight("w2", (24, 32), 0), b.weight("b2", (24,), 0, 0.1)], transB=1, name="fc2")])
    y = b.op("Gemm", [h2, b.weight("w3", (10, 24)), b.weight("b3", (10,), None, 0.1)], transB=1, name="fc3")
    outer = {"h": h, "w1": w1}[reads]
    one = b.const("one", np.array([1], dtype=np.int64))

    def body_sum(prefix, extra_inputs=()):
        """Nodes computing ReduceSum(outer read, axis 1) -> [N, 1] (or [1, 1] for Scan state)."""
        nodes = []
        src = outer
        if reads == "w1":  # use the weight as a Gemm weight on the outer x
            nodes.append(helper.make_node("Gemm", ["x", w1], [prefix + "_g"], transB=1))
            src = prefix + "_g"
        nodes.append(helper.make_node("ReduceSum", [src, one], [prefix + "_s"], keepdims=1))
        return nodes, prefix + "_s"

    s0 = b.op("ReduceSum", ["x", one], keepdims=1)  # [N, 1]
    if kind in ("If", "nested"):
        cond = b.op("Greater", [b.op("ReduceSum", ["x"], keepdims=0), b.const("zero", np.float32(0))])
        nodes, out = body_sum("then")
        then = helper.make_graph(nodes, "then", [], [_vi(out, ["N", 1])])
        if kind == "nested":
            inner = helper.make_node("If", [cond], ["inner_z"], then_branch=then,
                                     else_branch=helper.make_graph([helper.make_node("Identity", [s0], ["e2"])], "e2", [], [_vi("e2", ["N", 1])]))
            then = helper.make_graph([inner], "outer_then", [], [_vi("inner_z", ["N", 1])])
        els = helper.make_graph([helper.make_node("Neg", [s0], ["neg"])], "else", [], [_vi("neg", ["N", 1])])
        z = b.op("If", [cond], then_branch=then, else_branch=els)
    elif kind == "Loop":
        nodes, out = body_sum("body")
        nodes.append(helper.make_node("Add", ["v_in", out], ["v_out"]))
        nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
        body = helper.make_graph(nodes, "body", [_vi("i", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
                                                 _vi("v_in", ["N", 1])],
                                 [_vi("cond_out", [], TensorProto.BOOL), _vi("v_out", ["N", 1])])
        z = b.op("Loop", [b.const("trips", np.array(2, dtype=np.int64)), "", s0], body=body)
    elif kind == "Scan":
        nodes, out = body_sum("body")
        nodes.append(helper.make_node("ReduceSum", [out], ["body_t"], keepdims=0))
        nodes.append(helper.make_node("Add", ["state_in", "body_t"], ["state_out"]))
        nodes.append(helper.make_node("Identity", ["x_t"], ["scan_out"]))
        body = helper.make_graph(nodes, "body", [_vi("state_in", []), _vi("x_t", [16])],
                                 [_vi("state_out", []), _vi("scan_out", [16])])
        state, _ = b.op("Scan", [b.const("state0", np.float32(0)), "x"], n_out=2, body=body, num_scan_inputs=1)
        z = b.op("Mul", [s0, state])
    else:
        raise ValueError(kind)
    return b.model([("x", ["N", 16])], [y, (z, ["N", 1])])


def recurrent(cell: str = "LSTM", dup: bool = False) -> onnx.ModelProto:
    """x[S,B,8] -> MatMul 16 -> Add b -> Relu -> LSTM/GRU (hidden 12) -> Squeeze (directions)
    -> MatMul 20 -> Relu -> MatMul 6: the group before the cell stops there; the one after it
    is compressible."""
    b = Builder(12)
    d = 1 if dup else None
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", ["x", b.weight("w0", (8, 16))], name="pre"),
                                   b.weight("b0", (16,), None, 0.1)])])
    gates = {"LSTM": 4, "GRU": 3}[cell]
    y, _ = b.op(cell, [h, b.weight("W", (1, gates * 12, 16)), b.weight("R", (1, gates * 12, 12))],
                n_out=2, hidden_size=12, name="cell")
    y = b.op("Squeeze", [y, b.const("axis1", np.array([1], dtype=np.int64))])
    h2 = b.op("Relu", [b.op("MatMul", [y, b.weight("w1", (12, 20), d)], name="post")])
    return b.model([("x", ["S", "B", 8])], [b.op("MatMul", [h2, b.weight("w2", (20, 6))], name="head")])


def custom_op(domain: str = "com.example") -> onnx.ModelProto:
    """mlp whose hidden activation goes through an op of a made-up domain."""
    b = Builder(13)
    h = b.op("Relu", [b.op("Gemm", ["x", b.weight("w1", (32, 16))], transB=1, name="fc1")])
    b.nodes.append(helper.make_node("FancyScale", [h], ["fancy"], name="fancy", domain=domain, alpha=2.0))
    y = b.op("Gemm", ["fancy", b.weight("w2", (10, 32))], transB=1, name="fc2")
    ins = [_vi("x", ["N", 16])]
    graph = helper.make_graph(b.nodes, "custom", ins, [_vi(y, ["N", 10])], initializer=b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def half_mlp(elem: int = TensorProto.FLOAT16, dup: bool = False) -> onnx.ModelProto:
    """The mlp with every weight, input and output in float16 (elem=FLOAT16), or float32
    compute on weights stored as float16/bfloat16 and Cast to float (elem=BFLOAT16 / the
    pattern `cast=`): see `cast_weights`."""
    b = Builder(14)
    d = 0 if dup else None
    np_t = helper.tensor_dtype_to_np_dtype(elem)
    w = lambda base, shape, dup_axis=None, scale=None: b.const(base, b.random(shape, dup_axis, scale).astype(np_t))
    h = b.op("Relu", [b.op("Gemm", ["x", w("w1", (32, 16), d), w("b1", (32,), d, 0.1)], transB=1, name="fc1")])
    h = b.op("Relu", [b.op("Gemm", [h, w("w2", (24, 32), d), w("b2", (24,), d, 0.1)], transB=1, name="fc2")])
    y = b.op("Gemm", [h, w("w3", (10, 24)), w("b3", (10,), None, 0.1)], transB=1, name="fc3")
    graph = helper.make_graph(b.nodes, "half", [_vi("x", ["N", 16], elem)], [_vi(y, ["N", 10], elem)], initializer=b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def cast_weights(elem: int = TensorProto.BFLOAT16, big: bool = True, dup: bool = False) -> onnx.ModelProto:
    """Float32 compute, weights stored in `elem` (bfloat16/float16) and Cast to float before
    use (mixed-precision storage). fc1/fc2 weights are Cast nodes on 16-bit initializers; their
    biases are float32."""
    b = Builder(15)
    d = 0 if dup else None
    np_t = helper.tensor_dtype_to_np_dtype(elem)
    width = 96 if big else 32

    def w(base, shape, dup_axis=None):
        raw = b.const(base, b.random(shape, dup_axis).astype(np_t))
        return b.op("Cast", [raw], to=TensorProto.FLOAT)

    h = b.op("Relu", [b.op("Gemm", ["x", w("w1", (width, 64), d), b.weight("b1", (width,), d, 0.1)], transB=1, name="fc1")])
    h = b.op("Relu", [b.op("Gemm", [h, w("w2", (48, width), d), b.weight("b2", (48,), d, 0.1)], transB=1, name="fc2")])
    y = b.op("Gemm", [h, b.weight("w3", (10, 48)), b.weight("b3", (10,), None, 0.1)], transB=1, name="fc3")
    return b.model([("x", ["N", 64])], [y])


def qdq_mlp(dup: bool = False) -> onnx.ModelProto:
    """An int8 QDQ model: every Gemm weight is DequantizeLinear(int8, scale) and every
    activation entering a Gemm goes through QuantizeLinear -> DequantizeLinear (uint8)."""
    b = Builder(16)

    def qweight(base, shape):
        w = b.random(shape)
        scale = np.float32(np.abs(w).max() / 127)
        q = b.const(base, np.clip(np.round(w / scale), -127, 127).astype(np.int8))
        return b.op("DequantizeLinear", [q, b.const(base + "_scale", scale), b.const(base + "_zp", np.int8(0))])

    def qact(x):
        s, zp = b.const("act_scale", np.float32(0.05)), b.const("act_zp", np.uint8(128))
        return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, s, zp]), s, zp])

    h = b.op("Relu", [b.op("Gemm", [qact("x"), qweight("w1", (32, 16)), b.weight("b1", (32,), None, 0.1)], transB=1, name="fc1")])
    h = b.op("Relu", [b.op("Gemm", [qact(h), qweight("w2", (24, 32)), b.weight("b2", (24,), None, 0.1)], transB=1, name="fc2")])
    y = b.op("Gemm", [qact(h), qweight("w3", (10, 24)), b.weight("b3", (10,), None, 0.1)], transB=1, name="fc3")
    return b.model([("x", ["N", 16])], [y], opset=13)


def versioned(opset: int, dup: bool = False) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 -> BN -> Clip(0, 6) = a; gate = Sigmoid(Conv 8 (Relu(Conv 4
    (ReduceMean_{2,3} a)))); Conv 1x1 6 (a * gate) -> Relu -> GlobalAveragePool -> Squeeze ->
    Gemm 10 -> Softmax. The ops whose signature changed across opsets (ReduceMean and Squeeze
    axes as attribute or input, Clip bounds as inputs, Softmax's axis) are built as `opset`
    wants them."""
    b = Builder(17)
    d = 0 if dup else None
    a = b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d), b.weight("c1b", (8,), d, 0.1)], pads=[1, 1, 1, 1], name="conv1")
    a = b.op("Clip", [b.bn(a, 8, dup), b.const("lo", np.float32(0)), b.const("hi", np.float32(6))])
    if opset < 18:
        s = b.op("ReduceMean", [a], axes=[2, 3], keepdims=1)
    else:
        s = b.op("ReduceMean", [a, b.const("hw", np.array([2, 3], dtype=np.int64))], keepdims=1)
    s = b.op("Relu", [b.op("Conv", [s, b.weight("se1", (4, 8, 1, 1), d), b.weight("se1b", (4,), d, 0.1)], name="se.reduce")])
    gate = b.op("Sigmoid", [b.op("Conv", [s, b.weight("se2", (8, 4, 1, 1), d), b.weight("se2b", (8,), d, 0.1)], name="se.expand")])
    h = b.op("Relu", [b.op("Conv", [b.op("Mul", [a, gate]), b.weight("c2", (6, 8, 1, 1), d)], name="conv2")])
    h = b.op("GlobalAveragePool", [h])
    if opset < 13:
        h = b.op("Squeeze", [h], axes=[2, 3])
    else:
        h = b.op("Squeeze", [h, b.const("sq", np.array([2, 3], dtype=np.int64))])
    y = b.op("Gemm", [h, b.weight("fc", (10, 6)), b.weight("fcb", (10,), None, 0.1)], transB=1, name="fc")
    return b.model([("x", ["N", 3, 8, 8])], [b.op("Softmax", [y], axis=1)], opset=opset)


def siamese(dup: bool = False) -> onnx.ModelProto:
    """x[N,16]: Relu(Gemm(x, W, b)) + Relu(Gemm(-x, W, b)) -> Gemm 10. Both producers read the
    same weight and bias and join in one group (the weight is edited once)."""
    b = Builder(18)
    d = 0 if dup else None
    w, bias = b.weight("w", (32, 16), d), b.weight("b", (32,), d, 0.1)
    left = b.op("Relu", [b.op("Gemm", ["x", w, bias], transB=1, name="left")])
    right = b.op("Relu", [b.op("Gemm", [b.op("Neg", ["x"]), w, bias], transB=1, name="right")])
    y = b.op("Gemm", [b.op("Add", [left, right]), b.weight("w2", (10, 32)), b.weight("b2", (10,), None, 0.1)], transB=1, name="fc2")
    return b.model([("x", ["N", 16])], [y])


def shared_bias() -> onnx.ModelProto:
    """Two parallel Gemm 24 branches on x whose producers share one bias initializer but have
    their own weights: one constant, two groups editing it -> both left alone."""
    b = Builder(19)
    bias = b.weight("b", (24,), None, 0.1)
    outs = []
    for k in range(2):
        h = b.op("Relu", [b.op("Gemm", ["x", b.weight(f"w{k}", (24, 16)), bias], transB=1, name=f"branch{k}")])
        outs.append(b.op("Gemm", [h, b.weight(f"head{k}", (4, 24))], transB=1, name=f"head{k}"))
    return b.model([("x", ["N", 16])], [b.op("Add", outs)])


def local_function_op() -> onnx.ModelProto:
    """mlp whose hidden activation goes through `com.example:Double`, an op the model defines
    itself as a local function (x * 2): ONNX Runtime can run it."""
    m = custom_op()
    for node in m.graph.node:
        if node.op_type == "FancyScale":
            node.op_type = "Double"
            del node.attribute[:]
    two = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2), "two"))
    fn = helper.make_function("com.example", "Double", ["X"], ["Y"],
                              [two, helper.make_node("Mul", ["X", "two"], ["Y"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    onnx.checker.check_model(m, full_check=True)
    return m


def ffn_flat(dup: bool = False) -> onnx.ModelProto:
    """x[B,S,16] -> Reshape [-1, 16] -> MatMul 32 -> Add b -> Relu -> MatMul 16 -> Reshape to
    Shape(x): the sequence length only exists at run time."""
    b = Builder(20)
    d = 1 if dup else None
    flat = b.op("Reshape", ["x", b.const("flat", np.array([-1, 16], dtype=np.int64))])
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [flat, b.weight("w1", (16, 32), d, 0.3)], name="fc1"),
                                   b.const("b1", b.random((32,), 0 if dup else None, 0.1))])])
    y = b.op("MatMul", [h, b.weight("w2", (32, 16), None, 0.2)], name="fc2")
    return b.model([("x", ["B", "S", 16])], [b.op("Reshape", [y, b.op("Shape", ["x"])])])


def parallel_mlps(groups: int, width: int) -> onnx.ModelProto:
    """y = sum_k Gemm(Relu(Gemm(x, A_k)), B_k), x[N,16] -> y[N,4], A_k 16 x width, B_k width x 4:
    `groups` channel groups of `width` channels (one group when groups=1: a single wide layer).
    A few MB of weights whose Grams would take groups * 8 width^2 bytes side by side."""
    rng = np.random.default_rng(0)
    nodes, inits, last = [], [], None
    for k in range(groups):
        inits += [numpy_helper.from_array(rng.standard_normal((16, width)).astype(np.float32) * 0.1, f"a{k}"),
                  numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32) * 0.01, f"b{k}")]
        nodes += [helper.make_node("Gemm", ["x", f"a{k}"], [f"h{k}"], name=f"up{k}"),
                  helper.make_node("Relu", [f"h{k}"], [f"r{k}"], name=f"act{k}"),
                  helper.make_node("Gemm", [f"r{k}", f"b{k}"], [f"y{k}"], name=f"down{k}")]
        if last is not None:
            nodes.append(helper.make_node("Add", [last, f"y{k}"], [f"s{k}"], name=f"sum{k}"))
        last = f"s{k}" if k else f"y{k}"
    nodes.append(helper.make_node("Identity", [last], ["y"], name="out"))
    graph = helper.make_graph(nodes, "parallel_mlps", [_vi("x", ["N", 16])], [_vi("y", ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# ---- group patterns of issue 15 (test_patterns.py) ----

def concat_neck(dup: bool = False, se: bool = True, second: str = "conv") -> onnx.ModelProto:
    """An FPN-style neck. a = Relu(Conv 8 (x)), with se a squeeze-and-excitation residual
    a + a * HardSigmoid(Conv 8 (Relu(Conv 2 (GAP a)))); b = Resize x2 (Relu(BN(Conv 6 stride 2
    (x)))); Concat(a, b) along the channels (14) -> Conv 3x3 head 4. `second` replaces b by the
    graph input "x2" ("input"), by a second copy of a ("same") or by a constant ("const")."""
    b = Builder(30)
    d = 0 if dup else None
    a = b.op("Relu", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d), b.weight("c1b", (8,), d, 0.1)],
                           pads=[1, 1, 1, 1], name="conv_a")])
    if se:
        s = b.op("Relu", [b.op("Conv", [b.op("GlobalAveragePool", [a]), b.weight("se1", (2, 8, 1, 1)),
                                        b.weight("se1b", (2,), None, 0.1)], name="se.reduce")])
        gate = b.op("HardSigmoid", [b.op("Conv", [s, b.weight("se2", (8, 2, 1, 1), d), b.weight("se2b", (8,), d, 0.1)],
                                         name="se.expand")])
        a = b.op("Add", [a, b.op("Mul", [a, gate])])
    inputs = [("x", ["N", 3, 8, 8])]
    if second == "conv":
        h = b.op("Relu", [b.bn(b.op("Conv", ["x", b.weight("c2", (6, 3, 3, 3), d)], pads=[1, 1, 1, 1], strides=[2, 2],
                                    name="conv_b"), 6, dup)])
        other = b.op("Resize", [h, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    elif second == "input":
        other, inputs = "x2", inputs + [("x2", ["N", 6, 8, 8])]
    elif second == "same":
        other = a
    else:
        other = b.const("fixed", b.random((1, 6, 8, 8), None, 1.0))
    cat = b.op("Concat", [a, other], axis=1)
    width = 8 + (8 if second == "same" else 6)
    y = b.op("Conv", [cat, b.weight("head", (4, width, 3, 3)), b.weight("headb", (4,), None, 0.1)],
             pads=[1, 1, 1, 1], name="head")
    return b.model(inputs, [y])


def nested_concat(dup: bool = False) -> onnx.ModelProto:
    """Concat(Concat(Relu(Conv 4 (x)), Relu(Conv 6 (x))), Relu(Conv 5 (x))) -> Conv 1x1 3, and
    the inner Concat also feeds a depthwise Conv -> Relu -> Conv 1x1 2 (an exit in a window)."""
    b = Builder(31)
    d = 0 if dup else None
    parts = [b.op("Relu", [b.op("Conv", ["x", b.weight(f"c{c}", (c, 3, 3, 3), d), b.weight(f"c{c}b", (c,), d, 0.1)],
                                pads=[1, 1, 1, 1], name=f"conv{c}")]) for c in (4, 6, 5)]
    inner = b.op("Concat", parts[:2], axis=1)
    dw = np.concatenate([b.random((4, 1, 3, 3), d), b.random((6, 1, 3, 3), d)])  # copies within each window
    dw = b.op("Relu", [b.op("Conv", [inner, b.const("dw", dw)], group=10, pads=[1, 1, 1, 1], name="dw")])
    side = b.op("Conv", [dw, b.weight("side", (2, 10, 1, 1))], name="side")
    outer = b.op("Concat", [inner, parts[2]], axis=1)
    y = b.op("Conv", [outer, b.weight("head", (3, 15, 1, 1)), b.weight("headb", (3,), None, 0.1)], name="head")
    return b.model([("x", ["N", 3, 8, 8])], [y, side])


def concat_residual(dup: bool = False) -> onnx.ModelProto:
    """a = Relu(Conv 2 (x)), b = Relu(Conv 4 (x)), cat = Concat(a, b) (6); y = Relu(Conv 3x3 6
    (cat) + cat), a residual join on the concatenation; GAP -> Flatten -> Gemm 5. With dup,
    a's and b's second halves copy their first, and so do the residual conv's rows within each
    window ([0, 2) and [2, 6)): the copies of the join's two operands line up."""
    b = Builder(33)
    d = 0 if dup else None
    parts = [b.op("Relu", [b.op("Conv", ["x", b.weight(f"c{c}", (c, 3, 3, 3), d), b.weight(f"c{c}b", (c,), d, 0.1)],
                                pads=[1, 1, 1, 1], name=name)]) for c, name in ((2, "conv_a"), (4, "conv_b"))]
    cat = b.op("Concat", parts, axis=1)
    rows = np.concatenate([b.random((c, 6, 3, 3), d, 0.2) for c in (2, 4)])
    res = b.op("Conv", [cat, b.const("res", rows), b.const("resb", np.concatenate([b.random((c,), d, 0.1) for c in (2, 4)]))],
               pads=[1, 1, 1, 1], name="res")
    h = b.op("Relu", [b.op("Add", [res, cat])])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    y = b.op("Gemm", [flat, b.weight("head", (5, 6)), b.weight("headb", (5,), None, 0.1)], transB=1, name="head")
    return b.model([("x", ["N", 3, 8, 8])], [y])


def conv_transpose(dup: bool = False, group: int = 1) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 -> Relu -> ConvTranspose 6 (2x2, stride 2, bias, `group`) -> BN ->
    Relu -> ConvTranspose 2 (3x3, stride 2, pads 1) -> Sigmoid (the PP-OCR detection head)."""
    b = Builder(32)
    d = 0 if dup else None
    h = b.op("Relu", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1")])
    w = b.random((8, 6 // group, 2, 2), None, 0.3)
    if dup:
        w[:, 3:] = w[:, :3]
    t = b.op("ConvTranspose", [h, b.const("t1", w), b.weight("t1b", (6,), d, 0.1)], strides=[2, 2], group=group,
             name="up1")
    t = b.op("Relu", [b.bn(t, 6, dup)])
    y = b.op("ConvTranspose", [t, b.weight("t2", (6, 2, 3, 3), None, 0.3)], strides=[2, 2], pads=[1, 1, 1, 1],
             name="up2")
    return b.model([("x", ["N", 3, 8, 8])], [b.op("Sigmoid", [y])])


def gated_ffn(dup: bool = False, act: str = "silu", up: str = "matmul") -> onnx.ModelProto:
    """x[B,S,16] -> Mul(act(x W1), x W3) -> W2 (16), plus x: a SwiGLU (act "silu": h *
    Sigmoid(h)) or GeGLU (act "gelu": Erf form) feed-forward block. W1 and W3 have 24 columns.
    With up="input" the gate multiplies a graph input x3[B,S,24] instead of x W3."""
    b = Builder(33)
    d = 1 if dup else None
    h1 = b.op("MatMul", ["x", b.weight("w1", (16, 24), d, 0.3)], name="ffn.gate")
    if act == "silu":
        a = b.op("Mul", [h1, b.op("Sigmoid", [h1])])
    else:
        e = b.op("Erf", [b.op("Div", [h1, b.const("sqrt2", np.float32(np.sqrt(2)))])])
        a = b.op("Mul", [b.op("Mul", [h1, b.op("Add", [e, b.const("one", np.float32(1))])]),
                         b.const("half", np.float32(0.5))])
    h3 = b.op("MatMul", ["x", b.weight("w3", (16, 24), d, 0.3)], name="ffn.up") if up == "matmul" else "x3"
    y = b.op("MatMul", [b.op("Mul", [a, h3]), b.weight("w2", (24, 16), None, 0.2)], name="ffn.down")
    inputs = [("x", ["B", "S", 16])] + ([] if up == "matmul" else [("x3", ["B", "S", 24])])
    return b.model(inputs, [b.op("Add", [y, "x"])])


def group_norm(dup: bool = False, groups: int = 4) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 -> GroupNormalization (`groups` groups, scale and bias per channel,
    opset 21) -> Relu -> Conv 1x1 4. With dup the second half of the groups copies the first
    (whole groups)."""
    b = Builder(34)
    d = 0 if dup else None
    h = b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d), b.weight("c1b", (8,), d, 0.1)], pads=[1, 1, 1, 1],
             name="conv1")
    scale = b.const("gn_scale", 1 + 0.1 * b.random((8,), d, 1.0))
    bias = b.const("gn_bias", 0.1 * b.random((8,), d, 1.0))
    h = b.op("Relu", [b.op("GroupNormalization", [h, scale, bias], num_groups=groups, name="gn")])
    y = b.op("Conv", [h, b.weight("c2", (4, 8, 1, 1))], name="conv2")
    m = b.model([("x", ["N", 3, 8, 8])], [(y, ["N", 4, 8, 8])], opset=21)
    m.ir_version = 10
    return m


def grouped_conv(dup: bool = False, out_per_group: int = 2) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 8 -> Relu -> grouped Conv 3x3 (4 groups of 2 inputs, `out_per_group`
    outputs each) -> Relu -> Conv 1x1 4 (ResNeXt / RegNet style). With dup the last two groups
    copy the first two (whole groups)."""
    b = Builder(35)
    d = 0 if dup else None
    h = b.op("Relu", [b.op("Conv", ["x", b.weight("c1", (8, 3, 3, 3), d)], pads=[1, 1, 1, 1], name="conv1")])
    width = 4 * out_per_group
    h = b.op("Relu", [b.op("Conv", [h, b.weight("gc", (width, 2, 3, 3), d), b.weight("gcb", (width,), d, 0.1)],
                           group=4, pads=[1, 1, 1, 1], name="grouped")])
    return b.model([("x", ["N", 3, 8, 8])], [b.op("Conv", [h, b.weight("c2", (4, width, 1, 1))], name="conv2")])


def attention(dup: bool = False, heads: int = 4, size: int = 4, mask: bool = True,
              merge: str = "explicit", dynamic: bool = False) -> onnx.ModelProto:
    """Decomposed multi-head self-attention as PyTorch exports it: x[B,S,C] (C = heads * size) ->
    Q, K, V = MatMul + Add bias -> Reshape [0, 0, H, d] -> Transpose (K to [B,H,d,S]) ->
    Q K^T / sqrt(d) (+ mask[B,1,1,S]) -> Softmax -> @ V -> Transpose -> Reshape [0, 0, C] ->
    MatMul W_o + bias -> + x. With dup the second half of the heads copies the first (Q, K and V
    columns); merge="split" merges into [0, 0, C // 2, 2] instead (not a merge of the heads). With
    dynamic the Reshape targets are computed as PyTorch exports them with dynamic axes:
    Concat(Unsqueeze(Gather(Shape(x), 0)), Unsqueeze(Gather(Shape(x), 1)), [H], [d])."""
    b = Builder(36)
    c = heads * size
    d = 1 if dup else None

    def project(name):
        w = b.random((c, c), d, 0.5)
        bias = b.random((c,), 0 if dup else None, 0.1)
        return b.op("Add", [b.op("MatMul", ["x", b.const(f"w{name}", w)], name=f"attn.{name}"), b.const(f"b{name}", bias)])

    def shape_of(*tail):
        if not dynamic:
            return b.const("shape", np.array([0, 0, *tail], dtype=np.int64))
        dims = [b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", ["x"]), b.const("i", np.int64(k))], axis=0),
                                   b.const("ax", np.array([0], dtype=np.int64))]) for k in (0, 1)]
        return b.op("Concat", [*dims, *(b.const("dim", np.array([t], dtype=np.int64)) for t in tail)], axis=0)

    split = shape_of(heads, size)
    q, k, v = (b.op("Reshape", [project(n), split]) for n in "qkv")
    q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
    s = b.op("Div", [b.op("MatMul", [q, k]), b.const("scale", np.float32(np.sqrt(size)))])
    inputs = [("x", ["B", "S", c])]
    if mask:
        s = b.op("Add", [s, "mask"])
        inputs.append(("mask", ["B", 1, 1, "S"]))
    ctx = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [s], axis=-1), v])], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, shape_of(c) if merge == "explicit" else shape_of(c // 2, 2)])
    if merge != "explicit":
        ctx = b.op("Reshape", [ctx, shape_of(c)])
    y = b.op("Add", [b.op("MatMul", [ctx, b.weight("wo", (c, c), None, 0.3)], name="attn.o"), b.const("bo", b.random((c,), None, 0.1))])
    return b.model(inputs, [b.op("Add", [y, "x"])])


def masked_encoder(flat: bool = False, vocab: int = 40, width: int = 8, hidden: int = 24) -> onnx.ModelProto:
    """A BERT-like block with an attention mask: input_ids[B,S] -> Gather (embedding) -> self
    attention (scores X X^T / sqrt(width), -10000 where attention_mask[B,S] is 0, Softmax) -> +X
    -> MatMul `hidden` + bias -> Relu -> MatMul `width` -> y[B,S,width]. Outputs at real positions
    do not depend on the padding. With flat, the FFN runs on [B*S, width] (Reshape before it, as
    some exports do), so its hidden activations no longer have the mask's [B, S] shape."""
    b = Builder(37)
    x = b.op("Gather", [b.weight("emb", (vocab, width), None, 1.0), "input_ids"], name="embed")
    m = b.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = b.op("Mul", [b.op("Sub", [b.const("one", np.float32(1)), m]), b.const("neg", np.float32(-10000))])
    bias = b.op("Unsqueeze", [bias, b.const("ax1", np.array([1], dtype=np.int64))])   # [B,1,S]
    s = b.op("Div", [b.op("MatMul", [x, b.op("Transpose", [x], perm=[0, 2, 1])]),
                     b.const("scale", np.float32(np.sqrt(width)))])
    ctx = b.op("MatMul", [b.op("Softmax", [b.op("Add", [s, bias])], axis=-1), x])
    h = b.op("Add", [ctx, x])
    if flat:
        h = b.op("Reshape", [h, b.const("flat", np.array([-1, width], dtype=np.int64))])
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", [h, b.weight("w1", (width, hidden))], name="ffn.in"),
                                   b.weight("b1", (hidden,), None, 0.3)])])
    y = b.op("MatMul", [h, b.weight("w2", (hidden, width))], name="ffn.out")
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info(y, TensorProto.FLOAT, None)
    out.type.tensor_type.ClearField("shape")
    graph = helper.make_graph(b.nodes, "masked", ins, [out], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def sentences(count: int, vocab: int = 40, lengths=(2, 12), seed: int = 3) -> list[dict]:
    """`count` feeds of one sentence each, [1, L] with L in `lengths` (mask all ones)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(*lengths))
        out.append({"input_ids": rng.integers(1, vocab, size=(1, n)).astype(np.int64),
                    "attention_mask": np.ones((1, n), dtype=np.int64)})
    return out


def padded(feeds: list[dict]) -> dict:
    """The sentences of `feeds` as one array per input, padded to the longest with token 0 and
    attention_mask 0 (what a tokenizer's padding=True gives)."""
    longest = max(f["input_ids"].shape[1] for f in feeds)
    ids = np.zeros((len(feeds), longest), dtype=np.int64)
    mask = np.zeros((len(feeds), longest), dtype=np.int64)
    for i, f in enumerate(feeds):
        n = f["input_ids"].shape[1]
        ids[i, :n], mask[i, :n] = f["input_ids"][0], 1
    return {"input_ids": ids, "attention_mask": mask}


def residual_blocks(kind: str = "identity", zero_branch: bool = False) -> onnx.ModelProto:
    """x[N,8] -> Gemm 8 (stem) = h -> block: h + W2 Relu(W1 h + b1) + b2 = y -> Relu -> Gemm 4.

    kind "identity": the block above (a residual block with an identity skip); "projection":
    the skip is Gemm(h) (not the identity); "parallel": Add(W1 h, W2 z) of two branches, z the
    stem's input (not a residual block); "leak": the block's hidden tensor is also read by a
    second output head (the body is not closed). zero_branch: W2 and b2 are zero, so f(x) = 0."""
    b = Builder(41)
    h = b.op("Gemm", ["x", b.weight("stem", (8, 8))], transB=1, name="stem")
    inner = b.op("Relu", [b.op("Gemm", [h, b.weight("w1", (16, 8)), b.weight("b1", (16,), None, 0.1)],
                                transB=1, name="fc1")])
    w2, b2 = b.random((8, 16)), b.random((8,), None, 0.1)   # drawn either way: the same other weights
    if zero_branch:
        w2, b2 = 0 * w2, 0 * b2
    f = b.op("Gemm", [inner, b.const("w2", w2), b.const("b2", b2)], transB=1, name="fc2")
    skip = h
    if kind == "projection":
        skip = b.op("Gemm", [h, b.weight("proj", (8, 8))], transB=1, name="proj")
    elif kind == "parallel":
        f = b.op("Gemm", ["x", b.weight("other", (8, 8))], transB=1, name="other")
        skip = b.op("Gemm", [h, b.weight("w3", (8, 8))], transB=1, name="w3")
    y = b.op("Add", [skip, f], name="join")
    outs = [b.op("Gemm", [b.op("Relu", [y]), b.weight("head", (4, 8))], transB=1, name="head")]
    if kind == "leak":
        outs.append(b.op("Gemm", [inner, b.weight("aux", (2, 16))], transB=1, name="aux"))
    return b.model([("x", ["N", 8])], outs)


def post_ln_encoder(heads: int = 2, size: int = 4, zero: str = "", weak: str = "") -> onnx.ModelProto:
    """One post-LN transformer layer, x[B,S,C]: a = LN(x + Attn(x, mask)); y = LN(a + FFN(a)),
    FFN = W2 Relu(W1 a + b1) + b2; attention as in `attention` (mask[B,1,1,S] added to the
    scores). zero "attn" / "ffn": that sub-block's output projection and bias are zero, so its
    f = 0; weak "attn" / "ffn": that projection and bias are scaled by 1e-3 (a block that barely
    contributes)."""
    b = Builder(43)
    c = heads * size
    rng = b.rng

    def dense(inp, shape, name, zeroed=False, scale=1.0):
        w, bias = b.random(shape, None, 0.4), b.random((shape[1],), None, 0.1)
        w, bias = (0 if zeroed else scale) * w, (0 if zeroed else scale) * bias
        return b.op("Add", [b.op("MatMul", [inp, b.const(f"w{name}", w)], name=name), b.const(f"b{name}", bias)])

    def ln(t):
        return b.op("LayerNormalization", [t, b.const("g", (1 + 0.1 * rng.standard_normal(c)).astype(np.float32)),
                                           b.const("beta", (0.1 * rng.standard_normal(c)).astype(np.float32))], axis=-1)

    split = b.const("split", np.array([0, 0, heads, size], dtype=np.int64))
    q, k, v = (b.op("Reshape", [dense("x", (c, c), f"attn.{n}"), split]) for n in "qkv")
    q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
    s = b.op("Add", [b.op("Div", [b.op("MatMul", [q, k], name="scores"), b.const("scale", np.float32(np.sqrt(size)))]),
                     "mask"], name="masked")
    ctx = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [s], axis=-1), v], name="context")], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.const("merge", np.array([0, 0, c], dtype=np.int64))])
    a = ln(b.op("Add", ["x", dense(ctx, (c, c), "attn.o", zero == "attn", 1e-3 if weak == "attn" else 1.0)], name="attn.add"))
    hidden = b.op("Relu", [dense(a, (c, 4 * c), "ffn.1")])
    y = ln(b.op("Add", [a, dense(hidden, (4 * c, c), "ffn.2", zero == "ffn", 1e-3 if weak == "ffn" else 1.0)], name="ffn.add"))
    return b.model([("x", ["B", "S", c]), ("mask", ["B", 1, 1, "S"])], [y])


def chain_blocks(zero: tuple[int, ...] = ()) -> onnx.ModelProto:
    """Two pre-activation residual blocks in a row, the second reading the first's output, the
    last Add the graph output: x[N,6]; y1 = x + W1 Relu(x); y2 = y1 + W2 Relu(y1). Blocks whose
    number (1, 2) is in `zero` have W = 0, so their f = 0."""
    b = Builder(47)
    y = "x"
    for n in (1, 2):
        w = b.random((6, 6)) * (0 if n in zero else 1)
        y = b.op("Add", [y, b.op("MatMul", [b.op("Relu", [y]), b.const(f"w{n}", w)], name=f"f{n}")], name=f"add{n}")
    return b.model([("x", ["N", 6])], [y])
