"""Bad inputs, one by one, and the promise that a failure writes nothing.

Every case checks the exit code, that stderr is one line naming what is at fault (no traceback
without -v), and that the case's folder is exactly as before: the input model and data keep their
bytes, and the output folder gains nothing (no partial model, no temporary files). Then the
Python API on a few of the same inputs, atomic saving, and interrupts.

The command-line catalogue runs `python -m onnxcompress` in subprocesses, a few at a time (a run
is mostly interpreter start-up); each test asserts on its own case.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import graphs
from onnxcompress import (AgreementError, Config, DataError, ModelError, OutputError, Plan, RewriteError,
                          UsageError, compress)
from onnxcompress.core import modelio, weights
from onnxcompress.cli import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Mischief:
    """Unpickling this makes a folder named `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


class Work:
    """One case's folder: in/ holds the model (the MLP of graphs.py, input x[N,16]) and the
    calibration data, out/ receives the output."""

    def __init__(self, root: Path):
        self.root, self.inp, self.out = root, root / "in", root / "out"
        self.inp.mkdir(parents=True)
        self.out.mkdir()
        self.model = self.inp / "mlp.onnx"
        onnx.save(graphs.mlp(), str(self.model))
        self.x = graphs.sample_inputs([("x", (16,))], 40)["x"]
        self.calib = self.npz("calib.npz", x=self.x)
        self.output = self.out / "o.onnx"
        self.cleanups = []

    def npz(self, name: str, **arrays) -> Path:
        np.savez(self.inp / name, **arrays)
        return self.inp / name

    def write(self, name: str, data: bytes) -> Path:
        (self.inp / name).write_bytes(data)
        return self.inp / name

    def edited_model(self, name: str, edit) -> Path:
        m = graphs.mlp()
        edit(m)
        onnx.save(m, str(self.inp / name))
        return self.inp / name

    def external_model(self, folder: str, location: str | None = None) -> Path:
        """The model saved with external data `ext.data` in in/<folder>, then its references
        pointed at `location`."""
        (self.inp / folder).mkdir(exist_ok=True)
        path = self.inp / folder / "ext.onnx"
        onnx.save(graphs.mlp(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
        if location is not None:
            m = onnx.load(str(path), load_external_data=False)
            for t in m.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = location
            onnx.save(m, str(path))
        return path

    def args(self, *extra, model=None, output=None, calib=None) -> list:
        return [model or self.model, output or self.output, "--calib", calib or self.calib, *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under `root` (hidden ones too), with a hash of each regular file's bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "-"
            for p in sorted(root.rglob("*"))}


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcompress", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---- the catalogue: name -> (exit code, words the message must contain, case builder) ----

CATALOGUE = {}


def case(name: str, code: int, *needles: str):
    def register(build):
        CATALOGUE[name] = (code, needles, build)
        return build
    return register


# the model

@case("model missing", 1, "nope.onnx", "no such file")
def _(w): return w.args(model=w.inp / "nope.onnx")


@case("model empty", 1, "empty.onnx", "empty")
def _(w): return w.args(model=w.write("empty.onnx", b""))


@case("model truncated inside a tensor", 1, "cut.onnx", "not a readable ONNX model")
def _(w):
    raw = w.model.read_bytes()
    return w.args(model=w.write("cut.onnx", raw[:len(raw) // 2]))


@case("model truncated before its opset imports", 1, "cut.onnx", "not a valid ONNX model", "opset_import")
def _(w):
    raw, m = w.model.read_bytes(), onnx.load(str(w.model))
    del m.opset_import[:]
    prefix = m.SerializeToString()
    assert raw.startswith(prefix) and len(prefix) < len(raw)  # a prefix that parses
    return w.args(model=w.write("cut.onnx", prefix))


@case("model is a text file", 1, "notes.onnx", "not a readable ONNX model")
def _(w): return w.args(model=w.write("notes.onnx", b"this is not a model\n" * 20))


@case("model is an .npz archive", 1, "calib.npz", "not a readable ONNX model")
def _(w): return w.args(model=w.calib)


@case("model is a directory", 1, "is a directory")
def _(w): return w.args(model=w.inp)


@case("model fails the checker: unknown operator", 1, "bad.onnx", "not a valid ONNX model", "NoSuchOp", "bad_node")
def _(w):
    def edit(m):
        m.graph.node[1].op_type, m.graph.node[1].name = "NoSuchOp", "bad_node"
    return w.args(model=w.edited_model("bad.onnx", edit))


@case("model fails the checker: input nothing produces", 1, "bad.onnx", "not a valid ONNX model", "'ghost'")
def _(w):
    def edit(m):
        m.graph.node[1].input[0] = "ghost"
    return w.args(model=w.edited_model("bad.onnx", edit))


@case("external data missing", 1, "ext.onnx", "'ext.data'", "missing")
def _(w):
    path = w.external_model("m")
    (path.parent / "ext.data").unlink()
    return w.args(model=path)


@case("external data outside the model's folder", 1, "ext.onnx", "'../ext.data'", "outside", "refused")
def _(w):
    path = w.external_model("m", "../ext.data")
    (path.parent / "ext.data").rename(w.inp / "ext.data")  # it exists, one folder up
    return w.args(model=path)


@case("external data at an absolute path", 1, "ext.onnx", "absolute", "refused")
def _(w):
    path = w.external_model("m", str(w.inp / "m" / "ext.data"))
    return w.args(model=path)


# the data

@case("calib missing an input", 1, "bad.npz", "missing input 'x'")
def _(w): return w.args(calib=w.npz("bad.npz", y=w.x))


@case("calib with an extra input", 1, "bad.npz", "'y' is not an input")
def _(w): return w.args(calib=w.npz("bad.npz", x=w.x, y=w.x))


@case("calib with the wrong dtype", 1, "bad.npz", "'x'", "int64", "float32")
def _(w): return w.args(calib=w.npz("bad.npz", x=w.x.astype(np.int64)))


@case("calib with the wrong rank", 1, "bad.npz", "'x'", "rank 3", "rank 2")
def _(w): return w.args(calib=w.npz("bad.npz", x=w.x[..., None]))


@case("calib with a wrong static dimension", 1, "bad.npz", "'x'", "15 on axis 1", "takes 16")
def _(w): return w.args(calib=w.npz("bad.npz", x=w.x[:, :15]))


@case("calib with NaN", 1, "bad.npz", "'x'", "NaN", "index (0, 3)")
def _(w):
    x = w.x.copy()
    x[0, 3] = np.nan
    return w.args(calib=w.npz("bad.npz", x=x))


@case("calib with Inf", 1, "bad.npz", "'x'", "Inf", "index (0, 5)")
def _(w):
    x = w.x.copy()
    x[0, 5] = -np.inf
    return w.args(calib=w.npz("bad.npz", x=x))


@case("calib with zero samples", 1, "bad.npz", "zero samples")
def _(w): return w.args(calib=w.npz("bad.npz", x=w.x[:0]))


@case("calib with object arrays", 1, "bad.npz", "pickled", "refused")
def _(w): return w.args(calib=w.npz("bad.npz", x=np.array([Mischief(w.out / "unpickled")] * 4, dtype=object)))


@case("calib that is a pickle", 1, "bad.npz", "pickled data", "refused")
def _(w):
    import pickle
    return w.args(calib=w.write("bad.npz", pickle.dumps({"x": Mischief(w.out / "unpickled")})))


@case("calib missing", 1, "nope.npz", "no such file")
def _(w): return w.args(calib=w.inp / "nope.npz")


@case("calib folder without feeds", 1, "feeds", "no .npz or .npy")
def _(w):
    (w.inp / "feeds").mkdir()
    return w.args(calib=w.inp / "feeds")


@case("calib folder with a bad feed", 1, "feeds feed 1", "15 on axis 1")
def _(w):
    (w.inp / "feeds").mkdir()
    np.savez(w.inp / "feeds" / "a.npz", x=w.x[:4])
    np.savez(w.inp / "feeds" / "b.npz", x=w.x[:4, :15])
    return w.args(calib=w.inp / "feeds")


@case("val with a different schema", 1, "val.npz", "missing input 'x'")
def _(w): return w.args("--val", w.npz("val.npz", image=w.x))


@case("val with a different width", 1, "val.npz", "15 on axis 1")
def _(w): return w.args("--val", w.npz("val.npz", x=w.x[:, :15]))


# the output

@case("output is the input model", 1, "is the input model")
def _(w): return w.args(output=w.model)


@case("output is the input model spelled otherwise, with --force", 1, "is the input model")
def _(w): return w.args("--force", output=w.out / ".." / "in" / "mlp.onnx")


@case("output is the calibration data, with --force", 1, "calib.npz", "a data file of --calib")
def _(w): return w.args("--force", output=w.calib)


@case("output folder missing", 1, "missing", "does not exist")
def _(w): return w.args(output=w.out / "missing" / "o.onnx")


@case("output folder not writable", 1, "out", "not writable")
def _(w):
    if IS_ROOT:
        pytest.skip("running as root: chmod does not stop writes (the /proc case covers root)")
    w.out.chmod(0o500)
    w.cleanups.append(lambda: w.out.chmod(0o700))
    return w.args()


@case("output folder where not even root can write", 1, "/proc", "not writable")
def _(w):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    return w.args(output="/proc/onnxcompress-test.onnx")


@case("output is a directory", 1, "is a directory")
def _(w): return w.args(output=w.out)


@case("output exists, no --force", 1, "o.onnx", "exists", "--force")
def _(w):
    w.output.write_bytes(b"an earlier result")
    return w.args()


@case("--report in a missing folder", 1, "--report", "does not exist")
def _(w): return w.args("--report", w.out / "missing" / "r.json")


@case("--report over the input model", 1, "--report", "input model")
def _(w): return w.args("--report", w.model)


@case("--report over the output model", 1, "--report", "output model")
def _(w): return w.args("--report", w.output)


@case("--save-plan over the calibration data", 1, "--save-plan", "a data file of --calib")
def _(w): return w.args("--save-plan", w.calib)


# options (the full list runs in-process below; these check the real process once)

@case("--keep out of range", 2, "keep", "(0, 1]", "1.5")
def _(w): return w.args("--keep", "1.5")


@case("--keep not a number", 2, "'--keep'", "abc")
def _(w): return w.args("--keep", "abc")


@case("unknown flag", 2, "--no-such-flag")
def _(w): return w.args("--no-such-flag")


# the gate

@case("gate not met", 3, "agreement gate", "0.999999")
def _(w): return w.args("--keep", "0.3", "--min-agreement", "0.999999")


@dataclass
class Outcome:
    run: subprocess.CompletedProcess | None = None
    before: dict | None = None
    after: dict | None = None
    error: BaseException | None = None  # raised while building the case (a skip, say)


def run_case(name: str, root: Path) -> Outcome:
    w = Work(root)
    try:
        args = CATALOGUE[name][2](w)
        before = snapshot(root)
        run = cli(*args)
        return Outcome(run, before, snapshot(root))
    except BaseException as e:  # pytest.skip included: re-raised by the test
        return Outcome(error=e)
    finally:
        for undo in w.cleanups:
            undo()


@pytest.fixture(scope="module")
def catalogue(request, tmp_path_factory) -> dict[str, Outcome]:
    """Run the selected catalogue cases concurrently, each in its own folder."""
    wanted = [item.callspec.params["name"] for item in request.session.items
              if getattr(item, "originalname", None) == "test_bad_input" and item.module.__name__ == __name__]
    base = tmp_path_factory.mktemp("catalogue")
    roots = {name: base / re.sub(r"\W+", "-", name).strip("-") for name in wanted}
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = pool.map(lambda name: run_case(name, roots[name]), wanted)
        return dict(zip(wanted, outcomes))


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input(catalogue, name):
    code, needles, _ = CATALOGUE[name]
    outcome = catalogue[name]
    if outcome.error is not None:
        raise outcome.error
    r = outcome.run
    assert r.returncode == code, r.stderr
    line = one_line(r.stderr)
    assert line.startswith("onnxcompress: error: ")
    for needle in needles:
        assert needle in line
    assert outcome.after == outcome.before  # inputs unchanged; nothing written, nothing left behind


# ---- every option out of range or contradicting another: exit 2, in-process ----

USAGE = [
    (["--keep", "0"], "--keep must be in (0, 1], got 0.0"),
    (["--keep", "1.5"], "--keep must be in (0, 1], got 1.5"),
    (["--keep", "nan"], "--keep must be in (0, 1], got nan"),
    (["--keep", "abc"], "'--keep': 'abc' is not a valid float"),
    (["--keep", "0.5", "--flops-target", "0.5"], "--keep and --flops-target contradict each other"),
    (["--keep", "0.5", "--tolerance", "0.1"], "--keep and --tolerance contradict"),
    (["--tolerance", "-0.1"], "--tolerance must be in [0, 1), got -0.1"),
    (["--holdout", "1"], "--holdout must be in [0, 1), got 1.0"),
    (["--holdout", "-0.2"], "--holdout must be in [0, 1), got -0.2"),
    (["--min-agreement", "2"], "--min-agreement must be in [0, 1], got 2.0"),
    (["--min-agreement", "-0.5"], "--min-agreement must be in [0, 1], got -0.5"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--batch-size", "2.5"], "'--batch-size': '2.5' is not a valid integer"),
    (["--max-rows", "-1"], "--max-rows must be non-negative, got -1"),
    (["--min-keep", "1.5"], "--min-keep must be in [0, 1], got 1.5"),
    (["--params-target", "0"], "--params-target must be in (0, 1], got 0.0"),
    (["--flops-target", "inf"], "--flops-target must be in (0, 1], got inf"),
    (["--select", "bogus"], "'--select': 'bogus' is not one of"),
    (["--exclude", "("], "--exclude is not a valid regular expression"),
    (["--no-such-flag"], "No such option '--no-such-flag'"),
    (["--plan", "{tmp}/missing.json"], "'--plan': File '{tmp}/missing.json' does not exist"),
    (["--plan", "{calib}"], "plan: {calib}: not a readable plan"),
    (["--plan", "{plan}", "--keep", "0.5"], "--plan fixes the sizes; --keep contradicts it"),
    (["--report", "{tmp}/r.json", "--save-plan", "{tmp}/r.json"], "--report and --save-plan name the same file"),
]


@pytest.fixture()
def work(tmp_path) -> Work:
    return Work(tmp_path)


def invoke(args) -> "click.testing.Result":
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("flags, message", USAGE, ids=[" ".join(f) for f, _ in USAGE])
def test_bad_options_exit_2(work, flags, message):
    Plan(method="id", select="id", entries=()).save(work.inp / "plan.json")
    names = {"tmp": work.out, "calib": work.calib, "plan": work.inp / "plan.json"}
    before = snapshot(work.root)
    r = invoke(work.args(*(f.format(**names) for f in flags)))
    assert r.exit_code == 2, r.output
    line = one_line(r.stderr)
    assert line.startswith("onnxcompress: error: ") and message.format(**names) in line
    assert snapshot(work.root) == before


def test_missing_model_argument_exits_2():
    r = invoke([])
    assert r.exit_code == 2
    assert "Missing argument 'MODEL'" in one_line(r.stderr)


def test_verbose_shows_the_traceback(tmp_path):
    r = cli(tmp_path / "nope.onnx", "-v")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("Traceback") and "ModelError" in r.stderr
    assert lines[-1] == f"onnxcompress: error: load: {tmp_path / 'nope.onnx'}: no such file"


def test_gate_with_keep_failed_writes_only_the_model(tmp_path):
    w = Work(tmp_path)
    inputs = {p: p.read_bytes() for p in (w.model, w.calib)}
    r = cli(*w.args("--keep", "0.3", "--min-agreement", "0.999999", "--keep-failed", "-q"))
    assert r.returncode == 3
    assert "(output kept: --keep-failed)" in one_line(r.stderr)
    assert sorted(p.name for p in w.out.iterdir()) == ["o.onnx"]
    onnx.checker.check_model(str(w.output), full_check=True)
    assert all(p.read_bytes() == b for p, b in inputs.items())


# ---- the Python API raises the matching class ----

def _unknown_op(w: Work) -> Path:
    def edit(m):
        m.graph.node[1].op_type = "NoSuchOp"
    return w.edited_model("bad.onnx", edit)


API_CASES = [
    ("missing model", ModelError, "no such file", lambda w: dict(model=w.inp / "nope.onnx")),
    ("unknown operator", ModelError, "NoSuchOp", lambda w: dict(model=_unknown_op(w))),
    ("data missing an input", DataError, "missing input 'x'", lambda w: dict(calib={"y": w.x})),
    ("NaN in an iterable", DataError, "NaN", lambda w: dict(calib=[{"x": np.full((2, 16), np.nan, np.float32)}])),
    ("pickled calib file", DataError, "pickled", lambda w: dict(calib=w.npz("bad.npz", x=np.array([None, 1], dtype=object)))),
    ("existing output", OutputError, "--force", lambda w: dict(output=w.write("old.onnx", b"old"))),
    ("output over the calib", OutputError, "input files", lambda w: dict(output=w.calib, config=Config(force=True))),
    ("config of the wrong type", UsageError, "Config", lambda w: dict(config={"keep": 0.5})),
    ("plan and a size rule", UsageError, "contradicts",
     lambda w: dict(plan=Plan(method="id", select="id", entries=()), config=Config(keep=0.5))),
    ("gate not met", AgreementError, "agreement gate", lambda w: dict(config=Config(keep=0.3, min_agreement=0.999999))),
]


@pytest.mark.parametrize("error, message, make", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_raises_the_matching_error(work, error, message, make):
    kwargs = dict(model=work.model, output=work.output, calib=work.calib) | make(work)
    before = snapshot(work.root)
    with pytest.raises(error, match=re.escape(message)) as info:
        compress(kwargs.pop("model"), kwargs.pop("output"), **kwargs)
    assert info.value.exit_code == {UsageError: 2, AgreementError: 3}.get(error, 1)
    assert snapshot(work.root) == before


def test_config_out_of_range_is_a_usage_error():
    for kwargs in (dict(keep=0), dict(keep="0.5"), dict(ridge=float("nan")), dict(batch_size=1.5), dict(force="no")):
        with pytest.raises(UsageError):
            Config(**kwargs)


def test_every_strict_prefix_of_a_model_is_refused(tmp_path):
    raw = Work(tmp_path).model.read_bytes()
    path = tmp_path / "cut.onnx"
    for cut in list(range(1, len(raw), max(1, len(raw) // 60))) + [len(raw) - 1]:
        path.write_bytes(raw[:cut])
        with pytest.raises(ModelError, match="cut.onnx"):
            modelio.load_model(path)
    path.write_bytes(raw)
    assert len(modelio.load_model(path).graph.node) == len(graphs.mlp().graph.node)


def test_unsorted_nodes_are_accepted(tmp_path):
    """The checker wants topological order; normalize provides it, so only that is forgiven."""
    m = graphs.mlp()
    nodes = list(m.graph.node)[::-1]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, str(tmp_path / "unsorted.onnx"))
    assert len(modelio.load_model(tmp_path / "unsorted.onnx").graph.node) == len(nodes)


# ---- atomic output ----

def _partial_save(exc):
    """A stand-in for onnx.save that writes half the bytes, then fails with `exc`."""
    def save(model, path, *args, **kwargs):
        Path(path).write_bytes(model.SerializeToString()[:100])
        raise exc
    return save


@pytest.mark.parametrize("exc, raised", [(OSError(28, "No space left on device"), OutputError),
                                         (KeyboardInterrupt(), KeyboardInterrupt)])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing(tmp_path, monkeypatch, exc, raised, existing):
    out = tmp_path / "o.onnx"
    if existing:
        out.write_bytes(b"the previous output")
    monkeypatch.setattr(modelio.onnx, "save", _partial_save(exc))
    with pytest.raises(raised, match="No space left" if raised is OutputError else None):
        modelio.save_model(graphs.mlp(), out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == (["o.onnx"] if existing else [])
    if existing:
        assert out.read_bytes() == b"the previous output"


def test_save_refuses_a_model_that_fails_the_checker(tmp_path):
    m = graphs.mlp()
    m.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(RewriteError, match="nothing was written"):
        modelio.save_model(m, tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def external_saves(monkeypatch):
    """Make every model 'large': save_model writes external data (`<name>.data`)."""
    monkeypatch.setattr(modelio, "PROTOBUF_LIMIT", modelio._EXTERNAL_MARGIN + 1)


def test_external_data_output_round_trips(tmp_path, external_saves):
    written = modelio.save_model(graphs.mlp(), tmp_path / "o.onnx")
    assert written == [tmp_path / "o.onnx", tmp_path / "o.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "o.onnx.data"]
    back = modelio.load_model(tmp_path / "o.onnx")
    want = {t.name: onnx.numpy_helper.to_array(t) for t in graphs.mlp().graph.initializer}
    assert any(weights.is_external(t) for t in back.graph.initializer)  # read lazily, through maps
    got = {t.name: np.asarray(weights.array(t)) for t in back.graph.initializer}
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


def test_external_data_is_removed_if_the_model_move_is_interrupted(tmp_path, external_saves, monkeypatch):
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the data file is in place; the model is next
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        modelio.save_model(graphs.mlp(), tmp_path / "o.onnx")
    assert calls == ["o.onnx.data", "o.onnx"]
    assert list(tmp_path.iterdir()) == []


def test_existing_external_data_needs_force(tmp_path, external_saves):
    (tmp_path / "o.onnx.data").write_bytes(b"someone's data")
    with pytest.raises(OutputError, match="o.onnx.data exists"):
        modelio.save_model(graphs.mlp(), tmp_path / "o.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["o.onnx.data"]


# ---- interrupts: exit 130, nothing written ----

@pytest.mark.parametrize("where", ["calibrate", "save"])
def test_interrupt_exits_130_and_writes_nothing(work, monkeypatch, where):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "calibrate":
        monkeypatch.setattr("onnxcompress.api.calibrate", interrupt)
    else:  # half a file written, then Ctrl-C
        monkeypatch.setattr(modelio.onnx, "save", _partial_save(KeyboardInterrupt()))
    before = snapshot(work.root)
    r = invoke(work.args("--report", work.out / "r.json"))
    assert r.exit_code == 130
    assert one_line(r.stderr) == "onnxcompress: interrupted; no output was written"
    assert snapshot(work.root) == before


# SIGINT, SIGTERM and SIGHUP sent to a real process: tests/test_hostile.py
