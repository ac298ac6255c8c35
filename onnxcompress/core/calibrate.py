"""Calibrate: stream feeds through ONNX Runtime and accumulate the requested statistics
(`stats.py`) in one session with every requested tensor exposed as an output.

`accumulate` is the pass over some feeds, each known by its position k in the calibration
source; `calibrate` runs it over every feed, in this process or split by feed over a Ray cluster
(`cluster.py`), whose workers run `accumulate` on their share and whose partial statistics are
summed in shard order (`stats.merge`). The rows `max_rows` samples from feed k are drawn from a
generator seeded by (seed, k) alone, so they do not depend on which process reads the feed or
on which feeds it read before: a sharded run equals a single-process run up to the order of
float additions.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from .runtime import make_session, run
from .stats import ChannelGram, PatchGram, Request, Stats, TokenCounts  # noqa: F401 (re-exported)

Progress = Callable[[str, int, int | None], None]


def ticker(progress: Progress | None, stage: str, total: int) -> Callable[[], None]:
    """A callable that reports one more step of `total` in `stage` to `progress` (if any) each
    time it is called: for stages that loop over groups or layers (decide)."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(stage, done, total)
    return tick


def feed_rng(seed: int, k: int) -> np.random.Generator:
    """The generator of the rows sampled from calibration feed k: seeded by (seed, k) only."""
    return np.random.default_rng((seed, k))


def calibrate(model: onnx.ModelProto, requests: Iterable[Request], feeds,
              *, types: dict[str, int] | None = None, progress: Progress | None = None,
              max_rows: int = 0, seed: int = 0, provider: str = "cpu", cluster=None) -> dict:
    """Stream `feeds` through `model` and return, per request, its statistic: `Stats` for the
    Grams, a counts vector for `TokenCounts`.

    max_rows: cap on the rows (positions) taken from one tensor of one feed, 0 for all; feed k's
    rows are drawn with `feed_rng(seed, k)`.
    provider: the ONNX Runtime execution provider ("cpu" or "cuda", `runtime.PROVIDERS`).
    cluster: a `cluster.Cluster` to split the feeds over (its workers' partial statistics are
    summed in shard order), or None to run here.
    """
    reqs = sorted(set(requests), key=repr)
    if not reqs:
        return {}
    if cluster is not None:
        return cluster.calibrate(model, reqs, feeds, types=types, progress=progress, max_rows=max_rows,
                                 seed=seed, provider=provider)
    total = getattr(feeds, "feeds", None)

    def tick(done: int) -> None:
        if progress:
            progress("calibrate", done, total)
    return accumulate(model, reqs, enumerate(feeds), types=types, max_rows=max_rows, seed=seed,
                      provider=provider, tick=tick)


def accumulate(model: onnx.ModelProto, reqs: list[Request], feeds: Iterable[tuple[int, dict]], *,
               types: dict[str, int] | None = None, max_rows: int = 0, seed: int = 0, provider: str = "cpu",
               threads: int = 0, tick: Callable[[int], None] | None = None) -> dict:
    """The statistics of `reqs` (in this order) over `feeds`, pairs (k, feed) with k the feed's
    position in the calibration source: per request, `Stats` (G = sum Z^T Z, sums, rows) or a
    counts vector. These are partial statistics: over disjoint sets of feeds they add up
    (`stats.merge`) to the statistics of all of them. `tick(n)` after the n-th feed; `threads`:
    ONNX Runtime intra-op threads (0: its default)."""
    names = sorted({r.tensor for r in reqs})
    session = make_session(model, names, types, provider=provider, threads=threads)
    acc = {r: r.accumulator() for r in reqs}
    done = 0
    for k, feed in feeds:
        values = dict(zip(names, run(session, names, feed, f"calibration feed {k}")))
        rng = feed_rng(seed, k)
        for r in reqs:
            acc[r].add(r.rows(values[r.tensor], max_rows, rng))
        done += 1
        if tick:
            tick(done)
    return {r: a.result() for r, a in acc.items()}
