"""Wall time of calibration in one process and sharded on a local Ray instance (`--ray`),
measured, never asserted in tests.

    python tools/bench_ray.py [--model build/bench/minilm/model.onnx] [--calib build/bench/minilm/calib]
                              [--feeds 512] [--method auto] [--workers 1,2]

Every request `--method` makes of the model (MiniLM with auto: the Grams of every linear layer's
input and the embedding's token counts) is calibrated over the first `--feeds` files of the
folder:
* in this process, one ONNX Runtime session with its default threads (what runs without --ray),
  and again with one thread (what each Ray task uses: on a loaded machine, ONNX Runtime's
  spinning thread pool can make the default much slower than one thread);
* on one local Ray instance with max(workers) CPUs, once per worker count: the feeds cut into
  that many shards, one task each, one ONNX Runtime thread per task, each task reading its own
  files; the partial statistics merged in shard order.
Ray's start-up is timed apart. Every sharded result is compared with the single-process one
(the largest relative difference over every Gram, sum and count). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnxcompress.api import _find, shapes_at  # noqa: E402
from onnxcompress.core import data as data_mod  # noqa: E402
from onnxcompress.core.calibrate import accumulate, calibrate  # noqa: E402
from onnxcompress.core.cluster import Cluster, connect  # noqa: E402
from onnxcompress.core.config import Config  # noqa: E402
from onnxcompress.core.graph import GraphIndex  # noqa: E402
from onnxcompress.core.modelio import load_model  # noqa: E402
from onnxcompress.core.normalize import normalize  # noqa: E402
from onnxcompress.core.stats import Stats  # noqa: E402
from onnxcompress.methods import for_method  # noqa: E402


def rel_diff(a, b) -> float:
    if isinstance(a, Stats):
        return max(rel_diff(a.gram, b.gram), rel_diff(a.sums, b.sums), float(a.rows != b.rows))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-300))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="build/bench/minilm/model.onnx")
    ap.add_argument("--calib", default="build/bench/minilm/calib")
    ap.add_argument("--feeds", type=int, default=512, help="the first N files of --calib")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--max-rows", type=int, default=8192)
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    norm = normalize(load_model(args.model))
    specs = data_mod.input_specs(norm)
    whole = data_mod.open_source(args.calib, specs, batch_size=16)
    table = data_mod.FileFeeds(whole.table.paths[:args.feeds], whole.table.specs)
    source = data_mod.FeedSource(whole.name, None, specs, None, len(table), table=table)
    g = GraphIndex(norm, *shapes_at(norm, next(iter(source))))
    methods = {m.name: m for m in for_method(args.method)}
    sites, _ = _find(g, methods, Config(method=args.method, keep=0.5))
    reqs = sorted({r for s in sites for r in methods[s.method].requests(s)}, key=repr)
    kw = dict(types=g.types, max_rows=args.max_rows, seed=0)

    start = time.perf_counter()
    single = calibrate(norm, reqs, source, **kw)
    out = {"model": args.model, "feeds": source.feeds, "requests": len(reqs), "cores": os.cpu_count(),
           "load_before": os.getloadavg()[0], "single_process_s": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    one = accumulate(norm, reqs, enumerate(source), threads=1, **kw)
    out["single_process_1_thread_s"] = round(time.perf_counter() - start, 2)
    out["single_process_1_thread_max_rel_diff"] = max(rel_diff(single[r], one[r]) for r in reqs)
    start = time.perf_counter()
    with connect("local", max(workers)):
        out["ray_start_s"] = round(time.perf_counter() - start, 2)
        for w in workers:
            start = time.perf_counter()
            sharded = calibrate(norm, reqs, source, cluster=Cluster(workers=w), **kw)
            out[f"ray_{w}_workers_s"] = round(time.perf_counter() - start, 2)
            out[f"ray_{w}_workers_max_rel_diff"] = max(rel_diff(single[r], sharded[r]) for r in reqs)
    out["load_after"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
