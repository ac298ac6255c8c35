"""Hostile inputs and faults: what an unlucky or malicious user can hand the tool.

Families: inputs that an output would overwrite (external data, data folders, the plan); files
written everything-or-nothing; SIGTERM / SIGHUP and stale temporary folders; special files and
links; NaN and Inf; reads whose memory a header decides; malformed files that must be a file or
usage error, never "internal error"; and smaller points (binary output whatever the suffix,
terminal escapes, kept permissions, Config types, endless generators).

Every command-line case checks the exit code, a one-line message naming what is at fault, and
that the case's folder is exactly as before (inputs keep their bytes, no output, no temporary
files). Cases that could allocate without bound run in a subprocess whose address space is
limited to 2 GiB, so a regression fails the test instead of the machine.
"""
from __future__ import annotations

import base64
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphs
from onnxcompress import Config, DataError, ModelError, OutputError, Plan, UsageError, compress
from onnxcompress.cli import printable
from onnxcompress.core import data as data_mod
from onnxcompress.core import files, modelio, stats
from onnxcompress.core.report import Report
from onnxcompress.core.validate import _Tally
from test_errors import Work, invoke, one_line, snapshot

HAS_FIFO = hasattr(os, "mkfifo")
GIB = 2**30


@pytest.fixture()
def work(tmp_path) -> Work:
    return Work(tmp_path)


def refused(r, code: int, *needles: str, before=None, root=None) -> str:
    """The run exited `code` with one line holding every needle, and (given a snapshot) left the
    folder as it was."""
    out = getattr(r, "exit_code", None)
    out = r.returncode if out is None else out
    assert out == code, (r.stderr, getattr(r, "output", ""))
    line = one_line(r.stderr)
    assert line.startswith("onnxcompress: error: ") and "internal error" not in line
    for needle in needles:
        assert needle in line, line
    if before is not None:
        assert snapshot(root) == before
    return line


