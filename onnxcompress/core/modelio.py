"""Load and save: the only module that touches protobuf files.

Loading runs the ONNX checker and reads external data (refusing locations that escape the
model's folder). Saving writes to a temporary folder beside the destination, runs the full ONNX
checker there, and only then moves the data file and the model into place, so a half-written
output never appears under its name, and an error or interrupt leaves no temporary files.
Models whose serialized size would pass 2 GB are written with external data (`<name>.data`).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import external_data_helper, helper

from .errors import ModelError, OutputError, RewriteError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_MARGIN = 64 * 2**20  # leave room for the graph itself below the protobuf limit


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model and its external data; raise `ModelError` naming the file on failure.

    The model must pass the ONNX checker (structure, operator schemas, opset imports; not the
    strict shape inference of `full_check`). A graph whose only fault is node order is accepted:
    normalize sorts it.
    """
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
    _check_external(model, path.parent, path)
    unsorted = _check_input(path)
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:
        raise ModelError(f"load: {path}: cannot read external data ({_first_line(e)})") from e
    if unsorted:
        _check_sorted_copy(model, path)
    return model


def _check_external(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Every external-data reference must name an existing file inside `base`."""
    base_real = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        target = (base / location).resolve()
        if location.is_absolute():
            raise ModelError(f"load: {path}: external data of tensor {tensor.name!r} has an absolute "
                             f"location ({info.location!r}); refused")
        if not target.is_relative_to(base_real):
            raise ModelError(f"load: {path}: external data of tensor {tensor.name!r} points outside "
                             f"the model's folder ({info.location!r}); refused")
        if not target.is_file():
            raise ModelError(f"load: {path}: external data file {info.location!r} of tensor "
                             f"{tensor.name!r} is missing")


def _check_input(path: Path) -> bool:
    """Run the ONNX checker on the file (it resolves external data itself). Returns True if its
    only complaint is node order (left to `_check_sorted_copy`); raises `ModelError` otherwise."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        if "topologically sorted" in str(e):
            return True
        raise ModelError(f"load: {path}: not a valid ONNX model: {_one_line(e)}") from e
    return False


def _check_sorted_copy(model: onnx.ModelProto, path: Path) -> None:
    """The checker refused the node order: check a sorted copy, so that only a graph that is
    broken in another way (an input nothing produces, a cycle) is refused."""
    from .normalize import topological_sort

    if model.ByteSize() >= PROTOBUF_LIMIT:
        log.warning("load: %s: nodes are not in topological order; not re-checked (over 2 GB)", path)
        return
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        topological_sort(copy.graph)
        onnx.checker.check_model(copy)
    except Exception as e:
        raise ModelError(f"load: {path}: not a valid ONNX model: {_one_line(e)}") from e


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
               inputs: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Write `model` to `path` atomically; return the files written (the model, maybe its data).

    The model is staged in a temporary folder beside `path`, checked with the full ONNX checker
    there, and only then moved into place (data file first, model last). On any failure or
    interrupt nothing appears under the final names and the temporary folder is removed.
    `inputs` are files that must never be overwritten (the input model, the data).
    """
    path = Path(path)
    check_output_path(path, force=force, inputs=inputs)
    external = serialized_size(model) > PROTOBUF_LIMIT - _EXTERNAL_MARGIN
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    if external:
        check_output_path(data_path, force=force, inputs=inputs)
    tmp = moved_data = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=path.parent))
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
        written = [path]
        if external:
            os.replace(tmp / data_name, data_path)
            moved_data = data_path
            written.append(data_path)
        os.replace(staged, path)
        moved_data = None  # both in place: the output is complete
        return written
    except OSError as e:
        raise OutputError(f"save: {path}: cannot write ({e.strerror or e})") from e
    finally:
        if moved_data is not None:  # interrupted between the two moves: no data without its model
            moved_data.unlink(missing_ok=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(path: Path, *, force: bool, source: Path | None = None,
                      inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse an output that would overwrite the input model (`source`) or any of `inputs`, an
    existing file without `force`, a directory, or a folder that is missing or not writable.
    Writability is probed by creating (and removing) a temporary file in the folder, which also
    catches read-only mounts and special filesystems where root cannot write either."""
    path = Path(path)
    for other in ([source] if source is not None else []) + [Path(p) for p in inputs]:
        if _same_file(path, other):
            what = "the input model" if other is source else "one of the input files"
            raise OutputError(f"output {path} is {what}; inputs are never overwritten")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist")
    if path.is_dir():
        raise OutputError(f"output {path} is a directory")
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to overwrite it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxcompress-", dir=path.parent)
    except OSError as e:
        raise OutputError(f"output folder {path.parent} is not writable ({e.strerror or e})") from e
    try:
        os.close(fd)
    finally:
        os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    """True if `a` and `b` name the same file (same path after resolving links, or same inode)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The whole message on one line (the checker puts the node's name on a later line)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
