"""End-to-end sensitivity of each site: the exchange rate between a site's local error and the
model's output error, so the allocator can compare an FFN group, an attention projection and
an embedding table in one currency.

For site s with local error curve e_s, one probe compresses s alone at a probe size j_p (the
first step whose local error reaches min(0.05, half the curve's largest), so the probe sits in
the range the allocator will use), runs the probe feeds through ONNX Runtime and measures the
relative output error energy

    E_s = mean over float outputs o of  sum_feeds ||y_o - y'_o||^2 / sum_feeds ||y_o||^2.

Padded positions (attention mask 0, `calibrate.mask_input`) of token-major outputs
([batch, sequence, ...]) are left out of both sums, as validation leaves them out.

The site's weight is w_s = E_s / e_s(j_p), with e_s(j_p) the probe's local error on the
calibration statistics; the allocator then estimates the model's error as sum_s w_s e_s(j_s).
A site whose curve is flat at zero keeps w_s = 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .core.calibrate import Progress, mask_input
from .core.runtime import make_session, run
from .methods import loadtime
from .methods.base import Curve


@dataclass(frozen=True)
class Sensitivity:
    site: str
    size: int          # the probe size (channels, rank)
    local: float       # the curve's local relative error at that size
    measured: float    # the model's relative output error energy with only this site compressed
    weight: float      # measured / local

    def to_dict(self) -> dict:
        return asdict(self)


def probe_index(curve: Curve, level: float = 0.05) -> int | None:
    """The first budget step whose local error reaches min(level, half the largest), or None
    when the curve is zero everywhere."""
    steps = curve.grid
    steps = steps[steps > 0]
    if not len(steps):
        return None
    err = np.asarray(curve.error)[steps]
    top = float(np.max(err))
    if top <= 0:
        return None
    hit = np.nonzero(err >= min(level, 0.5 * top))[0]
    return int(steps[hit[0]])


def _local_error(decision, fallback: float) -> float:
    """The probe's local error as measured on the calibration statistics (the decision's own
    relative error, squared). For an embedding table this counts the tokens seen in calibration
    only, while its curve also gives unseen tokens their smoothed weight: the ratio then carries
    the curve's allowance for unseen tokens into the estimate."""
    err = getattr(decision, "error", None)
    return float(err) ** 2 if err is not None and np.isfinite(err) else fallback


def reference_outputs(model, feeds: list[dict], names: list[str]) -> list[list[np.ndarray]]:
    session = make_session(model)
    return [run(session, names, feed, f"probe feed {k} (original model)") for k, feed in enumerate(feeds)]


def output_error(model, feeds: list[dict], names: list[str], reference: list[list[np.ndarray]],
                 mask: str | None = None) -> float:
    """The relative output error energy of `model` against `reference` on `feeds` (float outputs;
    `mask`: the attention-mask input, whose padded positions are left out)."""
    session = make_session(model)
    diff = np.zeros(len(names))
    norm = np.zeros(len(names))
    floats = np.zeros(len(names), dtype=bool)
    for k, feed in enumerate(feeds):
        new = run(session, names, feed, f"probe feed {k} (probe model)")
        for o, (r, c) in enumerate(zip(reference[k], new)):
            if r.dtype.kind == "f":
                floats[o] = True
                r64, c64 = r.astype(np.float64), c.astype(np.float64)
                real = _real(feed, mask, r.shape)
                if real is not None:
                    r64, c64 = np.where(real, r64, 0.0), np.where(real, c64, 0.0)
                diff[o] += float(np.sum((r64 - c64) ** 2))
                norm[o] += float(np.sum(r64 * r64))
    rel = np.where(norm > 0, diff / np.maximum(norm, 1e-300), diff)
    rel = np.where(np.isfinite(rel), rel, 1.0)
    return float(np.mean(rel[floats])) if floats.any() else 0.0


def _real(feed: dict, mask: str | None, shape: tuple) -> np.ndarray | None:
    """Where a token-major output of `shape` holds real positions (broadcast to `shape`), or
    None when the mask does not apply."""
    m = feed.get(mask) if mask is not None else None
    if m is None or np.ndim(m) != 2 or len(shape) < 3 or tuple(shape[:2]) != np.shape(m):
        return None
    m = np.asarray(m) != 0
    return None if m.all() else np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - 2)), shape)


def measure(model, g, methods: dict, curves: list[Curve], feeds: list[dict], config, *,
            progress: Progress | None = None) -> list[Sensitivity]:
    """One probe per curve (see the module docstring). `methods`: registry name -> method."""
    names = [vi.name for vi in model.graph.output]
    mask = mask_input(model)
    reference = reference_outputs(model, feeds, names)
    out = []
    for k, curve in enumerate(curves):
        j = probe_index(curve)
        if j is None:
            out.append(Sensitivity(curve.id, int(curve.sizes[0]), 0.0, 0.0, 1.0))
        else:
            method = methods[curve.site.method]
            decision = getattr(method, "probe", method.realize)(g, curve, j, config)  # `LowRankMethod.probe`
            probe = loadtime.finish(method.rewrite(model, g, [curve.site], [decision]), model, config)  # as written
            measured = output_error(probe, feeds, names, reference, mask)
            local = _local_error(decision, float(curve.error[j]))
            out.append(Sensitivity(curve.id, int(curve.sizes[j]), local, measured,
                                   measured / local if local > 0 else 1.0))
        if progress:
            progress("sensitivity", k + 1, len(curves))
    return out
