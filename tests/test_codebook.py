"""Product-quantized embedding tables (methods/quant/codebook.py): weighted k-means against brute
force, the stored format through ONNX Runtime (and OpenVINO when installed), and plans with
codebook entries that replay."""
from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Config, Plan, compress
from onnxcompress.api import shapes_at
from onnxcompress.core.graph import GraphIndex
from onnxcompress.methods.lowrank.layers import find_layers
from onnxcompress.methods.quant import QuantMethod, QuantPlan, codebook, storage
from onnxcompress.methods.quant import solvers as qs

from checks import run

PQ4 = qs.Format(8, dim=4)
PQ3 = qs.Format(8, dim=3)  # the one the method offers


def _best_1d(x, w, k):
    """Optimal weighted k-means in one dimension: the clusters are runs of the sorted points."""
    order = np.argsort(x)
    xs, ws = x[order], w[order]
    best = np.inf
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        err = 0.0
        for a, b in zip((0, *cuts), (*cuts, len(xs))):
            c = np.sum(ws[a:b] * xs[a:b]) / np.sum(ws[a:b])
            err += np.sum(ws[a:b] * (xs[a:b] - c) ** 2)
        best = min(best, err)
    return best


def test_weighted_kmeans_reaches_the_brute_force_optimum_and_is_a_fixed_point():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 5), rng.normal(6, 0.5, 4), [20.0]])
    w = rng.uniform(0.1, 3, len(x))
    best = _best_1d(x, w, 3)
    errors = []
    for seed in range(8):
        centres, labels = codebook.kmeans(x[:, None], w, 3, seed=seed)
        assert np.array_equal(labels, np.argmin((x[:, None] - centres[:, 0]) ** 2, axis=1))  # nearest
        for c in range(3):
            if np.any(labels == c):
                np.testing.assert_allclose(centres[c, 0], np.average(x[labels == c], weights=w[labels == c]))
        errors.append(np.sum(w * (x - centres[labels, 0]) ** 2))
    assert min(errors) == pytest.approx(best, rel=1e-12)
    assert min(errors) < np.sum(w * (x - np.average(x, weights=w)) ** 2)


def test_product_quantize_error_codes_and_exact_cases():
    rng = np.random.default_rng(1)
    E = rng.standard_normal((300, 8))
    counts = rng.integers(0, 5, 300).astype(float)
    q = codebook.product_quantize(E, counts, PQ4)
    assert q.codes.shape == (300, 2) and q.codes.dtype == np.uint8 and q.scales.shape == (512, 4)
    np.testing.assert_array_equal(q.dequantized, codebook.decode(q.codes, q.scales, 4))
    from onnxcompress.methods.lowrank.solvers import token_weights
    w = token_weights(counts)
    want = np.sum(w[:, None] * (E - q.dequantized) ** 2) / np.sum(w[:, None] * E ** 2)
    assert q.error == pytest.approx(want) and 0 < q.error < 0.5
    # every row takes its nearest codeword in each subspace
    for j in range(2):
        books = q.scales[j * 256:(j + 1) * 256]
        d2 = ((E[:, None, 4 * j:4 * j + 4] - books[None]) ** 2).sum(-1)
        np.testing.assert_allclose(d2[np.arange(300), q.codes[:, j]], d2.min(1))
    # at most 256 distinct sub-vectors: exact
    small = np.repeat(rng.standard_normal((100, 8)), 3, axis=0)
    assert codebook.product_quantize(small, np.ones(300), PQ4).error == pytest.approx(0, abs=1e-20)
    with pytest.raises(ValueError):
        codebook.product_quantize(E, counts, qs.Format(8, dim=3))  # 3 does not tile 8


