"""Factorize: input statistics + size rule -> one `LayerPlan` per split layer (the low-rank
counterpart of `select.py`; docs/maths.md, "Low rank", "Choosing sizes").

Per layer, with W (out x in) and its input Gram G (see `layers.py`):

* method "svd":   plain truncated SVD of W (seed 001's baseline);
* method "aasvd": activation-aware SVD, the exact minimizer of tr((W - AB) G (W - AB)^T); for a
  Gather table G = diag(counts), so it is the frequency-weighted SVD of the table's rows with
  `smoothing` pseudo-counts (unseen tokens keep a say);
* method "lp":    the robust l_p rank-r subspace of W's rows (for a table: the vocabulary rows),
  by IRLS (seed 002); with `lp_weighted`, a table's rows are weighted by smoothed token counts.

A Conv reads the Gram of its im2col patches, or, for patches longer than `max_patch`, kron(G_c, I)
from its channel Gram alone (the report says which).

Sizes: `keep F` takes, per layer, the largest rank with r (in + out) <= F in out; `tolerance eps`
the smallest rank whose relative error sqrt(e_r) is at most eps; the budgets start every layer
unsplit and repeatedly take the step (unsplit -> the largest rank that saves anything, then
smaller ranks) with the least added relative error energy per parameter or FLOP saved, until
the model total is at most the target. The error curve is the method's own (plain SVD's for
"lp"). A layer whose chosen split would not be smaller stays as it is, with the reason.

Every plan carries its relative calibration output error sqrt(tr(D G D^T) / tr(W G W^T)) and
the activation-aware optimum at the same rank, so any method is measured against the optimum.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from . import solvers as lowrank
from ...core.stats import ChannelGram, PatchGram
from ...core.calibrate import Progress, ticker
from ...core.config import Config
from ...core.cost import cheapest_first
from ...core.graph import GraphIndex
from ..base import Skipped
from .layers import Layer, LayerAnalysis, weight_matrix
from ...core.plan import LayerPlan

log = logging.getLogger(__name__)

_KRON_LIMIT = 8192   # channel-only Conv statistics are expanded to kron(G_c, I) up to this size


@dataclass(frozen=True)
class LayerCurve:
    layer: Layer
    w: np.ndarray
    gram: np.ndarray | None     # input Gram (inputs x inputs); None for tables
    counts: np.ndarray | None   # token counts, tables only
    spectrum: lowrank.Spectrum  # the method's factors for every rank (plain SVD's for "lp")
    optimal: bool = False       # spectrum is the activation-aware one


def input_gram(layer: Layer, stat) -> np.ndarray | None:
    """The layer's input Gram over W's columns, or None where it is not affordable."""
    if isinstance(layer.request, PatchGram):
        return stat.gram
    if isinstance(layer.request, ChannelGram):
        k = int(np.prod(layer.kernel, dtype=np.int64)) if layer.kernel else 1
        if k == 1:
            return stat.gram
        if layer.inputs <= _KRON_LIMIT:
            return np.kron(stat.gram, np.eye(k))
    return None


def layer_curve(g: GraphIndex, layer: Layer, stat, config: Config) -> LayerCurve:
    w = weight_matrix(g, layer)
    if layer.kind == "gather":
        counts = np.asarray(stat, dtype=np.float64)
        if config.method == "aasvd":
            spec = _transpose(lowrank.frequency_weighted(w.T, counts, config.smoothing))
        else:
            spec = lowrank.svd(w)
        return LayerCurve(layer, w, None, counts, spec)
    gram = input_gram(layer, stat)
    if config.method == "aasvd" and gram is not None:
        return LayerCurve(layer, w, gram, None, lowrank.activation_aware(w, gram), optimal=True)
    return LayerCurve(layer, w, gram, None, lowrank.svd(w))


def _transpose(spec: lowrank.Spectrum) -> lowrank.Spectrum:
    """E ~ A_e B_e as W = E^T ~ B_e^T A_e^T."""
    return lowrank.Spectrum(spec.right.T, spec.left.T, spec.error)


def factors(curve: LayerCurve, rank: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) for W ~ A B at `rank`, by the configured method."""
    if config.method != "lp":
        return curve.spectrum.factors(rank)
    if curve.layer.kind == "gather":
        weights = lowrank.token_weights(curve.counts, config.smoothing) if config.lp_weighted else None
        a_e, b_e = lowrank.lp_factors(curve.w.T, rank, config.p, row_weights=weights)
        return b_e.T, a_e.T
    return lowrank.lp_factors(curve.w, rank, config.p)


