"""Weight quantization as a method of the shared allocator.

Sites are the layers `lowrank.layers.find_layers` finds (Gemm, MatMul, Conv, Gather with a
constant weight read by no other node). Candidates: index 0 keeps the float weight; then the
`FORMATS` in decreasing order of stored bytes: int8 with one scale per output channel, and int4
with one scale per output channel and in blocks of 32, 64 and 128 input columns (a block as wide
as the row is the per-channel format, and is offered once), the blocks' scales in the weight's
float type or in float16 (`Format.half`: half the scale bytes; where two formats store the same
bytes the first listed is offered, so 32-blocks with float16 scales replace 64-blocks with
float32 ones); for a Gather table of at least
`CODEBOOK_ROWS` x 256 rows, also product quantization of its rows (`codebook.py`: a uint8 code per
sub-vector of 3 columns into a 256-entry codebook per subspace, 2.67 bits per weight, k-means
weighted by the token counts). Sub-vectors of 4 columns (2 bits) are not offered: on MiniLM's
word embedding their count-weighted error is half of int4's while held-out sentences lose 3 times
as much (cosine 0.9927 against 0.9976 with the rest float, measured by a one-off script), since rows the calibration never saw fit
the codebooks worst, and the allocator, which sees only calibration data, took them and ended
below what 3 columns reach at the same file size (0.9890 against 0.9911 at 12.5%). A format that stores as many bytes as the float
weight is not offered. int4 needs opset 21: a model below
it is converted (`storage.upgrade_opset`) when the converted model passes the full checker and
loads in ONNX Runtime; otherwise only int8 is offered, with the reason logged. Each is rounded with error
feedback against the layer's input Gram (GPTQ, `solvers.gptq`; a table's rows by their token
weights, `solvers.quantize_embedding`), and its local error is the relative calibration output
error tr((W - Q) G (W - Q)^T) / tr(W G W^T). Bytes scale by the format's size (codes + scales)
over the float weight's, counted as stored: codes packed at the format's bits, one scale per
(row, group) in the weight's own float type; parameters and FLOPs do not change. The weight is stored as integers
and a DequantizeLinear feeding the layer (`storage.py`), a codebook table as uint8 codes decoded
by Cast, Add, Gather and Reshape: standard ONNX, any runtime.
"""
from __future__ import annotations

import base64
import logging
import math
import threading
from dataclasses import dataclass, field

import numpy as np
from onnx import helper

from ...core.config import Config
from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ..base import Cost, Curve, Site
from ..lowrank.layers import find_layers, weight_matrix
from ..lowrank.ranks import input_gram
from .codebook import decode, product_quantize
from .solvers import Format, Quantized, gptq, quantize_embedding, rtn
from .storage import QuantEdit, apply, format_opset, layer_bytes, upgrade_opset

log = logging.getLogger(__name__)

#: the candidate formats, in the order they are offered (each layer drops the ones that store as
#: many bytes as an earlier one, so a block as wide as the row is per channel, and sorts the rest
#: by decreasing bytes)
FORMATS = (Format(8), Format(4), Format(4, 32), Format(4, 32, half=True), Format(4, 64, half=True),
           Format(4, 128, half=True), Format(4, 64), Format(4, 128), Format(8, dim=3))

