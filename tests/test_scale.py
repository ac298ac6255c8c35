"""Calibration split by feed: partial statistics and their merge, shards of every kind of source,
the same statistics and plan on a local two-worker Ray cluster, and --provider."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import graphs
from onnxcompress import Config, compress
from onnxcompress.api import _find, shapes_at
from onnxcompress.cli import main
from onnxcompress.core import data as data_mod
from onnxcompress.core.calibrate import accumulate, calibrate
from onnxcompress.core.errors import UsageError
from onnxcompress.core.graph import GraphIndex
from onnxcompress.core.normalize import normalize
from onnxcompress.core.runtime import make_session
from onnxcompress.core.stats import PatchGram, Stats, TokenCounts, merge
from onnxcompress.methods import for_method

ROOT = Path(__file__).resolve().parent.parent
MAX_ROWS = 40  # < the 64 positions of one 8x8 sample: every feed is subsampled


@pytest.fixture()
def work(tmp_path):
    """The conv-BN-ReLU chain and a folder of 9 feeds of 1 to 3 samples each."""
    model = graphs.conv_bn_relu()
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(9):
        np.savez(calib / f"{i:03d}.npz", x=rng.standard_normal((1 + i % 3, 3, 8, 8)).astype(np.float32))
    return tmp_path, model, calib


def requests_of(model, calib: Path):
    """The normalized model, its tensor types and every request `--method auto` makes of it."""
    norm = normalize(model)
    specs = data_mod.input_specs(norm)
    first = next(iter(data_mod.open_source(calib, specs, batch_size=16)))
    g = GraphIndex(norm, *shapes_at(norm, first))
    methods = {m.name: m for m in for_method("auto")}
    sites, _ = _find(g, methods, Config(method="auto", keep=0.5))
    reqs = sorted({r for s in sites for r in methods[s.method].requests(s)}, key=repr)
    return norm, g.types, specs, reqs


def rel_diff(a, b) -> float:
    if isinstance(a, Stats):
        return max(rel_diff(a.gram, b.gram), rel_diff(a.sums, b.sums), float(a.rows != b.rows))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-300))


def test_stats_add_and_merge_in_list_order():
    rng = np.random.default_rng(0)
    z = [rng.standard_normal((n, 4)) for n in (3, 5, 2)]
    parts = [{"g": Stats(x.T @ x, x.sum(0), len(x)), "t": np.array([len(x), 1])} for x in z]
    whole = np.concatenate(z)
    merged = merge(parts)
    np.testing.assert_allclose(merged["g"].gram, whole.T @ whole, rtol=1e-12)
    np.testing.assert_allclose(merged["g"].sums, whole.sum(0), rtol=1e-12)
    assert merged["g"].rows == 10 and merged["t"].tolist() == [10, 3]
    assert parts[0]["g"].rows == 3 and parts[0]["t"].tolist() == [3, 1]  # the parts are not modified
    assert merge([]) == {}
    with pytest.raises(ValueError, match="different requests"):
        merge([parts[0], {"g": parts[1]["g"]}])
    with pytest.raises(ValueError, match="4 and 2 channels"):
        parts[0]["g"] + Stats(np.eye(2), np.zeros(2), 1)


def test_shards_merge_to_the_single_process_statistics(work):
    tmp, model, calib = work
    norm, types, specs, reqs = requests_of(model, calib)
    assert any(isinstance(r, PatchGram) for r in reqs)
    source = data_mod.open_source(calib, specs, batch_size=16)
    single = calibrate(norm, reqs, source, types=types, max_rows=MAX_ROWS, seed=3)
    again = calibrate(norm, reqs, source, types=types, max_rows=MAX_ROWS, seed=3)
    for r in reqs:  # deterministic in one process, to the bit
        np.testing.assert_array_equal(single[r].gram, again[r].gram)
    patch = next(r for r in reqs if isinstance(r, PatchGram))
    assert single[patch].rows == 9 * MAX_ROWS  # every feed was subsampled
    for count in (2, 4):
        parts = data_mod.shards(source, count)
        assert [s.start for s in parts] == {2: [0, 4], 4: [0, 2, 4, 6]}[count]
        assert all(isinstance(s.table, data_mod.FileFeeds) for s in parts)  # paths, not arrays
        merged = merge([accumulate(norm, reqs, iter(s), types=types, max_rows=MAX_ROWS, seed=3) for s in parts])
        assert max(rel_diff(single[r], merged[r]) for r in reqs) <= 1e-10
    other_seed = calibrate(norm, reqs, source, types=types, max_rows=MAX_ROWS, seed=4)
    assert rel_diff(single[patch], other_seed[patch]) > 1e-6  # the seed does choose the rows


def test_shards_of_every_source_give_its_feeds_at_their_positions(work):
    tmp, model, calib = work
    specs = data_mod.input_specs(model)
    arrays = {"x": np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)}
    feeds = [{"x": a[None]} for a in arrays["x"][:5]]
    sources = [data_mod.open_source(calib, specs, batch_size=4),
               data_mod.split(data_mod.open_source(calib, specs, batch_size=4), 0.25)[0],
               data_mod.open_source(arrays, specs, batch_size=4),
               data_mod.open_source(feeds, specs, batch_size=4),
               data_mod.open_source(iter(feeds), specs, batch_size=4)]
    for source in sources:
        whole = list(source)
        parts = data_mod.shards(source, 3)
        got = [(k, f) for s in parts for k, f in s]
        assert [k for k, _ in got] == list(range(len(whole))), source.name
        for (_, f), w in zip(got, whole):
            np.testing.assert_array_equal(f["x"], w["x"])
    split_part = data_mod.shards(sources[1], 3)
    assert all(isinstance(s.table, data_mod.FileFeeds) for s in split_part)
    assert sum(len(s.table.paths) for s in split_part) == 7  # 9 files, every 4th held out
    in_memory = data_mod.shards(sources[2], 3)  # 3 feeds of 4, 4, 2 samples: each shard ships its own
    assert [sum(len(f["x"]) for f in s.table.feeds) for s in in_memory] == [4, 4, 2]


def test_a_shard_checks_its_feeds_as_the_source_does(work):
    tmp, model, calib = work
    specs = data_mod.input_specs(model)
    np.savez(calib / "999.npz", x=np.full((1, 3, 8, 8), np.nan, np.float32))
    last = data_mod.shards(data_mod.open_source(calib, specs, batch_size=4), 2)[-1]
    with pytest.raises(data_mod.DataError, match="feed 9: input 'x' holds NaN"):
        list(last)


def test_token_counts_merge_exactly():
    req = TokenCounts("ids", 7)
    a, b = req.accumulator(), req.accumulator()
    a.add(np.array([[0, 1, 1, -1]]))
    b.add(np.array([6, 2]))
    assert merge([{req: a.result()}, {req: b.result()}])[req].tolist() == [1, 2, 1, 0, 0, 0, 2]


# ---- Ray ----

def test_missing_ray_is_a_usage_error_naming_the_flag(work, monkeypatch):
    tmp, model, calib = work
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(UsageError, match=r"--ray needs Ray, which is not installed: pip install 'onnxcompress\[ray\]'"):
        compress(tmp / "m.onnx", tmp / "o.onnx", config=Config(ray="local"), calib=calib)
    r = CliRunner().invoke(main, [str(tmp / "m.onnx"), str(tmp / "o.onnx"), "--calib", str(calib), "--ray", "local"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == ["onnxcompress: error: --ray needs Ray, which is not installed: "
                                             "pip install 'onnxcompress[ray]'"]
    assert not (tmp / "o.onnx").exists()


def test_ray_options_are_checked(work):
    tmp, model, calib = work
    for kwargs, message in ((dict(ray_workers=2), "--ray-workers needs --ray"),
                            (dict(ray="local", ray_workers=0), "--ray-workers must be at least 1, got 0"),
                            (dict(ray=" "), "--ray needs an address"),
                            (dict(provider="tpu"), "--provider: unknown provider 'tpu'")):
        with pytest.raises(UsageError, match=message):
            Config(**kwargs)
    r = CliRunner().invoke(main, [str(tmp / "m.onnx"), "--calib", str(calib), "--ray-workers", "2"])
    assert r.exit_code == 2 and "onnxcompress: error: --ray-workers needs --ray" in r.stderr


def test_without_the_flag_ray_is_never_imported(work):
    tmp, model, calib = work
    code = ("import sys; from onnxcompress import compress, Config; "
            f"compress({str(tmp / 'm.onnx')!r}, {str(tmp / 'o.onnx')!r}, config=Config(keep=0.5), calib={str(calib)!r}); "
            "assert 'ray' not in sys.modules and 'onnxcompress.core.cluster' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert (tmp / "o.onnx").exists()


def test_nothing_to_calibrate_starts_no_cluster(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from onnxcompress.core import cluster
    started = []
    monkeypatch.setattr(cluster, "connect", lambda *a: started.append(a))
    b = graphs.Builder()
    onnx.save(b.model([("x", ["N", 4])], [b.op("Relu", ["x"])]), tmp_path / "relu.onnx")
    report = compress(tmp_path / "relu.onnx", tmp_path / "o.onnx", config=Config(ray="local"),
                      calib={"x": np.ones((10, 4), np.float32)})
    assert started == [] and report.plan.entries == () and (tmp_path / "o.onnx").exists()


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance of 2 CPUs for this module's tests (`cluster.connect("local", 2)`),
    shut down after them whatever happens."""
    ray = pytest.importorskip("ray")
    from onnxcompress.core.cluster import connect
    try:
        with connect("local", 2) as cluster:
            yield cluster
    finally:
        ray.shutdown()