def external_model(folder: Path, name: str = "m.onnx") -> Path:
    """graphs.mlp() saved with every weight in `<name>.data`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(graphs.mlp(), str(path), save_as_external_data=True, location=name + ".data", size_threshold=0)
    return path


def limited(args, env=None, timeout=240) -> subprocess.CompletedProcess:
    """The command line in a subprocess whose address space is capped at 2 GiB."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (2 * GIB, 2 * GIB))
    return subprocess.run([sys.executable, "-m", "onnxcompress", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap, env=env)


# ---- 1. inputs are never overwritten ----

def test_report_over_the_external_data_is_refused(work):
    m = external_model(work.inp / "ext")
    before = snapshot(work.root)
    r = invoke([m, work.output, "--calib", work.calib, "--report", str(m) + ".data"])
    refused(r, 1, "--report", "m.onnx.data", "external-data file of the input model", before=before, root=work.root)
    assert modelio.load_model(m)  # still loads


def test_output_over_the_external_data_is_refused_even_with_force(work):
    m = external_model(work.inp / "ext")
    before = snapshot(work.root)
    r = invoke([m, str(m) + ".data", "--calib", work.calib, "--force"])
    refused(r, 1, "external-data file of the input model", before=before, root=work.root)


def test_output_over_a_hard_link_of_the_external_data_is_refused(work):
    m = external_model(work.inp / "ext")
    os.link(str(m) + ".data", work.inp / "ext" / "alias.onnx")
    before = snapshot(work.root)
    r = invoke([m, work.inp / "ext" / "alias.onnx", "--calib", work.calib, "--force"])
    refused(r, 1, "external-data file of the input model", before=before, root=work.root)


def test_report_over_a_file_of_the_calibration_folder_is_refused(work):
    cd = work.inp / "cd"
    cd.mkdir()
    for k in range(3):
        np.save(cd / f"f{k}.npy", work.x[4 * k:4 * k + 4])
    before = snapshot(work.root)
    r = invoke([work.model, work.output, "--calib", cd, "--report", cd / "f0.npy"])
    refused(r, 1, "--report", "f0.npy", "a data file of --calib", before=before, root=work.root)


@pytest.mark.parametrize("flag", ["--report", "--save-plan"])
def test_side_outputs_over_any_file_of_a_validation_folder_are_refused(work, flag):
    vd = work.inp / "vd"
    vd.mkdir()
    np.save(vd / "v0.npy", work.x[:4])
    (vd / "notes.txt").write_text("not data, but in the folder the run reads")
    before = snapshot(work.root)
    r = invoke([*work.args(), "--val", vd, flag, vd / "notes.txt"])
    refused(r, 1, flag, "a data file of --val", before=before, root=work.root)


def test_output_over_the_plan_is_refused(work):
    plan = work.out / "plan.onnx"
    Plan(method="id", select="id", entries=()).save(plan)
    before = snapshot(work.root)
    r = invoke([work.model, plan, "--calib", work.calib, "--plan", plan, "--force"])
    refused(r, 1, "the --plan file", before=before, root=work.root)


def test_report_over_the_plan_is_refused(work):
    plan = work.inp / "plan.json"
    Plan(method="id", select="id", entries=()).save(plan)
    before = snapshot(work.root)
    r = invoke([*work.args(), "--plan", plan, "--report", plan])
    refused(r, 1, "--report", "the --plan file", before=before, root=work.root)


def test_output_that_is_a_hard_link_to_the_model_is_refused(work):
    os.link(work.model, work.out / "alias.onnx")
    before = snapshot(work.root)
    r = invoke(work.args("--force", output=work.out / "alias.onnx"))
    refused(r, 1, "the input model", before=before, root=work.root)


# ---- 2. everything or nothing ----

def _failing(exc):
    def save(self, path):
        Path(path).write_bytes(b'{"trunc')
        raise exc
    return save


@pytest.mark.parametrize("existing", [False, True])
def test_report_that_cannot_be_written_rolls_the_model_back(work, monkeypatch, existing):
    if existing:
        work.output.write_bytes(b"an earlier model")
        (work.out / "r.json").write_text('{"earlier": true}')
    monkeypatch.setattr(Report, "save", _failing(OSError(28, "No space left on device")))
    before = snapshot(work.root)
    r = invoke(work.args("--report", work.out / "r.json", "--force"))
    refused(r, 1, "report", "r.json", "No space left on device", before=before, root=work.root)


def test_plan_that_cannot_be_written_rolls_back_model_and_report(work, monkeypatch):
    monkeypatch.setattr(Plan, "save", _failing(OSError(13, "Permission denied")))
    before = snapshot(work.root)
    r = invoke(work.args("--report", work.out / "r.json", "--save-plan", work.out / "p.json"))
    refused(r, 1, "plan", "p.json", "Permission denied", before=before, root=work.root)


def test_a_rename_failing_midway_restores_every_file(work, monkeypatch):
    work.output.write_bytes(b"an earlier model")
    (work.out / "p.json").write_text("an earlier plan")
    real, moves = os.replace, []

    def replace(src, dst):
        if Path(dst).name == "r.json":  # the model and the plan are in place; the report is last
            moves.append(dst)
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    before = snapshot(work.root)
    r = invoke(work.args("--report", work.out / "r.json", "--save-plan", work.out / "p.json", "--force"))
    refused(r, 1, "Input/output error", "nothing was written", before=before, root=work.root)
    assert moves


def test_report_and_plan_saves_are_atomic(tmp_path, monkeypatch):
    for name, obj in (("r.json", Report(input="a", output=None, config={})),
                      ("p.json", Plan(method="id", select="id", entries=()))):
        path = tmp_path / name
        path.write_text("the earlier file")
        monkeypatch.setattr(files.Path, "write_text", lambda self, text: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(OSError):
            obj.save(path)
        monkeypatch.undo()
        assert path.read_text() == "the earlier file"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "r.json"} if name == "p.json" else {name})
        obj.save(path)
        assert json.loads(path.read_text())