#: a codebook format is offered for a table of at least this many times 2^bits rows
CODEBOOK_ROWS = 8


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
    dim: int = 0  # > 0: a table's product-quantized rows (`codebook.py`): codes uint8, scales the codebooks
    half: bool = False  # scales stored as float16 (`Format.half`)

    @property
    def site(self) -> str:
        return self.layer

    @property
    def format(self) -> Format:
        return Format(self.bits, self.block, self.dim, self.half)

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"layer": self.layer, "kind": self.kind, "format": self.format.name, "bits": self.bits,
             "block": self.block, "error": float(self.error) if math.isfinite(self.error) else None}
        if self.after:
            d["after"] = True
        if self.dim:
            d["dim"] = self.dim
        if self.half:
            d["half"] = True
        if matrices:
            kind = "uint8" if self.dim else "int8"
            codes = np.ascontiguousarray(self.codes, dtype=kind)
            d["codes"] = {"shape": list(codes.shape), kind: base64.b64encode(codes.tobytes()).decode("ascii")}
            scales = np.ascontiguousarray(self.scales, dtype="<f8")
            d["scales"] = {"shape": list(scales.shape), "float64": base64.b64encode(scales.tobytes()).decode("ascii")}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        kind = "uint8" if d.get("dim") else "int8"
        codes = np.frombuffer(base64.b64decode(d["codes"][kind]), dtype=kind).reshape(d["codes"]["shape"])
        scales = np.frombuffer(base64.b64decode(d["scales"]["float64"]), dtype="<f8").reshape(d["scales"]["shape"])
        error = d.get("error")
        return cls(d["layer"], d["kind"], int(d["bits"]), int(d["block"]), codes.copy(), scales.copy(),
                   float("nan") if error is None else float(error), bool(d.get("after", False)), int(d.get("dim", 0)),
                   bool(d.get("half", False)))

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
        dim = d.get("dim", 0)
        need(isinstance(dim, int) and dim >= 0 and (not dim or (d["bits"] == 8 and d["block"] == 0)),
             "'dim' must be a non-negative integer, and a codebook entry has 8 bits and no block")
        need(isinstance(d.get("half", False), bool) and not (dim and d.get("half")), "'half' must be true or false "
             "(and not with 'dim')")
        code_kind = "uint8" if dim else "int8"
        for key, kind, size in (("codes", code_kind, 1), ("scales", "float64", 8)):
            m = d.get(key)
            need(isinstance(m, dict) and isinstance(m.get("shape"), list) and len(m["shape"]) == 2
                 and all(isinstance(v, int) and v >= 1 for v in m["shape"]) and isinstance(m.get(kind), str),
                 f"{key!r} must hold a 2-D shape and {kind} data")
            try:
                raw = base64.b64decode(m[kind], validate=True)
            except ValueError:
                raise UsageError(f"plan: {where}: {key!r} is not base64") from None
            need(len(raw) == size * m["shape"][0] * m["shape"][1], f"{key!r} holds the wrong number of bytes")
        codes = np.frombuffer(base64.b64decode(d["codes"][code_kind]), dtype=code_kind)
        bits = d["bits"]
        if dim:
            need(d["scales"]["shape"][1] == dim and d["scales"]["shape"][0] == d["codes"]["shape"][1] * 2 ** bits,
                 "the codebooks must be (subspaces 2^bits x dim)")
        else:
            need(codes.size == 0 or (codes.min() >= -(2 ** (bits - 1)) and codes.max() < 2 ** (bits - 1)),
                 f"codes outside the int{bits} range")
        scales = np.frombuffer(base64.b64decode(d["scales"]["float64"]), dtype="<f8")
        need(bool(np.all(np.isfinite(scales))), "scales hold NaN or Inf")