def test_a_local_two_worker_ray_cluster_gives_the_single_process_statistics_and_plan(work, ray_cluster):
    tmp, model, calib = work
    assert ray_cluster.workers == 2
    norm, types, specs, reqs = requests_of(model, calib)
    source = data_mod.open_source(calib, specs, batch_size=16)
    seen = []
    single = calibrate(norm, reqs, source, types=types, max_rows=MAX_ROWS, seed=3)
    sharded = calibrate(norm, reqs, source, types=types, max_rows=MAX_ROWS, seed=3, cluster=ray_cluster,
                        progress=lambda *a: seen.append(a))
    assert set(sharded) == set(single)
    for r in reqs:
        assert rel_diff(single[r], sharded[r]) <= 1e-10, r
        assert sharded[r].rows == single[r].rows
    assert seen[-1] == ("calibrate", 9, 9)
    # the whole run, joining the running instance: the same kept channels and ranks
    plans = []
    for name, extra in (("one.onnx", {}), ("two.onnx", dict(ray="auto", ray_workers=2))):
        config = Config(method="auto", keep=0.5, max_rows=MAX_ROWS, round=1, **extra)
        plans.append(compress(tmp / "m.onnx", tmp / name, config=config, calib=calib).plan)
    assert plans[0].entries and list(map(decisions, plans[0].entries)) == list(map(decisions, plans[1].entries))
    assert [e.error for e in plans[1].entries] == pytest.approx([e.error for e in plans[0].entries], rel=1e-8)


