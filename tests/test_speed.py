"""Hardware-friendly sizes (`--round`), the latency model's structure and its use by the
allocator (`--minimize latency`, `--latency-target`, slower splits dropped), `--benchmark`'s
report section, and FLOPs per sample. No test times anything: the latency model's probes are
costed by a deterministic function here (see conftest.py), and `--benchmark` figures are only
checked for their structure."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import Config, compress, latency
from onnxcompress.benchmark import one_sample
from onnxcompress.cli import main
from onnxcompress.core.data import InputSpec
from onnxcompress.core.graph import GraphIndex
from onnxcompress.methods import rounding

from checks import reasons

RNG = np.random.default_rng(7)


def _model(nodes, inputs, inits) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return onnx.shape_inference.infer_shapes(m)


def wide_mlp(hidden=(40, 6)) -> tuple[onnx.ModelProto, list[dict]]:
    """x[N,16] -> Gemm h1 -> Relu -> Gemm h2 -> Relu -> Gemm 4; inputs in a 10-dim subspace."""
    h1, h2 = hidden
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="fc1", transB=1),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["c"], name="fc2", transB=1),
             helper.make_node("Relu", ["c"], ["s"]),
             helper.make_node("Gemm", ["s", "w3", "b3"], ["y"], name="fc3", transB=1)]
    inits = {"w1": RNG.standard_normal((h1, 16)) / 4, "b1": RNG.standard_normal(h1) * 0.1,
             "w2": RNG.standard_normal((h2, h1)) / 6, "b2": RNG.standard_normal(h2) * 0.1,
             "w3": RNG.standard_normal((4, h2)) / 3, "b3": np.zeros(4)}
    basis = RNG.standard_normal((10, 16))
    data = (RNG.standard_normal((96, 10)) @ basis).astype(np.float32)
    return _model(nodes, [("x", ["N", 16])], inits), data


def conv_chain() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv 24 3x3 -> Relu -> depthwise 3x3 -> Relu -> Conv 4 1x1."""
    nodes = [helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "dw"], ["d"], name="dw", group=24, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["d"], ["s"]),
             helper.make_node("Conv", ["s", "c2"], ["y"], name="conv2")]
    inits = {"c1": RNG.standard_normal((24, 3, 3, 3)) / 3, "c1b": RNG.standard_normal(24) * 0.1,
             "dw": RNG.standard_normal((24, 1, 3, 3)) / 3, "c2": RNG.standard_normal((4, 24, 1, 1)) / 5}
    return _model(nodes, [("x", ["N", 3, 8, 8])], inits)


def _npz(tmp_path, name, x):
    p = tmp_path / f"{name}.npz"
    np.savez(p, x=x)
    return p


def _save(tmp_path, m, name="m.onnx"):
    p = tmp_path / name
    onnx.save(m, str(p))
    return p


# ------------------------------------------------------------------------------------------
# rounding


def test_grid_takes_multiples_above_the_floor_and_always_index_0():
    sizes = np.arange(40, 0, -1)          # an ID curve: index j keeps 40 - j
    steps = rounding.grid(sizes, 8, floor=10)
    assert steps[0] == 0
    assert sizes[steps[1:]].tolist() == [32, 24, 16]     # 8 is below the floor
    assert rounding.grid(sizes, 64, floor=1).tolist() == [0]


def test_rules_round_and_narrow_sites_keep_their_width():
    assert rounding.keep_size(0.75 * 40, 40, 8) == 32      # 30 -> nearest multiple of 8
    assert rounding.keep_size(0.5 * 40, 40, 16) == 16      # 20 -> 16
    assert rounding.keep_size(0.75 * 6, 6, 8) == 6         # narrower than N: unrounded, whole
    assert rounding.keep_size(0.1 * 40, 40, 8) == 8        # never below N
    assert rounding.at_least(17, 40, 8) == 24              # tolerance rounds up
    assert rounding.at_least(37, 40, 8) == 40              # up to the full width
    assert rounding.keep_size(0.75 * 40, 40, 1) == 30      # --round 1: as before


def test_keep_rounds_id_widths_and_keeps_a_narrow_group_whole(tmp_path):
    m, data = wide_mlp((40, 6))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(keep=0.75, round=8),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    kept = {g["group"]: (g["kept"], g["channels"]) for g in report.groups}
    assert kept["fc1"] == (32, 40)
    assert kept["fc2"] == (6, 6)
    base = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx", config=Config(keep=0.75, round=1),
                    calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert {g["group"]: g["kept"] for g in base.groups} == {"fc1": 30, "fc2": 4}


@pytest.mark.parametrize("rule", [{"flops_target": 0.6}, {"params_target": 0.6}])
def test_budget_walk_steps_by_the_multiple(tmp_path, rule):
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(round=8, **rule),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    widths = [g["kept"] for g in report.groups]
    assert widths and all(k % 8 == 0 for k in widths)
    metric = "flops" if "flops_target" in rule else "params"
    assert report.allocation["reached"] <= 0.6 + 1e-9
    d = getattr(report, metric)
    assert d["after"] / d["before"] <= 0.6 + 1e-9


