"""Calibrate: stream feeds through ONNX Runtime and accumulate second-order statistics.

For each exit tensor (channel axis c), every other axis is flattened into rows, Z (rows x C),
and G = sum Z^T Z is accumulated in float64 together with the row count and per-channel sums.
Rows are buffered up to a fixed budget and folded in with one symmetric rank-k update (BLAS
`dsyrk`), so memory is bounded by the statistics and the buffer, never by the sample count.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

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


def calibrate(model: onnx.ModelProto, tensors: dict[str, tuple[int, int]], feeds,
              *, types: dict[str, int] | None = None, progress: Progress | None = None,
              max_rows: int = 0, seed: int = 0) -> dict[str, Stats]:
    """Stream `feeds` through `model` and return the statistics of each tensor.

    tensors: name -> (negative channel axis, channel count). max_rows: cap on the rows taken
    from one tensor of one feed (see `channel_rows`), 0 for all.
    """
    names = sorted(tensors)
    if not names:
        return {}
    session = make_session(model, names, types)
    acc = {n: GramAccumulator(tensors[n][1]) for n in names}
    total = getattr(feeds, "feeds", None)
    rng = np.random.default_rng(seed)
    for k, feed in enumerate(feeds):
        outs = run(session, names, feed, f"calibration feed {k}")
        for name, value in zip(names, outs):
            acc[name].add(channel_rows(value, tensors[name][0], max_rows, rng))
        if progress:
            progress("calibrate", k + 1, total)
    return {n: a.result() for n, a in acc.items()}
