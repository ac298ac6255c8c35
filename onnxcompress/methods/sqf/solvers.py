"""Sparse quantized factors (seed 003: Kuzmin et al., Quantized Sparse Weight Decomposition).

Pure numpy/scipy functions, float64 throughout, no I/O.

W (out x in) ~ Z C with C (k x in) on a b_C-bit grid (a scale per row of C) and Z (out x k)
holding at most s non-zeros per row on a b_Z-bit grid (a scale per row of Z), minimizing the
calibration output error f(Z, C) = tr((W - ZC) G (W - ZC)^T), G (in x in) the input Gram.
Grids are symmetric: x = scale * code, code in [-2^(b-1), 2^(b-1) - 1], scale = max |row| / qmax;
bits None means full precision; z_bits = 0 means the {0, 1} grid (no values, no scales).

Solver: start from the activation-aware low-rank optimum (`lowrank.solvers.activation_aware`,
Z = U_k S_k, C = V_k^T L^-1, so that C G C^T ~ I), project it, then alternate
* Z-step: Z <- P_Z(Z - grad_Z f / L_Z), grad_Z f = -2 (W - ZC) G C^T, L_Z = 2 lambda_max(C G C^T);
  P_Z keeps the s largest |entries| of every row and rounds them to the row's grid. On the {0, 1}
  grid with s = 1 the projection of a gradient step says nothing; the step is then the exact
  assignment of every row of W to its G-nearest row of C (the k-means assignment).
* C-step: C <- P_C(C - grad_C f / L_C), grad_C f = -2 Z^T (W - ZC) G, L_C = 2 lambda_max(Z^T Z)
  lambda_max(G); or (`c_step="exact"`, the default) the block minimizer C = (Z^T Z)^+ Z^T W, a
  minimizer for every PSD G (the residual (I - P_Z) W is orthogonal to Z's columns, so the cross
  term vanishes), then P_C (rounding each row to its grid).
Optional row weights r (an embedding table: token weights) make the objective
sum_o r_o (w_o - z_o C) G (w_o - z_o C)^T; see `sqf`.
Projected steps onto a grid are not monotone; the best iterate seen is returned.

Special cases (the tests): s = k at full precision stays at the activation-aware optimum;
s = 1 with z_bits = 0 and full-precision C is Lloyd's k-means on the rows of W in the metric G
(centroids are plain means: the G-weighted least-squares centroid of a cluster is its mean).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..lowrank.solvers import activation_aware

SCALE_BYTES = 4


@dataclass(frozen=True)
class SQFFormat:
    """rank k, s non-zeros per row of Z, bits of Z (None: float32, 0: {0, 1}) and of C (None: float32)."""
    rank: int
    nnz: int
    z_bits: int | None = 8
    c_bits: int | None = 8

    def __post_init__(self):
        if not 1 <= self.nnz <= self.rank:
            raise ValueError(f"nnz must be in [1, rank], got {self.nnz} of {self.rank}")
        if self.z_bits not in (None, 0, 2, 4, 8) or self.c_bits not in (None, 2, 4, 8):
            raise ValueError(f"bits must be None, 2, 4 or 8 (or 0 for Z), got {self.z_bits}, {self.c_bits}")
        if self.z_bits == 0 and self.nnz != 1:
            raise ValueError("the {0, 1} grid for Z is vector quantization: nnz must be 1")

    @property
    def name(self) -> str:
        z = "f" if self.z_bits is None else ("bin" if self.z_bits == 0 else self.z_bits)
        c = "f" if self.c_bits is None else self.c_bits
        return f"sqf/k{self.rank}/s{self.nnz}/z{z}/c{c}"

    def c_bytes(self, inputs: int) -> int:
        """C as float32, or codes at their stored width (`stored_bits`) + a float32 scale per row."""
        if self.c_bits is None:
            return self.rank * inputs * 4
        return -(-self.rank * inputs * stored_bits(self.c_bits) // 8) + self.rank * SCALE_BYTES

    def z_bytes(self, out: int) -> dict[str, int]:
        """Bytes of Z per storage. 'dense': every entry (float32, or codes at their stored width;
        the {0, 1} grid as int8) and a float32 scale per row. 'index': the s non-zeros of every row
        as values (float32 or int8 codes; none on the {0, 1} grid) and their column indices
        (uint8 for k <= 256, else uint16), scattered into a dense Z in the graph. (ONNX sparse
        initializers would cost 8-byte indices, and the full checker rejects them as inputs of
        DequantizeLinear, so they are not used.)"""
        zb = self.z_bits
        scales = 0 if zb in (None, 0) else out * SCALE_BYTES
        dense = out * self.rank * 4 if zb is None else -(-out * self.rank * stored_bits(zb or 8) // 8)
        value = 4 if zb is None else (0 if zb == 0 else 1)
        return {"dense": dense + scales, "index": out * self.nnz * (value + index_bytes(self.rank)) + scales}

    def storage(self, out: int) -> str:
        """The cheaper Z storage, 'dense' or 'index'."""
        sizes = self.z_bytes(out)
        return "index" if sizes["index"] < sizes["dense"] else "dense"

    def bytes(self, out: int, inputs: int) -> int:
        return self.c_bytes(inputs) + min(self.z_bytes(out).values())


def stored_bits(bits: int) -> int:
    """ONNX stores 4- and 8-bit integers: 2-bit codes are held as int4."""
    return 4 if bits in (2, 4) else 8


def index_bytes(rank: int) -> int:
    return 1 if rank <= 256 else 2


@dataclass(frozen=True)
class SQF:
    """Z (out x k) and C (k x in) as float (dequantized) values, their integer codes (int8; None
    at full precision) and per-row scales, the relative output error of Z C, and the objective
    history (relative error after each alternation, start first)."""
    z: np.ndarray
    c: np.ndarray
    z_codes: np.ndarray | None
    z_scales: np.ndarray | None
    c_codes: np.ndarray | None
    c_scales: np.ndarray | None
    error: float
    format: SQFFormat
    history: tuple = field(default=())


def grid(x: np.ndarray, bits: int | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Round every row of x to its symmetric `bits` grid: (values, codes, scales); bits None: x."""
    if bits is None:
        return x, None, None
    qmax = 2 ** (bits - 1) - 1
    amax = np.max(np.abs(x), axis=1) if x.shape[1] else np.zeros(len(x))
    scales = np.where(amax > 0, amax / qmax, 1.0)
    codes = np.clip(np.rint(x / scales[:, None]), -qmax - 1, qmax)
    return codes * scales[:, None], codes.astype(np.int8), scales


