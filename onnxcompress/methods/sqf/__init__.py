"""Sparse quantized factors (seed 003) as a method of the shared allocator.

Sites: the Gemm, MatMul and Conv (group 1) layers `lowrank.layers.find_layers` finds, W viewed
as a matrix (out x in; a Conv's in is in_channels * kernel). Left alone with the reason (`storable`):
Gather tables (`storage.py` does not store them: their statistic weighs rows, not columns), and
float16 / bfloat16 weights below opset 19 (their scales keep the weight's type, which
DequantizeLinear accepts from opset 19).

Candidates: index 0 keeps the float weight; then every `SQFFormat(k, s, b, b)` of the grid
k in {m/2, m/4, m/8} (m = min(out, in)), s in {k, k/4, k/16} non-zeros per row of Z, b = 8
bits (and b = 4 where the model's opset is 21 or newer: ONNX int4), solved by `solvers.sqf`
(projected steps alternating Z and C from the activation-aware optimum, at most `ITERS`
alternations) against the layer's input Gram G (in x in). Candidates whose stored bytes are not
below the float weight's are dropped; the rest are sorted by bytes, largest first. The local
error is the relative calibration output error energy tr(D G D^T) / tr(W G W^T), D = W - Z C.

Costs (per candidate, exactly what `storage.store` writes):
* bytes: C's codes (k x in, int8 or packed int4) and k scales; Z either dense (out x k codes and
  out scales) or, where cheaper, its s non-zeros per row (codes, out x s) with their columns
  (uint8 for k <= 256, else uint16) and an int64 shape (16 bytes); a Conv adds its int64
  reshape target. Scales have the weight's float type.
* params: the elements `core.cost.count_params` counts in that form (codes, scales, uint8
  columns).
* FLOPs per row of X (a position): MatMul(X, W) with k (in + out) < in out is stored on the
  activation, X C^T Z^T: k (in + out) multiply-adds instead of in out. Every other layer forms
  W = Z C in the graph (out k in multiply-adds per run, whatever the batch) and then runs as
  before: its FLOPs grow by the factor 1 + k / rows, rows the positions per sample.

Cost of the curves: per layer the grid is at most 18 solves (9 below opset 21), each up to
`ITERS` alternations of O(out in k + in^2 k) work, plus an SVD and an eigendecomposition of the
in x in Gram per solve. On MiniLM's shapes (opset 17: 9 solves per layer; random weights, one
BLAS thread, load average 17 to 30) a 384 x 384 layer took 22 s, out x in = 1536 x 384 59 s and
384 x 1536 440 s: about an hour for its 36 layers. That is why `--method auto` does not run this
method (it is registered, with `--method sqf` of its own; docs/allocation.md).
"""
from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from ...core.config import Config
from ...core.errors import UsageError
from ...core.graph import GraphIndex
from ..base import Cost, Curve, Site, Skipped
from ..lowrank.layers import find_layers, weight_matrix
from ..lowrank.ranks import input_gram
from ..lowrank.solvers import activation_aware
from ..quant.storage import BLOCKED_OPSET
from . import storage
from .solvers import SQF, SQFFormat, index_bytes, sqf, stored_bits

log = logging.getLogger(__name__)

ITERS = 20          # alternations per solve (the best iterate is kept)
RANKS = (2, 4, 8)   # k = min(out, in) / each
SPARSITY = (1, 4, 16)  # s = k / each
KINDS = ("gemm", "matmul", "matmul_left", "conv")
HALF_SCALES_OPSET = 19  # DequantizeLinear with float16 / bfloat16 scales


