"""Weights kept on disk: external-data initializers read through memory maps, one tensor at a time.

A model loaded by `modelio.load_model` keeps its external-data tensors as references: after the
checks, each one's `location` is made absolute (`locate`), so the reference stays valid wherever
the model goes in memory, and nothing reads the bytes until a stage asks for one tensor
(`array`, a read-only `numpy.memmap` of exactly that tensor). The page cache holds what was read;
the process holds no copy of the weights.

Such a model never reaches ONNX Runtime or a file as it is (an absolute location is refused by
both): `link` gives a copy whose locations name hard links in a given folder (ONNX Runtime then
maps the weights from the original files), `save` writes a model and one data file, copying
every tensor's bytes a block at a time, and `spill` moves large in-memory tensors (weights a
rewrite made) to a data file so that they too stay out of the process.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

ALIGN = 4096             # offsets of tensors we write: page-aligned, so ONNX Runtime can map them
THRESHOLD = 1024         # bytes: smaller tensors stay inside the model file
_COPY_BLOCK = 64 * 2**20


def fields(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def nbytes(t: onnx.TensorProto) -> int:
    """Bytes of the tensor's data, from its dims and type (external or not)."""
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # string tensors and the like
        itemsize = 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def locate(model: onnx.ModelProto, base: Path) -> int:
    """Make every external-data location of `model` (main graph and subgraphs) the absolute path
    of its file under `base` (the model's folder); returns the number of external tensors.
    `modelio` checks the locations first (inside the folder, within the file)."""
    from onnx import external_data_helper

    count = 0
    for t in external_data_helper._get_all_tensors(model):
        if is_external(t):
            for e in t.external_data:
                if e.key == "location":
                    e.value = str((base / e.value).resolve())
            count += 1
    return count


def has_external(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's value: a read-only memory map of its bytes for a located external tensor
    (nothing is read until used), else `numpy_helper.to_array`."""
    if not is_external(t):
        return numpy_helper.to_array(t)
    f = fields(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    shape = tuple(t.dims)
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(f["location"], dtype=dtype, mode="r", offset=int(f.get("offset", "0")), shape=shape)


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose external main-graph tensors hold their bytes (for small models)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if is_external(t):
            value = np.array(array(t))
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    return out


def _reference(t: onnx.TensorProto, dst: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `dst` an external tensor with t's name, type and dims at (location, offset, length)."""
    dst.name, dst.data_type = t.name, t.data_type
    dst.dims.extend(t.dims)
    if t.doc_string:
        dst.doc_string = t.doc_string
    dst.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = dst.external_data.add()
        e.key, e.value = key, value


def _append(f, t: onnx.TensorProto) -> tuple[int, int]:
    """Write t's bytes at the next page-aligned offset of the open file `f` (from its source file
    a block at a time, or from memory); returns (offset, length)."""
    f.write(b"\0" * ((-f.tell()) % ALIGN))
    offset = f.tell()
    if is_external(t):
        info = fields(t)
        length = int(info["length"]) if "length" in info else nbytes(t)
        with open(info["location"], "rb") as src:
            src.seek(int(info.get("offset", "0")))
            left = length
            while left:
                chunk = src.read(min(left, _COPY_BLOCK))
                if not chunk:
                    raise OSError(f"external data of {t.name!r} ends early")
                f.write(chunk)
                left -= len(chunk)
        return offset, length
    raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).astype(
        np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<"), copy=False).tobytes()
    f.write(raw)
    return offset, len(raw)


def spill(model: onnx.ModelProto, data: Path, threshold: int = THRESHOLD) -> int:
    """Append every in-memory initializer of more than `threshold` bytes of the main graph to the
    file `data` (created if missing) and replace it by an external reference (absolute location),
    releasing its bytes. Returns the bytes moved."""
    moved = 0
    with open(data, "ab") as f:
        for t in model.graph.initializer:
            if is_external(t) or nbytes(t) <= threshold:
                continue
            offset, length = _append(f, t)
            ref = onnx.TensorProto()
            _reference(t, ref, str(data.resolve()), offset, length)
            t.CopyFrom(ref)
            moved += length
    return moved


def save(model: onnx.ModelProto, path: Path, data_name: str, threshold: int = THRESHOLD) -> None:
    """Write `model` to `path` with every main-graph initializer of more than `threshold` bytes
    (and every external one) in the data file `data_name` beside it, page-aligned; tensors are
    copied a block at a time, so memory stays flat whatever the size. `model` is not changed."""
    from .modelio import without_initializers

    shell = without_initializers(model)
    with open(path.parent / data_name, "wb") as f:
        for t in model.graph.initializer:
            if not is_external(t) and nbytes(t) <= threshold:
                shell.graph.initializer.add().CopyFrom(t)
                continue
            offset, length = _append(f, t)
            _reference(t, shell.graph.initializer.add(), data_name, offset, length)
    _relocate_subgraphs(shell, path.parent)
    onnx.save(shell, str(path))


def _relocate_subgraphs(model: onnx.ModelProto, folder: Path) -> None:
    """External tensors left in subgraphs (rare) are copied to files of their own beside the
    model, since a saved model may only name files in its folder."""
    from onnx import external_data_helper

    for k, t in enumerate(external_data_helper._get_all_tensors(model)):
        if is_external(t) and Path(fields(t)["location"]).is_absolute():
            name = f"{folder.name[:32]}.sub{k}.data"
            with open(folder / name, "wb") as f:
                offset, length = _append(f, t)
            ref = onnx.TensorProto()
            _reference(t, ref, name, offset, length)
            t.CopyFrom(ref)


def link(model: onnx.ModelProto, folder: Path) -> onnx.ModelProto:
    """A copy of the graph of `model` (main-graph initializers only) whose external tensors name
    files in `folder`: a hard link to each source file (same inode, so ONNX Runtime maps the
    original bytes; ONNX Runtime refuses locations outside the model's folder, including through
    symbolic links), or a copy where a hard link cannot be made (another file system)."""
    from .modelio import without_initializers

    shell = without_initializers(model)
    names: dict[str, str] = {}
    for t in model.graph.initializer:
        if not is_external(t):
            shell.graph.initializer.add().CopyFrom(t)
            continue
        info = fields(t)
        source = info["location"]
        if source not in names:
            names[source] = f"w{len(names)}.data"
            target = folder / names[source]
            try:
                os.link(source, target)
            except OSError as e:
                log.info("weights: cannot link %s into %s (%s); copying it", source, folder, e.strerror or e)
                shutil.copyfile(source, target)
        ref = shell.graph.initializer.add()
        ref.CopyFrom(t)
        for e in ref.external_data:
            if e.key == "location":
                e.value = names[source]
    return shell
