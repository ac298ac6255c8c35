"""Calibrate: stream feeds through ONNX Runtime and accumulate the requested statistics
(`stats.py`) in one session with every requested tensor exposed as an output.

`accumulate` is the pass over some feeds, each known by its position k in the calibration
source; `calibrate` runs it over every feed, in this process or split by feed over a Ray cluster
(`cluster.py`), whose workers run `accumulate` on their share and whose partial statistics are
summed in shard order (`stats.merge`). The rows `max_rows` samples from feed k are drawn from a
generator seeded by (seed, k) alone, so they do not depend on which process reads the feed or
on which feeds it read before: a sharded run equals a single-process run up to the order of
float additions.

Batching. Feeds whose inputs have the same shapes and dtypes (past the sample axis 0, which must
be dynamic in the model) are run together, up to `batch` samples per ONNX Runtime call: a folder
of one-sentence files then costs what batches of sentences of equal length cost. Axis 0 is the
sample axis, as for `.npz` data. Each requested tensor is split back into the feeds' pieces along
its axis 0 when that axis has one entry per sample, so a feed contributes the same rows as when
run alone, and `max_rows` caps each feed, not the merged call (with feeds of a single shape,
run in order, it even draws the same subsets; with several shapes the draws come in another
order: other subsets, the same distribution); a tensor that cannot be split is added whole when no subset is drawn from it, and
otherwise the feeds are run one by one. A merged call that ONNX Runtime refuses is run feed by
feed, and merging stops.

Padding. When the model has an attention-mask input (an integer or boolean input of rank 2,
[batch, sequence], whose name contains "mask"; "attention_mask" first), positions where the mask
is 0 are padding and carry no statistic: rows of token-major tensors ([batch, sequence, C] with
the channel axis last and the mask's shape in front) and indices of [batch, sequence] index
tensors at padded positions are left out of the Grams, sums, row counts and token counts. Padded
positions of any other requested tensor (a shape the mask does not match) are counted; the
returned `Statistics.padding` names those tensors, so the report can say so.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

import numpy as np
import onnx

from .data import input_specs
from .runtime import make_session, run
from .threads import parallel_map
from .stats import ChannelGram, GramAccumulator, PatchGram, Request, Stats, TokenCounts, merge  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]

HOLD_BYTES = 64 * 2**20  # input bytes held back while feeds wait for others of their shape


class Statistics(dict):
    """request -> statistic (`Stats` for Grams, a counts vector for `TokenCounts`), and
    `padding`: {"mask": the mask input or None, "positions": mask positions seen, "padded":
    those that were 0, "excluded": tensors whose padded rows were left out, "counted": tensors
    whose padded rows were counted (their shape does not match the mask)}."""
    padding: dict | None = None


def ticker(progress: Progress | None, stage: str, total: int) -> Callable[[], None]:
    """A callable that reports one more step of `total` in `stage` to `progress` (if any) each
    time it is called: for stages that loop over groups or layers (decide). Safe to call from
    several threads (`threads.parallel_map`): the counts reported still rise one by one."""
    done = 0
    lock = threading.Lock()

    def tick() -> None:
        nonlocal done
        with lock:
            done += 1
            if progress:
                progress(stage, done, total)
    return tick


def feed_rng(seed: int, k: int) -> np.random.Generator:
    """The generator of the rows sampled from calibration feed k (a fresh one for each request):
    seeded by (seed, k) only."""
    return np.random.default_rng((seed, k))


def mask_input(model: onnx.ModelProto) -> str | None:
    """The model's attention-mask input: an integer or boolean input of rank 2 whose name
    contains "mask" ("attention_mask" preferred), or None."""
    found = [s.name for s in input_specs(model)
             if "mask" in s.name.lower() and s.dtype.kind in "iub" and s.shape is not None and len(s.shape) == 2]
    exact = [n for n in found if n.lower() == "attention_mask"]
    return (exact or found or [None])[0]


def calibrate(model: onnx.ModelProto, requests: Iterable[Request], feeds,
              *, types: dict[str, int] | None = None, progress: Progress | None = None,
              max_rows: int = 0, seed: int = 0, provider: str = "cpu", cluster=None,
              batch: int = 16) -> Statistics:
    """Stream `feeds` through `model` and return, per request, its statistic (see `Statistics`
    and the module docstring for batching and padding).

    max_rows: cap on the rows (positions) taken from one tensor of one feed, 0 for all; feed k's
    rows are drawn with `feed_rng(seed, k)`.
    provider: the ONNX Runtime execution provider ("cpu" or "cuda", `runtime.PROVIDERS`).
    cluster: a `cluster.Cluster` to split the feeds over (its workers' partial statistics are
    summed in shard order), or None to run here.
    batch: most samples per ONNX Runtime call when feeds of the same shape are merged.
    """
    reqs = sorted(set(requests), key=repr)
    if not reqs:
        out = Statistics()
        out.padding = _padding_record(mask_input(model))
        return out
    if cluster is not None:
        return cluster.calibrate(model, reqs, feeds, types=types, progress=progress, max_rows=max_rows,
                                 seed=seed, provider=provider, batch=batch)
    total = getattr(feeds, "feeds", None)

    def tick(done: int) -> None:
        if progress:
            progress("calibrate", done, total)
    return accumulate(model, reqs, enumerate(feeds), types=types, max_rows=max_rows, seed=seed,
                      provider=provider, tick=tick, batch=batch)


def _padding_record(mask: str | None) -> dict:
    return {"mask": mask, "positions": 0, "padded": 0, "excluded": [], "counted": []}


def merge_statistics(parts: list) -> Statistics:
    """`stats.merge` of partial `Statistics` (in list order), their padding records summed."""
    out = Statistics(merge([dict(p) for p in parts]))
    pads = [p.padding for p in parts if getattr(p, "padding", None)]
    record = _padding_record(pads[0]["mask"] if pads else None)
    for pad in pads:
        record["positions"] += pad["positions"]
        record["padded"] += pad["padded"]
        record["excluded"] = sorted(set(record["excluded"]) | set(pad["excluded"]))
        record["counted"] = sorted(set(record["counted"]) | set(pad["counted"]))
    out.padding = record
    return out


def accumulate(model: onnx.ModelProto, reqs: list[Request], feeds: Iterable[tuple[int, dict]], *,
               types: dict[str, int] | None = None, max_rows: int = 0, seed: int = 0, provider: str = "cpu",
               threads: int = 0, tick: Callable[[int], None] | None = None, batch: int = 16) -> Statistics:
    """The statistics of `reqs` (in this order) over `feeds`, pairs (k, feed) with k the feed's
    position in the calibration source: per request, `Stats` (G = sum Z^T Z, sums, rows) or a
    counts vector, and the padding record. These are partial statistics: over disjoint sets of
    feeds they add up (`merge_statistics`) to the statistics of all of them. `tick(n)` after n
    feeds; `threads`: ONNX Runtime intra-op threads (0: one per core)."""
    mask = mask_input(model)
    names = sorted({r.tensor for r in reqs})
    session = make_session(model, names, types, provider=provider, threads=threads, only=True)  # only the layers these tensors need
    acc = {r: r.accumulator() for r in reqs}
    for a in acc.values():  # full Gram buffers are flushed side by side (`_flush_due`)
        if isinstance(a, GramAccumulator):
            a.deferred = True
    pad = {**_padding_record(mask), "excluded": set(), "counted": set()}
    specs = input_specs(model)
    mergeable = all(s.shape and s.shape[0] is None for s in specs)
    state = {"merge": mergeable and batch > 1, "done": 0}

    def consume(group: list[tuple[int, dict]]) -> None:
        if len(group) > 1 and state["merge"]:
            merged = {n: np.concatenate([f[n] for _, f in group]) for n in group[0][1]}
            try:
                values = dict(zip(names, session.run(names, merged)))
            except Exception as e:  # the model does not take merged feeds: one by one from now on
                log.debug("calibrate: merged feeds refused (%s); running feeds one by one", str(e).splitlines()[0])
                state["merge"] = False
                values = None
            if values is not None and _add_merged(reqs, acc, values, group, mask, max_rows, seed, pad):
                _flush_due(acc)
                _tick(len(group))
                return
        for k, feed in group:
            values = dict(zip(names, run(session, names, feed, f"calibration feed {k}")))
            for r in reqs:  # each request draws from its own generator: feeds merged or not, the same rows
                acc[r].add(_rows(r, values[r.tensor], _mask_of(feed, mask), max_rows, feed_rng(seed, k), pad))
            _flush_due(acc)
            _count_padding(feed, mask, pad)
            _tick(1)

    def _tick(n: int) -> None:
        state["done"] += n
        if tick:
            tick(state["done"])

    for group in _groups(feeds, batch if state["merge"] else 1):
        consume(group)
    out = Statistics(zip(acc, parallel_map(lambda a: a.result(), list(acc.values()))))  # last flushes side by side
    out.padding = {**pad, "excluded": sorted(pad["excluded"]), "counted": sorted(pad["counted"])}
    return out


def _flush_due(acc: dict) -> None:
    """The Gram updates of every accumulator whose buffer is full, on one thread per core (ONNX
    Runtime is idle meanwhile; each update is one single-threaded dsyrk, as it would be alone)."""
    due = [a for a in acc.values() if getattr(a, "due", False)]
    if due:
        parallel_map(lambda a: a.flush(), due)


def _groups(feeds, batch: int):
    """Lists of (index, feed) to run together: feeds of one input shape and dtype, up to `batch`
    samples (a feed of `batch` samples or more runs alone). Feeds wait for others of their shape
    until their bucket is full, the input bytes held pass HOLD_BYTES (the largest bucket goes
    first) or the stream ends (buckets in order of arrival)."""
    buckets: dict = {}
    held = 0
    for k, feed in feeds:
        n = _samples(feed)
        if batch <= 1 or n is None or n >= batch:
            yield [(k, feed)]
            continue
        key = tuple((name, v.shape[1:], v.dtype.str) for name, v in sorted(feed.items()))
        bucket = buckets.setdefault(key, [[], 0])
        if bucket[1] + n > batch:
            held -= _nbytes(bucket[0])
            yield bucket[0]
            bucket[0], bucket[1] = [], 0
        bucket[0].append((k, feed))
        bucket[1] += n
        held += _nbytes([(k, feed)])
        if held > HOLD_BYTES:
            key = max(buckets, key=lambda b: _nbytes(buckets[b][0]))
            held -= _nbytes(buckets[key][0])
            yield buckets.pop(key)[0]
    for items, _ in buckets.values():
        if items:
            yield items


def _samples(feed: dict) -> int | None:
    """Axis 0 of the feed's inputs when every input has it and they agree, else None."""
    sizes = {v.shape[0] if v.ndim else None for v in feed.values()}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def _nbytes(items) -> int:
    return sum(v.nbytes for _, f in items for v in f.values())