def decisions(entry) -> tuple:
    """What a plan entry decides: its site, method, kept channels or rank."""
    return entry.site, entry.method, getattr(entry, "keep", None), getattr(entry, "rank", None)


def test_a_failure_on_a_worker_is_raised_as_itself(work, ray_cluster):
    tmp, model, calib = work
    norm, types, specs, reqs = requests_of(model, calib)
    np.savez(calib / "999.npz", x=np.full((1, 3, 8, 8), np.nan, np.float32))
    source = data_mod.open_source(calib, specs, batch_size=16)
    with pytest.raises(data_mod.DataError, match=r"^data: .*calib feed 9: input 'x' holds NaN values"):
        calibrate(norm, reqs, source, types=types, cluster=ray_cluster)


# ---- --provider ----

def test_provider_cuda_without_cuda_is_a_one_line_usage_error(work):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here: the error path cannot be reached")
    tmp, model, calib = work
    r = CliRunner().invoke(main, [str(tmp / "m.onnx"), str(tmp / "o.onnx"), "--calib", str(calib), "--provider", "cuda"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxcompress: error: --provider cuda: ")
    assert "CUDAExecutionProvider" in lines[0] and not (tmp / "o.onnx").exists()


def test_provider_cpu_is_the_default_and_changes_nothing(work, tmp_path):
    tmp, model, calib = work
    assert Config().provider == "cpu"
    assert make_session(model, provider="cpu").get_providers() == ["CPUExecutionProvider"]
    reports = [compress(tmp / "m.onnx", tmp / name, config=Config(keep=0.5, round=1, **extra), calib=calib)
               for name, extra in (("a.onnx", {}), ("b.onnx", dict(provider="cpu")))]
    assert reports[0].agreement == reports[1].agreement
    assert reports[0].plan.entries and reports[0].plan.to_dict() == reports[1].plan.to_dict()
    assert reports[1].config["provider"] == "cpu"
