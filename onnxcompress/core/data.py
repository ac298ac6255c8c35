"""Calibration and validation inputs: every source becomes a re-iterable stream of feeds
(`{input_name: ndarray}`, one ONNX Runtime run each), checked against the model's inputs.

Sources:
* `.npz`: keys are input names, arrays carry samples on axis 0; streamed in batches of
  `batch_size` samples (or of the model's static batch size).
* `.npy`: the same for a single-input model.
* a directory of `.npz`/`.npy` files: each file is one feed (sequences of different lengths can be
  fed unpadded), in sorted file-name order.
* from Python: any iterable of dicts, or an ONNX Runtime `CalibrationDataReader`.

Files are opened with `allow_pickle=False`: object arrays are refused, nothing in a data file runs.
Only regular files are read (a FIFO or device is refused, never waited on). Memory is bounded
before anything is allocated: an array's header must match the bytes the file (or the zip
member) holds, compressed members may expand to at most `MEMORY_BUDGET` bytes in all (a zip bomb
is refused unread), and a one-shot iterable (a generator, a CalibrationDataReader) is read up to
`MAX_STREAM_FEEDS` feeds or `MEMORY_BUDGET` bytes, with a warning when it is cut.

Dtypes: an array whose dtype differs from the input's is cast when the cast is safe in practice,
floats of another width to the model's float type (float64 or float16 for a float32 input; one
warning per input and source, since float64 -> float32 rounds) and integers of another width
when every value fits (silently); anything else (floats for an integer input, integers or
booleans for a float input, integers out of range) is a `DataError`.
"""
from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from . import files
from .errors import DataError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

MEMORY_BUDGET = 512 * 2**20  # bytes: compressed data expanded, a one-shot stream kept, synthesized feeds
MAX_STREAM_FEEDS = 4096      # feeds taken from a one-shot iterable


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for static dims, None for dynamic ones


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs a feed must provide (inputs with an initializer default are optional)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else np.dtype(np.float32)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tt.shape.dim) if tt.HasField("shape") else None
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


class FeedSource:
    """A re-iterable, checked stream of feeds. `len()` is the number of samples (axis 0 summed
    over feeds) when known without reading everything, else None via `samples`.

    `table`, when set, gives feed k by position (`FileFeeds`, `ArrayFeeds`, `ListFeeds`,
    `Picked`), which is what lets `shards` hand each worker its own feeds."""

    def __init__(self, name: str, make: Callable[[], Iterator[Feed]] | None, specs: list[InputSpec],
                 samples: int | None, feeds: int | None = None, arrays: Feed | None = None,
                 batch_size: int = 1, allow_nonfinite: bool = False, table=None):
        if make is None:
            make = lambda: (table[k] for k in range(len(table)))  # noqa: E731
        self.name, self._make, self.specs, self.samples, self.feeds = name, make, specs, samples, feeds
        self.arrays, self.batch_size = arrays, batch_size  # set for array sources: split by sample
        self.allow_nonfinite = allow_nonfinite
        self.table = table
        self.paths: list[Path] | None = None  # a folder's files, one feed each: split by file
        self._warned: set = set()  # inputs already warned about (a float cast), once per source

    def __iter__(self) -> Iterator[Feed]:
        count = 0
        for k, feed in enumerate(self._make()):
            yield check_feed(feed, self.specs, f"{self.name} feed {k}", allow_nonfinite=self.allow_nonfinite,
                             warned=self._warned, source=self.name)
            count += 1
        if count == 0:
            raise DataError(f"data: {self.name} holds no samples")


@dataclass(frozen=True)
class FileFeeds:
    """Feed k is the file `paths[k]` (a directory source), read when asked for: a worker given
    some of the paths reads those files itself, at the same path."""
    paths: tuple[Path, ...]
    specs: tuple[InputSpec, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, k: int) -> Feed:
        return _read_file(self.paths[k], list(self.specs))

    def take(self, index) -> "FileFeeds":
        return FileFeeds(tuple(self.paths[k] for k in index), self.specs)


@dataclass(frozen=True, eq=False)
class ListFeeds:
    """Feeds held in memory (a list from Python, synthesized inputs, a one-shot stream kept)."""
    feeds: tuple

    def __len__(self) -> int:
        return len(self.feeds)

    def __getitem__(self, k: int) -> Feed:
        return self.feeds[k]

    def take(self, index) -> "ListFeeds":
        return ListFeeds(tuple(self.feeds[k] for k in index))


