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
import stat
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import external_data_helper, helper

from . import files, weights
from .errors import ModelError, OutputError, RewriteError

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_MARGIN = 64 * 2**20  # leave room for the graph itself below the protobuf limit


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model; raise `ModelError` naming the file on failure.

    External data is checked but not read: each external tensor keeps its reference, with the
    location made absolute (`weights.locate`), and stages read one tensor at a time through a
    memory map (`weights.array`), so a model of any size costs the process only its graph.

    The model must pass the ONNX checker (structure, operator schemas, opset imports; not the
    strict shape inference of `full_check`). A graph whose only fault is node order is accepted:
    normalize sorts it.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"load: {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"load: {path}: cannot read ({getattr(e, 'strerror', None) or e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise ModelError(f"load: {path}: is a directory, not an ONNX file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"load: {path}: is {files.kind_of(st.st_mode)}, not a regular file; refused")
    if st.st_size == 0:
        raise ModelError(f"load: {path}: the file is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ... depending on version
        raise ModelError(f"load: {path}: not a readable ONNX model ({_first_line(e)})") from e
    if not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelError(f"load: {path}: not an ONNX model (no graph)")
    _check_external(model, path.parent, path)
    unsorted = _check_input(path)
    if unsorted:
        _check_sorted_copy(model, path)
    weights.locate(model, path.parent)
    return model


def _check_external(model: onnx.ModelProto, base: Path, path: Path) -> None:
    """Every external-data reference must name an existing regular file inside `base`, with an
    offset and length that are whole numbers within that file and that hold exactly the bytes the
    tensor's dims and type declare (so a lying header cannot ask for more memory than the file
    holds)."""
    base_real = base.resolve()
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            _check_one_external(tensor, base, base_real)
        except (OSError, ValueError, RuntimeError, TypeError, OverflowError) as e:
            text = getattr(e, "strerror", None) or _first_line(e)
            raise ModelError(f"load: {path}: external data of tensor {tensor.name!r}: {text}; refused") from e


def _check_one_external(tensor: onnx.TensorProto, base: Path, base_real: Path) -> None:
    fields = {}
    for entry in tensor.external_data:
        fields[entry.key] = entry.value
    location = fields.get("location", "")
    if not location or "\0" in location:
        raise ValueError(f"location {location!r} is empty or holds a NUL byte")
    if Path(location).is_absolute():
        raise ValueError(f"absolute location {location!r}")
    target = (base / location).resolve()
    if not target.is_relative_to(base_real):
        raise ValueError(f"location {location!r} points outside the model's folder")
    try:
        st = target.stat()
    except FileNotFoundError:
        raise ValueError(f"external data file {location!r} is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"external data file {location!r} is {files.kind_of(st.st_mode)}, not a regular file")
    offset = _whole(fields.get("offset", "0"), "offset")
    length = _whole(fields["length"], "length") if "length" in fields else st.st_size - offset
    if offset + length > st.st_size:
        raise ValueError(f"offset {offset} + length {length} pass the end of {location!r} ({st.st_size} bytes)")
    if tensor.data_type not in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        if any(d < 0 for d in tensor.dims):
            raise ValueError(f"negative dims {list(tensor.dims)}")
        count = 1
        for d in tensor.dims:
            count *= d
        bits = _ELEMENT_BITS.get(tensor.data_type)
        if bits is None:
            bits = 8 * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        need = (count * bits + 7) // 8
        if need != length:
            raise ValueError(f"dims {list(tensor.dims)} need {need} bytes, the data holds {length}")


_ELEMENT_BITS = {getattr(onnx.TensorProto, n): b for n, b in
                 (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                 if hasattr(onnx.TensorProto, n)}


def _whole(text: str, name: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"{name} {text!r} is not a whole number")
    return int(text)


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
        _external_as_inputs(copy.graph)  # the order is in question, not the weights' bytes
        onnx.checker.check_model(copy)
    except Exception as e:
        raise ModelError(f"load: {path}: not a valid ONNX model: {_one_line(e)}") from e


def _external_as_inputs(graph: onnx.GraphProto) -> None:
    """Turn the external-data initializers of `graph` into graph inputs of the same type and
    shape (a structural check then reads no weight file)."""
    keep = [t for t in graph.initializer if not weights.is_external(t)]
    listed = {vi.name for vi in graph.input}  # IR < 4 lists initializers as inputs too
    for t in graph.initializer:
        if weights.is_external(t) and t.name not in listed:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.initializer[:]
    graph.initializer.extend(keep)


def check_finite_weights(model: onnx.ModelProto, path, *, allow: bool, warnings: list | None = None) -> None:
    """No floating-point initializer may hold NaN, and none may hold Inf unless only bounds and
    selections read it (`INF_READERS`, in any graph of the model: a JAX export's Max(-inf, x), a
    Where(mask, x, -inf)): a NaN or Inf weight makes every agreement figure meaningless (a NaN
    row's argmax is 0 on both sides). Raises `ModelError` naming the first such tensor, or with `allow` logs it (and
    appends the message to `warnings`): such layers are then left alone and validation counts
    NaN outputs as disagreement."""
    from .normalize import _all_nodes
    readers: dict[str, set] = {}
    for node in _all_nodes(model.graph):   # subgraph bodies read outer-scope initializers too
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        for name in node.input:
            readers.setdefault(name, set()).add(op)
    bad = []
    for t in model.graph.initializer:
        if t.data_type not in _FLOAT_TYPES:
            continue
        what = _nonfinite(weights.array(t))
        if what == "Inf" and readers.get(t.name) and readers[t.name] <= INF_READERS:
            log.debug("load: %s holds Inf values, read only by %s: a bound or mask, accepted",
                      t.name, ", ".join(sorted(readers[t.name])))
            continue
        if what:
            bad.append((t.name, what))
    if not bad:
        return
    name, what = bad[0]
    more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    if not allow:
        raise ModelError(f"load: {path}: weight {name!r} holds {what} values{more}; pass "
                         f"--allow-nonfinite to compress it anyway")
    msg = f"weight {name!r} holds {what} values{more}: its layers are left alone, NaN outputs count as disagreement"
    log.warning(msg)
    if warnings is not None:
        warnings.append(msg)


# ops for which an infinite constant operand is a bound, a fill value or a selected value, not a
# weight (Add and Sub are not: an Inf bias is a broken layer, not a mask, as far as a check can tell)
INF_READERS = frozenset("Max Min Clip Where Less LessOrEqual Greater GreaterOrEqual Equal Pad Expand".split())


def _nonfinite(a: np.ndarray, block: int = 2**24) -> str | None:
    """"NaN" or "Inf" if `a` holds such a value (read a block of elements at a time, so a mapped
    weight is never copied whole), else None."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, block):
        part = np.asarray(flat[start:start + block])
        if not np.all(np.isfinite(part)):
            return "NaN" if np.isnan(part).any() else "Inf"
    return None


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes `model` would take serialized (within a few bytes per initializer), without
    serializing it. Protobuf's own `ByteSize()`
    fails past 2 GB (and costs a serialization in the upb runtime), so initializers are sized one
    by one: the bytes of their raw data plus their header (a single tensor over 2 GB by its
    element count)."""
    total = without_initializers(model).ByteSize()
    for t in model.graph.initializer:
        if weights.is_external(t):
            total += weights.nbytes(t) + 16 * len(t.dims) + len(t.name) + 8
            continue
        if t.HasField("raw_data"):
            total += _raw_tensor_size(t)
            continue
        try:
            total += t.ByteSize()
        except Exception:  # one tensor over 2 GB
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def _raw_tensor_size(t: onnx.TensorProto) -> int:
    """`t.ByteSize()` of a tensor holding dims, data_type, name and raw_data, from their lengths
    (protobuf's wire format: a tag byte and a varint per dim, the type, and length-prefixed name
    and data); other tensors are asked."""
    if {f.name for f, _ in t.ListFields()} - {"dims", "data_type", "name", "raw_data"}:
        return t.ByteSize()
    name = len(t.name.encode())
    raw = len(t.raw_data)
    return (sum(1 + _varint(d) for d in t.dims) + (1 + _varint(t.data_type) if t.data_type else 0)
            + (1 + _varint(name) + name if name else 0) + 1 + _varint(raw) + raw)


def _varint(n: int) -> int:
    """Bytes of n as a protobuf varint (a negative int64 takes ten)."""
    if n < 0:
        return 10
    return max(1, (n.bit_length() + 6) // 7)


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
        if serialized_size(model) < PROTOBUF_LIMIT and not weights.has_external(model):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxcompress-check-") as tmp:
                p = Path(tmp) / "model.onnx"
                weights.save(model, p, "model.onnx.data")
                onnx.checker.check_model(str(p), full_check=True)
    except Exception as e:
        raise ModelError(f"check: {where}: the model fails the ONNX checker ({_first_line(e)})") from e


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False,
               inputs: Iterable[str | os.PathLike] = (), source: str | os.PathLike | None = None) -> list[Path]:
    """Write `model` to `path` atomically; return the files written (the model, maybe its data).

    The model is staged in a temporary folder beside `path`, checked with the full ONNX checker
    there, and only then moved into place (data file first, model last). On any failure or
    interrupt nothing appears under the final names and the temporary folder is removed.
    `inputs` are files that must never be overwritten (the input model, the data), `source` the
    input model (its external-data files are protected too). The file is binary protobuf
    whatever its suffix (onnx would write text for `.json` or `.textproto`); a replaced file's
    permission bits carry over. Stale temporary folders of killed runs are removed first.
    """
    path = Path(path)
    inputs = list(inputs)
    check_output_path(path, force=force, inputs=inputs, source=source)
    files.remove_stale([path.parent])
    external = serialized_size(model) > PROTOBUF_LIMIT - _EXTERNAL_MARGIN
    if not external and weights.has_external(model):
        model = weights.materialize(model)  # small enough for one file, as it was written before
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    if external:
        check_output_path(data_path, force=force, inputs=inputs, source=source)
    tmp = moved_data = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".onnxcompress-", dir=path.parent))
        staged = tmp / path.name
        if external:  # one tensor at a time, from memory or from the files it is mapped from
            weights.save(model, staged, data_name)
        else:
            onnx.save(model, str(staged), format="protobuf")
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as e:
            raise RewriteError(f"save: {path}: the compressed model fails the ONNX checker "
                               f"({_first_line(e)}); nothing was written") from e
        written = [path]
        files.keep_mode(path, staged)
        if external:
            files.keep_mode(data_path, tmp / data_name)
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
    """Refuse an output that would overwrite the input model (`source`, with its external-data
    files) or any of `inputs`, an existing file without `force`, a link, a directory or special
    file, or a folder that is missing or not writable (`files.check_output`)."""
    protected = files.Inputs([source] if source is not None else [],
                             [(p, "one of the input files") for p in inputs])
    files.check_output(path, inputs=protected, replace=force)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The whole message on one line (the checker puts the node's name on a later line)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
