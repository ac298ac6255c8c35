"""Low-rank splits (seeds 001 and 002) as a method of the shared allocator.

Sites are the layers `layers.py` finds (Gemm, MatMul, Conv, Gather with a constant weight read by
no other node). Candidates: index 0 keeps the layer whole; index j >= 1 splits it at rank
r = max_rank - j + 1, where max_rank is the largest rank whose split is smaller than the layer.
The local error at r is the method's relative calibration output error energy (`ranks.py`);
parameters and bytes scale by r (in + out) / (in out), FLOPs likewise, except a Gather's, which
are 0 whole and 2 rows r out split.

The variant is `--method` (svd, aasvd or lp); `--method auto` uses aasvd.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ...core.config import Config
from ...core.graph import GraphIndex
from ...core.plan import LayerPlan, Plan
from ..base import Cost, Curve, Site
from .. import rounding
from .layers import find_layers
from . import solvers as lowrank
from .ranks import errors, factors, layer_curve
from .rewrite import split


class LowRankMethod:
    name = "lowrank"
    decision = LayerPlan
    section = "layers"
    entry_at_full = False  # a layer kept whole is not split

    VARIANTS = ("svd", "aasvd", "lp")

    def _config(self, config: Config) -> Config:
        """The config with its method as the low-rank variant (auto: aasvd)."""
        return config if config.method in self.VARIANTS else dataclasses.replace(config, method="aasvd")

    def sites(self, g: GraphIndex, config: Config):
        found = find_layers(g, include=config.include, exclude=config.exclude, max_patch=config.max_patch)
        claims = lambda x: frozenset(n for n in g.nodes[x.node].input if n in g.initializers)  # noqa: E731
        sites = [Site(self.name, x.key, g.nodes[x.node].op_type, claims(x), x) for x in found.layers]
        return sites, list(found.skipped)

    def requests(self, site: Site):
        return [site.target.request]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        layer = site.target
        state = layer_curve(g, layer, stats[layer.request], self._config(config))
        top = layer.max_rank
        ranks = np.arange(top, 0, -1)
        sizes = np.concatenate([[min(layer.out, layer.inputs)], ranks])
        spectrum = np.asarray(state.spectrum.error, dtype=np.float64)
        error = np.concatenate([[0.0], np.maximum(spectrum[np.minimum(ranks, len(spectrum) - 1)], 0.0)])
        floor = max(1, math.ceil(config.min_keep * min(layer.out, layer.inputs)))
        n = rounding.multiple(config.round, layer.kind)
        steps = rounding.grid(sizes, n, floor, parts=32)
        return Curve(site, sizes, error, tuple(self._costs(g, layer, sizes, flops, config.decode == "load")), state,
                     steps, n)

    def _costs(self, g: GraphIndex, layer, sizes: np.ndarray, flops: dict, tables_at_load: bool = False) -> list[Cost]:
        """Params and bytes as stored; FLOPs per call: a split table looked up then multiplied adds
        2 rows r d, none when it is formed at load (`tables_at_load`, `--decode load`)."""
        split = sizes * (layer.out + layer.inputs) / layer.params
        split[0] = 1.0
        w = g.const(layer.weight)
        out = [Cost("params", layer.weight, float(layer.params), split),
               Cost("bytes", layer.weight, float(w.nbytes), split)]
        if layer.kind == "gather":
            dense = 2.0 * layer.rows * layer.params
            frac = np.zeros(len(sizes)) if tables_at_load else sizes / layer.inputs
            frac[0] = 0.0
            out.append(Cost("flops", layer.key, dense, frac))
        else:
            out.append(Cost("flops", layer.key, flops.get(layer.node, 2.0 * layer.rows * layer.params), split))
        return out

    def keep_index(self, curve: Curve, fraction: float):
        layer, n = curve.site.target, curve.multiple
        r = min(math.floor(fraction * layer.params / (layer.out + layer.inputs)), layer.max_rank)
        if n > 1 and r >= 1:
            r = rounding.keep_size(r, layer.max_rank + 1, n)
            r = r if r <= layer.max_rank else n * (layer.max_rank // n)
        if r < 1:
            return (f"keep {fraction} leaves no rank >= 1 for a {layer.out} x {layer.inputs} weight" if n == 1 else
                    f"no multiple of {n} (--round) below rank {layer.max_rank + 1} makes a "
                    f"{layer.out} x {layer.inputs} weight smaller")
        return layer.max_rank - r + 1

    def tolerance_index(self, curve: Curve, eps: float):
        layer, n = curve.site.target, curve.multiple
        r = rounding.at_least(max(1, curve.state.spectrum.rank_for(eps * eps)), layer.max_rank + 1, n)
        if r > layer.max_rank:
            return (f"tolerance {eps} needs rank {r}" + (f" (a multiple of {n}, --round)" if n > 1 else "")
                    + "; a split that size is not smaller than the layer")
        return layer.max_rank - r + 1

    def realize(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> LayerPlan:
        """The split at the curve's rank r; for a table under aasvd, the split with exact rows for
        the tokens calibration saw (`frequent_rows`) where it fits in r's parameters and bytes, its
        rank still a multiple of `--round` and above `--min-keep`, and its Good-Turing held-out
        error is the lower (its `error` is then that estimate). Not with `--quantize`, which would
        round the exact rows and leave the index map at 4 bytes a token."""
        plan = self.probe(g, curve, index, config)
        layer, state = curve.site.target, curve.state
        if (layer.kind != "gather" or state.counts is None or self._config(config).method != "aasvd"
                or config.quantize):
            return plan
        table = state.w.T
        split = lowrank.frequent_rows(table, state.counts, plan.rank, config.smoothing,
                                      itemsize=g.const(layer.weight).dtype.itemsize, multiple=curve.multiple,
                                      floor=math.ceil(config.min_keep * min(layer.out, layer.inputs)))
        plain = lowrank.smoothed_error(table, state.counts, config.smoothing, plan.right.T, plan.left.T)
        if split is None or split.error >= plain:
            return plan
        return dataclasses.replace(plan, rank=split.right.shape[0], left=split.right.T, right=split.left.T,
                                   error=math.sqrt(max(split.error, 0.0)), rows=split.rows, residual=split.residual)

    def probe(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> LayerPlan:
        """The plain split at the curve's rank: what a sensitivity probe measures (exact rows
        would hide a table's error from calibration feeds, whose tokens they all cover)."""
        layer, state = curve.site.target, curve.state
        rank = int(curve.sizes[index])
        a, b = factors(state, rank, self._config(config))
        err, best = errors(state, a, b, rank)
        statistic = layer.statistic if state.gram is not None or state.counts is not None else "none"
        return LayerPlan(layer.key, layer.kind, layer.out, layer.inputs, rank, a, b, err, best, statistic)

    def rewrite(self, model, g: GraphIndex, sites: list[Site], decisions: list):
        if not decisions:
            return model
        return split(model, g, {s.key: s.target for s in sites}, Plan("lowrank", "id", tuple(decisions)))

    def describe(self, site: Site, decision: LayerPlan) -> dict:
        return {**decision.to_dict(matrices=False),
                "error_ratio": (decision.error / decision.best_error) if decision.best_error > 0 else None}
