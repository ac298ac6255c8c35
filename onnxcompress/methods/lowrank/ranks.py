"""Low-rank curves: input statistics -> each layer's error at every rank and its factors
(docs/maths.md, "Low rank").

Per layer, with W (out x in) and its input Gram G (see `layers.py`):

* method "svd":   plain truncated SVD of W (seed 001's baseline);
* method "aasvd": activation-aware SVD, the exact minimizer of tr((W - AB) G (W - AB)^T); for a
  Gather table G = diag(counts), so it is the frequency-weighted SVD of the table's rows with
  `smoothing` pseudo-counts (unseen tokens keep a say);
* method "lp":    the robust l_p rank-r subspace of W's rows (for a table: the vocabulary rows),
  by IRLS (seed 002); with `lp_weighted`, a table's rows are weighted by smoothed token counts.

A Conv reads the Gram of its im2col patches, or, for patches longer than `max_patch`, kron(G_c, I)
from its channel Gram alone (the report says which). The error curve the allocator reads is the
method's own (plain SVD's for "lp").

Every plan carries its relative calibration output error sqrt(tr(D G D^T) / tr(W G W^T)) and
the activation-aware optimum at the same rank, so any method is measured against the optimum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import ellipsoid
from . import solvers as lowrank
from ...core.stats import ChannelGram, PatchGram
from ...core.config import Config
from ...core.graph import GraphIndex
from .layers import Layer, weight_matrix

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
    lp_factors = ellipsoid.lp_factors if config.solver == "ellipsoid" else lowrank.lp_factors
    if curve.layer.kind == "gather":
        weights = lowrank.token_weights(curve.counts, config.smoothing) if config.lp_weighted else None
        a_e, b_e = lp_factors(curve.w.T, rank, config.p, row_weights=weights)
        return b_e.T, a_e.T
    return lp_factors(curve.w, rank, config.p)


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