def test_conv_group_with_depthwise_rounds_every_member(tmp_path):
    m = conv_chain()
    x = RNG.standard_normal((48, 3, 8, 8)).astype(np.float32)
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(keep=0.5, round=8), calib=_npz(tmp_path, 'c', x[:32]), val=_npz(tmp_path, 'v', x[32:]))
    assert [(g["kept"], g["channels"]) for g in report.groups] == [(16, 24)]   # 12 -> 16 (ties round up)
    out = onnx.load(str(tmp_path / "o.onnx"))
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 16


def test_lowrank_ranks_are_multiples(tmp_path):
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(method="svd", keep=0.6, round=4),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert report.layers
    assert all(x["rank"] % 4 == 0 for x in report.layers)
    many = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx", config=Config(method="svd", keep=0.6, round=64),
                    calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert not many.layers                                  # no multiple of 64 makes any layer smaller
    assert any("--round" in r for r in reasons(many).values())


def test_round_is_checked():
    with pytest.raises(Exception, match="round"):
        Config(round=0)
    with pytest.raises(Exception, match="latency-target"):
        Config(latency_target=1.5)


def test_cli_refuses_round_zero(tmp_path):
    from click.testing import CliRunner
    m, _ = wide_mlp()
    result = CliRunner().invoke(main, [str(_save(tmp_path, m)), "--round", "0"])
    assert result.exit_code == 2


# ------------------------------------------------------------------------------------------
# latency model


def _graph(m, feed):
    from onnxcompress.api import shapes_at
    return GraphIndex(m, *shapes_at(m, feed))


def test_probes_are_the_nodes_at_their_widths_and_run():
    m = conv_chain()
    g = _graph(m, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    conv1 = g.index_of("conv1")
    full, narrow = latency.node_probe(g, conv1), latency.node_probe(g, conv1, w_out=8)
    assert full.nodes[0][2][0] == (24, 3, 3, 3) and narrow.nodes[0][2][0] == (8, 3, 3, 3)
    dw = latency.node_probe(g, g.index_of("dw"), w_out=8)
    assert dict(dw.nodes[0][1])["group"] == 8 and dw.shape == (1, 8, 8, 8)
    split = latency.node_probe(g, conv1, rank=4)
    assert [w for _, _, ws in split.nodes for w in ws] == [(4, 3, 3, 3), (24, 4, 1, 1)]
    for probe, channels in ((full, 24), (narrow, 8), (dw, 8), (split, 24)):
        sess = ort.InferenceSession(latency.build(probe).SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.zeros(probe.shape, np.float32)})[0]
        assert y.shape == (1, channels, 8, 8)


def test_timings_are_cached_per_probe(tmp_path):
    calls = []
    t = latency.Timings(1, timer=lambda p, threads: calls.append(p) or 1.0)
    probe = latency.Probe((2, 3), (("MatMul", (), ((3, 4),)),))
    assert t(probe) == t(probe) == 1.0
    assert len(calls) == 1
    disk = latency.Timings(1, cache_dir=tmp_path)
    disk.values["1|" + probe.key()] = 2.5
    disk.measured = 1
    disk.save()
    assert latency.Timings(1, cache_dir=tmp_path)(probe) == 2.5
    assert latency.Timings(2, cache_dir=tmp_path).values.get("2|" + probe.key()) is None


def _each(timer):
    """A `latency.time_probes` that times each probe with `timer(probe, threads)`."""
    return lambda probes, threads: [timer(p, threads) for p in probes]


def _overhead_timer(probe, threads):
    """Per node a fixed overhead plus its weights: a split (two nodes) is slower than its layer
    unless the rank is small."""
    return sum(1000.0 + float(np.prod(w)) for _, _, ws in probe.nodes for w in ws)


def test_slower_splits_are_dropped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(method="svd", keep=0.9),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    why = reasons(report)
    assert not report.layers
    assert all("latency: the split at rank" in why[k] for k in ("fc1", "fc2"))
    off = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx", config=Config(method="svd", keep=0.9, latency_check=False),
                   calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert {x["layer"] for x in off.layers} >= {"fc1", "fc2"}


