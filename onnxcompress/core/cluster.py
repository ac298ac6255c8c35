"""Calibration split over a Ray cluster (`--ray`, docs/scale.md).

The calibration feeds are cut into contiguous shards, one per worker task (`data.shards`): a
directory's shards carry file paths, which each worker reads itself, and in-memory feeds are
carried as the arrays of just that shard. Each task runs `calibrate.accumulate`, the code a
single-process run uses, over its shard and returns its partial statistics (float64
G_s = sum Z^T Z, channel sums and row counts; token counts). The driver sums them in shard order,
G = G_1 + ... + G_S (`stats.merge`). The rows `max_rows` samples from feed k are drawn with a
generator seeded by (seed, k), wherever the feed is read, so the result equals a single-process
run up to the order of the float additions (relative differences of order 1e-15).

Ray is imported by this module only, and this module only when `--ray` is given.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import onnx

from .calibrate import accumulate, merge_statistics
from .data import shards
from .errors import ClusterError, OnnxCompressError, UsageError
from .runtime import weights_bytes

log = logging.getLogger(__name__)

INSTALL = "pip install 'onnxcompress[ray]'"
PROTOBUF_LIMIT = 2**31 - 2**24  # bytes: the model travels to the workers as one serialized protobuf


def import_ray():
    """The `ray` module, or a `UsageError` naming --ray when it is not installed."""
    try:
        import ray
    except ImportError as e:
        raise UsageError(f"--ray needs Ray, which is not installed: {INSTALL}") from e
    return ray


@dataclass(frozen=True)
class Cluster:
    """A connected Ray cluster: calibration is cut into `workers` shards, one task each (one CPU
    and one ONNX Runtime thread per task; one GPU with provider "cuda")."""
    workers: int

    def calibrate(self, model: onnx.ModelProto, reqs: list, feeds, *, types: dict[str, int] | None,
                  progress, max_rows: int, seed: int, provider: str, batch: int = 16) -> dict:
        """`calibrate.calibrate` over the cluster: per request, the merged statistics of every
        feed of `feeds` (a `data.FeedSource`, or any iterable of feeds, which is then read here)."""
        ray = import_ray()
        if weights_bytes(model) > PROTOBUF_LIMIT:
            raise UsageError("--ray sends the model to the workers as one protobuf, limited to 2 GiB; "
                             "this model's weights are larger: calibrate without --ray")
        parts = shards(_as_source(feeds), self.workers)
        if provider == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
            raise UsageError("--provider cuda with --ray: the Ray cluster has no GPU")
        names = {r.tensor for r in reqs}
        types = {n: t for n, t in (types or {}).items() if n in names}
        blob = ray.put(model.SerializeToString())
        task = ray.remote(_calibrate_shard).options(num_cpus=1, num_gpus=1 if provider == "cuda" else 0)
        refs = [task.remote(blob, reqs, s, types, max_rows, seed, provider, batch) for s in parts]
        log.info("calibrate: %d feeds in %d shards on Ray", sum(map(len, parts)), len(parts))
        try:
            _wait(ray, refs, [len(s) for s in parts], progress)
            results = ray.get(refs)  # in shard order, whatever order they finished in
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, OnnxCompressError):
                raise cause from None
            raise ClusterError(f"calibrate: a Ray worker failed ({_first_line(cause or e)})") from e
        except ray.exceptions.RayError as e:
            raise ClusterError(f"calibrate: the Ray cluster failed ({_first_line(e)})") from e
        return merge_statistics(results)


def _calibrate_shard(blob: bytes, reqs: list, shard, types: dict, max_rows: int, seed: int, provider: str,
                     batch: int = 16) -> dict:
    """On a worker: the partial statistics of one shard."""
    model = onnx.load_from_string(blob)
    return accumulate(model, reqs, iter(shard), types=types, max_rows=max_rows, seed=seed, provider=provider,
                      threads=1, batch=batch)


def _wait(ray, refs: list, sizes: list[int], progress) -> None:
    """Block until every task has finished, reporting the feeds done as shards complete."""
    size = dict(zip(refs, sizes))
    total, done, pending = sum(sizes), 0, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += sum(size[r] for r in ready)
        if progress:
            progress("calibrate", done, total)


def _as_source(feeds):
    from .data import FeedSource, ListFeeds
    if isinstance(feeds, FeedSource):
        return feeds
    items = tuple(feeds)
    return FeedSource("calibration feeds", None, None, None, len(items), table=ListFeeds(items))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


@contextmanager
def connect(address: str, workers: int | None = None) -> Iterator[Cluster]:
    """A `Cluster` for the length of the `with` block.

    address "local": start a Ray instance on this machine with `workers` CPUs (default: every
    core) and shut it down at the end. Any other address joins a running cluster ("auto", or the
    head's "HOST:6379", or "ray://HOST:10001" for Ray Client) and disconnects at the end, leaving
    the cluster up. `workers` (default: the cluster's CPUs) is the number of shards. A process
    already connected (`ray.init` called by the caller) keeps its connection, which is then used.
    """
    ray = import_ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            if address == "local":
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            what = "start a local Ray instance" if address == "local" else "join the Ray cluster there"
            raise ClusterError(f"--ray {address}: cannot {what} ({_first_line(e)})") from e
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        cluster = Cluster(workers=workers or max(1, cpus))
        log.info("calibrate: Ray cluster with %d CPUs, %d shards", cpus, cluster.workers)
        yield cluster
    finally:
        if owned:
            ray.shutdown()
