"""Calibrate: stream feeds through ONNX Runtime and accumulate the requested statistics
(`stats.py`) in one session with every requested tensor exposed as an output."""
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


def calibrate(model: onnx.ModelProto, requests: Iterable[Request], feeds,
              *, types: dict[str, int] | None = None, progress: Progress | None = None,
              max_rows: int = 0, seed: int = 0) -> dict:
    """Stream `feeds` through `model` and return, per request, its statistic: `Stats` for the
    Grams, a counts vector for `TokenCounts`.

    max_rows: cap on the rows (positions) taken from one tensor of one feed, 0 for all.
    """
    reqs = sorted(set(requests), key=repr)
    if not reqs:
        return {}
    names = sorted({r.tensor for r in reqs})
    session = make_session(model, names, types, only=True)  # only the layers these tensors need
    acc = {r: r.accumulator() for r in reqs}
    total = getattr(feeds, "feeds", None)
    rng = np.random.default_rng(seed)
    for k, feed in enumerate(feeds):
        values = dict(zip(names, run(session, names, feed, f"calibration feed {k}")))
        for r in reqs:
            acc[r].add(r.rows(values[r.tensor], max_rows, rng))
        if progress:
            progress("calibrate", k + 1, total)
    return {r: a.result() for r, a in acc.items()}