@dataclass(frozen=True, eq=False)
class ArrayFeeds:
    """Samples on axis 0 of in-memory arrays; feed k is samples [k * step, (k + 1) * step)."""
    arrays: Feed
    step: int
    count: int

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int) -> Feed:
        if not 0 <= k < self.count:
            raise IndexError(k)
        return {name: v[k * self.step:(k + 1) * self.step] for name, v in self.arrays.items()}

    def take(self, index) -> ListFeeds:
        return ListFeeds(tuple(self[k] for k in index))  # only the samples of those feeds


@dataclass(frozen=True)
class Picked:
    """Feed k is feed `index[k]` of `base` (one part of a `split`)."""
    base: object
    index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> Feed:
        return self.base[self.index[k]]

    def take(self, index):
        return self.base.take([self.index[k] for k in index])


@dataclass(frozen=True)
class Shard:
    """Feeds `start`, `start + 1`, ... of a source, carried as `table` (file paths, or the arrays
    of just these feeds) so it can be sent to another process. Iterating gives (k, feed) pairs,
    k the feed's position in the whole source, each feed checked as the source checks it (not
    at all without `specs`: feeds from Python given straight to `calibrate`)."""
    name: str
    start: int
    table: object
    specs: tuple[InputSpec, ...] | None
    allow_nonfinite: bool = False

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[tuple[int, Feed]]:
        warned: set = set()
        for j in range(len(self.table)):
            k = self.start + j
            if self.specs is None:
                yield k, self.table[j]
                continue
            yield k, check_feed(self.table[j], list(self.specs), f"{self.name} feed {k}",
                                allow_nonfinite=self.allow_nonfinite, warned=warned, source=self.name)


def shards(source: FeedSource, count: int) -> list[Shard]:
    """`source` cut into at most `count` contiguous runs of feeds of near-equal length, in order.
    A directory's shards carry file paths, read where the shard is iterated; in-memory feeds are
    carried as arrays. A source without a table (a one-shot iterable) is read here first."""
    table = source.table if source.table is not None else ListFeeds(tuple(source))
    n = len(table)
    count = max(1, min(count, n))
    bounds = [i * n // count for i in range(count + 1)]
    specs = tuple(source.specs) if source.specs is not None else None
    return [Shard(source.name, a, table.take(range(a, b)), specs, source.allow_nonfinite)
            for a, b in zip(bounds, bounds[1:])]


def open_source(spec, specs: list[InputSpec], *, batch_size: int, label: str = "calibration",
                allow_nonfinite: bool = False) -> FeedSource:
    """Turn a path, iterable or CalibrationDataReader into a `FeedSource`. NaN/Inf values are
    refused unless `allow_nonfinite`."""
    source = _open(spec, specs, batch_size, label)
    source.allow_nonfinite = allow_nonfinite
    return source


def _open(spec, specs: list[InputSpec], batch_size: int, label: str) -> FeedSource:
    if isinstance(spec, (str, os.PathLike)):
        return _open_path(Path(spec), specs, batch_size)
    if hasattr(spec, "get_next"):
        return _from_reader(spec, specs, label)
    if isinstance(spec, dict):
        return _from_arrays(f"{label} arrays", dict(spec), specs, batch_size)
    if isinstance(spec, Iterable):
        items = spec if isinstance(spec, (list, tuple)) else None
        if items is None:
            return _one_shot(f"{label} iterable", iter(spec), specs)
        return FeedSource(f"{label} list", None, specs, None, len(items), table=ListFeeds(tuple(items)))
    raise DataError(f"data: cannot read {label} data from a {type(spec).__name__}")


def _open_path(path: Path, specs: list[InputSpec], batch_size: int) -> FeedSource:
    if not path.exists():
        raise DataError(f"data: {path}: no such file or directory")
    if path.is_dir():
        try:
            found = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and not p.is_dir())
        except OSError as e:
            raise DataError(f"data: {path}: cannot list the directory ({e.strerror or e})") from e
        if not found:
            raise DataError(f"data: {path}: the directory holds no .npz or .npy files")
        return _from_files(str(path), found, specs)
    arrays = _read_file(path, specs)
    return _from_arrays(str(path), arrays, specs, batch_size)


