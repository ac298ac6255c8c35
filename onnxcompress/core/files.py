"""What may be written, and how: the one place that decides.

* `Inputs` is every file a run reads: the model, its external-data files, every file of a
  `--calib` / `--val` folder (or the data file itself), the `--plan` file. None of them is ever
  written, whatever the flags.
* `check_output` refuses, before any work, an output that is an input (by path, through a link,
  or as a hard link to the same inode), a symbolic link (writes never follow links: a dangling
  link in a shared folder would otherwise create its target elsewhere), anything that is not a
  regular file (a device such as /dev/null, a FIFO, a socket, a directory), an existing file
  without `replace`, and a folder that is missing or not writable.
* `Transaction` stages every file as a temporary file in its destination's folder, then moves
  them all into place with signals held off; until `commit`, and on `rollback`, the destinations
  keep what they held before (an existing output is backed up by a hard link first). An
  existing file's permission bits carry over to its replacement.
* `remove_stale` deletes temporary files and folders of our own naming (`.onnxcompress-*`
  beside outputs, `onnxcompress-*` in the system's temporary folder) older than a day, left by
  a run that was killed outright.
* `open_regular` opens a file for reading only if it is a regular file, without blocking on a
  FIFO (the check is made on the opened descriptor, so nothing can be swapped in between).
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import OutputError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".onnxcompress-"
SYSTEM_PREFIX = "onnxcompress-"  # our folders in the system temporary folder (validate, session, check)
STALE_SECONDS = 24 * 3600
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class SpecialFile(OSError):
    """A path that is not a regular file where one is needed (raised by `open_regular`)."""


def kind_of(mode: int) -> str:
    """What a file of st_mode `mode` is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(path: str | os.PathLike):
    """Open `path` for binary reading if it is a regular file (links are followed: reading through
    a link is harmless). A FIFO is opened without blocking and refused; raises `SpecialFile`
    (an OSError) for anything that is not a regular file, OSError for the rest."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SpecialFile(f"{kind_of(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def same_file(a: Path, b: Path) -> bool:
    """True if `a` and `b` name the same file: the same path once links are resolved, or the same
    inode (a hard link)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, ValueError, RuntimeError):
        return False


class Inputs:
    """The files a run reads, each with the words that name it in a message.

    `models` are ONNX files whose external-data files are protected as well; those are listed
    (by reading the model's graph without its weights) only when an output that already exists
    lies in the model's folder, the only place external data may be."""

    def __init__(self, models: Iterable = (), files: Iterable[tuple] = ()):
        self.models = [Path(m) for m in models if m is not None]
        self.files = [(Path(p), what) for p, what in files if p is not None]
        self._external: dict[Path, list[Path]] = {}

    @classmethod
    def of_run(cls, model, calib=None, val=None, plan=None, labels=None) -> "Inputs":
        """The inputs of a command-line run: data folders contribute every file they hold."""
        files = []
        for flag, spec in (("--calib", calib), ("--val", val)):
            if isinstance(spec, (str, os.PathLike)):
                files += [(p, f"a data file of {flag}") for p in data_files(Path(spec))]
        if plan is not None:
            files.append((Path(plan), "the --plan file"))
        if labels is not None:
            files.append((Path(labels), "the --val-labels file"))
        return cls([model], files)

    def find(self, path: Path) -> str | None:
        """The words naming the input that `path` is, or None if it is none of them."""
        for model in self.models:
            if same_file(path, model):
                return "the input model"
        for p, what in self.files:
            if same_file(path, p):
                return what
        if not path.exists():
            return None
        for model in self.models:
            if _inside(path, model.parent):
                if any(same_file(path, x) for x in self._external_files(model)):
                    return "an external-data file of the input model"
        return None

    def _external_files(self, model: Path) -> list[Path]:
        if model not in self._external:
            self._external[model] = external_files(model)
        return self._external[model]


def external_files(model: Path) -> list[Path]:
    """The files the model's external-data entries name (within its folder), read from the graph
    alone; [] if the model cannot be read (loading will say why)."""
    import onnx
    from onnx import external_data_helper

    try:
        proto = onnx.load(str(model), load_external_data=False)
        found = set()
        for t in external_data_helper._get_all_tensors(proto):
            for entry in t.external_data:
                if entry.key == "location" and entry.value and "\0" not in entry.value:
                    found.add(model.parent / entry.value)
        return sorted(found)
    except Exception:  # an unreadable model is refused by load_model, with its own message
        return []


