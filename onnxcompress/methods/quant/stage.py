"""`--quantize int8|int4`: quantize what the plan leaves, after the other methods have rewritten
the model.

The structural plan (ID channel groups, low-rank splits) changes the weights and the inputs of
the layers it touches: an ID exit reads only the kept channels and holds the interpolation folded
into its weight, a producer has fewer output rows, a split layer becomes two factors A (out x r)
and B (r x in) whose middle tensor has its own statistics. So the weights are quantized on the
rewritten model M', from statistics of M' itself: one more calibration pass streams the same
feeds through M' and gives every remaining layer's input Gram G' (its real inputs, upstream
changes included). Each float weight W' of a Gemm / MatMul / Conv / Gather in M' is then
rounded with error feedback (GPTQ, `solvers.gptq`), minimizing tr((W' - Q) G' (W' - Q)^T), and
stored as integers + DequantizeLinear (`storage.apply`). Errors compose: the model's output
error is that of the structural plan plus what rounding adds on top of it, both on M's outputs.

The entries are `QuantPlan`s with `after=True`, keyed by the layers of M'. A saved plan
replays them on the model its other entries rewrite (`replay`), which reproduces M' exactly.

int4 is stored in blocks of 32 inputs (DequantizeLinear with block_size, opset 21), or with one
scale per output channel where 32 does not divide the layer's input channels. A model at
an older opset is converted with onnx's version converter when the converted model passes the
full checker and loads in ONNX Runtime (`storage.upgrade_opset`); otherwise int8 per channel is
used and the report says why.
"""
from __future__ import annotations

import re
from dataclasses import replace

import onnx

from ...core.calibrate import calibrate
from ...core.config import Config
from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ..base import Site
from .solvers import Format
from .storage import BLOCKED_OPSET, model_opset, upgrade_opset

FORMATS = {"int8": Format(8), "int4": Format(4, 32)}


def _method():
    from .. import REGISTRY  # the registry imports this package; this module is loaded by its users
    return REGISTRY["quant"]


def prepare(model: onnx.ModelProto, fmt: Format, warnings: list | None = None) -> tuple[onnx.ModelProto, Format]:
    """(model at an opset that stores `fmt`, the format used): int4 needs opset 21; when the
    conversion is not safe, int8 per channel, with the reason appended to `warnings` (the caller
    reports it)."""
    if not fmt.block or model_opset(model) >= BLOCKED_OPSET:
        return model, fmt
    upgraded, reason = upgrade_opset(model, BLOCKED_OPSET)
    if upgraded is None:
        message = f"--quantize int4 needs opset {BLOCKED_OPSET} ({reason}); quantized to int8 per channel instead"
        if warnings is not None:
            warnings.append(message)
        return model, Format(8)
    return upgraded, fmt


def _fitting(layer, fmt: Format, fits) -> Format:
    """`fmt`, or the same bits per output channel where its blocks do not divide the layer's
    blocked axis (a partial last block is valid ONNX, but OpenVINO refuses it)."""
    return fmt if fits(layer, fmt) else Format(fmt.bits)


def _index(model: onnx.ModelProto, sample: dict) -> GraphIndex:
    from ...api import shapes_at  # the same shapes compress() uses
    return GraphIndex(model, *shapes_at(model, sample))


def quantize_rest(model: onnx.ModelProto, name: str, calib_src, config: Config, sample: dict, *,
                  progress=None, warnings: list | None = None):
    """Quantize every float weight of `model` (the rewritten model M') in format `name` ("int8"
    or "int4"). Returns (new model, entries, sites, skipped): the `QuantPlan`s (after=True), the
    `Site`s they were made for (in M') and the layers left float, with the reason."""
    method = _method()
    model, fmt = prepare(model, FORMATS[name], warnings)
    g = _index(model, sample)
    sites, skipped = method.sites(g, config)
    if not sites:
        return model, [], [], list(skipped)
    requests = [r for s in sites for r in method.requests(s)]
    stats = calibrate(model, requests, calib_src, types=g.types, progress=progress,
                      max_rows=config.max_rows, seed=config.seed, provider=config.provider)
    from . import _blocks_fit, entry, solve
    entries = [entry(s.target, solve(g, s.target, stats[s.target.request], [_fitting(s.target, fmt, _blocks_fit)],
                                     config)[0], after=True)
               for s in sites]
    return method.rewrite(model, g, sites, entries), entries, sites, list(skipped)


def replay(model: onnx.ModelProto, entries: list, sample: dict) -> tuple[onnx.ModelProto, list[Site]]:
    """Apply saved `--quantize` entries to the model the plan's other entries rewrote. Returns
    (new model, the sites the entries were applied to)."""
    if not entries:
        return model, []
    method = _method()
    if any(e.block for e in entries) and model_opset(model) < BLOCKED_OPSET:
        model, fmt = prepare(model, Format(4, 32))
        if fmt.block == 0:
            raise UsageError(f"plan: its int4 entries need opset {BLOCKED_OPSET}, and this model cannot be converted")
    g = _index(model, sample)
    found, _ = method.sites(g, Config())
    by_key = {s.key: s for s in found}
    for e in entries:  # plans saved before split nodes were named: "<Op #i>", node i of this model
        m = re.fullmatch(r"<(\w+) #(\d+)>", e.layer)
        if e.layer not in by_key and m and int(m[2]) < len(g.nodes) and g.nodes[int(m[2])].op_type == m[1]:
            by_key.setdefault(e.layer, next((s for s in found if s.key == g.key(int(m[2]))), None))
    by_key = {k: v for k, v in by_key.items() if v is not None}
    missing = [e.layer for e in entries if e.layer not in by_key]
    if missing:
        raise UsageError(f"plan: quantized layer {missing[0]!r} is not in the model the plan's other entries make")
    sites = [by_key[e.layer] for e in entries]
    entries = [e if e.layer == s.key else replace(e, layer=s.key) for e, s in zip(entries, sites)]
    return method.rewrite(model, g, sites, entries), sites