def top_s(z: np.ndarray, s: int) -> np.ndarray:
    """z with all but the s largest |entries| of every row set to 0."""
    if s >= z.shape[1]:
        return z
    keep = np.argpartition(-np.abs(z), s - 1, axis=1)[:, :s]
    out = np.zeros_like(z)
    rows = np.arange(len(z))[:, None]
    out[rows, keep] = z[rows, keep]
    return out


def _project_z(z: np.ndarray, fmt: SQFFormat):
    if fmt.z_bits == 0:
        one = np.zeros_like(z)
        one[np.arange(len(z)), np.argmax(z, axis=1)] = 1.0
        return one, one.astype(np.int8), None
    return grid(top_s(z, fmt.nnz), fmt.z_bits)


def assign(W: np.ndarray, C: np.ndarray, G: np.ndarray) -> np.ndarray:
    """One-hot Z (out x k): row o of W to argmin_j (w_o - c_j) G (w_o - c_j)^T."""
    cg = C @ G
    d = -2 * (W @ G) @ C.T + np.sum(cg * C, axis=1)[None, :]
    z = np.zeros((W.shape[0], C.shape[0]))
    z[np.arange(len(W)), np.argmin(d, axis=1)] = 1.0
    return z


def _objective(w, g, z, c, rw) -> float:
    r = w - z @ c
    return max(float(np.sum(((r @ g) * r).sum(axis=1) * rw)), 0.0)


