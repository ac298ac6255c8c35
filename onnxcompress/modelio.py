"""Load and save: the only module that touches protobuf files.

Loading reads external data (refusing locations that escape the model's folder); saving writes to
a temporary folder beside the destination, runs the full ONNX checker there, and only then moves
the data file and the model into place, so a half-written output never appears under its name.
Models whose serialized size would pass 2 GB are written with external data (`<name>.data`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, helper

from .errors import ModelError, OutputError, RewriteError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_MARGIN = 64 * 2**20  # leave room for the graph itself below the protobuf limit


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model and its external data; raise `ModelError` naming the file on failure."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"load: {path}: no such file")
    if path.is_dir():
        raise ModelError(f"load: {path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelError(f"load: {path}: the file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ... depending on version
        raise ModelError(f"load: {path}: not a readable ONNX model ({_first_line(e)})") from e
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"load: {path}: not an ONNX model (no graph)")
    _load_external(model, path.parent, path)
    return model


def _load_external(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Resolve every external-data reference inside `base` and read it into the model."""
    base_real = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (base / location).resolve()
        if location.is_absolute() or not target.is_relative_to(base_real):
            raise ModelError(f"load: {path}: external data of tensor {tensor.name!r} points outside "
                             f"the model's folder ({info.location!r}); refused")
        if not target.is_file():
            raise ModelError(f"load: {path}: external data file {info.location!r} of tensor "
                             f"{tensor.name!r} is missing")
    try:
        external_data_helper.load_external_data_for_model(model, str(base))
    except Exception as e:
        raise ModelError(f"load: {path}: cannot read external data ({_first_line(e)})") from e


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes `model` would take serialized (within a few bytes per initializer), without
    serializing it. Protobuf's own `ByteSize()`
    fails past 2 GB, so initializers are sized one by one (a single tensor over 2 GB by its
    element count)."""
    total = without_initializers(model).ByteSize()
    for t in model.graph.initializer:
        try:
            total += t.ByteSize()
        except Exception:  # one tensor over 2 GB
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose main graph has no initializers (cheap for any model size)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def _copy_fields(src, dst, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def check_model(model: onnx.ModelProto, where: str) -> None:
    """Run onnx's full checker (with shape inference); raise `ModelError` naming `where`."""
    try:
        if serialized_size(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "model.onnx"
                onnx.save(model, str(p), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(p), full_check=True)
    except Exception as e:
        raise ModelError(f"check: {where}: the model fails the ONNX checker ({_first_line(e)})") from e


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """Write `model` to `path` atomically; return the files written (the model, maybe its data).

    The model is checked with the full ONNX checker before it is moved into place; on any
    failure nothing appears at `path`.
    """
    path = Path(path)
    check_output_path(path, force=force)
    external = serialized_size(model) > PROTOBUF_LIMIT - _EXTERNAL_MARGIN
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=path.parent))
    try:
        staged = tmp / path.name
        if external:
            onnx.save(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data_name, size_threshold=1024)
        else:
            onnx.save(model, str(staged))
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as e:
            raise RewriteError(f"save: {path}: the compressed model fails the ONNX checker "
                               f"({_first_line(e)}); nothing was written") from e
        written = []
        if external:
            os.replace(tmp / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(staged, path)
        written.insert(0, path)
        return written
    except OSError as e:
        raise OutputError(f"save: {path}: cannot write ({e.strerror or e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(path: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse an output that would overwrite the input, an existing file, or a missing folder."""
    if source is not None and path.resolve() == source.resolve():
        raise OutputError(f"output {path} is the input model; the input is never overwritten")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output folder {path.parent} is not writable")
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to overwrite it")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