def data_files(spec: Path) -> list[Path]:
    """A data path's files: the path itself, or every entry of the folder it names."""
    try:
        return sorted(spec.iterdir()) if spec.is_dir() else [spec]
    except OSError:  # unreadable: the data stage says so
        return [spec]


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def check_output(path: str | os.PathLike, *, inputs: Inputs, replace: bool, what: str = "output") -> None:
    """Refuse writing `path` (see the module docstring); raise `OutputError` naming it as `what`."""
    path = Path(path)
    found = inputs.find(path)
    if found:
        raise OutputError(f"{what} {path} is {found}; inputs are never overwritten")
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot be examined ({e.strerror or e})") from e
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{what} {path} is a symbolic link; refused (outputs never follow links: "
                          f"give the real path)")
    if not path.parent.is_dir():
        raise OutputError(f"{what} folder {path.parent} does not exist")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {path} is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file; refused")
    if st is not None and not replace:
        raise OutputError(f"{what} {path} exists; pass --force to overwrite it")
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    except OSError as e:
        raise OutputError(f"{what} folder {path.parent} is not writable ({e.strerror or e})") from e
    try:
        os.close(fd)
    finally:
        os.unlink(probe)


def temp_name(dest: Path) -> Path:
    """A fresh temporary name of our own naming in `dest`'s folder."""
    return dest.parent / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{dest.name[:64]}"


def keep_mode(dest: Path, staged: Path) -> None:
    """Give `staged` the permission bits of the file it will replace, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(dest, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return
    os.chmod(staged, mode)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block is done (main thread only; elsewhere a no-op),
    so a move of several files into place is never cut in half."""
    can = hasattr(signal, "pthread_sigmask") and _SIGNALS
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS) if can else None
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Transaction:
    """Files written everything-or-nothing. `stage(dest, save)` has `save(temp_path)` write a
    temporary file beside `dest`; `guard(dest)` declares a file that another stage writes in
    place itself (the model), backing up what it holds now; `commit()` moves the staged files into
    place; `rollback()` restores every destination to what it held before."""

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []     # (temporary file, destination)
        self._moved: list[tuple[Path, Path | None]] = []  # (destination, backup of the old file)
        self.committed = False

    def guard(self, dest: str | os.PathLike) -> None:
        dest = Path(dest)
        self._moved.append((dest, _backup(dest)))

    def stage(self, dest: str | os.PathLike, save: Callable[[Path], None]) -> None:
        dest = Path(dest)
        tmp = temp_name(dest)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self._staged.append((tmp, dest))
        save(tmp)
        keep_mode(dest, tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, or a crash could leave it empty
            os.fsync(f.fileno())

    def commit(self) -> None:
        with signals_held():
            try:
                for tmp, dest in list(self._staged):
                    backup = _backup(dest)
                    try:
                        os.replace(tmp, dest)
                    except BaseException:
                        _discard(backup)
                        raise
                    self._staged.remove((tmp, dest))
                    self._moved.append((dest, backup))
            except BaseException:
                self.rollback()
                raise
            for _, backup in self._moved:
                _discard(backup)
            self._moved, self.committed = [], True

    def rollback(self) -> None:
        with signals_held():
            for tmp, _ in self._staged:
                tmp.unlink(missing_ok=True)
            for dest, backup in reversed(self._moved):
                try:
                    if backup is not None and dest.exists() and os.path.samefile(backup, dest):
                        backup.unlink()  # untouched (rename between two links of a file does nothing)
                    elif backup is not None:
                        os.replace(backup, dest)
                    else:
                        dest.unlink(missing_ok=True)
                except OSError as e:
                    log.error("cannot restore %s (%s)", dest, e.strerror or e)
            self._staged, self._moved = [], []


def _backup(dest: Path) -> Path | None:
    """A hard link (or, where links are not possible, a copy) of the regular file at `dest`,
    beside it under a temporary name; None if there is no file."""
    if not dest.is_file() or dest.is_symlink():
        return None
    backup = temp_name(dest)
    try:
        os.link(dest, backup)
    except OSError:
        shutil.copy2(dest, backup)
    return backup


def _discard(backup: Path | None) -> None:
    if backup is not None:
        backup.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: readers see the old
    file or the new one, never a part; a failure leaves the old one."""
    txn = Transaction()
    try:
        txn.stage(path, lambda tmp: tmp.write_text(text))
        txn.commit()
    except BaseException:
        txn.rollback()
        raise


def remove_stale(folders: Iterable[str | os.PathLike], *, now: float | None = None) -> list[Path]:
    """Delete our temporary files and folders (`.onnxcompress-*` in `folders`, `onnxcompress-*`
    in the system's temporary folder) that are older than a day and
    belong to this user: what a run killed outright left behind. Returns what was removed."""
    now = time.time() if now is None else now
    places = [(Path(f), TEMP_PREFIX) for f in dict.fromkeys(map(str, folders))]
    places.append((Path(tempfile.gettempdir()), SYSTEM_PREFIX))
    removed = []
    for folder, prefix in places:
        try:
            entries = [e for e in os.scandir(folder) if e.name.startswith(prefix)]
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                if now - st.st_mtime < STALE_SECONDS or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError as e:
                log.debug("cannot remove %s (%s)", entry.path, e)
    if removed:
        log.info("removed %d stale temporary files left by interrupted runs", len(removed))
    return removed