def test_a_split_slower_on_all_cores_is_dropped_too(tmp_path, monkeypatch):
    """On one thread the split is faster (weights only); on all cores each node pays a fixed
    overhead, so the two-node split is slower there: the check refuses it, naming the threads."""
    def timer(probe, threads):
        cost = sum(float(np.prod(w)) for _, _, ws in probe.nodes for w in ws)
        return cost + (0.0 if threads == 1 else 5000.0 * len(probe.nodes))

    monkeypatch.setattr(latency, "time_probes", _each(timer))
    monkeypatch.setattr(latency.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(latency, "CACHE_DIR", tmp_path / "cache")
    m, data = wide_mlp((40, 24))
    cfg = Config(method="svd", keep=0.5, round=1)
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=cfg,
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    why = reasons(report)
    assert not report.layers
    assert all("(4 threads)" in why[k] for k in ("fc1", "fc2"))
    monkeypatch.setattr(latency.os, "cpu_count", lambda: 1)  # one core: only the one-thread timing counts
    single = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx", config=cfg,
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert {x["layer"] for x in single.layers} >= {"fc1", "fc2"}


def test_latency_items_scale_with_the_timed_widths():
    m, data = wide_mlp((40, 24))
    g = _graph(m, {"x": data[:1]})
    from onnxcompress.methods.id import IdMethod
    method = IdMethod()
    sites, _ = method.sites(g, Config())
    from onnxcompress.methods.base import Curve
    site = next(s for s in sites if s.key == "fc1")
    sizes = np.arange(40, 0, -1)
    curve = Curve(site, sizes, np.zeros(40), (), None, np.arange(0, 40, 8), 8)
    items = latency.id_costs(g, curve, latency.Timings(1, timer=lambda p, t: _overhead_timer(p, t)))
    by = {c.item: c for c in items}
    assert set(by) == {"fc1", "fc2"}                      # the producer's rows, the consumer's columns
    assert by["fc1"].base == pytest.approx(1000 + 40 * 16)
    assert by["fc1"].factor[0] == pytest.approx(1.0)
    assert by["fc1"].factor[8] == pytest.approx((1000 + 32 * 16) / (1000 + 40 * 16))
    assert by["fc2"].factor[16] == pytest.approx((1000 + 24 * 24) / (1000 + 24 * 40))


def test_latency_items_of_a_concat_group_time_each_producer_at_its_own_window():
    """conv_a (8) and conv_b (6) meet at a Concat read by the head: at a size where the
    selection keeps 6 of conv_a's channels and 1 of conv_b's, conv_a is timed with 6 outputs and
    conv_b with 1, not both with the group's 7; the head reads all 7."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    sys.path.insert(0, str(Path(__file__).parent))
    import graphs
    from onnxcompress.core.normalize import normalize
    from onnxcompress.methods.base import Curve
    from onnxcompress.methods.id import IdMethod
    m = normalize(graphs.concat_neck(se=False))
    g = _graph(m, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    site = next(s for s in IdMethod().sites(g, Config())[0] if "conv_a" in s.target.producers)
    sizes = np.arange(14, 0, -1)
    shares = {(0, 8): np.clip(sizes - 1, 1, 8) / 8, (8, 6): np.clip(sizes - 8 + 1, 1, 6) / 6}
    shares[(0, 8)][sizes == 7], shares[(8, 6)][sizes == 7] = 6 / 8, 1 / 6
    curve = Curve(site, sizes, np.zeros(14), (), SimpleNamespace(windows=shares), np.array([0, 7]), 1)
    seen = []
    latency.id_costs(g, curve, latency.Timings(1, timer=lambda p, t: seen.append(p) or _overhead_timer(p, t)))
    widths = {p.nodes[0][2][0][:2] for p in seen}
    assert (6, 3) in widths and (1, 3) in widths            # conv_a at 6 outputs, conv_b at 1
    assert (4, 7) in widths                                 # the head reads the 7 kept channels
    assert (7, 3) not in widths


def test_latency_target_and_minimize_latency(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(latency_target=0.8, round=1),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    a = report.allocation
    assert a["metric"] == "latency"
    # measured: the written model is the least compressed probe timed within the target (the
    # tests' stand-in timing is the weights' element count, conftest)
    assert a["measured_latency"] <= 0.8 and 1 <= len(a["latency_probes"]) <= 5
    chosen = next(p for p in a["latency_probes"] if p["measured"] == a["measured_latency"])
    assert chosen["passed"] and chosen["position"] == min(p["position"] for p in a["latency_probes"] if p["passed"])
    # a closed search timed a position just before the cut, over the target
    assert a["search_closed"] and any(not p["passed"] and (p["position"] == chosen["position"] - 1
                                                           or p["estimated"] - chosen["estimated"] < 0.01)
                                      for p in a["latency_probes"])
    written = sum(np.prod(t.dims) for t in onnx.load(tmp_path / "o.onnx").graph.initializer)
    assert written / sum(np.prod(t.dims) for t in m.graph.initializer) == pytest.approx(a["measured_latency"])
    assert any(g["kept"] < g["channels"] for g in report.groups)
    table = report.table()
    assert "timings against the original" in table
    assert sum("(written)" in line for line in table.splitlines()) == 1
    # --no-latency-check: the estimate alone decides, as for the other budgets
    alone = compress(_save(tmp_path, m, "c.onnx"), tmp_path / "q.onnx",
                     config=Config(latency_target=0.8, round=1, latency_check=False),
                     calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert alone.allocation["reached"] <= 0.8 + 1e-9 and "latency_probes" not in alone.allocation
    target = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx",
                      config=Config(target="cosine>=0.9", minimize="latency", method="id"),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert target.allocation["metric"] == "latency"
    assert all("latency" in p["cost"] for p in target.allocation["probes"])
    table = target.table()   # the terminal summary shows the estimated latency of every probe
    lines = table.splitlines()
    at = next(k for k, line in enumerate(lines) if "est. err" in line)
    assert "latency" in lines[at]
    first = lines[at + 1]
    assert f"{target.allocation['probes'][0]['cost']['latency']:.1%}" in first


# ------------------------------------------------------------------------------------------
# FLOPs per sample, --benchmark


def test_one_sample_cuts_dynamic_batch_only():
    specs = [InputSpec("x", np.dtype(np.float32), (None, 4)), InputSpec("k", np.dtype(np.float32), (3, 4))]
    feed = {"x": np.zeros((5, 4), np.float32), "k": np.zeros((3, 4), np.float32)}
    cut = one_sample(feed, specs)
    assert cut["x"].shape == (1, 4) and cut["k"].shape == (3, 4)
    assert one_sample({"x": feed["x"][:1], "k": feed["k"]}, specs)["x"].shape == (1, 4)


def test_report_flops_do_not_depend_on_batching(tmp_path):
    m, data = wide_mlp((40, 24))
    p = _save(tmp_path, m)
    figures = []
    for batch in (4, 32):
        r = compress(p, tmp_path / f"o{batch}.onnx", config=Config(keep=0.5, batch_size=batch), calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
        figures.append((r.flops["before"], r.flops["after"], r.flops["at_input_shapes"]["x"]))
    assert figures[0] == figures[1]
    assert figures[0][2] == [1, 16]
    assert figures[0][0] == 2 * (16 * 40 + 40 * 24 + 24 * 4)


def test_benchmark_reports_both_models_per_thread_count_and_batch(tmp_path):
    m, data = wide_mlp((40, 24))
    r = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(keep=0.5, benchmark=True, batch_size=8),
                 calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    lat = r.latency
    assert lat["provider"] == "CPUExecutionProvider" and lat["onnxruntime"] == ort.__version__
    seen = {(x["threads"], x["batch"]) for x in lat["runs"]}
    threads = {1, lat["cpu_count"]}
    assert seen == {(t, b) for t in threads for b in ("batch 1", "feed batch")}
    for x in lat["runs"]:
        assert x["original_s"] > 0 and x["compressed_s"] > 0
        assert x["shapes"]["x"][0] == (1 if x["batch"] == "batch 1" else 8)
    assert "latency (median of" in r.table()
    assert compress(_save(tmp_path, m, "b.onnx"), tmp_path / "p.onnx", config=Config(keep=0.5),
                    calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:])).latency is None


def test_timing_sessions_sleep_instead_of_spinning(monkeypatch):
    """Two sessions called in turn: one's spinning threads must not take the other's cores. Every
    timing path (whole models, node probes, the node profile) builds its sessions so."""
    from onnxcompress import benchmark
    for threads in (1, 2, 0):
        opts = benchmark.options(threads)
        assert opts.intra_op_num_threads == threads
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    made = []
    real = ort.InferenceSession

    def spy(src, opts=None, **kw):
        made.append((opts.intra_op_num_threads, opts.get_session_config_entry("session.intra_op.allow_spinning")))
        return real(src, opts, **kw)
    monkeypatch.setattr(ort, "InferenceSession", spy)
    m = conv_chain()
    feed = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    benchmark.interleaved([benchmark.session(m, 2), benchmark.session(m, 2)], feed, repeats=1, warmup=0)
    g = _graph(m, feed)
    latency.probe_session(latency.node_probe(g, g.index_of("conv1")), 2)   # (time_probes' sessions)
    latency.node_times(m, feed, 2, runs=1)
    assert made == [(2, "0")] * 4


# the whole-model guard

@pytest.mark.parametrize("splits, needed", [(0, 0), (1, 0), (1, 1), (5, 0), (5, 3), (5, 5), (9, 4), (16, 1)])
def test_the_guard_finds_the_fewest_splits_to_undo(splits, needed):
    """`latency.guard` against brute force on a slowdown that shrinks as splits are undone
    (slower while fewer than `needed` are undone), in at most 2 (2 + log2(splits)) timings (a
    slower timing is confirmed by a second)."""
    timed = []

    def ratios(k):
        timed.append(k)
        return {1: 1.0, 2: 1.1 if k < needed else 0.97}
    k, probes = latency.guard(splits, ratios)
    assert k == min((j for j in range(splits + 1) if not (j < needed)), default=0)
    assert [p["undone"] for p in probes] == timed
    assert len(timed) <= 2 * (2 + max(splits, 1).bit_length())
    assert all(set(p["ratios"]) == {"1", "2"} for p in probes)


def test_a_slowdown_must_show_twice():
    """One slow timing (other load on the machine) undoes nothing; a slowdown that repeats does."""
    seen = []

    def burst(k):
        seen.append(k)
        return {1: 1.0, 2: 1.5 if len(seen) == 1 else 0.98}
    k, probes = latency.guard(3, burst)
    assert k == 0 and [p["undone"] for p in probes] == [0, 0]
    k, probes = latency.guard(3, lambda k: {1: 1.0, 2: 1.5 if k < 3 else 0.98})
    assert k == 3 and [p["undone"] for p in probes][:3] == [0, 0, 3]


def test_the_guard_keeps_the_splits_when_they_are_not_the_cause():
    """Slower even with every split undone (noise, or the ID widths): nothing is undone."""
    k, probes = latency.guard(4, lambda k: {1: 1.05})
    assert k == 0 and [p["undone"] for p in probes] == [0, 0, 4, 4]


def test_splits_the_whole_model_cannot_afford_are_undone_least_saving_first(tmp_path, monkeypatch):
    """A compressed model 'slower' while it has more than one split (a fake timing that counts
    the MatMul/Gemm nodes): the guard undoes the splits saving the fewest FLOPs, reports them as
    left alone with the reason, and the output holds the remaining split only."""
    def ratios(original, compressed, feed):
        model = onnx.load(original)
        extra = sum(n.op_type in ("Gemm", "MatMul") for n in compressed.graph.node) - \
            sum(n.op_type in ("Gemm", "MatMul") for n in model.graph.node)
        return {1: 1.0 + 0.05 * max(extra - 1, 0)}
    monkeypatch.setattr(latency, "model_ratios", ratios)
    m, data = wide_mlp((40, 24))
    args = dict(calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    free = compress(_save(tmp_path, m, "a.onnx"), tmp_path / "a.out.onnx",
                    config=Config(method="svd", keep=0.5, latency_check=False), **args)
    assert len(free.layers) == 3  # without the checks every layer is split
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(method="svd", keep=0.5), **args)
    guard = report.allocation["latency_guard"]
    assert [x["layer"] for x in report.layers] == [guard_kept := _most_saving(free)]
    assert set(guard["undone"]) == {x["layer"] for x in free.layers} - {guard_kept}
    assert guard["probes"][0] == {"undone": 0, "ratios": {"1": 1.1}}
    why = reasons(report)
    assert all("whole model ran slower" in why[k] for k in guard["undone"])
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert sum(n.op_type in ("Gemm", "MatMul") for n in out.graph.node) == 4  # 3 layers, one split in two
    # a plan given is applied as it is: the guard does not run
    report.plan.save(tmp_path / "p.json")
    from onnxcompress import Plan
    again = compress(_save(tmp_path, m, "b.onnx"), tmp_path / "b.out.onnx", plan=Plan.load(tmp_path / "p.json"), **args)
    assert "latency_guard" not in again.allocation


def _most_saving(report) -> str:
    """The split layer saving the most parameters (FLOPs scale with them in an MLP)."""
    return max(report.layers, key=lambda x: x["params_before"] - x["params_after"])["layer"]


def test_a_budget_names_the_latency_check_when_every_split_of_a_layer_was_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(method="svd", params_target=0.8),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    why = reasons(report)
    assert not report.layers
    assert all("latency: the split at rank" in why[k] for k in ("fc1", "fc2"))


def test_an_embedding_split_is_left_to_the_whole_model_guard(tmp_path, monkeypatch):
    """--decode run: a Gather is a lookup, slower split whatever the rank (the overhead timer says
    so too); its split saves bytes, so the per-op check keeps it and the whole-model guard has
    the last word."""
    from test_mixed import embed_ffn, feeds
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    path = _save(tmp_path, embed_ffn())
    config = Config(method="svd", keep=0.5, decode="run")
    report = compress(path, tmp_path / "o.onnx", config=config, calib=feeds(32), val=feeds(8, 5))
    assert [x["layer"] for x in report.layers] == ["embed"]
    why = reasons(report)
    assert all("latency: the split at rank" in why[k] for k in ("fc1", "fc2"))
    def ratios(original, compressed, feed):  # slower with the split's extra MatMul
        return {1: 1.2 if sum(n.op_type == "MatMul" for n in compressed.graph.node) > 2 else 1.0}
    monkeypatch.setattr(latency, "model_ratios", ratios)
    slow = compress(path, tmp_path / "p.onnx", config=config, calib=feeds(32), val=feeds(8, 5))
    assert not slow.layers and slow.allocation["latency_guard"]["undone"] == ["embed"]
    assert "whole model ran slower" in reasons(slow)["embed"]


def test_a_table_split_formed_at_load_is_neither_timed_nor_guarded(tmp_path, monkeypatch):
    """--decode load (the default): the split table is formed when the model loads and looked up
    as the original's, so the per-op latency model does not time it, it adds no FLOPs, and the
    whole-model guard does not undo it, even when the timings would call the model slower."""
    from test_mixed import embed_ffn, feeds
    probed = []

    def timer(probes, threads):
        probed.extend(op for p in probes for op, _, _ in p.nodes)
        return _each(_overhead_timer)(probes, threads)
    monkeypatch.setattr(latency, "time_probes", timer)
    monkeypatch.setattr(latency, "model_ratios", lambda original, compressed, feed: {1: 1.2})
    path = _save(tmp_path, embed_ffn())
    report = compress(path, tmp_path / "o.onnx", config=Config(method="svd", keep=0.5), calib=feeds(32), val=feeds(8, 5))
    assert [x["layer"] for x in report.layers] == ["embed"]
    assert "Gather" not in probed and "latency_guard" not in report.allocation
    assert report.flops["after"] == report.flops["before"]


def test_a_model_the_guard_cannot_time_keeps_its_splits(tmp_path, monkeypatch, caplog):
    def broken(original, compressed, feed):
        raise RuntimeError("cannot load")
    monkeypatch.setattr(latency, "model_ratios", broken)
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(method="svd", keep=0.5),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert len(report.layers) == 3 and "latency_guard" not in report.allocation
    assert "could not be timed" in caplog.text


def test_nodes_without_a_weight_scale_with_the_channels_they_carry():
    """concat_neck: conv_a (8) and conv_b (6) meet at a Concat. The profiled Relu after conv_a
    and the Resize after conv_b each carry one window, so each scales with its own window's kept
    share; the Concat carries the whole group and scales with k / C. The Convs are timed by
    probes, never twice."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace
    sys.path.insert(0, str(Path(__file__).parent))
    import graphs
    from onnxcompress.core.normalize import normalize
    from onnxcompress.methods.base import Curve
    from onnxcompress.methods.id import IdMethod
    m = normalize(graphs.concat_neck(se=False))
    g = _graph(m, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    site = next(s for s in IdMethod().sites(g, Config())[0] if "conv_a" in s.target.producers)
    assert dict(((t, (o, w)) for t, o, w in site.target.spans))["resize_17"] == (8, 6)
    sizes = np.arange(14, 0, -1)
    shares = {(0, 8): np.clip(sizes - 1, 1, 8) / 8, (8, 6): np.clip(sizes - 8 + 1, 1, 6) / 6}
    curve = Curve(site, sizes, np.zeros(14), (), SimpleNamespace(windows=shares), np.array([0, 7]), 1)
    idx = {n.op_type: i for i, n in enumerate(m.graph.node) if n.op_type in ("Relu", "Resize", "Concat")}
    relu_a = next(i for i, n in enumerate(m.graph.node) if n.op_type == "Relu" and n.input[0] == "conv_3")
    times = {relu_a: 2.0, idx["Resize"]: 5.0, idx["Concat"]: 3.0, g.index_of("conv_a"): 100.0}
    items = latency.id_costs(g, curve, latency.Timings(1, timer=_overhead_timer), times)
    by = {c.item: c for c in items}
    key = lambda i: g.key(i)   # noqa: E731
    assert by[key(relu_a)].base == 2.0 and np.allclose(by[key(relu_a)].factor, shares[(0, 8)])
    assert by[key(idx["Resize"])].base == 5.0 and np.allclose(by[key(idx["Resize"])].factor, shares[(8, 6)])
    assert by[key(idx["Concat"])].base == 3.0 and np.allclose(by[key(idx["Concat"])].factor, sizes / 14)
    assert sum(c.item == "conv_a" for c in items) == 1
    without = {c.item: c for c in latency.id_costs(g, curve, latency.Timings(1, timer=_overhead_timer))}
    assert set(without) == set(by) - {key(relu_a), key(idx["Resize"]), key(idx["Concat"])}
    # a profiled weight node: its time in the model, scaled by the probes' width curve
    assert by["conv_a"].base == 100.0
    assert without["conv_a"].base == pytest.approx(_overhead_timer(latency.node_probe(g, g.index_of("conv_a")), 1))
    np.testing.assert_allclose(by["conv_a"].factor, without["conv_a"].factor)
    assert by["conv_b"].base == without["conv_b"].base           # not profiled: the probe's time


def test_node_times_come_from_the_profiler_and_leave_the_model_as_it_was():
    """Real ONNX Runtime profiling: positive times keyed by node index, at most the nodes of the
    graph; unnamed nodes are named only while the session is built."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    import graphs
    from onnxcompress.core.normalize import normalize
    for m, feed in ((normalize(graphs.concat_neck(se=False)), {"x": np.ones((1, 3, 8, 8), np.float32)}),
                    (normalize(wide_mlp()[0]), {"x": np.ones((1, 16), np.float32)})):
        before = m.SerializeToString()
        times = latency.node_times(m, feed, 1, runs=3)
        assert m.SerializeToString() == before
        assert times and all(0 <= i < len(m.graph.node) and t > 0 for i, t in times.items())
    # the blocked-layout Convs ONNX Runtime renames after their output are found again
    m = normalize(graphs.concat_neck(se=False))
    times = latency.node_times(m, {"x": np.ones((1, 3, 8, 8), np.float32)}, 1, runs=3)
    convs = {i for i, n in enumerate(m.graph.node) if n.op_type == "Conv"}
    assert convs <= set(times)          # conv_b's is found through the BatchNormalization and Relu fused into it
    resize = next(i for i, n in enumerate(normalize(graphs.concat_neck(se=False)).graph.node) if n.op_type == "Resize")
    assert resize in latency.node_times(normalize(graphs.concat_neck(se=False)),
                                        {"x": np.ones((1, 3, 8, 8), np.float32)}, 1, runs=3)


def test_a_latency_target_falls_back_to_the_estimate_when_a_probe_cannot_be_timed(tmp_path, monkeypatch):
    """A compressed model the timing sessions refuse: the estimate decides, the report keeps the
    timings made and says why; with --quantize the probes are not timed at all (they would be
    timed unquantized)."""
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    calls = []

    def flaky(original, compressed, feed, threads):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("ONNX Runtime refused the model\nsecond line")
        return 0.9
    monkeypatch.setattr(latency, "measured_ratio", flaky)
    m, data = wide_mlp((40, 24))
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(latency_target=0.8, round=1),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    a = report.allocation
    assert len(calls) == 2 and len(a["latency_probes"]) == 1 and "measured_latency" not in a
    assert a["reached"] <= 0.8 + 1e-9
    assert any("could not be timed (ONNX Runtime refused the model)" in w for w in report.warnings)
    calls.clear()
    quantized = compress(_save(tmp_path, m, "q.onnx"), tmp_path / "q_out.onnx",
                         config=Config(latency_target=0.8, round=1, quantize="int8"),
                         calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert not calls and "latency_probes" not in quantized.allocation and quantized.allocation["reached"] <= 0.8 + 1e-9


def test_splits_undone_after_a_latency_target_search_are_reported(tmp_path, monkeypatch):
    """The whole-model guard still runs after a timed latency target and may undo splits (here,
    any model with more nodes than the original "runs" 1.5 times slower on every thread count);
    the measured latency was timed with them, and a warning says so."""
    m, data = wide_mlp((40, 24))
    nodes = len(m.graph.node)

    def ratios(original, compressed, feed):
        model = compressed if isinstance(compressed, onnx.ModelProto) else onnx.load(compressed)
        return {1: 1.5 if len(model.graph.node) > nodes else 1.0}
    monkeypatch.setattr(latency, "model_ratios", ratios)
    report = compress(_save(tmp_path, m), tmp_path / "o.onnx", config=Config(latency_target=0.8, method="aasvd", round=1),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert report.allocation["measured_latency"] <= 0.8
    assert report.allocation["latency_guard"]["undone"]
    assert any("undone after the search" in w for w in report.warnings)


def test_latency_rules_take_a_model_with_external_data(tmp_path, monkeypatch):
    """The latency model's sessions (whole-model timing, profile) get an external-data model
    as a file with linked weights, not as bytes naming its weight file by an absolute path
    (which ONNX Runtime refuses)."""
    monkeypatch.setattr(latency, "time_probes", _each(_overhead_timer))
    monkeypatch.setattr(latency, "CACHE_DIR", tmp_path / "cache")
    m, data = wide_mlp((40, 24))
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ext.*")}
    report = compress(src, tmp_path / "o.onnx", config=Config(latency_target=0.8, round=1),
                      calib=_npz(tmp_path, 'c', data[:64]), val=_npz(tmp_path, 'v', data[64:]))
    assert report.allocation["metric"] == "latency"
    assert report.allocation["measured_latency"] <= 0.8
    assert any(g["kept"] < g["channels"] for g in report.groups)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ext.*")} == before


def test_a_budget_times_a_nodes_widths_together_in_this_run(tmp_path, monkeypatch):
    """`fresh` timings never read the cache (figures cached under other load would give wrong
    ratios between widths) but still write it; a node's widths are timed in one call, together."""
    calls = []
    monkeypatch.setattr(latency, "time_probes", lambda probes, threads: calls.append(len(probes)) or [1.0] * len(probes))
    probes = [latency.Probe((2, 3), (("MatMul", (), ((3, w),)),)) for w in (4, 8, 16)]
    stale = latency.Timings(1, cache_dir=tmp_path)
    stale.values.update({"1|" + p.key(): 99.0 for p in probes})
    stale.measured = 3
    stale.save()
    assert latency.Timings(1, cache_dir=tmp_path).batch(probes) == [99.0] * 3 and calls == []
    fresh = latency.Timings(1, cache_dir=tmp_path, fresh=True)
    assert fresh.batch(probes) == [1.0] * 3 and calls == [3]
    assert fresh.batch(probes[:2]) == [1.0] * 2 and calls == [3]        # once per run
    fresh.save()
    assert latency.Timings(1, cache_dir=tmp_path).batch(probes) == [1.0] * 3


def test_probes_timed_together_run_for_real(monkeypatch):
    monkeypatch.undo()   # the real ONNX Runtime timing, not the suite's weight count
    probes = [latency.Probe((8, 16), (("MatMul", (), ((16, w),)),)) for w in (8, 64)]
    times = latency.time_probes(probes, 1)
    assert len(times) == 2 and all(0 < t < 1 for t in times)


def test_a_node_whose_parameter_the_group_slices_without_a_probe_counts_by_its_profile():
    """Conv 8 -> PRelu (slope per channel, sliced with the group) -> Conv: the PRelu has no
    probe, so its profiled time is its item, scaling with k / C; the Convs keep their probes."""
    from onnxcompress.core.normalize import normalize
    from onnxcompress.methods.base import Curve
    from onnxcompress.methods.id import IdMethod
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("PRelu", ["a", "slope"], ["p"], name="prelu"),
             helper.make_node("Conv", ["p", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": RNG.standard_normal((8, 3, 3, 3)), "b1": RNG.standard_normal(8),
             "slope": RNG.random((8, 1, 1)) * 0.2, "w2": RNG.standard_normal((4, 8, 1, 1)), "b2": np.zeros(4)}
    m = normalize(_model(nodes, [("x", ["N", 3, 6, 6])], inits))
    g = _graph(m, {"x": np.zeros((1, 3, 6, 6), np.float32)})
    site = next(s for s in IdMethod().sites(g, Config())[0] if "c1" in s.target.producers)
    prelu = g.index_of("prelu")
    assert prelu in latency._sides(g, site.target)              # the group slices its slope
    sizes = np.arange(8, 0, -1)
    curve = Curve(site, sizes, np.zeros(8), (), None, np.array([0, 4]), 1)
    items = {c.item: c for c in latency.id_costs(g, curve, latency.Timings(1, timer=_overhead_timer), {prelu: 4.0})}
    assert items["prelu"].base == 4.0 and np.allclose(items["prelu"].factor, sizes / 8)
    assert {"c1", "c2"} <= set(items)


def test_node_times_keep_subgraph_kernels_out_of_the_main_graph_nodes():
    """An If whose branches hold nodes named like a main-graph node: the branch kernels neither
    take that node's time nor count twice in the total (the If's own kernel holds them)."""
    branch = lambda op: helper.make_graph(   # noqa: E731
        [helper.make_node(op, ["a"], ["b"], name="relu")], op, [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("ReduceSum", ["a"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="cond"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=branch("Neg"), else_branch=branch("Abs"))]
    m = _model(nodes, [("x", [4, 64])], {"zero": np.zeros((), np.float32)})
    times = latency.node_times(m, {"x": np.ones((4, 64), np.float32)}, 1, runs=3)
    assert set(times) <= set(range(len(m.graph.node)))
    assert 3 in times                                              # the If itself
    assert [n.name for n in m.graph.node] == ["relu", "sum", "cond", "if"]
    assert m.graph.node[3].attribute[0].g.node[0].name == "relu"   # branch names untouched


def test_layout_conversions_go_to_the_group_whose_tensors_have_their_shape():
    """ONNX Runtime's layout conversions are no node of the model: one of a shape that only the
    group's tensors have scales with the group; one of the input's shape stays fixed."""
    from onnxcompress.core.normalize import normalize
    from onnxcompress.methods.base import Curve
    from onnxcompress.methods.id import IdMethod
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="c2")]
    inits = {"w1": RNG.standard_normal((8, 3, 3, 3)), "b1": RNG.standard_normal(8),
             "w2": RNG.standard_normal((4, 8, 1, 1)), "b2": np.zeros(4)}
    m = normalize(_model(nodes, [("x", ["N", 3, 6, 6])], inits))
    g = _graph(m, {"x": np.zeros((1, 3, 6, 6), np.float32)})
    site = next(s for s in IdMethod().sites(g, Config())[0] if "c1" in s.target.producers)
    sizes = np.arange(8, 0, -1)
    curve = Curve(site, sizes, np.zeros(8), (), None, np.array([0, 4]), 1)
    layout = [("ReorderOutput_token_1", (1, 8, 6, 6), 2.0), ("ReorderInput_token_2", (1, 3, 6, 6), 1.0)]
    items = latency._layout_owners(g, [curve], layout)
    assert list(items) == [0] and len(items[0]) == 1
    item = items[0][0]
    assert item.item.startswith("layout ReorderOutput_token_1") and item.base == 2.0
    np.testing.assert_allclose(item.factor, sizes / 8)
    # two groups with tensors of that shape (Conv 8 -> Relu -> Conv 8 -> Relu -> Conv 4): an
    # equal part each
    nodes = nodes[:2] + [helper.make_node("Conv", ["r", "w3", "b3"], ["a2"], name="c3"),
                         helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
                         helper.make_node("Conv", ["r2", "w2", "b2"], ["y"], name="c2")]
    inits.update(w3=RNG.standard_normal((8, 8, 1, 1)), b3=RNG.standard_normal(8))
    m = normalize(_model(nodes, [("x", ["N", 3, 6, 6])], inits))
    g = _graph(m, {"x": np.zeros((1, 3, 6, 6), np.float32)})
    curves = [Curve(s, sizes, np.zeros(8), (), None, np.array([0, 4]), 1) for s in IdMethod().sites(g, Config())[0]]
    assert len(curves) == 2
    both = latency._layout_owners(g, curves, layout)
    assert sorted(both) == [0, 1] and [c.base for ci in (0, 1) for c in both[ci]] == [1.0, 1.0]
    # two items, not one item of two factors: the cost model adds them
    from onnxcompress.allocate import CostModel
    parts = [dataclasses.replace(c, costs=tuple(both[ci])) for ci, c in enumerate(curves)]
    model = CostModel(parts, {"latency": 2.0})
    assert model.total("latency", [0, 0]) == pytest.approx(2.0)
    assert model.total("latency", [4, 0]) == pytest.approx(1.0 * 4 / 8 + 1.0)
    assert model.total("latency", [4, 4]) == pytest.approx(1.0)      # one item of both factors: 1.25
