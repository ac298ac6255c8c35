"""`--decode load`: quantized weights stored as integers with Cast and Mul on constants, which
ONNX Runtime folds into the float weight when it loads the model."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Config, compress
from onnxcompress.methods.quant.storage import decode_at_load, int_tensor

from test_mixed import feeds, path  # noqa: F401 (path: the embed_ffn model, a fixture)

K = 40  # MatMul inputs: blocks of 16 leave a partial last block of 8


def _codes(rng, shape, bits):
    return rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), size=shape).astype(np.int8)


def _model(*, extra: bool = False):
    """x (2, K) -> four MatMuls whose weights are DequantizeLinear of int initializers, each in
    another layout; img (1, 4, 5, 5) -> Conv with an int4 weight in blocks of 2 input channels
    per kernel offset. Returns (model, the float weights as DequantizeLinear defines them). With
    `extra`, a fifth MatMul reads a DequantizeLinear with a zero point (left as it is)."""
    rng = np.random.default_rng(0)
    inits, nodes, weights = [], [], {}
    c1 = _codes(rng, (K, 24), 4)
    s1 = rng.uniform(0.01, 0.1, size=(3, 24)).astype(np.float32)          # int4, axis 0, block 16
    c2 = _codes(rng, (24, 12), 8)
    s2 = rng.uniform(0.01, 0.1, size=12).astype(np.float32)               # int8, axis 1
    c3 = _codes(rng, (12, 12), 8)
    s3 = np.float32(0.05)                                                 # int8, per tensor
    c4 = _codes(rng, (12, 12), 8)
    s4 = rng.uniform(0.01, 0.1, size=12).astype(np.float16)               # float16 scales through a Cast
    cc = _codes(rng, (6, 4, 3, 3), 4)
    sc = rng.uniform(0.01, 0.1, size=(6, 2, 3, 3)).astype(np.float32)     # int4, axis 1, block 2
    weights["W1"] = c1.astype(np.float32) * np.repeat(s1, 16, axis=0)[:K]
    weights["W2"] = c2.astype(np.float32) * s2[None, :]
    weights["W3"] = c3.astype(np.float32) * s3
    weights["W4"] = c4.astype(np.float32) * s4.astype(np.float32)[None, :]
    weights["WC"] = cc.astype(np.float32) * np.repeat(sc, 2, axis=1)
    inits += [int_tensor("c1", c1, 4), numpy_helper.from_array(s1, "s1"), int_tensor("c2", c2, 8),
              numpy_helper.from_array(s2, "s2"), int_tensor("c3", c3, 8), numpy_helper.from_array(np.array(s3), "s3"),
              int_tensor("c4", c4, 8), numpy_helper.from_array(s4, "s4"), int_tensor("cc", cc, 4),
              numpy_helper.from_array(sc, "sc")]
    nodes += [helper.make_node("DequantizeLinear", ["c1", "s1"], ["W1"], name="dq1", axis=0, block_size=16),
              helper.make_node("DequantizeLinear", ["c2", "s2"], ["W2"], name="dq2", axis=1),
              helper.make_node("DequantizeLinear", ["c3", "s3"], ["W3"], name="dq3"),
              helper.make_node("Cast", ["s4"], ["s4f"], name="cast4", to=TensorProto.FLOAT),
              helper.make_node("DequantizeLinear", ["c4", "s4f"], ["W4"], name="dq4", axis=1),
              helper.make_node("DequantizeLinear", ["cc", "sc"], ["WC"], name="dqc", axis=1, block_size=2),
              helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
              helper.make_node("MatMul", ["h1", "W2"], ["h2"], name="mm2"),
              helper.make_node("MatMul", ["h2", "W3"], ["h3"], name="mm3"),
              helper.make_node("MatMul", ["h3", "W4"], ["y"], name="mm4"),
              helper.make_node("Conv", ["img", "WC"], ["z"], name="conv", pads=[1, 1, 1, 1])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 12]),
               helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, 5, 5])]
    if extra:
        c5 = _codes(rng, (12, 12), 8)
        inits += [int_tensor("c5", c5, 8), numpy_helper.from_array(np.float32(0.02), "s5"),
                  numpy_helper.from_array(np.int8(3), "z5")]
        nodes += [helper.make_node("DequantizeLinear", ["c5", "s5", "z5"], ["W5"], name="dq5"),
                  helper.make_node("MatMul", ["y", "W5"], ["y5"], name="mm5")]
        outputs.append(helper.make_tensor_value_info("y5", TensorProto.FLOAT, [2, 12]))
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]),
                                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 5, 5])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model, weights


def _float_model(model: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """`model` with each DequantizeLinear output an initializer holding `weights`'s value."""
    nodes = [n for n in model.graph.node if n.op_type not in ("DequantizeLinear", "Cast")]
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    graph = helper.make_graph(nodes, "float", list(model.graph.input), list(model.graph.output), inits)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized: str | None = None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = level
    if optimized:
        opts.optimized_model_filepath = optimized
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _feed():
    rng = np.random.default_rng(1)
    return {"x": rng.standard_normal((2, K)).astype(np.float32),
            "img": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}