def _from_files(name: str, paths: list[Path], specs: list[InputSpec]) -> FeedSource:
    """One feed per file, read when the stream reaches it."""
    source = FeedSource(name, None, specs, None, len(paths), table=FileFeeds(tuple(paths), tuple(specs)))
    source.paths = paths
    return source


_NPY_MAGIC, _ZIP_MAGICS = b"\x93NUMPY", (b"PK\x03\x04", b"PK\x05\x06")


def _read_file(path: Path, specs: list[InputSpec]) -> Feed:
    """One file's arrays. The format is taken from the first bytes, not trusted from the suffix:
    anything that is not an .npy array or a zip of them (a pickle above all) is refused unread.
    Only a regular file is opened (a FIFO would block forever)."""
    if path.suffix not in (".npz", ".npy"):
        raise DataError(f"data: {path}: expected a .npz or .npy file or a directory")
    if path.suffix == ".npy" and len(specs) != 1:
        raise DataError(f"data: {path}: a .npy file serves a single-input model; this model "
                        f"has inputs {', '.join(s.name for s in specs)} (use .npz)")
    try:
        with files.open_regular(path) as f:
            head = f.read(6)
            want = _NPY_MAGIC if path.suffix == ".npy" else _ZIP_MAGICS
            if not head:
                raise DataError(f"data: {path}: the file is empty")
            if not head.startswith(want):
                kind = ("pickled data" if head[:1] == b"\x80" else "a .npy array" if head == _NPY_MAGIC
                        else "a zip archive" if head[:4] in _ZIP_MAGICS else "not numpy data")
                raise DataError(f"data: {path}: not a {path.suffix} file ({kind}); refused")
            f.seek(0)
            if path.suffix == ".npy":
                return {specs[0].name: _read_npy(f, os.fstat(f.fileno()).st_size, f"data: {path}")}
            return _read_npz(f, path)
    except DataError:
        raise
    except files.SpecialFile as e:
        raise DataError(f"data: {path}: {e}; refused") from e
    except ValueError as e:
        if "Object arrays cannot be loaded" in str(e):
            raise DataError(f"data: {path}: holds object arrays (pickled data); refused") from e
        raise DataError(f"data: {path}: cannot read ({str(e).splitlines()[0]})") from e
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as e:
        text = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise DataError(f"data: {path}: cannot read ({text})") from e


def _npy_header(f, where: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data bytes) from an .npy header, without reading the data. Object dtypes
    are refused here: they would need pickle."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise DataError(f"{where}: unknown .npy format version {version}")
    if dtype.hasobject:
        raise DataError(f"{where}: holds object arrays (pickled data); refused")
    count = 1
    for d in shape:
        count *= int(d)
    return shape, dtype, count * dtype.itemsize


def _read_npy(f, available: int, where: str) -> np.ndarray:
    """Read one .npy array from `f` after checking that its header's size fits in `available`
    bytes (the file's, or the zip member's, declared length)."""
    start = f.tell()
    shape, dtype, nbytes = _npy_header(f, where)
    body = available - (f.tell() - start)
    if nbytes > body:
        raise DataError(f"{where}: the header declares shape {tuple(shape)} of {dtype} ({_gib(nbytes)}), "
                        f"but only {_gib(max(body, 0))} follow; refused")
    f.seek(start)
    return np.lib.format.read_array(f, allow_pickle=False)


