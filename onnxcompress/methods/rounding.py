"""Widths that suit the hardware: every kept width (ID) and rank (low rank) a multiple of N.

ONNX Runtime's CPU convolutions run fastest in its blocked channel layout (NCHWc), whose block
is 16 channels on CPUs with AVX-512 and 8 otherwise; a Conv whose channel counts are not
multiples of the block falls back to a slower kernel and forces layout conversions around it.
Its GEMM kernels pack the weight in panels of 16 columns. So by default (`Config.round` None):

    Conv (and every channel group fed by one):   N = the NCHWc block (16 with AVX-512, else 8)
    Gemm, MatMul, Gather (widths and ranks):     N = 16

`--round N` forces one N for every op; `--round 1` allows every size.

Given a curve whose sizes are s_0 (unchanged) > s_1 > ... and a multiple N, the allowed
candidates are index 0 and every j >= 1 with s_j a positive multiple of N. A size rule that asks
for k:

* `keep`: the multiple of N nearest to k (at least N); the full width when that is not below it;
* `tolerance` (a lower bound on the size): the smallest multiple of N at or above k; the full
  width when that is not below it.

So a group or layer narrower than N keeps its full, unrounded width.
"""
from __future__ import annotations

import functools
import math

import numpy as np

CONV_KINDS = ("conv",)
GEMM_MULTIPLE = 16


@functools.lru_cache(maxsize=1)
def nchwc_block() -> int:
    """ONNX Runtime's NCHWc block size on this CPU: 16 with AVX-512F, 8 otherwise."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8


def defaults() -> dict[str, int]:
    """The per-op N used when `Config.round` is None."""
    return {"conv": nchwc_block(), "gemm": GEMM_MULTIPLE}


def multiple(config_round: int | None, kind: str) -> int:
    """N for a site of `kind` ("conv", "gemm", "matmul", "matmul_left", "gather")."""
    if config_round is not None:
        return int(config_round)
    return defaults()["conv" if kind in CONV_KINDS else "gemm"]


def allowed(sizes: np.ndarray, n: int) -> np.ndarray:
    """Mask of the candidates a rounded walk may take: index 0 and sizes that are multiples of n."""
    sizes = np.asarray(sizes)
    ok = (sizes % n == 0) & (sizes > 0)
    ok[0] = True
    return ok


def grid(sizes: np.ndarray, n: int, floor: int, last: int | None = None, parts: int = 64) -> np.ndarray:
    """Indices the budget walk may take: 0, then the allowed candidates with size >= floor (and
    index <= last when given), thinned to about `parts` evenly spaced ones (the smallest kept)."""
    sizes = np.asarray(sizes)
    ok = allowed(sizes, n) & (sizes >= floor)
    ok[0] = False
    idx = np.nonzero(ok)[0]
    if last is not None:
        idx = idx[idx <= last]
    if len(idx) > parts:
        stride = math.ceil(len(idx) / parts)
        idx = np.unique(np.append(idx[::stride], idx[-1]))
    return np.concatenate([[0], idx]).astype(np.int64)


def keep_size(k: float, full: int, n: int) -> int:
    """The multiple of n nearest to k (at least n), or `full` when that is not below `full`."""
    if n <= 1:
        return int(min(full, max(1, round(k))))
    r = max(n, n * int(math.floor(k / n + 0.5)))
    return full if r >= full else r


def at_least(k: int, full: int, n: int) -> int:
    """The smallest multiple of n at or above k, or `full` when that is not below `full`."""
    r = n * int(math.ceil(max(k, 1) / n))
    return full if r >= full else r


def index_of(sizes: np.ndarray, size: int) -> int:
    """The index of `size` in a curve's sizes (0 when it is the full size or absent)."""
    hit = np.nonzero(np.asarray(sizes)[1:] == size)[0]
    return int(hit[0]) + 1 if len(hit) else 0
