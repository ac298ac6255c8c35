"""Weight quantization as a method of the shared allocator.

Sites are the layers `lowrank.layers.find_layers` finds (Gemm, MatMul, Conv, Gather with a
constant weight read by no other node). Candidates: index 0 keeps the float weight; then int8
with one scale per output channel; then, where the model's opset allows blocked
DequantizeLinear (21 and newer), int4 in blocks of 32 input columns. Each is rounded with error
feedback against the layer's input Gram (GPTQ, `solvers.gptq`; a table's rows by their token
weights, `solvers.quantize_embedding`), and its local error is the relative calibration output
error tr((W - Q) G (W - Q)^T) / tr(W G W^T). Bytes scale by the format's size (codes + scales)
over the float weight's; parameters and FLOPs do not change. The weight is stored as integers
and a DequantizeLinear feeding the layer (`storage.py`): standard ONNX, any runtime.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np

from ...core.config import Config
from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ..base import Cost, Curve, Site
from ..lowrank.layers import find_layers, weight_matrix
from ..lowrank.ranks import input_gram
from .solvers import Format, Quantized, gptq, quantize_embedding, rtn
from .storage import BLOCKED_OPSET, QuantEdit, apply

FORMATS = (Format(8), Format(4, 32))


@dataclass(frozen=True)
class QuantPlan:
    """One quantized weight: integer `codes` and `scales` in the solver's orientation (W as
    out x in; a table as vocab x d), the format, and the relative output error (sqrt of energy)."""
    method = "quant"

    layer: str
    kind: str
    bits: int
    block: int
    codes: np.ndarray = field(compare=False)
    scales: np.ndarray = field(compare=False)
    error: float = 0.0
    after: bool = False  # `--quantize`: a layer of the model the other entries rewrote (`stage.py`)

    @property
    def site(self) -> str:
        return self.layer

    @property
    def format(self) -> Format:
        return Format(self.bits, self.block)

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"layer": self.layer, "kind": self.kind, "format": self.format.name, "bits": self.bits,
             "block": self.block, "error": float(self.error) if math.isfinite(self.error) else None}
        if self.after:
            d["after"] = True
        if matrices:
            codes = np.ascontiguousarray(self.codes, dtype=np.int8)
            d["codes"] = {"shape": list(codes.shape), "int8": base64.b64encode(codes.tobytes()).decode("ascii")}
            scales = np.ascontiguousarray(self.scales, dtype="<f8")
            d["scales"] = {"shape": list(scales.shape), "float64": base64.b64encode(scales.tobytes()).decode("ascii")}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        codes = np.frombuffer(base64.b64decode(d["codes"]["int8"]), dtype=np.int8).reshape(d["codes"]["shape"])
        scales = np.frombuffer(base64.b64decode(d["scales"]["float64"]), dtype="<f8").reshape(d["scales"]["shape"])
        error = d.get("error")
        return cls(d["layer"], d["kind"], int(d["bits"]), int(d["block"]), codes.copy(), scales.copy(),
                   float("nan") if error is None else float(error), bool(d.get("after", False)))

    @staticmethod
    def check(d: dict, where: str) -> None:
        """The structure `from_dict` reads (a `UsageError` naming the entry)."""
        def need(ok, message):
            if not ok:
                raise UsageError(f"plan: {where}: {message}")
        need(isinstance(d.get("layer"), str) and isinstance(d.get("kind"), str), "must name its layer and kind")
        need(isinstance(d.get("bits"), int) and d["bits"] in (2, 3, 4, 8), "'bits' must be 2, 3, 4 or 8")
        need(isinstance(d.get("block"), int) and d["block"] >= 0, "'block' must be a non-negative integer")
        need(isinstance(d.get("after", False), bool), "'after' must be true or false")
        for key, kind, size in (("codes", "int8", 1), ("scales", "float64", 8)):
            m = d.get(key)
            need(isinstance(m, dict) and isinstance(m.get("shape"), list) and len(m["shape"]) == 2
                 and all(isinstance(v, int) and v >= 1 for v in m["shape"]) and isinstance(m.get(kind), str),
                 f"{key!r} must hold a 2-D shape and {kind} data")
            try:
                raw = base64.b64decode(m[kind], validate=True)
            except ValueError:
                raise UsageError(f"plan: {where}: {key!r} is not base64") from None
            need(len(raw) == size * m["shape"][0] * m["shape"][1], f"{key!r} holds the wrong number of bytes")
        codes = np.frombuffer(base64.b64decode(d["codes"]["int8"]), dtype=np.int8)
        bits = d["bits"]
        need(codes.size == 0 or (codes.min() >= -(2 ** (bits - 1)) and codes.max() < 2 ** (bits - 1)),
             f"codes outside the int{bits} range")
        scales = np.frombuffer(base64.b64decode(d["scales"]["float64"]), dtype="<f8")
        need(bool(np.all(np.isfinite(scales))), "scales hold NaN or Inf")


class QuantMethod:
    name = "quant"
    decision = QuantPlan
    section = "quantized"
    entry_at_full = False  # a float weight is not an entry

    def sites(self, g: GraphIndex, config: Config):
        found = find_layers(g, include=config.include, exclude=config.exclude, max_patch=config.max_patch)
        sites = [Site(self.name, x.key, g.nodes[x.node].op_type, frozenset({x.weight}), x) for x in found.layers]
        return sites, list(found.skipped)

    def requests(self, site: Site):
        return [site.target.request]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        layer = site.target
        formats = [f for f in FORMATS if not f.block or g.opset >= BLOCKED_OPSET]
        found = solve(g, layer, stats[layer.request], formats, config)
        nbytes = float(g.const(layer.weight).nbytes)
        stored = np.array([nbytes] + [self._bytes(layer, f) for f in formats])
        error = np.array([0.0] + [max(float(q.error), 0.0) for q in found])
        sizes = np.array([32] + [f.bits for f in formats])
        costs = (Cost("bytes", layer.weight, nbytes, stored / nbytes),)
        return Curve(site, sizes, error, costs, state=[None] + found, steps=np.arange(len(sizes)))

    @staticmethod
    def _bytes(layer, f: Format) -> float:
        rows, cols, kernel = ((layer.inputs, layer.out, ()) if layer.kind == "gather"
                              else (layer.out, layer.inputs, layer.kernel if layer.kind == "conv" else ()))
        return float(f.bytes(rows, cols, kernel))

    def keep_index(self, curve: Curve, fraction: float):
        return "--keep sizes channels and ranks; quantization is chosen by a budget or a target"

    def tolerance_index(self, curve: Curve, eps: float):
        ok = np.nonzero(np.sqrt(curve.error) <= eps)[0]
        return int(ok[-1]) if len(ok) and ok[-1] > 0 else "no format meets the tolerance"

    def realize(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> QuantPlan:
        return entry(curve.site.target, curve.state[index])

    def rewrite(self, model, g: GraphIndex, sites: list[Site], decisions: list):
        if not decisions:
            return model
        layers = {s.key: s.target for s in sites}
        edits = []
        for d in decisions:
            layer = layers.get(d.layer)
            if layer is None or layer.kind != d.kind:
                raise UsageError(f"plan: quantized layer {d.layer!r} does not match this model")
            rows, cols = (layer.inputs, layer.out) if layer.kind == "gather" else (layer.out, layer.inputs)
            if d.codes.shape != (rows, cols):
                raise UsageError(f"plan: quantized layer {d.layer!r} does not match this model")
            group = d.format.groups(cols, layer.kernel if layer.kind == "conv" else ())
            deq = d.scales[:, group] * d.codes
            edits.append(QuantEdit(layer, Quantized(d.codes, d.scales, group, deq, d.error ** 2, d.format)))
        try:
            return apply(model, edits)
        except ValueError as e:
            raise UsageError(f"quantize: {e}") from e

    def describe(self, site: Site | None, decision: QuantPlan) -> dict:
        """The report's row; bytes from the decision's own codes (its layer in the model it was
        made for: the input model, or for `--quantize` the rewritten one)."""
        rows, cols = decision.codes.shape
        kernel = ()
        if site is not None and site.target.kind == "conv" and decision.kind == "conv":
            kernel = site.target.kernel
        return {**decision.to_dict(matrices=False), "bytes_before": int(rows * cols * 4),
                "bytes_after": int(decision.format.bytes(rows, cols, kernel))}


def solve(g: GraphIndex, layer, stat, formats, config: Config) -> list:
    """`layer`'s weight quantized in each of `formats` (`solvers.Quantized`): GPTQ against the
    input Gram (round to nearest where the Gram is not affordable), a table by its token weights."""
    w = weight_matrix(g, layer)
    if layer.kind == "gather":
        return [quantize_embedding(w.T, np.asarray(stat, dtype=np.float64), f, config.smoothing) for f in formats]
    gram = input_gram(layer, stat)
    kernel = layer.kernel if layer.kind == "conv" else ()
    return [gptq(w, gram, f, kernel) if gram is not None else rtn(w, np.ones(w.shape[1]), f, kernel)
            for f in formats]


def entry(layer, q: Quantized, *, after: bool = False) -> QuantPlan:
    """The plan entry of `layer` stored as `q`."""
    return QuantPlan(layer.key, layer.kind, q.format.bits, q.format.block, q.codes.astype(np.int8),
                     np.asarray(q.scales, dtype=np.float64), math.sqrt(max(float(q.error), 0.0)), after)