@dataclass(frozen=True)
class SqfPlan:
    """One weight stored as sparse quantized factors W ~ Z C, W (out x in) as
    `lowrank.layers.weight_matrix` views it: Z = z_codes * z_scales[:, None] (out x k, at most
    `nnz` non-zeros per row), C = c_codes * c_scales[:, None] (k x in). `error`: the relative
    calibration output error sqrt(tr(D G D^T) / tr(W G W^T)), D = W - Z C; `lowrank_error` the
    same for the activation-aware low rank (float32 factors) at the largest rank `lowrank_rank`
    whose bytes do not exceed this entry's."""
    method = "sqf"

    layer: str
    kind: str
    out: int
    inputs: int
    rank: int
    nnz: int
    bits: int
    z_codes: np.ndarray = field(compare=False)
    z_scales: np.ndarray = field(compare=False)
    c_codes: np.ndarray = field(compare=False)
    c_scales: np.ndarray = field(compare=False)
    error: float = 0.0
    lowrank_rank: int = 0
    lowrank_error: float = 1.0

    @property
    def site(self) -> str:
        return self.layer

    @property
    def format(self) -> SQFFormat:
        return SQFFormat(self.rank, self.nnz, self.bits, self.bits)

    def result(self) -> SQF:
        """The factors as `storage.store` takes them."""
        z = self.z_codes * self.z_scales[:, None]
        c = self.c_codes * self.c_scales[:, None]
        return SQF(z, c, self.z_codes, self.z_scales, self.c_codes, self.c_scales, self.error ** 2, self.format)

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"layer": self.layer, "kind": self.kind, "shape": [self.out, self.inputs], "format": self.format.name,
             "rank": self.rank, "nnz": self.nnz, "bits": self.bits, "error": _finite(self.error),
             "lowrank_rank": self.lowrank_rank, "lowrank_error": _finite(self.lowrank_error)}
        if matrices:
            for key in ("z_codes", "c_codes"):
                a = np.ascontiguousarray(getattr(self, key), dtype=np.int8)
                d[key] = {"shape": list(a.shape), "int8": base64.b64encode(a.tobytes()).decode("ascii")}
            for key in ("z_scales", "c_scales"):
                a = np.ascontiguousarray(getattr(self, key), dtype="<f8")
                d[key] = {"shape": list(a.shape), "float64": base64.b64encode(a.tobytes()).decode("ascii")}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SqfPlan":
        def arr(key, kind, dtype):
            raw = base64.b64decode(d[key][kind])
            return np.frombuffer(raw, dtype=dtype).reshape(d[key]["shape"]).copy()
        return cls(d["layer"], d["kind"], int(d["shape"][0]), int(d["shape"][1]), int(d["rank"]), int(d["nnz"]),
                   int(d["bits"]), arr("z_codes", "int8", np.int8), arr("z_scales", "float64", "<f8"),
                   arr("c_codes", "int8", np.int8), arr("c_scales", "float64", "<f8"),
                   _float(d.get("error")), int(d.get("lowrank_rank", 0)), _float(d.get("lowrank_error")))

    @staticmethod
    def check(d: dict, where: str) -> None:
        """The structure `from_dict` reads (a `UsageError` naming the entry)."""
        def need(ok, message):
            if not ok:
                raise UsageError(f"plan: {where}: {message}")
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        need(isinstance(d.get("layer"), str) and d.get("kind") in KINDS, f"must name its layer and a kind of {KINDS}")
        shape = d.get("shape")
        need(isinstance(shape, list) and len(shape) == 2 and all(whole(v) and v >= 1 for v in shape),
             "'shape' must be two positive integers")
        out, n = shape
        rank, nnz, bits = d.get("rank"), d.get("nnz"), d.get("bits")
        need(whole(rank) and 1 <= rank <= min(out, n), f"'rank' must be an integer in [1, {min(out, n)}]")
        need(whole(nnz) and 1 <= nnz <= rank, f"'nnz' must be an integer in [1, {rank}]")
        need(bits in (4, 8) and whole(bits), "'bits' must be 4 or 8")
        for key, kind, size, want in (("z_codes", "int8", 1, [out, rank]), ("c_codes", "int8", 1, [rank, n]),
                                      ("z_scales", "float64", 8, [out]), ("c_scales", "float64", 8, [rank])):
            m = d.get(key)
            need(isinstance(m, dict) and m.get("shape") == want and isinstance(m.get(kind), str),
                 f"{key!r} must hold shape {want} and {kind} data")
            try:
                raw = base64.b64decode(m[kind], validate=True)
            except ValueError:
                raise UsageError(f"plan: {where}: {key!r} is not base64") from None
            need(len(raw) == size * math.prod(want), f"{key!r} holds the wrong number of bytes")
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        z = np.frombuffer(base64.b64decode(d["z_codes"]["int8"]), dtype=np.int8).reshape(out, rank)
        for key in ("z_codes", "c_codes"):
            codes = np.frombuffer(base64.b64decode(d[key]["int8"]), dtype=np.int8)
            need(codes.min() >= lo and codes.max() <= hi, f"{key!r} outside the int{bits} range")
        need(int(np.count_nonzero(z, axis=1).max()) <= nnz, f"a row of Z holds more than {nnz} non-zeros")
        for key in ("z_scales", "c_scales"):
            s = np.frombuffer(base64.b64decode(d[key]["float64"]), dtype="<f8")
            need(bool(np.all(np.isfinite(s))), f"{key!r} holds NaN or Inf")
        for key in ("error", "lowrank_error"):
            v = d.get(key)
            need(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), f"{key!r} must be a number")