def _table_model(vocab=300, d=8, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.standard_normal((vocab, d)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 9])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 9, d])
    graph = helper.make_graph([helper.make_node("Gather", ["w", "ids"], ["y"], name="emb", axis=0)], "t", [ids], [y],
                              [numpy_helper.from_array(E, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, {"ids": rng.integers(0, vocab, (2, 9)).astype(np.int64)}


def test_stored_codebook_runs_in_onnx_runtime_as_the_decoded_table():
    model, feed = _table_model()
    g = GraphIndex(model, *shapes_at(model, feed))
    layer = find_layers(g).layers[0]
    q = codebook.product_quantize(g.const(layer.weight), np.ones(300), PQ4)
    new = storage.store(model, layer, q)
    onnx.checker.check_model(new, full_check=True)
    assert storage.model_opset(new) == 17 and "w" not in {t.name for t in new.graph.initializer}
    assert [n.op_type for n in new.graph.node] == ["Cast", "Add", "Gather", "Reshape", "Gather"]
    codes = next(t for t in new.graph.initializer if t.data_type == TensorProto.UINT8)
    assert tuple(codes.dims) == (300, 2)
    got = run(new, feed)[0]
    np.testing.assert_array_equal(got, q.dequantized.astype(np.float32)[feed["ids"]])
    books = next(t for t in new.graph.initializer if t.data_type == TensorProto.FLOAT)
    assert len(codes.raw_data) + len(books.raw_data) == PQ4.bytes(300, 8) == 300 * 2 + 2 * 256 * 4 * 4
    ov = pytest.importorskip("openvino")
    compiled = ov.Core().compile_model(ov.Core().read_model(new.SerializeToString(), b""), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    np.testing.assert_allclose(compiled(feed)[0], got, rtol=1e-6, atol=1e-6)


def _embed_mlp(vocab=4096, d=12, seed=0):
    """y = MatMul(Gather(E: vocab x d, ids), W: d x 16): a table large enough for a codebook."""
    rng = np.random.default_rng(seed)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 16])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="emb", axis=0),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, d)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((d, 16)).astype(np.float32), "W")]
    model = helper.make_model(helper.make_graph(nodes, "embed_mlp", [ids], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(n, vocab=4096, seed=1):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, vocab // 2, (4, 6)).astype(np.int64)} for _ in range(n)]


def test_the_method_offers_codebooks_for_large_tables_only():
    g = GraphIndex(_embed_mlp())
    m = QuantMethod()
    layers = {s.target.kind: s.target for s in m.sites(g, Config(method="quant"))[0]}
    assert PQ3 in m.formats(g, layers["gather"])
    assert not any(f.dim for f in m.formats(g, layers["matmul"]))
    small = GraphIndex(_embed_mlp(vocab=2000))
    table = next(s.target for s in m.sites(small, Config(method="quant"))[0] if s.target.kind == "gather")
    assert not any(f.dim for f in m.formats(small, table))


def test_a_plan_with_a_codebook_entry_replays_exactly(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_embed_mlp(), str(path))
    data = _feeds(8)
    first = compress(path, tmp_path / "a.onnx", config=Config(method="quant", size_target=0.17), calib=data, val=data)
    entries = [e for e in first.plan.entries if isinstance(e, QuantPlan) and e.dim]
    assert len(entries) == 1 and entries[0].layer == "emb"
    row = next(r for r in first.sections["quantized"] if r["layer"] == "emb")
    assert row["format"] == "pq8/d3" and row["bytes_before"] == 4096 * 12 * 4
    assert row["bytes_after"] == 4096 * 4 + 4 * 256 * 3 * 4
    plan_file = tmp_path / "plan.json"
    first.plan.save(plan_file)
    saved = json.loads(plan_file.read_text())
    assert any(e.get("dim") == 3 for e in saved["entries"])
    compress(path, tmp_path / "b.onnx", plan=Plan.load(plan_file), calib=data, val=data)
    onnx.checker.check_model(str(tmp_path / "b.onnx"), full_check=True)
    for a, b in zip(run(tmp_path / "a.onnx", data[0]), run(tmp_path / "b.onnx", data[0])):
        np.testing.assert_array_equal(a, b)
    bad = json.loads(plan_file.read_text())
    for e in bad["entries"]:
        if e.get("dim"):
            e["scales"]["shape"] = [e["scales"]["shape"][0] // 2, e["scales"]["shape"][1] * 2]
    plan_file.write_text(json.dumps(bad))
    from onnxcompress import UsageError
    with pytest.raises(UsageError, match="codebooks"):
        compress(path, tmp_path / "c.onnx", plan=Plan.load(plan_file), calib=data, val=data)


def embed_two_layers(vocab=8192, d=48, seed=0) -> onnx.ModelProto:
    """y = MatMul(MatMul(Gather(E: vocab x d, ids), W1: d x 64), W2: 64 x 16). At its smallest the
    quant method stores E as a codebook (pq8/d3) and W2 in one block of 64 with a float16 scale."""
    rng = np.random.default_rng(seed)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 16])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="emb", axis=0),
             helper.make_node("MatMul", ["h", "W1"], ["h1"], name="fc1"),
             helper.make_node("MatMul", ["h1", "W2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, d)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((d, 64)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "W2")]
    model = helper.make_model(helper.make_graph(nodes, "embed_two", [ids], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_at_its_smallest_a_codebook_table_and_float16_scales(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(embed_two_layers(), str(path))
    data = _feeds(8, vocab=8192)
    report = compress(path, tmp_path / "a.onnx", config=Config(method="quant", size_target=0.115), calib=data, val=data)
    formats = {r["layer"]: r["format"] for r in report.sections["quantized"]}
    assert formats["emb"] == "pq8/d3" and formats["fc2"] == "int4/b64/f16"
    onnx.checker.check_model(str(tmp_path / "a.onnx"), full_check=True)
    assert report.agreement[0]["cosine"] > 0.9