def _add_merged(reqs, acc, values, group, mask, max_rows, seed, pad) -> bool:
    """Add the outputs of a merged call, feed by feed where a tensor splits along axis 0. False
    (nothing added) when some tensor neither splits nor can be added whole without drawing a
    subset of its rows: the caller then runs the feeds one by one."""
    counts = [_samples(f) for _, f in group]
    bounds = np.cumsum(counts)[:-1]
    plan = {}
    for r in reqs:
        v = values[r.tensor]
        if v.ndim and v.shape[0] == sum(counts):
            plan[r] = "split"
        elif isinstance(r, TokenCounts) or not max_rows or (
                isinstance(r, ChannelGram) and v.size // max(v.shape[r.axis], 1) <= max_rows):
            plan[r] = "whole"
        else:
            return False
    masks = [_mask_of(f, mask) for _, f in group]
    whole_mask = np.concatenate(masks) if mask is not None else None
    for r in reqs:
        v = values[r.tensor]
        if plan[r] == "whole":  # no subset is drawn from it
            acc[r].add(_rows(r, v, whole_mask, max_rows, feed_rng(seed, group[0][0]), pad))
            continue
        for piece, m, (k, _) in zip(np.split(v, bounds), masks, group):
            acc[r].add(_rows(r, piece, m, max_rows, feed_rng(seed, k), pad))
    for _, f in group:
        _count_padding(f, mask, pad)
    return True


def _mask_of(feed: dict, mask: str | None) -> np.ndarray | None:
    """The feed's attention mask as booleans (True = a real position), or None."""
    if mask is None or mask not in feed or np.ndim(feed[mask]) != 2:
        return None
    return np.asarray(feed[mask]) != 0


def _count_padding(feed: dict, mask: str | None, pad: dict) -> None:
    m = _mask_of(feed, mask)
    if m is not None:
        pad["positions"] += m.size
        pad["padded"] += int(m.size - np.count_nonzero(m))


def _rows(r: Request, value: np.ndarray, mask: np.ndarray | None, max_rows: int,
          rng: np.random.Generator, pad: dict) -> np.ndarray:
    """What `r` accumulates from `value`, without the padded positions where the mask applies:
    Z (rows x C) for Grams, indices for token counts."""
    padded = mask is not None and not mask.all()
    if padded and isinstance(r, TokenCounts) and value.shape == mask.shape:
        pad["excluded"].add(r.tensor)
        return value[mask]
    if (padded and isinstance(r, ChannelGram) and value.ndim == 3 and r.axis in (-1, 2)
            and value.shape[:2] == mask.shape):
        pad["excluded"].add(r.tensor)
        z = value[mask]
        if max_rows and len(z) > max_rows:
            z = z[np.sort(rng.choice(len(z), size=max_rows, replace=False))]
        return z
    if padded:
        pad["counted"].add(r.tensor)
    return r.rows(value, max_rows, rng)
