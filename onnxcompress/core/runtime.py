"""ONNX Runtime sessions: the one place a model is handed to ONNX Runtime (calibration, shape
probes, sensitivity probes and validation all run through `make_session` and `run`)."""
from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from . import files, weights
from .errors import DataError, ModelError, UsageError
from .modelio import load_model, without_initializers
from .normalize import unique_node_names

log = logging.getLogger(__name__)


LARGE_MODEL = 2**28  # bytes of weights from which ONNX Runtime gets the model as a file

# --provider: the execution providers of a session, in ONNX Runtime's order of preference (nodes
# a provider cannot run fall back to the next one)
PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def check_provider(provider: str) -> None:
    """A `UsageError` naming --provider unless this ONNX Runtime build offers `provider`'s
    execution provider (CUDA needs the onnxruntime-gpu package and a GPU)."""
    want = PROVIDERS[provider][0]
    have = ort.get_available_providers()
    if want not in have:
        raise UsageError(f"--provider {provider}: ONNX Runtime {ort.__version__} has no {want} here "
                         f"(available: {', '.join(have)}); install onnxruntime-gpu or use --provider cpu")


def make_session(model: onnx.ModelProto | str | os.PathLike, outputs: Iterable[str] = (),
                 types: dict[str, int] | None = None, *, provider: str = "cpu", threads: int = 0,
                 only: bool = False, large: bool | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session of `model` on `provider` (`PROVIDERS`; CPU by default) with
    `outputs` exposed in addition to the graph outputs (types from `types`, float by default)
    and repeated node names made unique; `threads` intra-op threads (0: one per core). With
    `only`, `outputs` replace the graph outputs and the graph keeps only the nodes they depend on
    (a calibration pass over the first layers then runs, and maps, only those layers). The
    argument is not modified.

    `model` may be the path of an ONNX file: ONNX Runtime then reads it itself (a file it refuses,
    with repeated node names say, is loaded here and passed on). A model with external-data
    weights (`weights`), or with more than LARGE_MODEL bytes of weights, reaches ONNX Runtime as
    a temporary file whose external data are hard links to the files the weights are in (weights
    held in memory are written there first, page-aligned, one tensor at a time), and is not
    pre-packed: ONNX Runtime maps the weights instead of holding its own copy, and no copy of the
    whole model is made. `large`: for a path, whether its weights pass LARGE_MODEL when the
    caller knows (None: the file is parsed to find out).
    """
    outputs = list(outputs)
    if isinstance(model, (str, os.PathLike)) and not outputs:
        try:
            if large is None:
                large = weights_bytes(onnx.load(str(model), load_external_data=False)) > LARGE_MODEL
            return _session(str(model), large=large, provider=provider, threads=threads)
        except Exception:
            model = load_model(model)
    elif isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    shell = without_initializers(model)
    unique_node_names(shell.graph)  # ONNX Runtime refuses repeated node names
    known = {vi.name for vi in model.graph.output}
    if only:
        del shell.graph.output[:]
        known = set()
    for name in outputs:
        if name not in known:
            elem = (types or {}).get(name, onnx.TensorProto.FLOAT)
            shell.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    needed = _prune(shell.graph) if only else None
    inits = [t for t in model.graph.initializer if needed is None or t.name in needed]
    try:
        if _fits_in_memory(model, inits):
            values = _in_memory(inits, shell)
            return _session(shell.SerializeToString(), large=False, provider=provider, threads=threads,
                            initializers=values)
        with _linked_file(shell, inits) as path:
            return _session(path, large=True, provider=provider, threads=threads)
    except Exception as e:
        raise ModelError(f"run: ONNX Runtime cannot load the model ({str(e).splitlines()[0][:300]})") from e


def _fits_in_memory(model: onnx.ModelProto, initializers) -> bool:
    """ONNX Runtime may get the model from memory: its weights are all in memory (none external)
    and within LARGE_MODEL bytes."""
    return weights_bytes(model) <= LARGE_MODEL and not any(weights.is_external(t) for t in initializers)


@contextmanager
def _linked_file(shell: onnx.ModelProto, initializers) -> Iterator[str]:
    """The path of a temporary ONNX file of `shell` with `initializers`: external ones as hard
    links to the files they are in, in-memory ones written beside it (`_write_external`). A
    session built inside the `with` block keeps its mapped weights after the files are gone."""
    with tempfile.TemporaryDirectory(prefix=files.SYSTEM_PREFIX + "session-") as tmp:
        path = Path(tmp) / "model.onnx"
        _write_external(initializers, shell, path.with_name("model.onnx.data"))
        onnx.save(weights.link(shell, Path(tmp)), str(path))
        yield str(path)


@contextmanager
def session_source(model: onnx.ModelProto | str | os.PathLike) -> Iterator[str | bytes]:
    """What `ort.InferenceSession` takes for `model`, for sessions with options of their own
    (latency timings, profiling): a path as it is; a model whose weights are all in memory and
    within LARGE_MODEL bytes, serialized; any other as a temporary file whose external data are
    hard links to its weight files (`_linked_file`; serialized bytes would name the weight files
    by absolute paths, which ONNX Runtime refuses). Build the session inside the `with` block."""
    if isinstance(model, (str, os.PathLike)):
        yield str(model)
        return
    inits = list(model.graph.initializer)
    if _fits_in_memory(model, inits):
        yield model.SerializeToString()
        return
    with _linked_file(without_initializers(model), inits) as path:
        yield path


def _prune(graph: onnx.GraphProto) -> set[str]:
    """Keep only the nodes the graph outputs depend on (in their order); return every tensor name
    they read, subgraph reads included. Graph inputs stay, so every feed still applies."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    want, stack = set(), [vi.name for vi in graph.output]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i in want:
            continue
        want.add(i)
        node = graph.node[i]
        stack.extend(n for sub in _with_subgraphs(node) for n in sub.input if n)
    keep = [n for i, n in enumerate(graph.node) if i in want]
    del graph.node[:]
    graph.node.extend(keep)
    return {n for node in keep for sub in _with_subgraphs(node) for n in sub.input}


def _with_subgraphs(node: onnx.NodeProto):
    """The node and every node of its subgraphs (If/Loop/Scan bodies read outer tensors)."""
    yield node
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for inner in g.node:
                yield from _with_subgraphs(inner)



def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# element types handed to ONNX Runtime as arrays (`_in_memory`); others (strings, packed 4-bit,
# bfloat16, float8) go into the serialized model as they are
_ARRAY_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
                onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
IN_MEMORY_BYTES = 1024  # initializers above this many bytes reach ONNX Runtime as arrays


def _in_memory(initializers, shell: onnx.ModelProto) -> tuple[list[str], list]:
    """Add `initializers` to `shell`: the large ones as external-data placeholders, returned as
    (names, OrtValues) for `SessionOptions.add_external_initializers`, so ONNX Runtime copies
    their bytes from the arrays instead of parsing a serialized copy of every weight (MiniLM:
    0.2 s for a session instead of 1.1 s); the small ones, and types NumPy does not carry as
    ONNX stores them, inline."""
    names, values = [], []
    for t in initializers:
        if t.data_type not in _ARRAY_TYPES or _tensor_bytes(t) <= IN_MEMORY_BYTES or not t.HasField("raw_data"):
            shell.graph.initializer.add().CopyFrom(t)
            continue
        a = np.ascontiguousarray(numpy_helper.to_array(t))
        ext = shell.graph.initializer.add()
        ext.name, ext.data_type = t.name, t.data_type
        ext.dims.extend(t.dims)
        ext.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", "onnxcompress-in-memory"), ("offset", "0"), ("length", str(a.nbytes))):
            entry = ext.external_data.add()
            entry.key, entry.value = key, value
        names.append(t.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(a))
    return names, values


def _session(model: str | bytes, *, large: bool, provider: str = "cpu", threads: int = 0,
             initializers: tuple[list[str], list] | None = None) -> ort.InferenceSession:
    """A throughput session (calibration, shape probes, sensitivity probes, validation): one
    intra-op thread per core (or `threads`), and idle threads sleep instead of spinning between
    runs, so NumPy's work on the outputs (Gram updates, comparisons) and other processes get the
    cores. Latency measurements (`latency.py`, `benchmark.py`) build their own sessions."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or cores()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if large:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if initializers and initializers[0]:
        opts.add_external_initializers(*initializers)
    return ort.InferenceSession(model, opts, providers=list(PROVIDERS[provider]))


def weights_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers, from their shapes and types."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


_tensor_bytes = weights.nbytes


def _write_external(initializers, shell: onnx.ModelProto, data: Path, threshold: int = 1024) -> None:
    """Write the in-memory initializers of more than `threshold` bytes to `data` at page-aligned
    offsets and add them to `shell` as external tensors; smaller ones, and external ones (still
    naming their own files), are copied into `shell` as they are."""
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
            for key, value in (("location", str(data)), ("offset", str(offset)), ("length", str(len(raw)))):
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
