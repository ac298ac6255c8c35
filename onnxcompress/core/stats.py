"""Statistics requests and their streaming accumulators.

A request names a tensor and the statistic to accumulate over it:

* `ChannelGram` (ID exits, linear-layer inputs): with channel axis c, every other axis is
  flattened into rows, Z (rows x C), and G = sum Z^T Z is accumulated with the row count and the
  per-channel sums;
* `PatchGram` (Conv inputs for low rank): Z holds the im2col patches, one row per output
  position, columns ordered (channel, kernel offsets) as in the weight's (in x kh x kw) flattening,
  zero padding included, so G is (C*kh*kw) square;
* `TokenCounts` (Gather inputs): how often each row of the table is read (the one-hot Gram is
  diag(counts)).

Grams are float64; rows are buffered up to a fixed budget (one buffer per Gram, reused) and folded
in with one symmetric rank-k update (BLAS `dsyrk`) each time it fills, so memory is bounded by the
statistics and the buffer, never by the sample count. Feature maps with more positions than
`max_rows` contribute a uniform random subset.

Partial results merge by addition: the statistics of disjoint sets of rows Z_1, Z_2 are those of
their union, G = Z_1^T Z_1 + Z_2^T Z_2, sums and row counts adding likewise (token counts too).
So calibration can be split by feed and summed (`merge`); float addition is not associative,
so a fixed order of the parts makes the sum reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
from scipy.linalg import blas

_BUFFER_ELEMENTS = 4 * 2**20  # rows buffered per tensor before a dsyrk update (x 8 bytes)
GRAM_BUDGET = 128 * 2**20  # bytes of one float64 Gram (4096 columns); decide holds a few copies of it


STATS_BUDGET = 256 * 2**20  # bytes of all the Grams of one run, side by side; decide needs ~3x (real models: < 150 MiB)


def gram_bytes(width: int) -> int:
    return 8 * width * width


def over_total(need: int, used: int) -> str | None:
    """Why statistics of `need` bytes are not accumulated when earlier ones take `used` bytes of
    STATS_BUDGET, or None if they fit."""
    if used + need <= STATS_BUDGET:
        return None
    return (f"its statistics ({need / 2**20:.0f} MiB) would pass the {STATS_BUDGET // 2**20} MiB budget "
            f"for all statistics, {used / 2**20:.0f} MiB of which earlier layers take")


def gram_too_big(width: int) -> str | None:
    """Why a Gram of `width` columns is not accumulated (over GRAM_BUDGET), or None if it fits.
    A layer this wide is left alone rather than allowed to exhaust memory."""
    need = gram_bytes(width)
    if need <= GRAM_BUDGET:
        return None
    return (f"{width} columns: the Gram would take {need / 2**30:.3g} GiB, over the "
            f"{GRAM_BUDGET // 2**20} MiB budget")


@dataclass(frozen=True)
class Stats:
    """Streamed statistics of one tensor over its channel axis: gram (C x C) = sum Z^T Z,
    sums (C,) = sum of rows, rows = number of rows of Z."""
    gram: np.ndarray
    sums: np.ndarray
    rows: int

    def __add__(self, other: "Stats") -> "Stats":
        """The statistics of both row sets together (G_1 + G_2, s_1 + s_2, n_1 + n_2)."""
        if not isinstance(other, Stats):
            return NotImplemented
        if self.gram.shape != other.gram.shape:
            raise ValueError(f"cannot merge statistics of {self.gram.shape[0]} and {other.gram.shape[0]} channels")
        return Stats(gram=self.gram + other.gram, sums=self.sums + other.sums, rows=self.rows + other.rows)


def merge(parts: list[dict]) -> dict:
    """Per request, the sum of the partial statistics in `parts` (dicts request -> `Stats` or
    counts vector, every dict over the same requests), added in list order: left to right, so
    the same parts in the same order always give the same float64 result, equal to one pass over
    all the feeds up to round-off."""
    if not parts:
        return {}
    keys = set(parts[0])
    if any(set(p) != keys for p in parts[1:]):
        raise ValueError("partial statistics over different requests cannot be merged")
    out = dict(parts[0])
    for p in parts[1:]:
        for r in out:
            out[r] = out[r] + p[r]
    return out


class GramAccumulator:
    """partial_fit-style accumulator of Z^T Z for row blocks Z (rows x C).

    Rows are copied (as float64) into one buffer, allocated once and reused, and added in dsyrk
    updates of exactly `capacity` rows (about _BUFFER_ELEMENTS elements), the last one with the
    rows left at `result()`: the updates fall at the same rows wherever the blocks passed to
    `add` begin and end. With `deferred`, `add` only buffers (the buffer grows past `capacity`
    by the block that crossed it) and the full updates wait for the caller's `flush()` (`due`
    says they are ready), so the caller can run several accumulators' updates side by side.
    Either way the updates are the same rows in the same order, so the result does not depend
    on it. Reusing the buffer matters: a fresh buffer of tens of MB per update is mapped and
    faulted in anew each time."""

    def __init__(self, channels: int, *, deferred: bool = False):
        self.channels = channels
        self.deferred = deferred
        self.capacity = max(1, _BUFFER_ELEMENTS // max(channels, 1))  # rows per dsyrk update
        self._gram = np.zeros((channels, channels), order="F")
        self._sums = np.zeros(channels)
        self._rows = 0
        self._buffer: np.ndarray | None = None   # grown as rows come: `capacity` rows, or more when deferred
        self._buffered = 0                       # rows waiting in it

    @property
    def due(self) -> bool:
        return self._buffered >= self.capacity

    def add(self, z: np.ndarray) -> None:
        if z.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {z.shape[1]}")
        finite = np.isfinite(z).all(axis=1)
        if not finite.all():  # only with allow_nonfinite: such rows carry no statistic
            z = z[finite]
        start = 0
        while start < len(z):
            if not self.deferred:
                self.flush()   # full updates now: the buffer never holds more than `capacity` rows
            room = self.capacity - self._buffered if not self.deferred else len(z) - start
            take = min(len(z) - start, max(room, 0))
            end = self._buffered + take
            grown = self._buffer_rows_for(end)
            if grown:
                self._grow(grown)
            self._buffer[self._buffered:end] = z[start:start + take]
            self._buffered = end
            start += take
        if not self.deferred:
            self.flush()

    def _buffer_rows_for(self, rows: int) -> int:
        """0 if the buffer holds `rows` rows, else the size to grow it to: `capacity` rows at
        once (np.empty maps pages lazily, so rows never written cost nothing, while growing by
        doubling would fault in and copy about twice the memory), and past it (deferred, before
        the caller's flush) by half at a time, so a stream of small blocks does not copy the
        buffer once per block."""
        have = 0 if self._buffer is None else len(self._buffer)
        if rows <= have:
            return 0
        grown = self.capacity if have < self.capacity else have + have // 2
        return max(rows, grown)

    def _grow(self, rows: int) -> None:
        grown = np.empty((rows, self.channels))
        if self._buffered:
            grown[:self._buffered] = self._buffer[:self._buffered]
        self._buffer = grown

    def flush(self) -> None:
        """The dsyrk updates of every full `capacity` rows buffered (`deferred` accumulators:
        when `due`); the rows past the last full update move to the front of the buffer."""
        done = 0
        while self._buffered - done >= self.capacity:
            self._update(self._buffer[done:done + self.capacity])
            done += self.capacity
        if done:
            rest = self._buffered - done
            self._buffer[:rest] = self._buffer[done:self._buffered]
            self._buffered = rest

    def _update(self, z: np.ndarray) -> None:
        self._rows += z.shape[0]
        self._sums += z.sum(axis=0)
        # dsyrk on Z^T (C x rows, Fortran order = Z in C order): gram += Z^T Z, upper triangle
        self._gram = blas.dsyrk(1.0, z.T, beta=1.0, c=self._gram, trans=0, lower=0, overwrite_c=1)

    def result(self) -> Stats:
        self.flush()
        if self._buffered:
            self._update(self._buffer[:self._buffered])
            self._buffered = 0
        self._buffer = None  # the buffer's memory goes back now, not with the accumulator
        # dsyrk updates only the upper triangle; the strict lower one is still the zeros it
        # started as, so G = U + U^T less the diagonal counted twice
        gram = self._gram + self._gram.T
        gram[np.diag_indices(self.channels)] = np.diag(self._gram)
        return Stats(gram=np.ascontiguousarray(gram), sums=self._sums.copy(), rows=self._rows)


def channel_rows(value: np.ndarray, axis: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Z (rows x C): every position of `value` but the channel axis, as rows. With more than
    `max_rows` positions (large feature maps), a uniform random subset of `max_rows` of them
    (without replacement), gathered without copying the whole tensor; max_rows=0 keeps all."""
    v = np.moveaxis(value, axis, -1)
    rows = int(np.prod(v.shape[:-1], dtype=np.int64))
    if not max_rows or rows <= max_rows:
        return v.reshape(rows, v.shape[-1])
    pick = np.sort(rng.choice(rows, size=max_rows, replace=False))
    return v[np.unravel_index(pick, v.shape[:-1])]


class CountAccumulator:
    """Occurrences of each index in [0, size) (negative indices count from the end)."""

    def __init__(self, size: int):
        self.size = size
        self._counts = np.zeros(size, dtype=np.int64)

    def add(self, idx: np.ndarray) -> None:
        flat = np.asarray(idx, dtype=np.int64).ravel()
        flat = np.where(flat < 0, flat + self.size, flat)
        flat = flat[(flat >= 0) & (flat < self.size)]
        self._counts += np.bincount(flat, minlength=self.size)

    def result(self) -> np.ndarray:
        return self._counts.copy()


@dataclass(frozen=True)
class ChannelGram:
    """Gram over the channel axis `axis` (negative) of `tensor`, which has `channels` channels."""
    tensor: str
    axis: int
    channels: int

    def accumulator(self) -> GramAccumulator:
        return GramAccumulator(self.channels)

    @property
    def width(self) -> int:
        return self.channels

    def rows(self, value: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
        return channel_rows(value, self.axis, max_rows, rng)


@dataclass(frozen=True)
class PatchGram:
    """Gram of the im2col patches a Conv (NC + spatial layout) reads from `tensor`."""
    tensor: str
    channels: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]        # begins then ends, as the Conv attribute
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"

    def accumulator(self) -> GramAccumulator:
        return GramAccumulator(self.width)

    @property
    def width(self) -> int:
        return self.channels * int(np.prod(self.kernel))

    def rows(self, value: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
        return patch_rows(value, self, max_rows, rng)


@dataclass(frozen=True)
class TokenCounts:
    """How often each of `size` rows is gathered by the indices in `tensor`."""
    tensor: str
    size: int

    def accumulator(self) -> CountAccumulator:
        return CountAccumulator(self.size)

    def rows(self, value: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
        return value


Request = Union[ChannelGram, PatchGram, TokenCounts]


def conv_pads(spatial: tuple[int, ...], req: PatchGram) -> list[tuple[int, int]]:
    """(begin, end) zero padding per spatial axis, resolving auto_pad as ONNX defines it."""
    n = len(spatial)
    if req.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for d, k, s, dil in zip(spatial, req.kernel, req.strides, req.dilations):
            total = max(0, (-(-d // s) - 1) * s + (k - 1) * dil + 1 - d)
            small, large = total // 2, total - total // 2
            out.append((small, large) if req.auto_pad == "SAME_UPPER" else (large, small))
        return out
    if req.auto_pad == "VALID" or not req.pads:
        return [(0, 0)] * n
    return list(zip(req.pads[:n], req.pads[n:]))


def patch_rows(value: np.ndarray, req: PatchGram, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Z (positions x C*prod(kernel)): the patch under every output position of the Conv
    (a random `max_rows` of them when there are more), columns in (channel, offsets) order."""
    n, c = value.shape[:2]
    spatial = value.shape[2:]
    pads = conv_pads(spatial, req)
    x = np.pad(value, [(0, 0), (0, 0), *pads])
    outs = [(d + b + e - (k - 1) * dil - 1) // s + 1
            for d, (b, e), k, s, dil in zip(spatial, pads, req.kernel, req.strides, req.dilations)]
    total = n * int(np.prod(outs, dtype=np.int64))
    pick = np.arange(total) if not max_rows or total <= max_rows else np.sort(
        rng.choice(total, size=max_rows, replace=False))
    pos = np.unravel_index(pick, (n, *outs))
    rank = len(spatial)
    index = [pos[0].reshape(-1, *[1] * rank)]
    for a in range(rank):
        shape = [1] * rank
        shape[a] = req.kernel[a]
        offsets = (np.arange(req.kernel[a]) * req.dilations[a]).reshape(shape)
        index.append(pos[a + 1].reshape(-1, *[1] * rank) * req.strides[a] + offsets)
    # x[n, :, i1, i2, ...] with advanced indices around the channel slice: (P, *kernel, C)
    patches = x[(index[0], slice(None), *index[1:])] if rank else x[index[0]]
    patches = np.moveaxis(patches, -1, 1)
    return patches.reshape(len(pick), c * int(np.prod(req.kernel)))
