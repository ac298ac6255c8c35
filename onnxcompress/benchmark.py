"""Measured latency of the original and the compressed model (`--benchmark`).

Both models run in ONNX Runtime on the CPU execution provider, in one process, interleaved call
by call (original, compressed, original, ...), so a change in machine load hits both alike.
After `WARMUP` calls each, the figure is the median of `REPEATS` calls. It is taken at one
sample (batch 1, see `one_sample`) and at the validation feed's own batch, with one intra-op
thread and with all cores. The ratio compressed / original is what to read; absolute times
depend on the machine and its load.

Every timing session (`options`) has its idle intra-op threads sleep rather than spin. ONNX
Runtime's threads spin for a while after each call by default; with two sessions called in turn,
one session's spinning threads then compete with the other's work for the cores, and on two
cores the ratio of a model to a copy of itself came out anywhere between 0.94 and 1.63 (between
0.96 and 1.01 without spinning).
"""
from __future__ import annotations

import logging
import os
import statistics
import time

import numpy as np

log = logging.getLogger(__name__)

WARMUP = 3
REPEATS = 15
PROVIDER = "CPUExecutionProvider"


def one_sample(feed: dict, specs) -> dict:
    """The feed cut to its first sample on axis 0, for inputs whose axis 0 is dynamic in the
    model (`specs`, `core.data.InputSpec`) and of rank >= 2, when those inputs agree on its
    length; otherwise the feed as it is. FLOPs are counted, and batch-1 latency is measured, at
    this feed."""
    dynamic = {s.name for s in specs if s.shape is not None and len(s.shape) >= 2 and s.shape[0] is None}
    batched = {k: v for k, v in feed.items() if k in dynamic and np.ndim(v) >= 2}
    sizes = {int(v.shape[0]) for v in batched.values()}
    if len(sizes) != 1 or sizes == {1}:
        return feed
    return {k: (v[:1] if k in batched else v) for k, v in feed.items()}


def options(threads: int):
    """Session options of every timing: `threads` intra-op threads (0: ONNX Runtime's default,
    all cores), idle threads sleeping instead of spinning (module docstring), quiet."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def session(model, threads: int):
    """An ONNX Runtime CPU session of `model` (path or ModelProto) with `threads` intra-op threads
    (0: ONNX Runtime's default, all cores), with the timing `options`."""
    import onnxruntime as ort
    opts = options(threads)
    from .core.runtime import session_source
    with session_source(model) as src:
        return ort.InferenceSession(src, opts, providers=[PROVIDER])


def interleaved(sessions: list, feed: dict, *, repeats: int = REPEATS, warmup: int = WARMUP) -> list[float]:
    """Median seconds per call of each session on `feed`, the sessions called in turn."""
    times = [[] for _ in sessions]
    for k in range(warmup + repeats):
        for s, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feed)
            if k >= warmup:
                times[s].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def thread_counts() -> list[int]:
    """1 and all cores (one entry on a single-core machine)."""
    return sorted({1, os.cpu_count() or 1})


def benchmark(original, compressed, feed: dict, specs, *, repeats: int = REPEATS) -> dict:
    """The report's `latency` section: per thread count and batch, the median seconds of both
    models and their ratio, with the execution provider and ONNX Runtime version."""
    import onnxruntime as ort
    feeds = {"batch 1": one_sample(feed, specs), "feed batch": feed}
    shapes = {name: {k: list(v.shape) for k, v in f.items()} for name, f in feeds.items()}
    if shapes["batch 1"] == shapes["feed batch"]:
        del feeds["feed batch"]
    runs = []
    for threads in thread_counts():
        pair = [session(original, threads), session(compressed, threads)]
        for name, f in feeds.items():
            before, after = interleaved(pair, f, repeats=repeats)
            runs.append({"threads": threads, "batch": name, "shapes": shapes[name],
                         "original_s": before, "compressed_s": after,
                         "ratio": after / before if before > 0 else None})
    return {"provider": PROVIDER, "onnxruntime": ort.__version__, "cpu_count": os.cpu_count(),
            "repeats": repeats, "warmup": WARMUP, "interleaved": True, "runs": runs}


def model_latency(model, feed: dict, threads: int, *, repeats: int = REPEATS) -> float:
    """Median seconds per call of one model on `feed` (the latency model's whole-model total)."""
    return interleaved([session(model, threads)], feed, repeats=repeats)[0]