def _read_npz(f, path: Path) -> Feed:
    """The arrays of a zip of .npy members. Every member is checked before any is read: stored or
    deflated only, not encrypted, an .npy header whose size is the member's declared size, and
    deflated members that expand to at most MEMORY_BUDGET bytes in all."""
    out, expanded = {}, 0
    with zipfile.ZipFile(f) as z:
        members = z.infolist()
        for info in members:
            where = f"data: {path}: member {info.filename!r}"
            if info.flag_bits & 0x1:
                raise DataError(f"{where} is encrypted; refused")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise DataError(f"{where} uses compression method {info.compress_type}; only stored "
                                f"or deflated members are read")
            if not info.filename.endswith(".npy"):
                raise DataError(f"{where} is not an .npy array; refused")
            with z.open(info) as m:
                _, _, nbytes = _npy_header(m, where)
                header = m.tell() if m.seekable() else None
            if header is not None and header + nbytes != info.file_size:
                raise DataError(f"{where}: the header declares {_gib(nbytes)} but the member holds "
                                f"{_gib(max(info.file_size - header, 0))}; refused")
            if info.compress_type == zipfile.ZIP_STORED and info.file_size > info.compress_size:
                raise DataError(f"{where}: declares {_gib(info.file_size)} but stores {_gib(info.compress_size)}; refused")
            if info.compress_type == zipfile.ZIP_DEFLATED:
                expanded += nbytes
        if expanded > MEMORY_BUDGET:
            raise DataError(f"data: {path}: compressed members would expand to {_gib(expanded)}, over the "
                            f"{_gib(MEMORY_BUDGET)} limit for compressed data (save with np.savez, "
                            f"uncompressed, or as a folder of files)")
        for info in members:
            with z.open(info) as m:
                out[info.filename[:-4]] = _read_npy(m, info.file_size, f"data: {path}: member {info.filename!r}")
    return out


def _gib(nbytes: int) -> str:
    return f"{nbytes} bytes" if nbytes < 2**20 else f"{nbytes / 2**30:.3g} GiB"