def errors(curve: LayerCurve, a: np.ndarray, b: np.ndarray, rank: int) -> tuple[float, float]:
    """(relative calibration output error of A B, the activation-aware optimum at `rank`), both
    as sqrt of energy fractions; NaN where the layer's input statistic is not available."""
    if curve.counts is not None:
        c = curve.counts
        d = curve.w - a @ b                                       # (d x vocab), column i = token i
        total = float(np.dot(c, np.einsum("ij,ij->j", curve.w, curve.w)))
        err = float(np.dot(c, np.einsum("ij,ij->j", d, d))) / total if total > 0 else 0.0
        best = lowrank.frequency_weighted(curve.w.T, c, 0.0).error[rank]
        return math.sqrt(max(err, 0.0)), math.sqrt(max(float(best), 0.0))
    if curve.gram is None:
        return math.nan, math.nan
    err = lowrank.output_error(curve.w, a, b, curve.gram)
    best = (curve.spectrum if curve.optimal else lowrank.activation_aware(curve.w, curve.gram)).error[rank]
    return math.sqrt(max(err, 0.0)), math.sqrt(max(float(best), 0.0))


def factorize(g: GraphIndex, analysis: LayerAnalysis, stats: dict, config: Config,
              totals: tuple[float, float], progress: Progress | None = None
              ) -> tuple[tuple[LayerPlan, ...], tuple[Skipped, ...]]:
    """Plans for the layers worth splitting, and the layers left alone with their reasons.
    `progress("decide", done, total)` is called after each layer's curve and each layer's factors."""
    tick = ticker(progress, "decide", 2 * len(analysis.layers))
    curves = []
    for layer in analysis.layers:
        curves.append(layer_curve(g, layer, stats[layer.request], config))
        tick()
    ranks = choose_ranks(curves, config, totals)
    plans, skipped = [], []
    for curve in curves:
        tick()
        layer, rank = curve.layer, ranks[curve.layer.key]
        if isinstance(rank, str):
            skipped.append(Skipped(layer.key, g.nodes[layer.node].op_type, rank))
            continue
        a, b = factors(curve, rank, config)
        err, best = errors(curve, a, b, rank)
        plans.append(LayerPlan(layer.key, layer.kind, layer.out, layer.inputs, rank, a, b, err, best,
                               layer.statistic if curve.gram is not None or curve.counts is not None else "none"))
    return tuple(plans), tuple(skipped)


def choose_ranks(curves: list[LayerCurve], config: Config, totals: tuple[float, float]) -> dict:
    """Per layer key, the rank to split at, or the reason it stays whole."""
    rule, value = config.size_rule
    if rule in ("flops_target", "params_target"):
        return greedy_ranks(curves, config, rule, value, totals)
    out = {}
    for c in curves:
        layer = c.layer
        if rule == "keep":
            r = min(math.floor(value * layer.params / (layer.out + layer.inputs)), layer.max_rank)
            out[layer.key] = r if r >= 1 else f"keep {value} leaves no rank >= 1 for a {layer.out} x {layer.inputs} weight"
        else:
            r = max(1, c.spectrum.rank_for(value * value))
            out[layer.key] = r if r <= layer.max_rank else (
                f"tolerance {value} needs rank {r}; a split that size is not smaller than the layer")
    return out


def step_cost(layer: Layer, rank: int | None, flops: bool) -> float:
    """Parameters (or FLOPs per feed) of the layer whole (rank None) or split at `rank`."""
    if not flops:
        return float(layer.params if rank is None else layer.split_params(rank))
    if layer.kind == "gather":
        return 0.0 if rank is None else 2.0 * layer.rows * rank * layer.out
    return 2.0 * layer.rows * (layer.params if rank is None else layer.split_params(rank))


def greedy_ranks(curves: list[LayerCurve], config: Config, rule: str, target: float,
                 totals: tuple[float, float]) -> dict:
    """Seed 000's allocation over layers: shrink where the error per unit saved is least."""
    flops = rule == "flops_target"
    total = totals[1] if flops else totals[0]
    rank: dict[str, int | None] = {c.layer.key: None for c in curves}
    goal = target * total

    def steps():
        for c in curves:
            layer, r = c.layer, rank[c.layer.key]
            floor = max(1, math.ceil(config.min_keep * min(layer.out, layer.inputs)))
            new = layer.max_rank if r is None else r - max(1, layer.max_rank // 32)
            if new < floor or layer.max_rank < floor:
                continue
            saved = step_cost(layer, r, flops) - step_cost(layer, new, flops)
            if saved > 0:
                added = c.spectrum.error[new] - (0.0 if r is None else c.spectrum.error[r])
                yield max(float(added), 0.0) / saved, layer.key, new, saved

    reached = cheapest_first(total, goal, steps, rank.__setitem__)
    if reached > goal:
        log.warning("factorize: %s %.3f is not reachable by splitting these layers; reached %.3f",
                    rule, target, reached / total if total else 0.0)
    return {k: (r if r is not None else f"{rule} {target} is met without splitting it")
            for k, r in rank.items()}