def sqf(W, G, fmt: SQFFormat, iters: int = 50, c_step: str = "exact", ridge: float = 1e-6,
        row_weights=None) -> SQF:
    """Sparse quantized factors minimizing sum_o r_o tr((w_o - z_o C) G (w_o - z_o C)^T) over the
    rows o of W, r = row_weights (default ones: the output error tr((W - ZC) G (W - ZC)^T); for
    an embedding table E (vocab x d) pass W = E, G = I and r = token weights, the Gather's
    one-hot Gram). Row weights leave the Z-step as it is (row-separable, the step per row is
    1 / (2 r_o lambda_max(C G C^T)) times a gradient proportional to r_o); the exact C-step
    becomes the weighted least squares C = (Z^T R Z)^+ Z^T R W, and the start the SVD of
    R^1/2 W L (module docstring). error: the relative weighted error of the returned Z C."""
    w = np.asarray(W, dtype=np.float64)
    g = np.asarray(G, dtype=np.float64)
    out, n = w.shape
    if fmt.rank > min(out, n):
        raise ValueError(f"rank {fmt.rank} exceeds min{w.shape}")
    rw = np.ones(out) if row_weights is None else np.asarray(row_weights, dtype=np.float64)
    if rw.shape != (out,) or np.any(rw <= 0):
        raise ValueError(f"row_weights must be {out} positive numbers")
    sw = np.sqrt(rw)[:, None]
    g = 0.5 * (g + g.T)
    total = max(float(np.sum(((w @ g) * w).sum(axis=1) * rw)), np.finfo(float).tiny)
    z, c = activation_aware(sw * w, g, ridge).factors(fmt.rank)
    z = z / sw
    c, c_codes, c_scales = grid(c, fmt.c_bits)
    if fmt.z_bits == 0:
        z = assign(w, c, g)
        z_codes, z_scales = z.astype(np.int8), None
    else:
        z, z_codes, z_scales = grid(top_s(z, fmt.nnz), fmt.z_bits)
    best = (_objective(w, g, z, c, rw), z, c, z_codes, z_scales, c_codes, c_scales)
    history = [best[0] / total]
    lam_g = float(np.linalg.eigvalsh(g)[-1]) if n else 0.0
    for _ in range(iters):
        if fmt.z_bits == 0:
            z = assign(w, c, g)
            z_codes, z_scales = z.astype(np.int8), None
        else:
            cgc = c @ g @ c.T
            lz = 2 * float(np.linalg.eigvalsh(cgc)[-1]) if len(cgc) else 0.0
            if lz > 0:
                z, z_codes, z_scales = _project_z(z + 2 * ((w - z @ c) @ g @ c.T) / lz, fmt)
        if c_step == "exact":
            c = np.linalg.lstsq(sw * z, sw * w, rcond=None)[0]
        else:
            lc = 2 * float(np.linalg.eigvalsh((z * rw[:, None]).T @ z)[-1]) * lam_g
            if lc > 0:
                c = c + 2 * ((z * rw[:, None]).T @ ((w - z @ c) @ g)) / lc
        c, c_codes, c_scales = grid(c, fmt.c_bits)
        obj = _objective(w, g, z, c, rw)
        history.append(obj / total)
        if obj < best[0]:
            best = (obj, z, c, z_codes, z_scales, c_codes, c_scales)
        if len(history) > 2 and abs(history[-2] - history[-1]) <= 1e-10 * max(history[-1], 1e-300):
            break
    obj, z, c, z_codes, z_scales, c_codes, c_scales = best
    return SQF(z, c, z_codes, z_scales, c_codes, c_scales, obj / total, fmt, tuple(history))


@dataclass(frozen=True)
class Comparison:
    """SQF's error and bytes, and the activation-aware low-rank optimum (float32 factors) at the
    largest rank whose bytes do not exceed them (rank 0: the error 1)."""
    format: SQFFormat
    bytes: int
    error: float
    lowrank_rank: int
    lowrank_bytes: int
    lowrank_error: float


def versus_lowrank(W, G, fmt: SQFFormat, **kw) -> Comparison:
    """Run `sqf` and report it next to the activation-aware low rank at the same bytes."""
    w = np.asarray(W, dtype=np.float64)
    out, n = w.shape
    result = sqf(w, G, fmt, **kw)
    size = fmt.bytes(out, n)
    rank = min(size // (4 * (out + n)), min(out, n))
    spectrum = activation_aware(w, G)
    return Comparison(fmt, size, result.error, int(rank), int(rank * 4 * (out + n)), float(spectrum.error[rank]))
