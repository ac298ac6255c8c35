"""Weights kept on disk (core/weights.py) and statistics taken a block of groups at a time
(blocks.py): a model with external data is read through memory maps and gives the same results
as the same model held in memory; block-by-block calibration gives the same model as one pass."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

import graphs
from checks import kept, run
from onnxcompress import Config, compress
from onnxcompress import blocks
from onnxcompress.core import weights
from onnxcompress.core.graph import GraphIndex
from onnxcompress.core.modelio import load_model, save_model
from onnxcompress.core.runtime import make_session


def external_copy(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Save `model` with every initializer in `name`.data (the way large models come)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=0)
    return path


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(n)]


def test_external_weights_are_mapped_not_read(tmp_path):
    model = graphs.mlp()
    path = external_copy(model, tmp_path)
    loaded = load_model(path)
    g = GraphIndex(loaded)
    for t in model.graph.initializer:
        lazy = next(x for x in loaded.graph.initializer if x.name == t.name)
        assert weights.is_external(lazy) and not lazy.raw_data
        assert Path(weights.fields(lazy)["location"]).is_absolute()
        value = g.const(t.name)
        assert isinstance(value, np.memmap) and not value.flags.writeable
        np.testing.assert_array_equal(value, onnx.numpy_helper.to_array(t))


def test_session_of_a_mapped_model_matches_the_model_in_memory(tmp_path):
    model = graphs.mlp()
    loaded = load_model(external_copy(model, tmp_path))
    feed = feeds(1, 0)[0]
    out = [o.name for o in model.graph.output]
    expected = make_session(model).run(out, feed)
    got = make_session(loaded).run(out, feed)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_only_keeps_the_nodes_the_asked_tensors_need(tmp_path):
    model = graphs.mlp()
    first = model.graph.node[0]
    session = make_session(load_model(external_copy(model, tmp_path)), [first.output[0]], only=True)
    assert [o.name for o in session.get_outputs()] == [first.output[0]]
    full = make_session(model, [first.output[0]])
    feed = feeds(1, 1)[0]
    np.testing.assert_array_equal(session.run(None, feed)[0], full.run([first.output[0]], feed)[0])


def test_spill_and_save_stream_the_weights(tmp_path):
    model = graphs.mlp()
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    moved = weights.spill(model, tmp_path / "scratch.data", threshold=0)
    assert moved >= sum(v.nbytes for v in values.values())
    assert all(weights.is_external(t) for t in model.graph.initializer)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    weights.save(model, out, "m.onnx.data", threshold=0)
    onnx.checker.check_model(str(out), full_check=True)
    back = onnx.load(str(out))  # onnx reads the external data itself
    for t in back.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), values[t.name])
    offsets = [int(weights.fields(t)["offset"]) for t in onnx.load(str(out), load_external_data=False).graph.initializer]
    assert all(o % weights.ALIGN == 0 for o in offsets)


def test_small_model_with_external_data_is_written_as_one_file(tmp_path):
    loaded = load_model(external_copy(graphs.mlp(), tmp_path / "in"))
    written = save_model(loaded, tmp_path / "out.onnx")
    assert written == [tmp_path / "out.onnx"]
    assert not any(weights.is_external(t) for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer)


def test_compressing_a_mapped_model_equals_compressing_it_in_memory(tmp_path):
    model = graphs.gelu_ffn()
    inline = tmp_path / "inline.onnx"
    onnx.save(model, str(inline))
    external = external_copy(model, tmp_path / "ext")
    before = digest(external, external.with_name("model.onnx.data"))
    rng = np.random.default_rng(2)
    calib, val = ([{"x": rng.standard_normal((2, 8, 16)).astype(np.float32)} for _ in range(n)] for n in (6, 2))
    a = compress(inline, tmp_path / "a.onnx", config=Config(keep=0.5), calib=calib, val=val)
    b = compress(external, tmp_path / "b.onnx", config=Config(keep=0.5), calib=calib, val=val)
    assert kept(a) == kept(b) and kept(a)
    assert [e.keep for e in a.plan.entries] == [e.keep for e in b.plan.entries]
    for x, y in zip(run(tmp_path / "a.onnx", val[0]), run(tmp_path / "b.onnx", val[0])):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert digest(external, external.with_name("model.onnx.data")) == before  # the input is never written


def test_block_by_block_calibration_equals_one_pass(tmp_path, monkeypatch):
    src = tmp_path / "many.onnx"
    onnx.save(graphs.parallel_mlps(6, 32), str(src))
    x = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    one = compress(src, tmp_path / "one.onnx", config=Config(keep=0.5), calib={"x": x})
    monkeypatch.setattr(blocks, "budget", lambda config: 2 * 8 * 32 * 32)  # two 32-wide Grams a pass
    many = compress(src, tmp_path / "blocks.onnx", config=Config(keep=0.5), calib={"x": x})
    assert many.data["calibration_passes"] == 3 and "calibration_passes" not in one.data
    assert kept(many) == kept(one) and len(kept(one)) == 6
    for e1, e2 in zip(one.plan.entries, many.plan.entries):
        assert e1.keep == e2.keep
        for k in e1.interpolation:
            np.testing.assert_allclose(e1.interpolation[k], e2.interpolation[k], rtol=1e-9, atol=1e-12)
    val = {"x": x[:8]}
    for a, b in zip(run(tmp_path / "one.onnx", val), run(tmp_path / "blocks.onnx", val)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@dataclass(frozen=True)
class _Req:
    width: int


class _Method:
    def requests(self, site):
        return [_Req(site.width)]


@dataclass(frozen=True)
class _Site:
    key: str
    claims: frozenset
    width: int = 16
    method: str = "m"


def test_partition_packs_to_the_budget_and_keeps_sharing_sites_together():
    sites = [_Site("a", frozenset({"w1"})), _Site("b", frozenset({"w2"})), _Site("c", frozenset({"w3", "w1"})),
             _Site("d", frozenset({"w4"})), _Site("big", frozenset({"w5"}), width=64)]
    one = 8 * 16 * 16
    found = blocks.partition(sites, {"m": _Method()}, 2 * one)
    keys = [[[s.key for s in c] for c in b] for b in found]
    assert keys == [[["a", "c"]], [["b"], ["d"]], [["big"]]]  # a and c edit w1: one cluster; the big one alone
    assert [[s.key for s in c] for c in blocks.partition(sites, {"m": _Method()}, 10**9)[0]] == \
        [["a", "c"], ["b"], ["d"], ["big"]]



def test_unsorted_model_with_external_data_is_checked_sorted_and_loads(tmp_path):
    model = graphs.mlp()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = external_copy(model, tmp_path)
    loaded = load_model(path)
    assert [n.name for n in loaded.graph.node] == [n.name for n in nodes]  # normalize sorts them later
    assert all(weights.is_external(t) for t in loaded.graph.initializer)
