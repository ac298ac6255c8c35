"""Calibrate: stream feeds through ONNX Runtime and accumulate second-order statistics.

What is collected is said by requests, one per (tensor, statistic):

* `ChannelGram` (ID exits, linear-layer inputs): with channel axis c, every other axis is
  flattened into rows, Z (rows x C), and G = sum Z^T Z is accumulated with the row count and the
  per-channel sums;
* `PatchGram` (Conv inputs for low rank): Z holds the im2col patches, one row per output
  position, columns ordered (channel, kernel offsets) as in the weight's (in x kh x kw) flattening,
  zero padding included, so G is (C*kh*kw) square;
* `TokenCounts` (Gather inputs): how often each row of the table is read (the one-hot Gram is
  diag(counts)).

Grams are float64; rows are buffered up to a fixed budget and folded in with one symmetric rank-k
update (BLAS `dsyrk`), so memory is bounded by the statistics and the buffer, never by the sample
count. Feature maps with more positions than `max_rows` contribute a uniform random subset.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from scipy.linalg import blas

from .errors import DataError, ModelError
from .modelio import load_model, without_initializers
from .normalize import unique_node_names

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int | None], None]
_BUFFER_ELEMENTS = 4 * 2**20  # rows buffered per tensor before a dsyrk update (x 8 bytes)


@dataclass(frozen=True)
class Stats:
    """Streamed statistics of one tensor over its channel axis: gram (C x C) = sum Z^T Z,
    sums (C,) = sum of rows, rows = number of rows of Z."""
    gram: np.ndarray
    sums: np.ndarray
    rows: int


class GramAccumulator:
    """partial_fit-style accumulator of Z^T Z for row blocks Z (rows x C)."""

    def __init__(self, channels: int):
        self.channels = channels
        self._gram = np.zeros((channels, channels), order="F")
        self._sums = np.zeros(channels)
        self._rows = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    def add(self, z: np.ndarray) -> None:
        if z.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {z.shape[1]}")
        self._buffer.append(np.asarray(z, dtype=np.float64))
        self._buffered += z.size
        if self._buffered >= _BUFFER_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        z = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer, self._buffered = [], 0
        self._rows += z.shape[0]
        self._sums += z.sum(axis=0)
        # dsyrk on Z^T (C x rows, Fortran order = Z in C order): gram += Z^T Z, upper triangle
        self._gram = blas.dsyrk(1.0, z.T, beta=1.0, c=self._gram, trans=0, lower=0, overwrite_c=1)

    def result(self) -> Stats:
        self._flush()
        upper = np.triu(self._gram)
        gram = upper + np.triu(upper, 1).T
        return Stats(gram=np.ascontiguousarray(gram), sums=self._sums.copy(), rows=self._rows)


LARGE_MODEL = 2**28  # bytes of weights from which ONNX Runtime gets the model as a file


def make_session(model: onnx.ModelProto | str | os.PathLike, outputs: Iterable[str] = (),
                 types: dict[str, int] | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of `model` with `outputs` exposed in addition to the graph
    outputs (types from `types`, float by default) and repeated node names made unique. The
    argument is not modified.

    `model` may be the path of an ONNX file: ONNX Runtime then reads it itself (a file it refuses,
    with repeated node names say, is loaded here and passed on). A model of more than
    LARGE_MODEL bytes of weights reaches ONNX Runtime as a temporary file whose weights are
    page-aligned external data, written one tensor at a time, and is not pre-packed: ONNX Runtime
    maps the weights instead of holding its own copy, and no copy of the whole model is made.
    """
    if isinstance(model, (str, os.PathLike)) and not list(outputs):
        try:
            return _session(str(model), large=weights_bytes(onnx.load(str(model), load_external_data=False)) > LARGE_MODEL)
        except Exception:
            model = load_model(model)
    elif isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    shell = without_initializers(model)
    unique_node_names(shell.graph)  # ONNX Runtime refuses repeated node names
    known = {vi.name for vi in model.graph.output}
    for name in outputs:
        if name not in known:
            elem = (types or {}).get(name, onnx.TensorProto.FLOAT)
            shell.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    try:
        if weights_bytes(model) <= LARGE_MODEL:
            shell.graph.initializer.extend(model.graph.initializer)
            return _session(shell.SerializeToString(), large=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _write_external(model.graph.initializer, shell, path.with_name("model.onnx.data"))
            onnx.save(shell, str(path))
            return _session(str(path), large=True)
    except Exception as e:
        raise ModelError(f"run: ONNX Runtime cannot load the model ({str(e).splitlines()[0][:300]})") from e


def _session(model: str | bytes, *, large: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if large:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def weights_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their shapes and types."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _tensor_bytes(t: onnx.TensorProto) -> int:
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # string tensors and the like
        itemsize = 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _write_external(initializers, shell: onnx.ModelProto, data: Path, threshold: int = 1024) -> None:
    """Write the initializers of more than `threshold` bytes to `data` at page-aligned offsets and
    add them to `shell` as external tensors; smaller ones are copied into `shell` as they are."""
    with open(data, "wb") as f:
        for t in initializers:
            if t.data_location == onnx.TensorProto.EXTERNAL or _tensor_bytes(t) <= threshold:
                shell.graph.initializer.add().CopyFrom(t)
                continue
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            f.write(b"\0" * ((-f.tell()) % 4096))
            offset = f.tell()
            f.write(raw)
            ext = shell.graph.initializer.add()
            ext.name, ext.data_type = t.name, t.data_type
            ext.dims.extend(t.dims)
            ext.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = ext.external_data.add()
                entry.key, entry.value = key, value
            del raw


def run(session: ort.InferenceSession, names: list[str], feed: dict, where: str) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as e:
        raise DataError(f"run: ONNX Runtime failed on {where} ({str(e).splitlines()[0][:300]})") from e


def observed_shapes(model: onnx.ModelProto, feed: dict, names: list[str], types: dict[str, int]) -> dict:
    """Shapes of `names` seen when ONNX Runtime runs `feed` (fills what shape inference left
    open; tensors of unknown element type are not asked for)."""
    names = [n for n in names if types.get(n)]
    if not names:
        return {}
    try:
        values = make_session(model, names, types).run(names, feed)
    except Exception as e:
        log.warning("normalize: could not observe intermediate shapes (%s)", str(e).splitlines()[0][:200])
        return {}
    return {n: tuple(v.shape) for n, v in zip(names, values)}


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
        return GramAccumulator(self.channels * int(np.prod(self.kernel)))

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


def calibrate(model: onnx.ModelProto, requests: Iterable[Request], feeds,
              *, types: dict[str, int] | None = None, progress: Progress | None = None,
              max_rows: int = 0, seed: int = 0) -> dict:
    """Stream `feeds` through `model` and return, per request, its statistic: `Stats` for the
    Grams, a counts vector for `TokenCounts`.

    max_rows: cap on the rows (positions) taken from one tensor of one feed, 0 for all.
    """
    reqs = sorted(set(requests), key=repr)
    if not reqs:
        return {}
    names = sorted({r.tensor for r in reqs})
    session = make_session(model, names, types)
    acc = {r: r.accumulator() for r in reqs}
    total = getattr(feeds, "feeds", None)
    rng = np.random.default_rng(seed)
    for k, feed in enumerate(feeds):
        values = dict(zip(names, run(session, names, feed, f"calibration feed {k}")))
        for r in reqs:
            acc[r].add(r.rows(values[r.tensor], max_rows, rng))
        if progress:
            progress("calibrate", k + 1, total)
    return {r: a.result() for r, a in acc.items()}
