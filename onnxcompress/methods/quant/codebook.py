"""Product quantization of an embedding table: uint8 codes into one codebook per subspace.

Axes. The table E is (vocab x d), read by Gather(E, ids) along axis 0. Its d columns are cut into
m = d / p consecutive subspaces of p dimensions; row i's piece in subspace j is
e_ij = E[i, j p : (j + 1) p]. Each subspace has its own codebook C_j of K = 2^bits entries
(K x p); row i stores one code c_ij in [0, K) per subspace, and its quantized row is
q_i = [C_0[c_i0], C_1[c_i1], ..., C_{m-1}[c_i,m-1]]. At bits = 8 a code is one uint8: p = 4 gives
2 bits per weight, p = 8 one bit, plus the codebooks (m K p floats, shared by every row).

Error. The Gather's input is one-hot, so its calibration Gram is G = diag(w) over the rows
(w = `lowrank.solvers.token_weights(counts, smoothing)`: token counts with pseudo-counts, so a
token unseen in calibration still weighs a fraction of an average one). The output error is
sum_i w_i ||e_i - q_i||^2 = sum_j sum_i w_i ||e_ij - C_j[c_ij]||^2: separable over subspaces,
and in each one it is the weighted k-means objective. `product_quantize` minimizes it per subspace
with Lloyd's iterations (assign every row to its nearest codeword; move every codeword to the
w-weighted mean of its rows), from K rows drawn with probability proportional to w; a local
minimum, not the global one (k-means is NP-hard), but never above its start. Every row, seen or
not, gets its nearest codeword. The relative error is that sum over sum_i w_i ||e_i||^2.

Stored as standard ONNX (`nodes`): codes (vocab x m, uint8) -> Cast(int64) -> Add(j K, the
subspace's offset into the stacked codebooks) -> Gather(codebooks stacked (m K x p), axis 0)
-> (vocab, m, p) -> Reshape (vocab, d): the table, which the model's own Gather then reads. Every
input is a constant, so runtimes may fold the decoding at load time (ONNX Runtime does).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...ops.surgery import cast_weight
from ..lowrank.solvers import token_weights


def pq_parts(d: int, dim: int) -> int:
    """Subspaces m = d / dim (ValueError unless dim divides d)."""
    if dim < 1 or d % dim:
        raise ValueError(f"sub-vectors of {dim} dimensions do not tile rows of {d}")
    return d // dim


def decode(codes: np.ndarray, codebooks: np.ndarray, dim: int) -> np.ndarray:
    """The quantized table (vocab x m dim) from codes (vocab x m, values in [0, K)) and the
    stacked codebooks (m K x dim; rows j K .. j K + K - 1 are subspace j's)."""
    codes = np.asarray(codes, dtype=np.int64)
    vocab, m = codes.shape
    k = len(codebooks) // m
    return np.asarray(codebooks)[codes + np.arange(m) * k].reshape(vocab, m * dim)


def kmeans(X: np.ndarray, w: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weighted Lloyd's k-means: (centres k x p, label per row) minimizing
    sum_i w_i ||x_i - centre[label_i]||^2 locally. X (n x p), w (n,) > 0. Starts from k distinct
    rows drawn with probability w / sum w (all rows when n <= k, the rest of the centres then
    copies of row 0, unused); an emptied centre moves to the row with the largest weighted error."""
    x = np.asarray(X, dtype=np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    if n <= k:
        centres = np.concatenate([x, np.repeat(x[:1], k - n, axis=0)])
        return centres, np.arange(n)
    centres = x[rng.choice(n, size=k, replace=False, p=w / w.sum())].copy()
    labels = None
    for _ in range(iters):
        new = _nearest(x, centres)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        mass = np.bincount(labels, weights=w, minlength=k)
        sums = np.stack([np.bincount(labels, weights=w * x[:, c], minlength=k) for c in range(x.shape[1])], 1)
        full = mass > 0
        centres[full] = sums[full] / mass[full, None]
        if not np.all(full):
            err = w * np.sum((x - centres[labels]) ** 2, axis=1)
            for c, r in zip(np.flatnonzero(~full), np.argsort(-err)):
                centres[c] = x[r]
    return centres, _nearest(x, centres)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of each row's nearest centre: argmin_c ||c||^2 - 2 x.c (float32: a tie broken either
    way costs the same to rounding; the centres themselves are updated in float64)."""
    c = centres.astype(np.float32)
    return np.argmin((c * c).sum(1)[None, :] - 2 * (x.astype(np.float32) @ c.T), axis=1)


def product_quantize(E, counts, fmt, smoothing: float | None = None, iters: int = 25, seed: int = 0):
    """Table E (vocab x d) in `fmt` (a `solvers.Format` with dim = p > 0): a `solvers.Quantized`
    whose codes are (vocab x m) in [0, 2^bits), scales the stacked codebooks (m 2^bits x p),
    dequantized the decoded table, and error the relative weighted error (module docstring)."""
    from .solvers import Quantized, relative_error
    e = np.asarray(E, dtype=np.float64)
    w = token_weights(counts, smoothing)
    if len(w) != e.shape[0]:
        raise ValueError(f"counts has {len(w)} entries, E has {e.shape[0]} rows")
    p, k = fmt.dim, 2 ** fmt.bits
    m = pq_parts(e.shape[1], p)
    books = np.zeros((m * k, p))
    codes = np.zeros((e.shape[0], m), dtype=np.int64)
    for j in range(m):
        books[j * k:(j + 1) * k], codes[:, j] = kmeans(e[:, j * p:(j + 1) * p], w, k, iters, seed + j)
    deq = decode(codes, books, p)
    return Quantized(codes.astype(np.uint8), books, np.zeros(0, dtype=np.int64), deq,
                     relative_error(e.T, deq.T, w), fmt)


def nodes(name: str, codes: np.ndarray, codebooks: np.ndarray, dtype, names: list[str],
          table: str) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The nodes computing `table` (vocab x d) from the uint8 codes and the stacked codebooks
    (module docstring), and their initializers; `names` holds four fresh names (codes, codebooks,
    offsets, shape) and `name` prefixes the node names."""
    vocab, m = codes.shape
    k = len(codebooks) // m
    p = codebooks.shape[1]
    c, books, offsets, shape = names
    inits = [numpy_helper.from_array(np.ascontiguousarray(codes, dtype=np.uint8), c),
             numpy_helper.from_array(np.ascontiguousarray(cast_weight(codebooks, dtype)), books),
             numpy_helper.from_array(np.arange(m, dtype=np.int64) * k, offsets),
             numpy_helper.from_array(np.array([vocab, m * p], dtype=np.int64), shape)]
    out = [helper.make_node("Cast", [c], [f"{c}_int64"], name=f"{name}/cast", to=TensorProto.INT64),
           helper.make_node("Add", [f"{c}_int64", offsets], [f"{c}_index"], name=f"{name}/offset"),
           helper.make_node("Gather", [books, f"{c}_index"], [f"{c}_vectors"], name=f"{name}/lookup", axis=0),
           helper.make_node("Reshape", [f"{c}_vectors", shape], [table], name=f"{name}/table")]
    return out, inits