def test_success_writes_model_report_and_plan_and_nothing_else(work):
    r = invoke(work.args("--report", work.out / "r.json", "--save-plan", work.out / "p.json"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in work.out.iterdir()) == ["o.onnx", "p.json", "r.json"]
    assert json.loads((work.out / "r.json").read_text())["output"] == str(work.output)
    assert Plan.load(work.out / "p.json").groups


# ---- 3. SIGTERM, SIGHUP, stale temporary folders ----

HOLD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    ready, where = Path(sys.argv[1]), sys.argv[2]
    import onnxcompress.core.modelio as modelio
    import onnxcompress.core.validate as validate

    def wait(*args, **kwargs):
        ready.write_text(str(os.getpid()))
        while True:
            time.sleep(0.05)

    if where == "save":  # half the model staged, then stuck
        def save(model, path, *args, **kwargs):
            Path(path).write_bytes(model.SerializeToString()[:100])
            wait()
        modelio.onnx.save = save
    else:  # inside validation, with its temporary folder of reference outputs
        real = validate.np.savez
        def savez(path, *arrays):
            real(path, *arrays)
            wait()
        validate.np.savez = savez
    from onnxcompress.cli import main
    main(sys.argv[3:], prog_name="onnxcompress")
""")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
@pytest.mark.parametrize("where", ["save", "validate"])
def test_sigterm_and_sighup_exit_and_leave_nothing(work, tmp_path_factory, sig, code, where):
    """The tool is held at a known point (half a model staged, or reference outputs spooled) and
    signalled there: it exits 128 + signal, and neither the output folder nor the temporary
    folder keeps anything."""
    side = tmp_path_factory.mktemp("side")
    tmp = side / "tmp"
    tmp.mkdir()
    ready = side / "ready"
    script = side / "hold.py"
    script.write_text(HOLD)
    work.output.write_bytes(b"an earlier model")
    before = snapshot(work.root)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, script, ready, where,
                             *map(str, work.args("--force", "--report", work.out / "r.json"))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ignored here
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the tool never reached the holding point"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, stderr
    what = "interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}"
    assert one_line(stderr) == f"onnxcompress: {what}; no output was written"
    assert snapshot(work.root) == before
    ours = [p.name for p in tmp.iterdir() if p.name.startswith(("onnxcompress", "tmp"))]
    assert ours == []  # (a library keeps a session id file of its own there)


def test_stale_temporary_folders_are_removed_at_the_next_run(work, tmp_path_factory, monkeypatch):
    tmp = tmp_path_factory.mktemp("tmp")
    monkeypatch.setattr(files.tempfile, "gettempdir", lambda: str(tmp))
    old = time.time() - 2 * files.STALE_SECONDS
    stale = [work.out / ".onnxcompress-dead", work.out / ".onnxcompress-dead-file", tmp / "onnxcompress-validate-dead"]
    for p in stale:
        if p.name.endswith("file"):
            p.write_bytes(b"partial")
        else:
            p.mkdir()
            (p / "o.onnx").write_bytes(b"partial")
        os.utime(p, (old, old))
    fresh = work.out / ".onnxcompress-running"  # another run's, still young: kept
    fresh.mkdir()
    theirs = work.out / "onnxcompress-notes"  # not our naming: kept
    theirs.mkdir()
    os.utime(theirs, (old, old))
    r = invoke(work.args())
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in stale)
    assert fresh.is_dir() and theirs.is_dir()


# ---- 4. special files and links ----

@pytest.mark.skipif(not HAS_FIFO, reason="needs a named pipe")
def test_force_does_not_replace_a_fifo_output(work):
    os.mkfifo(work.output)
    before = snapshot(work.root)
    r = invoke(work.args("--force"))
    refused(r, 1, "named pipe", "not a regular file", before=before, root=work.root)
    assert stat.S_ISFIFO(os.lstat(work.output).st_mode)


def test_a_device_is_never_an_output():
    with pytest.raises(OutputError, match="character device, not a regular file"):
        files.check_output(Path("/dev/null"), inputs=files.Inputs(), replace=True)


def test_dangling_symlink_report_is_refused_and_its_target_not_created(work):
    target = work.root / "elsewhere" / "planted.json"
    target.parent.mkdir()
    (work.out / "r.json").symlink_to(target)
    before = snapshot(work.root)
    r = invoke(work.args("--report", work.out / "r.json"))
    refused(r, 1, "--report", "symbolic link", before=before, root=work.root)
    assert not target.exists()


def test_symlinked_output_is_refused_even_with_force(work):
    victim = work.root / "victim.txt"
    victim.write_text("someone's file")
    work.output.symlink_to(victim)
    before = snapshot(work.root)
    r = invoke(work.args("--force"))
    refused(r, 1, "symbolic link", before=before, root=work.root)


@pytest.mark.skipif(not HAS_FIFO, reason="needs a named pipe")
@pytest.mark.parametrize("what", ["calib", "calib folder entry", "val", "plan", "model", "external data"])
def test_fifos_are_refused_without_waiting(work, what):
    fifo = work.inp / ("pipe.json" if what == "plan" else "pipe.onnx" if what == "model" else "pipe.npz")
    args = work.args()
    if what == "calib":
        os.mkfifo(fifo)
        args = work.args(calib=fifo)
    elif what == "calib folder entry":
        cd = work.inp / "cd"
        cd.mkdir()
        np.save(cd / "a.npy", work.x[:8])
        os.mkfifo(cd / "b.npy")
        args = work.args(calib=cd)
    elif what == "val":
        os.mkfifo(fifo)
        args = work.args("--val", fifo)
    elif what == "plan":
        os.mkfifo(fifo)
        args = work.args("--plan", fifo)
    elif what == "model":
        os.mkfifo(fifo)
        args = work.args(model=fifo)
    else:
        m = external_model(work.inp / "ext")
        Path(str(m) + ".data").unlink()
        os.mkfifo(str(m) + ".data")
        args = work.args(model=m)
    before = snapshot(work.root)
    r = subprocess.run([sys.executable, "-m", "onnxcompress", *map(str, args)], capture_output=True,
                       text=True, timeout=120)
    code = 2 if what == "plan" else 1
    refused(r, code, "named pipe", before=before, root=work.root)


def test_calibration_through_a_link_to_a_device_is_refused(work):
    (work.inp / "zero.npz").symlink_to("/dev/zero")
    r = invoke(work.args(calib=work.inp / "zero.npz"))
    refused(r, 1, "zero.npz", "character device")


# ---- 5. NaN and Inf ----

def _poisoned(w: Work, value: float) -> Path:
    def edit(m):
        t = m.graph.initializer[0]
        a = numpy_helper.to_array(t).copy()
        a.flat[3] = value
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    return w.edited_model("poisoned.onnx", edit)


@pytest.mark.parametrize("value, what", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_nonfinite_weight_is_a_clear_error(work, value, what):
    m = _poisoned(work, value)
    before = snapshot(work.root)
    r = invoke(work.args("--min-agreement", "0.99", model=m))
    refused(r, 1, "poisoned.onnx", f"holds {what}", "--allow-nonfinite", before=before, root=work.root)


def _with_inf_operand(w: Work, op: str) -> Path:
    """The MLP with `op`(h, c) after its first hidden Relu, c a scalar -inf initializer (a JAX
    export writes Max(-inf, x) for the start of a max)."""
    def edit(m):
        relu = next(n for n in m.graph.node if n.op_type == "Relu")
        m.graph.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype=np.float32), "neg_inf"))
        old = relu.output[0]
        relu.output[0] = old + "_pre"
        i = list(m.graph.node).index(relu)
        m.graph.node.insert(i + 1, onnx.helper.make_node(op, [old + "_pre", "neg_inf"], [old], name="bound"))
    return w.edited_model(f"inf_{op.lower()}.onnx", edit)


def test_an_infinite_bound_is_not_a_weight(work):
    m = _with_inf_operand(work, "Max")
    report = compress(m, work.output, calib={"x": work.x}, config=Config(keep=0.5))
    plain = compress(work.model, work.out / "plain.onnx", calib={"x": work.x}, config=Config(keep=0.5))
    # Max(-inf, h) = h: the same groups, kept channels and agreement as without it
    assert report.groups and [g["kept"] for g in report.groups] == [g["kept"] for g in plain.groups]
    assert all(g["kept"] < g["channels"] for g in report.groups) and not report.warnings
    assert report.agreement[0]["rel_l2"] == pytest.approx(plain.agreement[0]["rel_l2"], rel=1e-6)
    out = onnx.load(str(work.output))
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in out.graph.node].count("Max") == 1
    # the same -inf scaling a layer's activations, or added to them as a bias, is refused: a weight
    for op in ("Mul", "Add"):
        m = _with_inf_operand(work, op)
        before = snapshot(work.root)
        r = invoke(work.args("--force", model=m))
        refused(r, 1, f"inf_{op.lower()}.onnx", "'neg_inf' holds Inf", "--allow-nonfinite", before=before, root=work.root)


def test_nan_weight_allowed_counts_as_disagreement_and_the_report_is_strict_json(work):
    m = _poisoned(work, np.nan)
    report = work.out / "r.json"
    r = subprocess.run([sys.executable, "-m", "onnxcompress", *map(str, work.args(
        "--allow-nonfinite", "--min-agreement", "0.99", "--report", report, model=m))],
        capture_output=True, text=True, timeout=240)
    assert r.returncode == 3, r.stderr
    assert "RuntimeWarning" not in r.stderr and "invalid value" not in r.stderr

    def no_constants(name):
        raise AssertionError(f"bare {name} in the report")
    doc = json.loads(report.read_text(), parse_constant=no_constants)
    (agreement,) = doc["agreement"]
    assert agreement["top1"] < 0.99 and agreement["max_abs"] is None
    assert not doc["gate"]["passed"]
    assert any("NaN" in w for w in doc["warnings"])
    assert not work.output.exists()


def test_nan_data_allowed_from_python_stays_out_of_the_statistics(work):
    x = work.x.copy()
    x[3, 5] = np.nan
    report = compress(work.model, work.output, calib={"x": x}, config=Config(allow_nonfinite=True, keep=0.5))
    assert report.groups and all(np.isfinite(g["error"]) for g in report.groups)
    json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    with pytest.raises(DataError, match="NaN"):
        compress(work.model, work.out / "o2.onnx", calib={"x": x}, config=Config(keep=0.5))


def test_agreement_counts_nan_and_unmatched_inf_as_disagreement():
    ref = np.array([[1.0, 2.0, 0.5], [3.0, 1.0, 0.0], [np.inf, 1.0, 0.0], [1.0, 0.0, 2.0]])
    new = np.array([[1.0, 2.0, 0.5], [np.nan, 1.0, 0.0], [np.inf, 1.0, 0.0], [np.inf, 0.0, 2.0]])
    t = _Tally()
    with np.errstate(all="raise"):  # no warning may escape
        t.add(ref, new, scores=True)
    a = t.result("y", integer=False)
    assert a.top1 == 2 / 4  # rows 0 and 2 (the same Inf on both sides) agree
    assert a.max_abs == float("inf") and a.rel_l2 == float("inf")
    assert a.cosine == pytest.approx((1.0 + 0.0 + 1.0 + 0.0) / 4)


def test_report_json_is_strict():
    r = Report(input="a", output=None, config={"x": np.float32(1.5)},
               agreement=[{"max_abs": float("nan"), "rel_l2": float("inf"), "n": np.int64(3)}])
    doc = json.loads(r.to_json(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert doc["agreement"] == [{"max_abs": None, "rel_l2": None, "n": 3}] and doc["config"] == {"x": 1.5}


# ---- 6. hangs and memory ----

def _deflated_npz(path: Path, name: str, shape, dtype="<f4", chunk=16 * 2**20):
    """An .npz whose one member holds zeros of `shape`, written in pieces (a zip bomb when large)."""
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(chunk)
            left = nbytes
            while left:
                f.write(zeros[:min(left, chunk)])
                left -= min(left, chunk)
    return path


def _lying_npy(path: Path, shape, dtype="<f4") -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
        f.write(bytes(64))
    return path


@pytest.fixture()
def big(tmp_path) -> Work:
    return Work(tmp_path)


def test_zip_bomb_is_refused_unread_within_2_gib(big):
    bomb = _deflated_npz(big.inp / "bomb.npz", "x", (10_000_000, 16))  # 640 MB of zeros, under 1 MB on disk
    assert bomb.stat().st_size < 100 * 2**20
    before = snapshot(big.root)
    r = limited(big.args(calib=bomb))
    refused(r, 1, "bomb.npz", "expand to", "limit for compressed data", before=before, root=big.root)


def test_npz_member_whose_header_lies_is_refused(big):
    path = big.inp / "lie.npz"
    with zipfile.ZipFile(path, "w") as z:
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                     "shape": (10**9, 16)})
            f.write(bytes(640))
    r = limited(big.args(calib=path))
    refused(r, 1, "lie.npz", "'x.npy'", "header declares")


@pytest.mark.parametrize("shape", [(10**7, 10**7, 16), (2**40, 16), (40_000_000, 16)])
def test_npy_whose_header_lies_about_its_shape_is_refused(big, shape):
    path = _lying_npy(big.inp / "lie.npy", shape)
    before = snapshot(big.root)
    r = limited(big.args(calib=path))
    refused(r, 1, "lie.npy", "header declares", "only 64 bytes follow", before=before, root=big.root)


def test_huge_declared_dims_without_calibration_are_refused(big):
    def edit(m):
        dims = m.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_value = 100_000_000
    m = big.edited_model("huge.onnx", edit)
    before = snapshot(big.root)
    r = limited([m, big.output, "-q"])
    refused(r, 1, "'x'", "synthesized", "pass --calib", before=before, root=big.root)


@pytest.mark.parametrize("method", ["id", "aasvd"])
def test_very_wide_layer_is_left_alone_within_2_gib(big, method):
    """A 16 -> 30000 -> 4 MLP: a Gram over 30000 channels would take 6.7 GiB."""
    onnx.save(graphs.parallel_mlps(1, 30000), str(big.inp / "wide.onnx"))
    report = big.out / "r.json"
    r = limited([big.inp / "wide.onnx", big.output, "--calib", big.calib, "--method", method, "--report", report])
    assert r.returncode == 0, r.stderr
    doc = json.loads(report.read_text())
    reasons = [s["reason"] for s in doc["skipped"]]
    assert any("30000 columns" in x and "GiB, over the" in x for x in reasons), reasons


@pytest.mark.parametrize("method, rule", [("id", "flops_target"), ("aasvd", "keep")])
def test_many_layers_stay_within_the_statistics_budget(work, monkeypatch, method, rule):
    """The budget over all statistics (patched small here: 12 groups of 64 channels, 32 KiB of
    Gram each, against 100 KiB): where the size rule needs every curve at once (and for low
    rank), the first layers are compressed, the rest left alone, saying why. Low rank also counts
    the 2 KiB statistic of each 16-wide input, so two 64-wide ones fit."""
    monkeypatch.setattr(stats, "STATS_BUDGET", 100 * 2**10)
    onnx.save(graphs.parallel_mlps(12, 64), str(work.inp / "many.onnx"))
    report = compress(work.inp / "many.onnx", work.output, calib={"x": work.x},
                      config=Config(method=method, **{rule: 0.5}, sensitivity=False))
    over = [s for s in report.skipped if "budget for all statistics" in s["reason"]]
    done = report.groups if method == "id" else [x for x in report.layers if x["shape"][1] == 64]
    fit = 3 if method == "id" else 2
    assert len(done) == fit and len(over) == 12 - fit


def test_many_groups_are_calibrated_a_block_at_a_time_within_the_budget(work, monkeypatch):
    """With a per-group rule (keep), ID takes the groups a budget's worth at a time: 3 groups
    (96 KiB of Grams) per calibration pass, 4 passes, every group compressed."""
    monkeypatch.setattr(stats, "STATS_BUDGET", 100 * 2**10)
    onnx.save(graphs.parallel_mlps(12, 64), str(work.inp / "many.onnx"))
    report = compress(work.inp / "many.onnx", work.output, calib={"x": work.x}, config=Config(keep=0.5))
    assert report.data["calibration_passes"] == 4
    assert len(report.groups) == 12 and not [s for s in report.skipped if "budget" in s["reason"]]


@pytest.mark.parametrize("bits, what", [(0x1, "encrypted"), (None, "compression method 12")])
def test_npz_member_encrypted_or_of_an_unknown_method_is_a_data_error(big, bits, what):
    path = big.inp / "odd.npz"
    np.savez(path, x=big.x)
    raw = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.find(sig)
        if bits is not None:
            raw[at + flag_at] |= bits
        else:
            raw[at + method_at:at + method_at + 2] = struct.pack("<H", 12)
    path.write_bytes(bytes(raw))
    r = invoke(big.args(calib=path))
    refused(r, 1, "odd.npz", "'x.npy'", what)


def test_npz_member_that_is_not_an_array_is_refused(big):
    path = big.inp / "odd.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"")
        z.writestr("notes.txt", b"x" * 100)
    r = invoke(big.args(calib=path))
    refused(r, 1, "odd.npz")


def test_endless_calibration_generator_is_capped_and_says_so(work, monkeypatch, caplog):
    monkeypatch.setattr(data_mod, "MAX_STREAM_FEEDS", 20)

    def endless():
        k = 0
        while True:
            yield {"x": work.x[k % 40:k % 40 + 1]}
            k += 1

    report = compress(work.model, work.output, calib=endless(), config=Config(keep=0.5))
    assert report.data["calibration_feeds"] is None or report.data["calibration_feeds"] <= 20
    assert any("took the first 20 feeds" in r.getMessage() for r in caplog.records)


# ---- 7. malformed files: a file or usage error, never "internal error" ----

def _external_edit(w: Work, **fields) -> Path:
    m = external_model(w.inp / "ext")
    proto = onnx.load(str(m), load_external_data=False)
    t = proto.graph.initializer[0]
    for key, value in fields.items():
        entries = {e.key: e for e in t.external_data}
        if key in entries:
            entries[key].value = value
        else:
            t.external_data.add(key=key, value=value)
    m.write_bytes(proto.SerializeToString())
    return m


EXTERNAL = [
    ({"offset": "abc"}, "offset 'abc' is not a whole number"),
    ({"offset": "-8"}, "offset '-8' is not a whole number"),
    ({"offset": "99999999"}, "pass the end"),
    ({"length": "12"}, "need"),
    ({"length": "1e9"}, "length '1e9' is not a whole number"),
    ({"location": "a\0b"}, "NUL"),
    ({"location": "x" * 5000}, "external data"),
    ({"location": "loop"}, "external data"),
    ({"location": "sub"}, "a directory"),
    ({"location": ""}, "empty"),
    ({"location": "../../../etc/passwd"}, "outside the model's folder"),
]


@pytest.mark.parametrize("fields, needle", EXTERNAL, ids=[repr(f)[:40] for f, _ in EXTERNAL])
def test_malformed_external_data_is_a_model_error(work, fields, needle):
    m = _external_edit(work, **fields)
    (m.parent / "loop").symlink_to("loop")
    (m.parent / "sub").mkdir()
    before = snapshot(work.root)
    r = invoke(work.args(model=m))
    refused(r, 1, "m.onnx", needle, before=before, root=work.root)


def test_external_dims_larger_than_the_data_are_refused(work):
    m = external_model(work.inp / "ext")
    proto = onnx.load(str(m), load_external_data=False)
    proto.graph.initializer[0].dims[0] = 10**12
    m.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelError, match="need .* bytes, the data holds"):
        modelio.load_model(m)


def _plan(w: Work) -> dict:
    r = invoke(w.args("--save-plan", w.out / "p.json", "--keep", "0.5"))
    assert r.exit_code == 0, r.output
    (w.out / "p.json").rename(w.inp / "p.json")
    (w.out / "o.onnx").unlink()
    return json.loads((w.inp / "p.json").read_text())


def _g(d, **kw):
    d["entries"][0].update(kw)
    return d


def _matrix(d, **kw):
    name = next(iter(d["entries"][0]["interpolation"]))
    d["entries"][0]["interpolation"][name].update(kw)
    return d


PLANS = {
    "negative index": lambda d: _g(d, keep=[-1] + d["entries"][0]["keep"][1:]),
    "index past the channels": lambda d: _g(d, keep=d["entries"][0]["keep"][:-1] + [10**6]),
    "unsorted indices": lambda d: _g(d, keep=d["entries"][0]["keep"][::-1]),
    "repeated index": lambda d: _g(d, keep=[d["entries"][0]["keep"][0]] * len(d["entries"][0]["keep"])),
    "empty keep": lambda d: _g(d, keep=[]),
    "float index": lambda d: _g(d, keep=[0.5] + d["entries"][0]["keep"][1:]),
    "channels as text": lambda d: _g(d, channels="32"),
    "channels as bool": lambda d: _g(d, channels=True),
    "entry not an object": lambda d: {**d, "entries": [5]},
    "entries not a list": lambda d: {**d, "entries": "all"},
    "entry of an unknown method": lambda d: _g(d, method="bogus"),
    "unknown version": lambda d: {**d, "version": 99},
    "matrix shape negative": lambda d: _matrix(d, shape=[-1, 3]),
    "matrix shape huge": lambda d: _matrix(d, shape=[10**9, 10**9]),
    "matrix shape wrong": lambda d: _matrix(d, shape=[1, 1]),
    "matrix not base64": lambda d: _matrix(d, float64="%%%%" * 4),
    "matrix NaN": lambda d: _matrix(d, float64=base64.b64encode(
        np.full(len(d["entries"][0]["keep"]) * d["entries"][0]["channels"], np.nan).tobytes()).decode()),
    "error as text": lambda d: _g(d, error="small"),
    "unknown method": lambda d: {**d, "method": "bogus"},
    "unknown selection": lambda d: {**d, "select": "bogus"},
    "group twice": lambda d: {**d, "entries": d["entries"] * 2},
    "intercept of the wrong length": lambda d: _g(d, intercept={
        k: {"shape": [3], "float64": base64.b64encode(np.zeros(3).tobytes()).decode()}
        for k in d["entries"][0]["interpolation"]}),
    "exit not in the model": lambda d: _g(d, interpolation={"nosuch": next(iter(d["entries"][0]["interpolation"].values()))}),
    "no interpolation": lambda d: _g(d, interpolation={}),
    "no method": lambda d: {k: v for k, v in d.items() if k != "method"},
    "a list": lambda d: [d],
    "a number": lambda d: 3,
    "deep nesting": lambda d: "[" * 100_000 + "]" * 100_000,
    "not UTF-8": lambda d: b"\xff\xfe{",
}


@pytest.mark.parametrize("name", list(PLANS))
def test_malformed_plan_is_a_usage_error(work, name):
    d = _plan(work)
    value = PLANS[name](d)
    path = work.inp / "bad.json"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(value if isinstance(value, str) else json.dumps(value))
    before = snapshot(work.root)
    r = invoke(work.args("--plan", path))
    fits_no_model = name in ("exit not in the model", "no interpolation")  # found when applied
    refused(r, 2, "plan", "does not match this model" if fits_no_model else "bad.json", before=before, root=work.root)


def test_negative_indices_are_refused_from_python(work):
    d = _plan(work)
    d["entries"][0]["keep"][0] = -1
    with pytest.raises(UsageError, match=r"entries\[0\]: kept channels must lie in"):
        Plan.from_dict(d)


def test_a_valid_plan_still_round_trips(work):
    d = _plan(work)
    plan = Plan.load(work.inp / "p.json")
    assert Plan.from_dict(plan.to_dict()) == plan and plan.to_dict()["entries"][0]["keep"] == d["entries"][0]["keep"]


# ---- 8. smaller points ----

@pytest.mark.parametrize("suffix", [".json", ".textproto", ".txt"])
def test_output_is_binary_protobuf_whatever_its_suffix(work, suffix):
    out = work.out / ("o" + suffix)
    r = invoke(work.args(output=out))
    assert r.exit_code == 0, r.output
    m = onnx.ModelProto()
    m.ParseFromString(out.read_bytes())
    assert len(m.graph.node) == len(graphs.mlp().graph.node) and not out.read_bytes().startswith(b"{")


def test_terminal_escapes_in_node_names_are_shown_escaped(work):
    def edit(m):
        for n in m.graph.node:
            n.name = "\x1b]0;owned\x07\x1b[2J" + n.name + "\u202e"
        m.graph.node[0].op_type = "NoSuchOp"
    bad = work.edited_model("esc.onnx", edit)
    r = invoke(work.args(model=bad))
    assert r.exit_code == 1
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "\u202e" not in r.stderr
    assert "\\x1b" in r.stderr or "NoSuchOp" in r.stderr

    def rename(m):
        for n in m.graph.node:
            n.name = "\x1b[31m" + n.name
    ok = work.edited_model("esc2.onnx", rename)
    r = invoke(work.args("--method", "svd", model=ok))
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\\x1b[31m" in r.output


def test_printable_keeps_text_and_escapes_controls():
    assert printable("layer ä/β\tok\n") == "layer ä/β\tok\n"
    assert printable("a\x1b[2Jb\x9bc\u202ed") == "a\\x1b[2Jb\\x9bc\\u202ed"


def test_force_keeps_the_existing_output_mode(work):
    work.output.write_bytes(b"an earlier result")
    work.output.chmod(0o600)
    (work.out / "r.json").write_text("{}")
    (work.out / "r.json").chmod(0o640)
    r = invoke(work.args("--force", "--report", work.out / "r.json"))
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(work.output.stat().st_mode) == 0o600
    assert stat.S_IMODE((work.out / "r.json").stat().st_mode) == 0o640
    assert onnx.load(str(work.output)).graph.node


def test_new_files_follow_the_umask(work):
    old = os.umask(0o027)
    try:
        r = invoke(work.args("--report", work.out / "r.json"))
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((work.out / "r.json").stat().st_mode) == 0o640
    assert stat.S_IMODE(work.output.stat().st_mode) == 0o640


@pytest.mark.parametrize("kw, message", [
    ({"p": "2"}, "p must be a number, got '2'"),
    ({"include": 5}, "include must be a string, got 5"),
    ({"smoothing": "x"}, "smoothing must be a number, got 'x'"),
    ({"lp_weighted": "no"}, "--lp-weighted must be True or False, got 'no'"),
    ({"allow_nonfinite": 1}, "must be True or False, got 1"),
    ({"max_patch": 2.5}, "--max-patch must be an integer, got 2.5"),
])
def test_config_types_are_usage_errors(kw, message):
    with pytest.raises(UsageError) as e:
        Config(**kw)
    assert message in str(e.value)