def test_every_layout_decodes_to_dequantize_linears_numbers():
    model, weights = _model()
    new = decode_at_load(model)
    onnx.checker.check_model(new, full_check=True)
    ops = Counter(n.op_type for n in new.graph.node)
    assert "DequantizeLinear" not in ops and ops["Cast"] == 6  # one per weight, and the float16 scales' own
    assert ops["Mul"] == 5 and ops["Slice"] == 1  # the int4 MatMul's partial last block
    # the integers are stored as they were: same tensors, no float copy of a weight
    ints = {t.name: t for t in new.graph.initializer if t.data_type in (TensorProto.INT4, TensorProto.INT8)}
    assert ints == {t.name: t for t in model.graph.initializer if t.name in ints} and len(ints) == 5
    assert all(t.data_type == TensorProto.INT64 and np.prod(t.dims) <= 5
               for t in new.graph.initializer if t.name not in {i.name for i in model.graph.initializer})
    # numbers, exactly: DequantizeLinear's (ONNX Runtime unoptimized: the plain kernels), and
    # optimized, the float model's whose weights are the codes times their scales
    feed = _feed()
    for level, ref in ((ort.GraphOptimizationLevel.ORT_DISABLE_ALL, model),
                       (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, _float_model(model, weights))):
        for got, want in zip(_session(new, level).run(None, feed), _session(ref, level).run(None, feed)):
            np.testing.assert_array_equal(got, want)


def test_onnx_runtime_folds_the_decoding_when_it_loads_the_model(tmp_path):
    """The optimized graph ONNX Runtime runs is the float model's: the same ops, every weight a
    float initializer, no Cast, Mul, Reshape, Expand or Slice left."""
    model, weights = _model()
    _session(decode_at_load(model), optimized=str(tmp_path / "decoded.onnx"))
    _session(_float_model(model, weights), optimized=str(tmp_path / "float.onnx"))
    _session(model, optimized=str(tmp_path / "dequantize.onnx"))
    ops = {name: Counter((n.domain, n.op_type) for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node)
           for name in ("decoded", "float", "dequantize")}
    assert ops["decoded"] == ops["float"]
    assert ops["dequantize"] != ops["float"]  # DequantizeLinear is not folded: its integers stay


def test_zero_points_and_kept_tensors_stay_and_nothing_to_do_returns_the_model():
    model, _ = _model(extra=True)
    new = decode_at_load(model, keep={"c2"})
    left = sorted(n.name for n in new.graph.node if n.op_type == "DequantizeLinear")
    assert left == ["dq2", "dq5"]  # kept by name; a zero point
    feed = _feed()
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for got, ref in zip(_session(new, plain).run(None, feed), _session(model, plain).run(None, feed)):
        np.testing.assert_array_equal(got, ref)
    assert decode_at_load(new, keep={"c2"}) is new


@pytest.mark.parametrize("method, extra", [("quant", {"size_target": 0.4}), ("sqf", {"size_target": 0.5}),
                                           ("id", {"keep": 0.5, "quantize": "int4"})])