@dataclass(frozen=True)
class Candidate:
    """One solved format of a layer: the factors and the low-rank comparison at its bytes."""
    result: SQF
    bytes: int
    lowrank_rank: int
    lowrank_error: float  # energy


class SqfMethod:
    name = "sqf"
    decision = SqfPlan
    section = "sqf"
    entry_at_full = False  # a float weight is not an entry

    def sites(self, g: GraphIndex, config: Config):
        found = find_layers(g, include=config.include, exclude=config.exclude, max_patch=config.max_patch)
        sites, skipped = [], list(found.skipped)
        for x in found.layers:
            reason = storable(g, x)
            if reason:
                skipped.append(Skipped(x.key, g.nodes[x.node].op_type, f"sparse quantized factors: {reason}"))
            else:
                sites.append(Site(self.name, x.key, g.nodes[x.node].op_type, frozenset({x.weight}), x))
        return sites, skipped

    def requests(self, site: Site):
        return [site.target.request]

    def curve(self, g: GraphIndex, site: Site, stats: dict, config: Config, flops: dict) -> Curve:
        layer = site.target
        w = weight_matrix(g, layer)
        gram = input_gram(layer, stats[layer.request])
        gram = np.eye(layer.inputs) if gram is None else gram
        itemsize = g.const(layer.weight).dtype.itemsize
        full = layer.out * layer.inputs * itemsize
        spectrum = activation_aware(w, gram)
        found = []
        for fmt in formats(layer.out, layer.inputs, g.opset):
            size = stored_bytes(fmt, layer, itemsize)
            if size >= full:
                continue
            r = sqf(w, gram, fmt, iters=ITERS)
            rank = min(size // (itemsize * (layer.out + layer.inputs)), min(layer.out, layer.inputs))
            found.append(Candidate(r, size, int(rank), float(spectrum.error[rank])))
        found.sort(key=lambda c: -c.bytes)
        log.debug("sqf %s: %d candidates", layer.key, len(found))
        sizes = np.array([full] + [c.bytes for c in found], dtype=np.int64)
        error = np.array([0.0] + [max(float(c.result.error), 0.0) for c in found])
        params = np.array([1.0] + [stored_params(c.result.format, layer) / layer.params for c in found])
        base = flops.get(layer.node, 2.0 * layer.rows * layer.params)
        rows = base / (2.0 * layer.params)
        fl = np.array([1.0] + [flop_factor(c.result.format, layer, rows) for c in found])
        costs = (Cost("params", layer.weight, float(layer.params), params),
                 Cost("bytes", layer.weight, float(full), sizes / full),
                 Cost("flops", layer.key, float(base), fl))
        return Curve(site, sizes, error, costs, state=[None] + found, steps=np.arange(len(sizes)))

    def keep_index(self, curve: Curve, fraction: float):
        return "--keep sizes channels and ranks; sparse quantized factors are chosen by a budget or a target"

    def tolerance_index(self, curve: Curve, eps: float):
        ok = np.nonzero(np.sqrt(curve.error) <= eps)[0]
        if not len(ok) or ok[-1] == 0:
            return "no sparse quantized factors meet the tolerance"
        return int(ok[np.argmin(curve.sizes[ok])])  # the fewest bytes of those that meet it

    def realize(self, g: GraphIndex, curve: Curve, index: int, config: Config) -> SqfPlan:
        layer, c = curve.site.target, curve.state[index]
        r = c.result
        fmt = r.format
        return SqfPlan(layer.key, layer.kind, layer.out, layer.inputs, fmt.rank, fmt.nnz, fmt.z_bits,
                       r.z_codes.astype(np.int8), np.asarray(r.z_scales, np.float64),
                       r.c_codes.astype(np.int8), np.asarray(r.c_scales, np.float64),
                       math.sqrt(max(float(r.error), 0.0)), c.lowrank_rank, math.sqrt(max(c.lowrank_error, 0.0)))

    def rewrite(self, model, g: GraphIndex, sites: list[Site], decisions: list):
        layers = {s.key: s.target for s in sites}
        for d in decisions:
            layer = layers.get(d.layer)
            if layer is None or layer.kind != d.kind or (layer.out, layer.inputs) != (d.out, d.inputs):
                raise UsageError(f"plan: sparse quantized factors of {d.layer!r} do not match this model")
            try:
                model = storage.store(model, layer, d.result(), on_activation=on_activation(d.format, layer))
            except ValueError as e:
                raise UsageError(f"sqf: {e}") from e
        return model

    def describe(self, site: Site | None, decision: SqfPlan) -> dict:
        """The report's row: format, error next to the low-rank optimum at the same bytes, bytes
        (as stored, float32 scales when the site is not known), how the product is formed."""
        layer = site.target if site is not None else None
        itemsize = 4
        fmt = decision.format
        row = {**decision.to_dict(matrices=False), "bytes_before": decision.out * decision.inputs * itemsize}
        row["bytes_after"] = (stored_bytes(fmt, layer, itemsize) if layer is not None
                              else fmt.bytes(decision.out, decision.inputs))
        row["product"] = "activation" if layer is not None and on_activation(fmt, layer) else "weight"
        return row


def storable(g: GraphIndex, layer) -> str:
    """Why `storage.store` cannot hold `layer` ("" if it can): Gather tables are not stored as
    factors, and DequantizeLinear takes scales of a float type other than float32 (the weight's
    type, which the scales keep) only from opset 19."""
    if layer.kind not in KINDS:
        return "Gather tables are not stored as factors"
    dtype = g.initializers[layer.weight].data_type
    if dtype != TensorProto.FLOAT and g.opset < HALF_SCALES_OPSET:
        return (f"a {TensorProto.DataType.Name(dtype).lower()} weight needs DequantizeLinear of opset "
                f"{HALF_SCALES_OPSET} (the model has {g.opset})")
    return ""


def formats(out: int, inputs: int, opset: int) -> list[SQFFormat]:
    """The grid of the module docstring (4 bits only at opset 21 and newer)."""
    m = min(out, inputs)
    bits = (8, 4) if opset >= BLOCKED_OPSET else (8,)
    ranks = sorted({max(1, m // d) for d in RANKS}, reverse=True)
    return [SQFFormat(k, s, b, b) for k in ranks for s in sorted({max(1, k // d) for d in SPARSITY}, reverse=True)
            for b in bits]


def on_activation(fmt: SQFFormat, layer) -> bool:
    """MatMul(X, W) whose factors are cheaper on the activation than the formed weight."""
    return layer.kind == "matmul" and fmt.rank * (layer.out + layer.inputs) < layer.out * layer.inputs


def _codes(n: int, bits: int) -> int:
    return -(-n * stored_bits(bits) // 8)


def stored_bytes(fmt: SQFFormat, layer, itemsize: int = 4) -> int:
    """The initializer bytes `storage.store` writes for `layer` in `fmt` (module docstring)."""
    k, out = fmt.rank, layer.out
    size = _codes(k * layer.inputs, fmt.c_bits) + k * itemsize + out * itemsize
    if fmt.storage(out) == "dense":
        size += _codes(out * k, fmt.z_bits)
    else:
        size += _codes(out * fmt.nnz, fmt.z_bits) + out * fmt.nnz * index_bytes(k) + 16
    if layer.kind == "conv":
        size += 8 * (2 + len(layer.kernel))
    return int(size)


def stored_params(fmt: SQFFormat, layer) -> int:
    """The elements `core.cost.count_params` counts in the stored form: codes, scales and uint8
    columns (uint16 columns are not counted there)."""
    k, out = fmt.rank, layer.out
    n = k * layer.inputs + k + out
    if fmt.storage(out) == "dense":
        return n + out * k
    return n + out * fmt.nnz * (2 if index_bytes(k) == 1 else 1)


def flop_factor(fmt: SQFFormat, layer, rows: float) -> float:
    """The layer's FLOPs in the stored form over its FLOPs now (module docstring)."""
    if on_activation(fmt, layer):
        return fmt.rank * (layer.out + layer.inputs) / layer.params
    return 1.0 + fmt.rank / max(rows, 1.0)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _float(x) -> float:
    return float("nan") if x is None else float(x)