class QuantMethod:
    name = "quant"
    decision = QuantPlan
    section = "quantized"
    entry_at_full = False  # a float weight is not an entry

    def __init__(self):
        self._itemsize: dict[str, int] = {}  # weight name -> float item size, for `describe`
        self._upgrade = None  # (model, its conversion or None, reason) of the last model asked about
        self._lock = threading.Lock()

    def sites(self, g: GraphIndex, config: Config):
        found = find_layers(g, include=config.include, exclude=config.exclude, max_patch=config.max_patch)
        sites = [Site(self.name, x.key, g.nodes[x.node].op_type, frozenset({x.weight}), x) for x in found.layers]
        return sites, list(found.skipped)

    def requests(self, site: Site):
        return [site.target.request]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        layer = site.target
        formats = self.formats(g, layer)
        found = solve(g, layer, stats[layer.request], formats, config)
        itemsize = _itemsize(g, layer.weight)
        self._itemsize[layer.weight] = itemsize
        nbytes = float(layer.params * itemsize)
        stored = np.array([nbytes] + [self._bytes(layer, f, itemsize) for f in formats])
        error = np.array([0.0] + [max(float(q.error), 0.0) for q in found])
        sizes = np.array([32] + [f.bits for f in formats])
        costs = (Cost("bytes", layer.weight, nbytes, stored / nbytes),)
        return Curve(site, sizes, error, costs, state=[None] + found, steps=np.arange(len(sizes)))

    def formats(self, g: GraphIndex, layer) -> list[Format]:
        """`FORMATS` this model can store (`allowed_opset`) in whole blocks (`_blocks_fit`), one
        per distinct byte count for this layer (the first offered wins: per channel over a block
        as wide as the row), by decreasing bytes."""
        opset = self.allowed_opset(g)
        itemsize = _itemsize(g, layer.weight)
        full = float(layer.params * itemsize)
        seen, out = set(), []
        for f in FORMATS:
            n = self._bytes(layer, f, itemsize)
            if format_opset(f) <= opset and _blocks_fit(layer, f) and n not in seen and n < full:
                seen.add(n)
                out.append(f)
        return sorted(out, key=lambda f: -self._bytes(layer, f, itemsize))

    def allowed_opset(self, g: GraphIndex) -> int:
        """The highest opset the formats may need: the model's own, or the one `FORMATS` need
        if `upgrade_opset` converts the model safely (checked once per model; the reason is
        logged when it does not)."""
        need = max(format_opset(f) for f in FORMATS)
        if g.opset >= need:
            return need
        with self._lock:  # sites' curves are made side by side (`threads.parallel_map`): convert once
            cache = self._upgrade
            if cache is None or cache[0] is not g.model:
                converted, reason = upgrade_opset(g.model, need)
                if converted is None:
                    log.warning("quant: only int8 per channel is offered: %s", reason)
                self._upgrade = cache = (g.model, converted, reason)
        return need if cache[1] is not None else max(g.opset, format_opset(FORMATS[0]))

    @staticmethod
    def _bytes(layer, f: Format, scale_bytes: int = 4) -> float:
        return float(layer_bytes(layer, f, "onnx", scale_bytes))

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
        for s in sites:
            if s.target.weight in g.initializers:
                self._itemsize[s.target.weight] = _itemsize(g, s.target.weight)
        edits = []
        for d in decisions:
            layer = layers.get(d.layer)
            if layer is None or layer.kind != d.kind:
                raise UsageError(f"plan: quantized layer {d.layer!r} does not match this model")
            rows, cols = (layer.inputs, layer.out) if layer.kind == "gather" else (layer.out, layer.inputs)
            if d.dim:
                if layer.kind != "gather" or d.codes.shape != (rows, cols // d.dim) or cols % d.dim:
                    raise UsageError(f"plan: quantized layer {d.layer!r} does not match this model")
                deq = decode(d.codes, d.scales, d.dim)
                edits.append(QuantEdit(layer, Quantized(d.codes, d.scales, np.zeros(0, dtype=np.int64), deq,
                                                        d.error ** 2, d.format)))
                continue
            if d.codes.shape != (rows, cols):
                raise UsageError(f"plan: quantized layer {d.layer!r} does not match this model")
            group = d.format.groups(cols, layer.kernel if layer.kind == "conv" else ())
            deq = d.scales[:, group] * d.codes
            edits.append(QuantEdit(layer, Quantized(d.codes, d.scales, group, deq, d.error ** 2, d.format)))
        cache = self._upgrade
        if cache is not None and cache[0] is model and cache[1] is not None:
            model = cache[1]  # converted once in `allowed_opset`: probes do not convert again
        try:
            return apply(model, edits)
        except ValueError as e:
            raise UsageError(f"quantize: {e}") from e

    def describe(self, site: Site | None, decision: QuantPlan) -> dict:
        """The report's row; bytes from the decision's own codes (its layer in the model it was
        made for: the input model, or for `--quantize` the rewritten one)."""
        rows, cols = decision.codes.shape
        cols *= max(decision.dim, 1)  # a codebook entry has one code per sub-vector of dim columns
        kernel, itemsize = (), 4
        if site is not None:
            itemsize = self._itemsize.get(site.target.weight, 4)
            if site.target.kind == "conv" and decision.kind == "conv":
                kernel = site.target.kernel
        return {**decision.to_dict(matrices=False), "bytes_before": int(rows * cols * itemsize),
                "bytes_after": int(decision.format.bytes(rows, cols, kernel, itemsize))}


def solve(g: GraphIndex, layer, stat, formats, config: Config) -> list:
    """`layer`'s weight quantized in each of `formats` (`solvers.Quantized`): GPTQ against the
    input Gram (round to nearest where the Gram is not affordable), a table by its token weights."""
    w = weight_matrix(g, layer)
    if layer.kind == "gather":
        counts = np.asarray(stat, dtype=np.float64)
        return [product_quantize(w.T, counts, f, config.smoothing, seed=config.seed) if f.dim else
                quantize_embedding(w.T, counts, f, config.smoothing) for f in formats]
    gram = input_gram(layer, stat)
    kernel = layer.kernel if layer.kind == "conv" else ()
    return [gptq(w, gram, f, kernel) if gram is not None else rtn(w, np.ones(w.shape[1]), f, kernel)
            for f in formats]


def entry(layer, q: Quantized, *, after: bool = False) -> QuantPlan:
    """The plan entry of `layer` stored as `q`."""
    codes = q.codes.astype(np.uint8 if q.format.dim else np.int8)
    return QuantPlan(layer.key, layer.kind, q.format.bits, q.format.block, codes,
                     np.asarray(q.scales, dtype=np.float64), math.sqrt(max(float(q.error), 0.0)), after,
                     q.format.dim, q.format.half)


def _itemsize(g: GraphIndex, name: str) -> int:
    """Bytes per value of initializer `name` (the type its DequantizeLinear scales are stored in)."""
    return int(np.dtype(helper.tensor_dtype_to_np_dtype(g.initializers[name].data_type)).itemsize)


def _blocks_fit(layer, f: Format) -> bool:
    """Per channel, or a block that divides the blocked axis (input channels; a table's d).
    ONNX and ONNX Runtime accept a partial last block, OpenVINO refuses it ("dimension of X at
    axis ... cannot be divided by block_size"), so the standard-op format keeps to whole blocks.
    A codebook format: only a Gather table whose d its sub-vectors tile, with at least
    `CODEBOOK_ROWS` codebook entries' worth of rows (fewer rows: the codebooks cost more than the
    codes save)."""
    if f.dim:
        return layer.kind == "gather" and layer.out % f.dim == 0 and layer.inputs >= CODEBOOK_ROWS * 2 ** f.bits
    if not f.block:
        return True
    channels = layer.out if layer.kind == "gather" else layer.inputs // int(np.prod(layer.kernel or (1,)))
    return channels % f.block == 0