def _from_arrays(name: str, arrays: Feed, specs: list[InputSpec], batch_size: int) -> FeedSource:
    """Samples on axis 0 of every array, cut into batches (the model's static batch if it has one).
    Ranks, fixed dimensions past axis 0 and dtypes are checked (and cast) on the whole arrays, so
    messages give the file's shapes, not a batch's."""
    check_names(arrays, specs, name)
    arrays = _whole_arrays(arrays, specs, name)
    counts = {k: (np.shape(v)[0] if np.ndim(v) else 0) for k, v in arrays.items()}
    n = min(counts.values())
    if len(set(counts.values())) > 1:
        raise DataError(f"data: {name}: inputs hold different sample counts {counts}")
    if n == 0:
        raise DataError(f"data: {name}: zero samples")
    static = {s.shape[0] for s in specs if s.shape and s.shape[0] is not None}
    step = static.pop() if len(static) == 1 else batch_size

    static_batch = bool(specs and all(s.shape and s.shape[0] is not None for s in specs))
    if static_batch and n < step:
        raise DataError(f"data: {name}: {n} samples, fewer than the model's fixed batch size {step}")
    table = ArrayFeeds(arrays, step, n // step if static_batch else -(-n // step))
    return FeedSource(name, None, specs, n, -(-n // step), arrays=arrays, batch_size=batch_size, table=table)


def _from_reader(reader, specs: list[InputSpec], label: str) -> FeedSource:
    def make():
        while (feed := reader.get_next()) is not None:
            yield feed
        if hasattr(reader, "rewind"):
            reader.rewind()

    return _one_shot(f"{label} CalibrationDataReader", make(), specs)


def _one_shot(name: str, iterator: Iterator[Feed], specs: list[InputSpec]) -> FeedSource:
    """An iterable that can be read once: its feeds are kept as they stream by, so later passes
    (validation of the held-out part) replay them."""
    seen: list[Feed] = []
    held = [0, False]  # bytes kept, cut

    def make():
        yield from seen
        while not held[1]:
            if len(seen) >= MAX_STREAM_FEEDS or held[0] >= MEMORY_BUDGET:
                held[1] = True
                log.warning("data: %s: took the first %d feeds (%s) and stopped: a one-shot iterable "
                            "is kept in memory, so at most %d feeds or %s are read", name, len(seen),
                            _gib(held[0]), MAX_STREAM_FEEDS, _gib(MEMORY_BUDGET))
                return
            try:
                feed = next(iterator)
            except StopIteration:
                held[1] = True
                return
            seen.append(feed)
            held[0] += sum(int(getattr(v, "nbytes", 0)) for v in feed.values()) if isinstance(feed, dict) else 0
            yield feed

    return FeedSource(name, make, specs, None)


def split(source: FeedSource, holdout: float) -> tuple[FeedSource, FeedSource]:
    """(calibration, validation): every feed whose position k satisfies k % m == m - 1 for
    m = round(1 / holdout) is held out; a source of one feed serves both (with a warning)."""
    if holdout <= 0:
        return source, source
    m = max(2, round(1 / holdout))
    if source.arrays is not None and source.samples >= 2:
        idx = np.arange(source.samples)
        held = idx % m == m - 1
        parts = tuple(_from_arrays(f"{source.name} ({part})", {k: v[mask] for k, v in source.arrays.items()},
                                   source.specs, source.batch_size)
                      for part, mask in (("calibration part", ~held), ("held-out part", held)))
        for p in parts:
            p.allow_nonfinite = source.allow_nonfinite
        return parts
    if source.paths is not None and len(source.paths) >= 2:
        return _split_files(source, m)
    feeds = list(source) if source.feeds is None else None
    total = source.feeds if feeds is None else len(feeds)
    if total < 2:
        log.warning("data: %s has a single feed; validating on the calibration data", source.name)
        return source, source

    def part(held: bool):
        def make():
            it = iter(feeds) if feeds is not None else iter(source)
            for k, feed in enumerate(it):
                if (k % m == m - 1) == held:
                    yield feed
        return make

    n_val = total // m
    allow = source.allow_nonfinite
    table = source.table if source.table is not None else ListFeeds(tuple(feeds)) if feeds is not None else None
    picked = [None, None] if table is None else [
        Picked(table, tuple(k for k in range(total) if (k % m == m - 1) == held)) for held in (False, True)]
    return (FeedSource(source.name + " (calibration part)", part(False), source.specs, None, total - n_val,
                       allow_nonfinite=allow, table=picked[0]),
            FeedSource(source.name + " (held-out part)", part(True), source.specs, None, n_val, allow_nonfinite=allow,
                       table=picked[1]))


def _split_files(source: FeedSource, m: int) -> tuple[FeedSource, FeedSource]:
    """`split` of a folder: each part reads only its own files (file k is held out when
    k % m == m - 1), checked and named as in the whole folder (`NAME feed k`)."""
    def part(held: bool):
        def make():
            for k, p in enumerate(source.paths):
                if (k % m == m - 1) == held:
                    yield check_feed(_read_file(p, source.specs), source.specs, f"{source.name} feed {k}",
                                     allow_nonfinite=source.allow_nonfinite, warned=source._warned, source=source.name)
        return make

    n_val = len(source.paths) // m
    allow = source.allow_nonfinite
    picked = [Picked(source.table, tuple(k for k in range(len(source.paths)) if (k % m == m - 1) == held))
              for held in (False, True)]  # by position, for shards (`shards`)
    return (FeedSource(source.name + " (calibration part)", part(False), source.specs, None,
                       len(source.paths) - n_val, allow_nonfinite=allow, table=picked[0]),
            FeedSource(source.name + " (held-out part)", part(True), source.specs, None, n_val, allow_nonfinite=allow,
                       table=picked[1]))


def _whole_arrays(arrays: Feed, specs: list[InputSpec], name: str) -> Feed:
    """Rank and fixed dimensions (past the sample axis) of each whole array, and its dtype cast
    once (see the module's rule on dtypes)."""
    out = dict(arrays)
    warned: set = set()
    for s in specs:
        a = np.asarray(arrays[s.name])
        if a.dtype != object and a.dtype != s.dtype:
            a = _cast(a, s, name, warned, name)
        if s.shape is not None:
            if a.ndim != len(s.shape):
                raise DataError(f"data: {name}: input {s.name!r} has rank {a.ndim} (shape {a.shape}), "
                                f"the model takes rank {len(s.shape)} (samples on axis 0)")
            for axis, (have, want) in enumerate(zip(a.shape, s.shape)):
                if axis > 0 and want is not None and have != want:
                    raise DataError(f"data: {name}: input {s.name!r} has {have} on axis {axis}, the model "
                                    f"takes {want} (shape {a.shape})")
        out[s.name] = a
    return out


def _cast(a: np.ndarray, s: InputSpec, where: str, warned: set, source: str) -> np.ndarray:
    """`a` as `s.dtype` under the module's dtype rule, or a `DataError`."""
    if a.dtype.kind == "f" and s.dtype.kind == "f":
        if s.name not in warned:
            warned.add(s.name)
            log.warning("data: %s: input %r is %s, cast to %s as the model takes", source, s.name, a.dtype, s.dtype)
        return a.astype(s.dtype)
    if a.dtype.kind in "iu" and s.dtype.kind in "iu":
        info = np.iinfo(s.dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise DataError(f"data: {where}: input {s.name!r} has {a.dtype} values outside {s.dtype}, "
                            f"which the model takes")
        return a.astype(s.dtype)
    raise DataError(f"data: {where}: input {s.name!r} has dtype {a.dtype}, the model takes {s.dtype}")


def check_names(feed: Feed, specs: list[InputSpec], where: str) -> None:
    names = {s.name for s in specs}
    missing, extra = sorted(names - set(feed)), sorted(set(feed) - names)
    if missing:
        holds = ", ".join(sorted(feed)) or "nothing"
        raise DataError(f"data: {where}: missing input {missing[0]!r} (the model needs {', '.join(sorted(names))}; "
                        f"the data holds {holds})")
    if extra:
        raise DataError(f"data: {where}: {extra[0]!r} is not an input of the model (inputs: {', '.join(sorted(names))})")


def check_feed(feed: Feed, specs: list[InputSpec], where: str, *, allow_nonfinite: bool = False,
               warned: set | None = None, source: str | None = None) -> Feed:
    """Check names, dtypes, ranks, static dimensions and finiteness (unless `allow_nonfinite`);
    cast under the module's dtype rule (a float cast warned once per input in `warned`). Returns
    the feed ready for ONNX Runtime."""
    if not isinstance(feed, dict):
        raise DataError(f"data: {where}: a feed must be a dict of input name -> array, got {type(feed).__name__}")
    check_names(feed, specs, where)
    out = {}
    for s in specs:
        a = np.asarray(feed[s.name])
        if a.dtype == object:
            raise DataError(f"data: {where}: input {s.name!r} is an object array; refused")
        if a.dtype != s.dtype:
            a = _cast(a, s, where, set() if warned is None else warned, source or where)
        if s.shape is not None:
            if a.ndim != len(s.shape):
                raise DataError(f"data: {where}: input {s.name!r} has rank {a.ndim} (shape {a.shape}), "
                                f"the model takes rank {len(s.shape)}")
            for axis, (have, want) in enumerate(zip(a.shape, s.shape)):
                if want is not None and have != want:
                    raise DataError(f"data: {where}: input {s.name!r} has {have} on axis {axis}, the model "
                                    f"takes {want} (shape {a.shape})")
        if a.size == 0:
            raise DataError(f"data: {where}: input {s.name!r} is empty (shape {a.shape})")
        if a.dtype.kind == "f" and not allow_nonfinite and not np.all(np.isfinite(a)):
            bad = np.argwhere(~np.isfinite(a))[0]
            what = "NaN" if np.isnan(a[tuple(bad)]) else "Inf"
            raise DataError(f"data: {where}: input {s.name!r} holds {what} values (first at index "
                            f"{tuple(int(i) for i in bad)})")
        out[s.name] = a
    return out


def synthesize(specs: list[InputSpec], *, count: int, seed: int) -> FeedSource:
    """Random feeds from the input specs (dynamic dims = 1 for the batch, 16 elsewhere): floats
    standard normal, integers in [0, 100). Only a fallback: statistics of random inputs say little
    about real ones."""
    rng = np.random.default_rng(seed)
    for s in specs:
        count_ = 1
        dims = tuple(d if d is not None else (1 if k == 0 else 16) for k, d in enumerate(s.shape or (1,)))
        for d in dims:
            count_ *= d
        if count_ * s.dtype.itemsize * count > MEMORY_BUDGET:
            raise DataError(f"data: input {s.name!r} declares shape {dims}: {count} synthesized feeds would "
                            f"take {_gib(count_ * s.dtype.itemsize * count)}, over the {_gib(MEMORY_BUDGET)} "
                            f"budget; pass --calib")
    feeds = []
    for _ in range(count):
        feed = {}
        for s in specs:
            shape = tuple(d if d is not None else (1 if k == 0 else 16)
                          for k, d in enumerate(s.shape or (1,)))
            if s.dtype.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype.kind == "b":
                feed[s.name] = rng.random(shape) < 0.5
            else:
                feed[s.name] = rng.integers(0, 100, size=shape).astype(s.dtype)
        feeds.append(feed)
    return FeedSource("synthesized inputs", None, specs, count, count, table=ListFeeds(tuple(feeds)))
