"""Calibrate, decide and rewrite a block of channel groups at a time, for models whose statistics
do not fit in memory side by side.

With a per-site size rule (`keep`, `tolerance`) each group's decision reads its own statistics
only, so the groups can be taken in blocks: per block, one calibration pass exposes only that
block's exit tensors (and runs only the layers they depend on, `runtime.make_session(only=True)`),
the block's curves and decisions are made, the rewrite applies them, and everything the block
needed is released before the next one:

* the Grams (8 C^2 bytes per exit) and curves are dropped after the block is decided;
* the weights the rewrite made are appended to a scratch data file (`weights.spill`), so the
  model in memory stays a graph of references;
* the interpolation matrices stay in the plan (`--save-plan` writes them) as memory maps of
  files in the scratch folder.

So the process holds at most one block's statistics (at most `Config.stats_memory` MiB, or the
largest single group's if that is more) on top of the weights ONNX Runtime maps. Groups that edit
a common weight are kept in one block, so each block's rewrite is the one-pass rewrite
restricted to its groups.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from .core import stats as stats_mod, weights
from .core.calibrate import calibrate
from .core.plan import GroupPlan, Plan
from .core.stats import gram_bytes

log = logging.getLogger(__name__)


def applies(config) -> bool:
    """Runs that can be calibrated block by block: ID with a per-site size rule."""
    return config.method == "id" and config.per_site


def budget(config) -> int:
    """Bytes of statistics one calibration pass may accumulate."""
    return stats_mod.STATS_BUDGET if config.stats_memory is None else config.stats_memory * 2**20


def need(site, methods) -> int:
    """Bytes of the statistics a site requests (float64 Grams, int64 counts)."""
    return sum(gram_bytes(r.width) if hasattr(r, "width") else 8 * r.size for r in methods[site.method].requests(site))


def partition(sites: list, methods: dict, limit: int) -> list[list[list]]:
    """Sites in blocks of at most `limit` bytes of statistics (a larger cluster alone), in order.
    A block is a list of clusters: sites that claim a common initializer form one cluster (they
    are decided in one block and rewritten together)."""
    parent = list(range(len(sites)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, s in enumerate(sites):
        for name in s.claims:
            if name in owner:
                parent[root(i)] = root(owner[name])
            else:
                owner[name] = i
    clusters: dict[int, list[int]] = {}
    for i in range(len(sites)):
        clusters.setdefault(root(i), []).append(i)
    out, current, used = [], [], 0
    for members in sorted(clusters.values()):
        size = sum(need(sites[i], methods) for i in members)
        if current and used + size > limit:
            out.append(current)
            current, used = [], 0
        current.append([sites[i] for i in members])
        used += size
    if current:
        out.append(current)
    return out


def run(norm, g, methods: dict, blocks: list[list[list]], config, *, calib_src, curve, decide, rewrite,
        scratch: Path, timer, progress=None) -> tuple:
    """Calibrate, decide and rewrite each block in turn on `norm` (not changed). `curve(site,
    stats)` makes a site's curve, `decide(curves)` returns (entries, left) for a block, and
    `rewrite(model, sites, plan)` applies a plan to those sites. The rewrite goes a cluster at a
    time and its new weights are spilled at once, so only one cluster's new weights are ever in
    memory. Returns (model, entries, left): the rewritten model (weights it made in
    `scratch`), every entry (matrices mapped from `scratch`), and the sites left whole with
    their reasons."""
    data = scratch / "weights.data"
    model, entries, left = norm, [], []
    for b, clusters in enumerate(blocks):
        block = [s for cluster in clusters for s in cluster]
        requests = [r for s in block for r in methods[s.method].requests(s)]
        log.info("calibrate: block %d of %d, %d sites, %.0f MiB of statistics", b + 1, len(blocks), len(block),
                 sum(need(s, methods) for s in block) / 2**20)
        with timer("calibrate"):
            stats = calibrate(norm, requests, calib_src, types=g.types, progress=progress,
                              max_rows=config.max_rows, seed=config.seed)
        with timer("decide"):
            curves = [curve(s, stats) for s in block]
        del stats
        found, why = decide(curves)
        del curves
        with timer("rewrite"):
            for cluster in clusters:
                keys = {(s.method, s.key) for s in cluster}
                mine = tuple(e for e in found if (e.method, e.site) in keys)
                if mine:
                    model = rewrite(model, cluster, Plan(config.method, config.select, mine))
                    weights.spill(model, data)
        entries += [_mapped(e, scratch, len(entries) + k) for k, e in enumerate(found)]
        left += why
    return model, entries, left


def _mapped(entry, scratch: Path, k: int):
    """`entry` with its large matrices moved to .npy files in `scratch`, read back as memory maps."""
    if not isinstance(entry, GroupPlan):
        return entry

    def keep_on_disk(name: str, value: np.ndarray) -> np.ndarray:
        if value.nbytes < 2**20:
            return value
        path = scratch / f"entry{k}-{name}.npy"
        np.save(path, value)
        return np.load(path, mmap_mode="r")

    interp = {e: keep_on_disk(f"T{j}", t) for j, (e, t) in enumerate(entry.interpolation.items())}
    return replace(entry, interpolation=interp)