def test_load_and_run_write_the_same_integers_and_numbers(path, tmp_path, method, extra):
    """One compression, both ways: the same integer tensors, no DequantizeLinear with "load", and
    the same outputs (the "run" file evaluated by ONNX Runtime's plain kernels)."""
    data = feeds(16)
    models = {}
    for decode in ("run", "load"):
        out = tmp_path / f"{decode}.onnx"
        compress(path, out, config=Config(method=method, decode=decode, **extra), calib=data, val=data)
        models[decode] = onnx.load(str(out))
        onnx.checker.check_model(models[decode], full_check=True)
    ints = {d: {t.name: numpy_helper.to_array(t).tobytes() for t in m.graph.initializer
                if t.data_type in (TensorProto.INT4, TensorProto.INT8)} for d, m in models.items()}
    assert ints["run"] and ints["run"] == ints["load"]
    count = {d: sum(n.op_type == "DequantizeLinear" for n in m.graph.node) for d, m in models.items()}
    assert count["run"] > 0 and count["load"] == 0
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for f in feeds(3, seed=4):
        want = _session(models["run"], plain).run(None, f)
        for got, ref in zip(_session(models["load"]).run(None, f), want):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_a_split_table_with_quantized_factors_is_folded_whole(path, tmp_path):
    """aasvd on the embedding table, then --quantize int8 on its two factors: with "load", what ONNX
    Runtime runs after folding is the original's graph (one Gather, the same MatMuls), and the
    outputs are those of the "run" file."""
    data = feeds(16)
    files = {}
    for decode in ("run", "load"):
        files[decode] = tmp_path / f"{decode}.onnx"
        report = compress(path, files[decode], calib=data, val=data,
                          config=Config(method="aasvd", keep=0.5, include="embed", round=1, quantize="int8",
                                        latency_check=False, decode=decode))
        assert [r["layer"] for r in report.layers] == ["embed"]
        assert sorted(r["layer"] for r in report.sections["quantized"]) == ["embed/lowrank_in", "embed/lowrank_out"]
    optimized = {}
    for name, p in (("original", path), *files.items()):
        _session(onnx.load(str(p)), optimized=str(tmp_path / f"{name}.opt.onnx"))
        optimized[name] = Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.opt.onnx")).graph.node)
    assert optimized["load"] == optimized["original"]
    assert optimized["run"] != optimized["original"]
    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for f in feeds(3, seed=4):
        for got, ref in zip(_session(onnx.load(str(files["load"]))).run(None, f),
                            _session(onnx.load(str(files["run"])), plain).run(None, f)):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_product_of_constants_costs_no_flops_per_call():
    """FLOPs count what runs at every call: a MatMul of two initializers (a table formed at load)
    is left out; the MatMul reading the looked-up rows is counted."""
    from onnxcompress.core.cost import load_time, node_flops
    from onnxcompress.core.graph import GraphIndex
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((50, 4)).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "A"),
             numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["B", "A"], ["table"]),
             helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
             helper.make_node("MatMul", ["rows", "W"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    g = GraphIndex(model, {"ids": [1, 5], "B": [50, 4], "A": [4, 8], "W": [8, 3], "table": [50, 8], "rows": [1, 5, 8],
                           "y": [1, 5, 3]}, {})
    assert load_time(g) == {"A", "B", "W", "table"}
    assert node_flops(g) == {2: 2.0 * 5 * 3 * 8}


@pytest.mark.parametrize("decode", ["load", "run"])
def test_sensitivity_probes_are_measured_in_the_form_written(path, tmp_path, monkeypatch, decode):
    """A site's end-to-end probe is the model as it would be written: with "load" no probe holds
    a DequantizeLinear (ONNX Runtime would run it through its int8-activation kernel, an error the
    written file does not have); with "run" the quantized probes do."""
    from onnxcompress import sensitivity
    seen, original = [], sensitivity.output_error

    def recording(model, *args, **kwargs):
        seen.append(sum(n.op_type == "DequantizeLinear" for n in model.graph.node))
        return original(model, *args, **kwargs)
    monkeypatch.setattr(sensitivity, "output_error", recording)
    data = feeds(16)
    compress(path, tmp_path / "t.onnx", calib=data, val=data,
             config=Config(method="quant", target="cosine>=0.99", decode=decode))
    assert seen
    assert (max(seen) == 0) if decode == "load" else (max(seen) > 0)


def _albert(tmp_path):
    """ids -> Gather(E 300 x 8) -> MatMul(W 8 x 16) -> Relu -> MatMul(V 16 x 4): a table the model
    itself factorizes (ALBERT's embedding and its projection)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((300, 8)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "V")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed", axis=0),
             helper.make_node("MatMul", ["e", "W"], ["h"], name="project"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "V"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "albert", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], inits)
    path = tmp_path / "albert.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = [{"ids": rng.integers(0, 300, size=(1, 6)).astype(np.int64)} for _ in range(24)]
    return path, data


def test_a_models_own_factorized_table_is_not_formed_at_load(tmp_path):
    """Quantized, the model's own Gather(E) -> MatMul(W) reads two decoded constants, as a split
    table's lookup does; it is still the model's structure, and stays a lookup then a product (the
    session holds E and W, not their 300 x 16 product)."""
    path, data = _albert(tmp_path)
    out = tmp_path / "q.onnx"
    report = compress(path, out, config=Config(keep=1.0, quantize="int8"), calib=data, val=data)
    assert {r["layer"] for r in report.sections["quantized"]} >= {"embed", "project"}
    model = onnx.load(str(out))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "ids")
    assert next(n for n in model.graph.node if gather.output[0] in n.input).name == "project"
    assert report.flops["after"] == report.flops["before"] > 0


def test_flops_of_a_product_still_run_per_call_are_counted():
    """Not formed at load: a MatMul of two DequantizeLinear outputs (ONNX Runtime keeps
    DequantizeLinear), a MatMul behind an If whose branches read the input, and one reading an
    initializer that is also a graph input (a caller may feed it)."""
    from onnxcompress.core.cost import node_flops
    from onnxcompress.core.graph import GraphIndex
    rng = np.random.default_rng(0)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])])
    inits = [int_tensor("zc", _codes(rng, (4, 4), 8), 8), numpy_helper.from_array(np.float32(0.1), "zs"),
             numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "C"),
             numpy_helper.from_array(np.array(True), "flag"),
             numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "P")]
    nodes = [helper.make_node("DequantizeLinear", ["zc", "zs"], ["Z"]),
             helper.make_node("MatMul", ["Z", "C"], ["ZC"]),                                # 0: DQ output
             helper.make_node("If", ["flag"], ["h"], then_branch=branch, else_branch=branch),
             helper.make_node("MatMul", ["h", "C"], ["y"]),                                 # 1: If output
             helper.make_node("MatMul", ["P", "C"], ["PC"])]                                # 2: P is an input
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("P", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("ZC", "y", "PC")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    shapes = {"Z": [4, 4], "C": [4, 4], "ZC": [4, 4], "h": [2, 4], "y": [2, 4], "P": [4, 4], "PC": [4, 4]}
    assert sorted(node_flops(GraphIndex(model, shapes, {}))) == [1, 3, 4]


def test_the_splits_of_a_file_written_with_decode_run_stay_when_it_is_compressed_again(path, tmp_path):
    """A file this tool wrote with `--decode run` holds split tables under the names a split gets;
    compressed again (here only quantized), they are its own structure and stay a lookup in one
    factor, then a product by the other."""
    data = feeds(16)
    first = tmp_path / "run.onnx"
    compress(path, first, calib=data, val=data,
             config=Config(method="aasvd", keep=0.5, include="embed", round=1, latency_check=False, decode="run"))
    lookup = next(n for n in onnx.load(str(first)).graph.node if n.name == "embed/lowrank_in")
    again = tmp_path / "again.onnx"
    compress(first, again, config=Config(keep=1.0, quantize="int8"), calib=data, val=data)
    nodes = {n.name: n for n in onnx.load(str(again)).graph.node}
    assert nodes["embed/lowrank_in"].op_type == "Gather" and nodes["embed/lowrank_in"].input[1] == lookup.input[1]
    assert nodes["embed/lowrank_out"].op_type == "MatMul" and "embed/table" not in nodes


def test_below_ir_4_an_initializer_listed_as_an_input_is_a_constant():
    """Before IR 4 every initializer was also listed as a graph input, and a runtime takes it as
    a constant: a MatMul of two such initializers is formed at load (no FLOPs per call)."""
    from onnxcompress.core.cost import node_flops
    from onnxcompress.core.graph import GraphIndex
    a = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "a")
    b = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "b")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("x", "a", "b")]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["ab"]), helper.make_node("Add", ["ab", "x"], ["y"])],
                              "old", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [a, b])
    shapes = {"a": [4, 4], "b": [4, 4], "ab": [4, 4]}
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], ir_version=3)
    assert node_flops(GraphIndex(model, shapes, {})) == {}
    model.ir_version = 4
    assert node_flops(GraphIndex(model, shapes, {})) == {0: 2.0 * 4 * 4 * 4}
