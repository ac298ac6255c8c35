"""Activation-aware weight quantization from the layer's input Gram (GPTQ / OBQ), and its baseline.

Pure numpy/scipy functions, float64 throughout, no I/O.

Axes. W is (out x in), y = W x; G = sum x x^T (in x in, PSD) is the calibration Gram of the
layer's input. The calibration output error of a quantized Q is tr((W - Q) G (W - Q)^T): it is a
sum over the rows of W, and within a row it couples the columns through G.

Grid. Symmetric: Q[o, j] = scale[o, group(j)] * code[o, j], code an integer in
[-2^(b-1), 2^(b-1) - 1]. `group` maps every column to a scale group: per output channel (one group,
`block = 0`), or blocks of B consecutive columns (`block = B`); for a Conv, whose columns are
(in channel, kernel offset), a block is B consecutive input channels at one kernel offset, which is
what DequantizeLinear's block_size along the Conv weight's channel axis gives. The scale of a group
is max |w| / (2^(b-1) - 1) over the group's original weights, optionally shrunk by a grid search
(`clip`) that minimizes the diag(G)-weighted rounding error of the group.

* `rtn`: round to nearest with those scales (the baseline).
* `gptq`: rounding with error feedback (Frantar et al., GPTQ; Optimal Brain Quantization). With
  H = G + lam I (lam = damp * mean diag G) and H^-1 = U^T U (U upper triangular), process the
  columns in order j = 0..in-1 (optionally by decreasing diag H, `act_order`): q_j = round(w_j),
  e_j = (w_j - q_j) / U[j, j], and w_k -= e_j U[j, k] for k > j. Each step is the exact
  minimizer of the output error over the not yet quantized columns given the ones already fixed
  (the OBS update); the updates are applied lazily in batches of `batch` columns (a rank-batch
  GEMM per batch). Scales are fixed before the sweep ("static groups"), so act_order works with
  every format. Not globally optimal (a greedy, one pass), but below RTN in practice.
* For an embedding table E (vocab x d) read by Gather, the input is one-hot: G = diag(token
  counts) (smoothed, `lowrank.solvers.token_weights`), taken over the rows of E. The error is then
  separable over entries, so rounding to nearest is exactly optimal for fixed scales; the weights
  enter the error figure and nothing else (each row has its own scales).

The relative error is tr(D G D^T) / tr(W G W^T) with the unridged G (0 if both vanish).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..lowrank.solvers import token_weights

#: bytes of one stored scale by default (float32, DequantizeLinear's output type for a float32
#: model; storage.py stores scales in the weight's own float type)
SCALE_BYTES = 4


@dataclass(frozen=True)
class Format:
    """A weight format: `bits` per code, scales per output channel (block = 0) or per block of
    `block` input columns (per row and block). dim = p > 0: product quantization of a table's
    rows instead (`codebook.py`): a `bits`-bit code (8: uint8) per sub-vector of p columns into a
    2^bits-entry codebook per subspace; no scales. half: the scales are stored as float16 (and
    cast to the weight's type in the graph), so they are float16 numbers and take 2 bytes each."""
    bits: int
    block: int = 0
    dim: int = 0
    half: bool = False

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.block < 0:
            raise ValueError(f"block must be >= 0, got {self.block}")
        if self.dim < 0 or (self.dim and (self.bits != 8 or self.block or self.half)):
            raise ValueError(f"a codebook format has 8-bit codes, no block and dim >= 1, got {self}")

    @property
    def name(self) -> str:
        if self.dim:
            return f"pq{self.bits}/d{self.dim}"
        return f"int{self.bits}" + (f"/b{self.block}" if self.block else "/channel") + ("/f16" if self.half else "")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    def groups(self, inputs: int, kernel: tuple[int, ...] = ()) -> np.ndarray:
        """Scale group of every column (inputs,), columns ordered (channel, kernel offset)."""
        return column_groups(inputs, self.block, kernel)

    def bytes(self, out: int, inputs: int, kernel: tuple[int, ...] = (), scale_bytes: int = SCALE_BYTES) -> int:
        """Stored bytes: codes packed at `bits` per entry (whole bytes per tensor) + one scale of
        `scale_bytes` per (row, group) (the weight's float type: 4 for float32, 2 for float16).
        A codebook format: out x (inputs / dim) codes + (inputs / dim) 2^bits dim codebook floats.
        `half`: 2 bytes per scale whatever `scale_bytes` says."""
        scale_bytes = 2 if self.half else scale_bytes
        if self.dim:
            parts = inputs // self.dim
            return -(-out * parts * self.bits // 8) + parts * 2 ** self.bits * self.dim * scale_bytes
        return -(-out * inputs * self.bits // 8) + out * self.ngroups(inputs, kernel) * scale_bytes

    def ngroups(self, inputs: int, kernel: tuple[int, ...] = ()) -> int:
        """Scale groups per row."""
        return int(self.groups(inputs, kernel).max()) + 1 if inputs else 0


#: the formats `error_curve` reports by default, largest first
DEFAULT_FORMATS = (Format(8), Format(8, 32), Format(4, 128), Format(4, 64), Format(4, 32))


def column_groups(inputs: int, block: int, kernel: tuple[int, ...] = ()) -> np.ndarray:
    """Group index per column: 0 everywhere (block = 0), else for columns j = c * K + p (channel
    c, kernel offset p, K = prod(kernel)): (c // block) * K + p."""
    k = int(np.prod(kernel)) if kernel else 1
    if inputs % k:
        raise ValueError(f"{inputs} columns are not a whole number of kernels of {k}")
    j = np.arange(inputs)
    if not block:
        return np.zeros(inputs, dtype=np.int64)
    return (j // k // block) * k + j % k


@dataclass(frozen=True)
class Quantized:
    """codes (out x in, int8 values in the format's range), scales (out x groups), group of every
    column (in,), dequantized = scales[:, group] * codes (out x in, float64), relative output
    error on G, and the format."""
    codes: np.ndarray
    scales: np.ndarray
    group: np.ndarray
    dequantized: np.ndarray
    error: float
    format: Format


def relative_error(W, Q, G) -> float:
    """tr((W-Q) G (W-Q)^T) / tr(W G W^T); G (in x in) or its diagonal (in,). 0 if both vanish."""
    w = np.asarray(W, dtype=np.float64)
    d = w - np.asarray(Q, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    if g.ndim == 1:
        num, den = float(np.sum(d * d * g)), float(np.sum(w * w * g))
    else:
        num, den = float(np.sum((d @ g) * d)), float(np.sum((w @ g) * w))
    num, den = max(num, 0.0), max(den, 0.0)
    if den > 0:
        return num / den
    return 0.0 if num == 0 else float("inf")


def scales_for(W, fmt: Format, group: np.ndarray, weights=None, clip: int = 0) -> np.ndarray:
    """Scales (out x groups): max |w| / qmax per (row, group); with clip = n > 0, the best of n
    shrink factors in [0.5, 1] for the weighted rounding error sum_j weights_j (w_j - q_j)^2 of
    the group (weights: diag G, default ones). Zero groups get scale 1 (all codes 0)."""
    w = np.asarray(W, dtype=np.float64)
    out, inputs = w.shape
    ngroups = int(group.max()) + 1 if inputs else 0
    members = [np.flatnonzero(group == k) for k in range(ngroups)]
    amax = np.zeros((out, ngroups))
    for k, cols in enumerate(members):
        amax[:, k] = np.max(np.abs(w[:, cols]), axis=1) if len(cols) else 0.0
    base = _representable(np.where(amax > 0, amax / fmt.qmax, 1.0), fmt)
    if not clip:
        return base
    h = np.ones(inputs) if weights is None else np.maximum(np.asarray(weights, dtype=np.float64), 0)
    best, best_err = base, None
    for f in np.linspace(1.0, 0.5, clip):
        s = _representable(base * f, fmt)
        d = w - _round(w, s[:, group], fmt) * s[:, group]
        dd = d * d * h
        err = np.stack([np.sum(dd[:, cols], axis=1) for cols in members], axis=1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


def _representable(s: np.ndarray, fmt: Format) -> np.ndarray:
    """Scales as they will be stored: float16 numbers (at least its smallest positive one) for a
    `half` format, else unchanged."""
    if not fmt.half:
        return s
    return np.maximum(s.astype(np.float16).astype(np.float64), float(np.finfo(np.float16).smallest_subnormal))


def _round(w: np.ndarray, s: np.ndarray, fmt: Format) -> np.ndarray:
    return np.clip(np.rint(w / s), fmt.qmin, fmt.qmax)


def _result(W, G, codes, scales, group, fmt) -> Quantized:
    deq = scales[:, group] * codes
    return Quantized(codes.astype(np.int8), scales, group, deq, relative_error(W, deq, G), fmt)


def _check(W, G):
    w = np.asarray(W, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"W must be 2-D, got shape {w.shape}")
    if g.shape not in ((w.shape[1], w.shape[1]), (w.shape[1],)):
        raise ValueError(f"G must be ({w.shape[1]} x {w.shape[1]}) or its diagonal, got {g.shape}")
    return w, g


def rtn(W, G, fmt: Format, kernel: tuple[int, ...] = (), clip: int = 0) -> Quantized:
    """Round to nearest on the `scales_for` grid; the error is measured on G (matrix or diagonal)."""
    w, g = _check(W, G)
    group = fmt.groups(w.shape[1], kernel)
    diag = g if g.ndim == 1 else np.diag(g)
    s = scales_for(w, fmt, group, diag, clip)
    return _result(w, g, _round(w, s[:, group], fmt), s, group, fmt)


def gptq(W, G, fmt: Format, kernel: tuple[int, ...] = (), damp: float = 0.01, act_order: bool = True,
         batch: int = 128, clip: int = 0) -> Quantized:
    """Quantize W (out x in) minimizing tr((W-Q) G (W-Q)^T) greedily with error feedback (module
    docstring). damp: lam = damp * mean(diag G) (1 if G = 0); act_order: columns by decreasing
    diag(G); batch: columns per lazy update block."""
    w, g = _check(W, G)
    if g.ndim == 1:
        g = np.diag(g)
    out, n = w.shape
    group = fmt.groups(n, kernel)
    diag = np.diag(g).copy()
    s = scales_for(w, fmt, group, diag, clip)
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    h = g[np.ix_(order, order)]
    lam = damp * float(np.mean(diag)) if np.any(diag > 0) else 1.0
    h = h + lam * np.eye(n)
    u = _upper_inverse_cholesky(h)
    work = w[:, order].copy()
    sp = s[:, group[order]]
    codes = np.zeros_like(work)
    for a in range(0, n, batch):
        b = min(a + batch, n)
        err = np.zeros((out, b - a))
        for j in range(a, b):
            q = _round(work[:, j], sp[:, j], fmt)
            codes[:, j] = q
            e = (work[:, j] - q * sp[:, j]) / u[j, j]
            work[:, j + 1:b] -= np.outer(e, u[j, j + 1:b])
            err[:, j - a] = e
        work[:, b:] -= err @ u[a:b, b:]
    inverse = np.argsort(order)
    return _result(w, g, codes[:, inverse], s, group, fmt)


def _upper_inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper U with H^-1 = U^T U (H symmetric positive definite), from one Cholesky: with J the
    reversal permutation, J H J = L L^T gives H = R R^T, R = J L J upper, so U = R^-1."""
    n = len(h)
    for _ in range(8):
        try:
            low = scipy.linalg.cholesky(h[::-1, ::-1], lower=True, check_finite=False)
            break
        except np.linalg.LinAlgError:
            h = h + np.eye(n) * max(float(np.mean(np.diag(h))), 1e-12) * 1e-2
    r = np.ascontiguousarray(low[::-1, ::-1])
    return scipy.linalg.solve_triangular(r, np.eye(n), lower=False, check_finite=False)


def quantize_embedding(E, counts, fmt: Format, smoothing: float | None = None, clip: int = 0) -> Quantized:
    """Embedding table E (vocab x d): rows = tokens, scales per token (block = 0) or per (token,
    block of d); rounding to nearest (optimal for G = diag(counts), module docstring). The error is
    sum_i w_i ||e_i - q_i||^2 / sum_i w_i ||e_i||^2 with w = token_weights(counts, smoothing)."""
    e = np.asarray(E, dtype=np.float64)
    w = token_weights(counts, smoothing)
    if len(w) != e.shape[0]:
        raise ValueError(f"counts has {len(w)} entries, E has {e.shape[0]} rows")
    group = fmt.groups(e.shape[1])
    s = scales_for(e, fmt, group, None, clip)
    deq = s[:, group] * _round(e, s[:, group], fmt)
    err = relative_error(e.T, deq.T, w)  # rows of E are W = E^T's columns
    return Quantized(_round(e, s[:, group], fmt).astype(np.int8), s, group, deq, err, fmt)


@dataclass(frozen=True)
class CurvePoint:
    format: Format
    bytes: int
    error: float


def error_curve(W, G, formats=DEFAULT_FORMATS, kernel: tuple[int, ...] = (), method=gptq,
                **kw) -> tuple[CurvePoint, ...]:
    """(format, bytes, relative output error) for every format, in the order given."""
    w = np.asarray(W)
    return tuple(CurvePoint(f, f.bytes(w.shape[0], w.shape[1], kernel), method(w, G, f, kernel, **kw).error)
                 for f in formats)


def embedding_curve(E, counts, formats=DEFAULT_FORMATS, **kw) -> tuple[CurvePoint, ...]:
    """`error_curve` for an embedding table E (vocab x d) with token counts."""
    e = np.asarray(E)
    return tuple(CurvePoint(f, f.bytes(*e.shape), quantize_embedding(e, counts, f, **kw).error) for f in formats)
