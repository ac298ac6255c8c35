"""`--quantize int8|int4`: what the plan leaves is quantized on the rewritten model, from that
model's own statistics; ID-shrunk weights and low-rank factors included; the plan replays it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxcompress import Config, Plan, UsageError, compress
from onnxcompress.cli import main
from onnxcompress.methods.quant.solvers import relative_error

from checks import assert_valid_output, run, session
from test_mixed import OUT, embed_ffn, feeds


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "embed_ffn.onnx"
    onnx.save(embed_ffn(), str(p))
    return p


def dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every DequantizeLinear replaced by its float result as an initializer
    (int8 per axis or int4 in blocks, evaluated by ONNX Runtime alone): what the quantized model
    must compute, exactly."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    keep = []
    for n in g.node:
        if n.op_type != "DequantizeLinear":
            keep.append(n)
            continue
        sub = onnx.helper.make_graph([n], "dq", [], [onnx.helper.make_tensor_value_info(n.output[0], 1, None)],
                                     [inits[x] for x in n.input])
        m = onnx.helper.make_model(sub, opset_imports=out.opset_import, ir_version=out.ir_version)
        (value,) = run(m, {})
        g.initializer.append(numpy_helper.from_array(value.astype(np.float32), n.output[0]))
    del g.node[:]
    g.node.extend(keep)
    return out


def float_weights(model: onnx.ModelProto) -> dict:
    """The float matrices that a MatMul, Gemm or Gather reads directly (not through a
    DequantizeLinear)."""
    read = {x for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Gather") for x in n.input}
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name in read and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}


@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4)])
def test_id_plan_then_quantize_stores_every_shrunk_weight_as_integers(path, tmp_path, name, bits):
    report = compress(path, tmp_path / "q.onnx", config=Config(keep=0.5, quantize=name, decode="run"),
                      calib=feeds(40), val=feeds(8, seed=5))
    out = onnx.load(str(tmp_path / "q.onnx"))
    # structure: no 2-D float weight is left; each layer reads a DequantizeLinear of its width
    assert float_weights(out) == {}
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 3
    rows = {r["layer"]: r for r in report.sections["quantized"]}
    assert set(rows) == {"fc1", "fc2", "embed"} and all(r["after"] and r["bits"] == bits for r in rows.values())
    ints = {t.name: t for t in out.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)}
    shapes = sorted(tuple(t.dims) for t in ints.values())
    kept = report.groups[0]["kept"]
    assert kept == 32  # the duplicated hidden units go
    assert shapes == sorted([(16, kept), (kept, OUT), (64, OUT)])
    if bits == 4:
        assert max(o.version for o in out.opset_import if o.domain == "") >= 21
    # numbers: the integers times their scales are what the model computes ...
    for f in feeds(3, seed=7):
        np.testing.assert_allclose(run(out, f)[0], run(dequantized(out), f)[0], rtol=1e-5, atol=1e-5)
    # ... and close to the unquantized ID model's outputs
    compress(path, tmp_path / "id.onnx", config=Config(keep=0.5), calib=feeds(40), val=feeds(8, seed=5))
    f = feeds(1, seed=9)[0]
    a, b = run(str(tmp_path / "id.onnx"), f)[0], run(out, f)[0]
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < (0.02 if bits == 8 else 0.3)
    assert_valid_output(path, tmp_path / "q.onnx", feeds(2, seed=3))


def test_split_factors_are_quantized_against_the_rewritten_models_gram(path, tmp_path):
    """The stage's error figure for a factor is tr(D G' D^T) / tr(W G' W^T) with G' the Gram of
    that factor's input in the rewritten model, recomputed here by running the split model."""
    cfg = Config(method="aasvd", keep=0.3, quantize="int8", latency_check=False, round=1, decode="run")
    report = compress(path, tmp_path / "q.onnx", config=cfg, calib=feeds(40), val=feeds(8, seed=5))
    split = [r for r in report.layers]
    assert split, "the low-rank stage split nothing"
    compress(path, tmp_path / "s.onnx", config=Config(method="aasvd", keep=0.3, latency_check=False, round=1),
             calib=feeds(40), val=feeds(8, seed=5))
    s = onnx.load(str(tmp_path / "s.onnx"))
    weights = float_weights(s)
    matmuls = [n for n in s.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
    assert len(matmuls) > 3  # factors of the split layers
    rows = {r["layer"]: r for r in report.sections["quantized"]}
    checked = 0
    for node in matmuls:
        if node.name not in rows or node.op_type != "MatMul":
            continue
        # the factor's input, streamed through the split model on the calibration feeds
        probe = onnx.ModelProto()
        probe.CopyFrom(s)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(node.input[0], 1, None))
        sess = session(probe)
        z = np.concatenate([sess.run([node.input[0]], f)[0].reshape(-1, weights[node.input[1]].shape[0])
                            for f in feeds(40)]).astype(np.float64)
        gram = z.T @ z
        w = weights[node.input[1]].T.astype(np.float64)       # out x in
        q = onnx.load(str(tmp_path / "q.onnx"))
        deq = float_weights(dequantized(q))
        name = next(k for k in deq if k.startswith(node.input[1]))
        d = deq[name].T.astype(np.float64)
        assert rows[node.name]["error"] == pytest.approx(np.sqrt(relative_error(w, d, gram)), rel=1e-3, abs=1e-7)
        checked += 1
    assert checked >= 2


def test_quantize_plan_round_trips(path, tmp_path):
    plan_file = tmp_path / "plan.json"
    assert main([str(path), str(tmp_path / "a.onnx"), "--calib", str(_npz(tmp_path, 40)), "--keep", "0.5",
                 "--quantize", "int4", "--save-plan", str(plan_file), "-q"], standalone_mode=False) is None
    d = json.loads(plan_file.read_text())
    late = [e for e in d["entries"] if e.get("after")]
    assert len(late) == 3 and {e["method"] for e in late} == {"quant"}
    assert main([str(path), str(tmp_path / "b.onnx"), "--calib", str(_npz(tmp_path, 40)), "--plan", str(plan_file),
                 "-q"], standalone_mode=False) is None
    for f in feeds(3, seed=11):
        np.testing.assert_array_equal(run(str(tmp_path / "a.onnx"), f)[0], run(str(tmp_path / "b.onnx"), f)[0])
    # a plan whose quantized layer is not in the rewritten model is refused, naming it
    d["entries"] = [e for e in d["entries"] if e["method"] != "id"]
    plan_file.write_text(json.dumps(d))
    with pytest.raises(UsageError, match="quantized layer"):
        compress(path, tmp_path / "c.onnx", plan=Plan.load(plan_file), val=feeds(4))


def test_target_search_quantizes_every_probe(path, tmp_path):
    report = compress(path, tmp_path / "t.onnx", config=Config(target="cosine>=0.99", quantize="int8"),
                      calib=feeds(40), val=feeds(8, seed=5))
    out = onnx.load(str(tmp_path / "t.onnx"))
    assert float_weights(out) == {}
    assert report.allocation["probes"]
    assert min(a["cosine"] for a in report.to_dict()["agreement"]) >= 0.99
    assert all(r["after"] for r in report.sections["quantized"])
    assert report.seconds.get("quantize", 0) > 0


def test_usage_errors(path, tmp_path):
    with pytest.raises(UsageError, match="--quantize.*--method quant"):
        Config(method="quant", quantize="int8")
    with pytest.raises(UsageError, match="--quantize must be one of"):
        Config(quantize="int2")
    report = compress(path, tmp_path / "a.onnx", config=Config(keep=0.5, quantize="int8"), calib=feeds(20))
    with pytest.raises(UsageError, match="--quantize contradicts"):
        compress(path, tmp_path / "b.onnx", config=Config(quantize="int8"), plan=report.plan, val=feeds(4))


def _npz(tmp_path, n: int):
    p = tmp_path / f"calib{n}.npz"
    if not p.exists():
        fs = feeds(n)
        np.savez(p, **{k: np.concatenate([f[k] for f in fs]) for k in fs[0]})
    return p
