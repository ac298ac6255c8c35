"""Block dropping as a method of the shared allocator.

Sites are residual blocks y = x + f(x) (`find.py`: an Add whose other operand is computed from x
by a body nothing else reads). A block has two candidates: index 0 keeps it, index 1 drops it
(y := x; the body's nodes and the initializers only they read are removed, `drop.py`).

Local error of dropping, from the calibration pass (two `Energy` requests):

    e = (sum ||f||^2 / n_f) / (sum ||y||^2 / n_y),

the relative energy of the Add's output that the block contributes, i.e. the relative error
of y itself when f is removed. With sensitivity probes (budgets and targets, the default) the
allocator's currency is the real thing: the probe drops the block alone, runs the probe feeds
and measures the model's relative output error E, so w e = E (`sensitivity.py`).

Costs: every weight the block removes (params, bytes; the same items, under the same keys, as
the ID, low-rank and quantization sites that edit it) and every body node's FLOPs, each scaled
by 1 (kept) or 0 (dropped).

Inner sites: the block claims every initializer it removes (`Site.claims`), so a channel group,
low-rank split or quantized weight inside it and the block exclude each other, as any two
methods claiming one weight do (`allocate.conflicts`): once the block is dropped its inner sites
stay whole and make no entry (they are void: their nodes are gone), and once an inner site has
shrunk the block stays. A channel group reaching through the Add into the rest of the network
(a ResNet stream) claims weights inside the block too, and is excluded the same way. With the
per-site rules the earlier method in the registry wins, so `--tolerance` under `--method auto`
drops only blocks no other site takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...core.config import Config
from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ..base import Cost, Curve, Site
from .drop import drop_blocks
from .find import Block, block_flops, find_blocks, weight_sizes


@dataclass(frozen=True)
class Energy:
    """A statistics request: the sum of squares and the element count of `tensor` (any shape),
    over every calibration feed. Duck-types `core.stats` requests for `core.calibrate`."""
    tensor: str

    def accumulator(self) -> "EnergyAccumulator":
        return EnergyAccumulator()

    def rows(self, value: np.ndarray, max_rows: int, rng) -> np.ndarray:
        return value


class EnergyAccumulator:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: np.ndarray) -> None:
        v = np.asarray(value, dtype=np.float64).ravel()
        v = v[np.isfinite(v)]
        self.total += float(v @ v)
        self.count += v.size

    def result(self) -> tuple[float, int]:
        return self.total, self.count


@dataclass(frozen=True)
class BlockPlan:
    """One dropped block: the Add node, its skip x and branch f (checked against the model when
    a plan is replayed) and the local error of dropping it (sqrt of e)."""
    method = "block"

    block: str
    skip: str
    branch: str
    error: float = 0.0

    @property
    def site(self) -> str:
        return self.block

    def to_dict(self, *, matrices: bool = True) -> dict:
        return {"block": self.block, "skip": self.skip, "branch": self.branch,
                "error": float(self.error) if math.isfinite(self.error) else None}

    @classmethod
    def from_dict(cls, d: dict) -> "BlockPlan":
        error = d.get("error")
        return cls(d["block"], d["skip"], d["branch"], float("nan") if error is None else float(error))

    @staticmethod
    def check(d: dict, where: str) -> None:
        if not all(isinstance(d.get(k), str) for k in ("block", "skip", "branch")):
            raise UsageError(f"plan: {where}: a dropped block must name its Add ('block'), 'skip' and 'branch'")
        if d.get("error") is not None and not isinstance(d["error"], (int, float)):
            raise UsageError(f"plan: {where}: 'error' must be a number")


def local_error(stats: dict, block: Block) -> float:
    """e = mean square of f / mean square of y on the calibration data (0 when y is all zero)."""
    (ef, nf), (ey, ny) = stats[Energy(block.branch)], stats[Energy(block.output)]
    if not nf or not ny or ey <= 0:
        return 0.0
    return (ef / nf) / (ey / ny)


class BlockMethod:
    name = "block"
    decision = BlockPlan
    section = "blocks"
    entry_at_full = False  # a kept block is no entry

    def sites(self, g: GraphIndex, config: Config):
        found = find_blocks(g, include=config.include, exclude=config.exclude)
        sites = [Site(self.name, b.key, "Add", frozenset(b.weights), b) for b in found.blocks]
        return sites, list(found.skipped)

    def requests(self, site: Site):
        b = site.target
        return [Energy(b.branch), Energy(b.output)]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        b = site.target
        drop = np.array([1.0, 0.0])
        costs = []
        for name, params, nbytes in weight_sizes(g, b):
            if params:
                costs.append(Cost("params", name, float(params), drop))
            costs.append(Cost("bytes", name, float(nbytes), drop))
        for j, f in sorted(block_flops(b, flops).items()):
            costs.append(Cost("flops", g.key(j), f, drop))
        error = np.array([0.0, max(local_error(stats, b), 0.0)])
        return Curve(site, np.array([1, 0]), error, tuple(costs), steps=np.array([0, 1]))

    def keep_index(self, curve: Curve, fraction: float):
        return "--keep sizes channels and ranks; blocks are dropped by a budget, a target or --tolerance"

    def tolerance_index(self, curve: Curve, eps: float):
        rel = math.sqrt(float(curve.error[1]))
        return 1 if rel <= eps else f"dropping it changes its output by {rel:.3g} (relative), over --tolerance {eps}"

    def realize(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> BlockPlan:
        b = curve.site.target
        if index == 0:
            raise ValueError("a kept block is no plan entry")
        return BlockPlan(b.key, b.skip, b.branch, math.sqrt(float(curve.error[1])))

    def rewrite(self, model, g: GraphIndex, sites: list[Site], decisions: list):
        if not decisions:
            return model
        blocks = {s.key: s.target for s in sites}
        pairs = []
        for d in decisions:
            b = blocks.get(d.block)
            if b is None or (b.skip, b.branch) != (d.skip, d.branch):
                raise UsageError(f"plan: block {d.block!r} does not match this model")
            pairs.append((b.output, b.skip))
        return drop_blocks(model, pairs)

    def describe(self, site: Site, decision: BlockPlan) -> dict:
        b = site.target
        return {**decision.to_dict(), "nodes": len(b.nodes), "side_inputs": list(b.side)}
