"""`onnxcompress sweep MODEL --calib ... --out DIR`: agreement against size, FLOPs and latency.

For each `Point` (a method at one size: by default `id` and `aasvd` at several `keep` values),
`compress()` runs and validates, then the compressed model's file size, FLOPs and latency are
measured. Two references are measured the same way: the original model, and ONNX Runtime's
`quantize_dynamic` (int8 weights, per channel). The results go to DIR/sweep.csv and
DIR/sweep.json, and, when matplotlib is installed (`pip install 'onnxcompress[plot]'`), to
DIR/sweep.png. matplotlib is imported only here, only to draw.

Agreement is the figure `--min-agreement` reads: per output, top-1 agreement for outputs that
look like class scores, else the mean cosine over samples; a point reports its worst output.
Latency is measured, never inferred from FLOPs: ONNX Runtime on CPU, one thread, the original
and the candidate called alternately on the first validation feed, `repeats` rounds after
warm-up; the ratio to the original is the median of the per-round ratios, and the milliseconds
are the candidate's median.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from .core import data as data_mod
from .core.config import Config
from .core.errors import OnnxCompressError, UsageError

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("id", "aasvd")
DEFAULT_SIZES = (0.9, 0.75, 0.6, 0.45, 0.3)
RULES = ("keep", "params_target", "flops_target", "size_target")


@dataclass(frozen=True)
class Point:
    """One compression to measure: `series` names the curve it belongs to in the plot."""
    series: str
    label: str
    config: Config


def default_points(methods=DEFAULT_METHODS, sizes=DEFAULT_SIZES, rule: str = "keep") -> list[Point]:
    """Every method at every size under one size rule (`keep`: channels kept by `id`, parameters
    kept per layer by the low-rank methods). A new method or allocation joins the sweep by
    adding its `Point`s to this list (any `Config` will do)."""
    if rule not in RULES:
        raise UsageError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    return [Point(m, f"{m} {rule.replace('_', '-')} {s:g}", Config(method=m, **{rule: s}))
            for m in methods for s in sizes]


@dataclass
class Row:
    """The measurements of one point or reference; `to_dict()` is a CSV/JSON row."""
    series: str
    label: str
    agreement: float | None = None       # worst output's score (top-1 or cosine)
    worst_output: str | None = None
    file_ratio: float | None = None      # file bytes / the original's
    params_ratio: float | None = None
    flops_ratio: float | None = None     # linear-layer FLOPs at the first feed's shapes
    latency_ratio: float | None = None   # median latency / the original's, same run
    latency_ms: float | None = None
    file_bytes: int | None = None
    seconds: float | None = None
    error: str | None = None
    outputs: list = field(default_factory=list)  # per output: agreement figures

    def to_dict(self) -> dict:
        return dict(vars(self))


def limited(spec, count: int | None):
    """The first `count` feeds of a data path (a directory: its first files; a .npz: its first
    samples), as an in-memory source `compress()` accepts; other specs unchanged."""
    if count is None or not isinstance(spec, (str, os.PathLike)):
        return spec
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz")[:count]
        feeds = []
        for p in files:
            with np.load(p, allow_pickle=False) as z:
                feeds.append({k: z[k] for k in z.files})
        return feeds
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k][:count] for k in z.files}
    return spec


def latency(paths: list[Path], feed: dict, repeats: int) -> tuple[list[float], list[float]]:
    """(median seconds per call, median ratio to the first model) of each model on `feed`: one
    thread each, called in turn after two warm-up calls each. The ratio is the median over rounds
    of the paired ratios t_j / t_0 of one round, so a change of load on the machine between
    rounds cancels out."""
    import onnxruntime as ort
    sessions = []
    for p in paths:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sessions.append(ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]))
    names = [[i.name for i in s.get_inputs()] for s in sessions]
    times = [[] for _ in sessions]
    for k in range(repeats + 2):
        for j, s in enumerate(sessions):
            inputs = {n: feed[n] for n in names[j]}
            start = time.perf_counter()
            s.run(None, inputs)
            if k >= 2:
                times[j].append(time.perf_counter() - start)
    ratios = [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]
    return [statistics.median(t) for t in times], ratios


def _agreement_row(row: Row, agreement) -> None:
    worst = min(agreement, key=lambda a: a.score)
    row.agreement, row.worst_output = worst.score, worst.output
    row.outputs = [a.to_dict() for a in agreement]


def run_sweep(model: str | os.PathLike, out_dir: str | os.PathLike, *, calib, val=None,
              points: list[Point] | None = None, feeds: int | None = None, val_feeds: int | None = None,
              repeats: int = 15, quantize: bool = True, keep_models: bool = False, echo=None) -> list[Row]:
    """Measure every point and the references (see the module docstring); write sweep.csv and
    sweep.json (and sweep.png with matplotlib) into `out_dir`. Returns the rows, references first
    (the original's latency is the median of its medians over the points' runs).
    `echo(text)` is called with one line per point as it completes."""
    from .api import compress
    model, out = Path(model), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    points = default_points() if points is None else points
    calib, val = limited(calib, feeds), limited(val, feeds if val_feeds is None else val_feeds)
    models = out / "models" if keep_models else Path(tempfile.mkdtemp(prefix="onnxcompress-sweep-", dir=out))
    models.mkdir(exist_ok=True)
    echo = echo or (lambda text: None)
    feed, base, t_orig_all = None, None, []
    rows = []
    try:
        for point in points:
            row = Row(point.series, point.label)
            target = models / (point.label.replace(" ", "_") + ".onnx")
            start = time.perf_counter()
            try:
                report = compress(model, target, config=_forced(point.config), calib=calib, val=val)
            except OnnxCompressError as e:
                row.error = str(e)
                rows.append(row)
                echo(_line(row))
                continue
            row.seconds = time.perf_counter() - start
            if feed is None:
                feed, base = _first_feed(model, val if val is not None else calib), report
            _agreement_row(row, _agreements(report))
            row.file_bytes = report.file_size["after"]
            row.file_ratio = row.file_bytes / report.file_size["before"]
            row.params_ratio = report.params["after"] / report.params["before"]
            row.flops_ratio = report.flops["after"] / report.flops["before"] if report.flops["before"] else None
            (t_orig, t_new), (_, ratio) = latency([model, target], feed, repeats)
            t_orig_all.append(t_orig)
            row.latency_ms, row.latency_ratio = 1000 * t_new, ratio
            rows.append(row)
            echo(_line(row))
            if not keep_models:
                target.unlink(missing_ok=True)
        if base is not None:
            rows.insert(0, Row("original", "original", agreement=1.0, file_ratio=1.0, params_ratio=1.0,
                               flops_ratio=1.0, latency_ratio=1.0, file_bytes=base.file_size["before"],
                               latency_ms=1000 * statistics.median(t_orig_all)))
            if quantize:
                rows.insert(1, _quantized(model, models, base, calib, val, feed, repeats))
                echo(_line(rows[1]))
    finally:
        if not keep_models:
            for p in models.glob("*"):
                p.unlink()
            models.rmdir()
    write(rows, out)
    return rows


def _forced(config: Config) -> Config:
    return dataclasses.replace(config, force=True)


def _agreements(report):
    from .core.validate import Agreement
    return [Agreement(**a) for a in report.agreement]


def _first_feed(model: Path, spec) -> dict:
    import onnx
    specs = data_mod.input_specs(onnx.load(str(model), load_external_data=False))
    return next(iter(data_mod.open_source(spec, specs, batch_size=16)))


def _quantized(model: Path, models: Path, base, calib, val, feed, repeats: int) -> Row:
    """ONNX Runtime's `quantize_dynamic` (int8 per-channel weights, float activations), validated
    and timed like the points. FLOPs are not comparable (integer arithmetic) and left empty."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .core.validate import validate
    row = Row("quantize_dynamic", "onnxruntime quantize_dynamic int8")
    target = models / "quantize_dynamic.onnx"
    start = time.perf_counter()
    try:
        logging.disable(logging.WARNING)  # its advice to pre-process is not ours to give
        try:
            quantize_dynamic(str(model), str(target), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        specs = data_mod.input_specs(onnx.load(str(model), load_external_data=False))
        source = val if val is not None else calib
        src = data_mod.open_source(source, specs, batch_size=16, label="validation")
        if val is None:
            _, src = data_mod.split(src, Config().holdout)
        scores = {a["output"] for a in base.agreement if a["top1"] is not None} if base else set()
        agreement = validate(model, onnx.load(str(target)), src, scores=scores)
    except Exception as e:  # the reference failing (as it does on some models) is a result
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    row.seconds = time.perf_counter() - start
    _agreement_row(row, agreement)
    row.file_bytes = target.stat().st_size
    row.file_ratio = row.file_bytes / model.stat().st_size
    (_, t_new), (_, ratio) = latency([model, target], feed, repeats)
    row.latency_ms, row.latency_ratio = 1000 * t_new, ratio
    target.unlink()
    return row


def _line(row: Row) -> str:
    if row.error:
        return f"{row.label}: failed: {row.error}"
    flops = "-" if row.flops_ratio is None else f"{row.flops_ratio:.1%}"
    return (f"{row.label}: agreement {row.agreement:.4f}, file {row.file_ratio:.1%}, FLOPs {flops}, "
            f"latency {row.latency_ratio:.2f}x")


COLUMNS = ("series", "label", "agreement", "worst_output", "file_ratio", "params_ratio", "flops_ratio",
           "latency_ratio", "latency_ms", "file_bytes", "seconds", "error")


def write(rows: list[Row], out: Path) -> list[Path]:
    """sweep.csv (one row per point, `COLUMNS`), sweep.json (with per-output figures) and, if
    matplotlib can be imported, sweep.png. Returns the paths written."""
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow(["" if getattr(r, c) is None else getattr(r, c) for c in COLUMNS])
    (out / "sweep.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2, default=float) + "\n")
    written = [out / "sweep.csv", out / "sweep.json"]
    try:
        written.append(plot(rows, out / "sweep.png"))
    except ImportError:
        log.warning("sweep: matplotlib is not installed, so no sweep.png; pip install 'onnxcompress[plot]'")
    return written


def plot(rows: list[Row], path: Path, title: str | None = None) -> Path:
    """Agreement against file size, FLOPs and latency (each as a share of the original), one
    curve per series, the references as single markers. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("file_ratio", "file size (share of the original)"),
              ("flops_ratio", "FLOPs (share of the original)"),
              ("latency_ratio", "latency, 1 thread (ratio to the original)"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    series = list(dict.fromkeys(r.series for r in rows if not r.error))
    refs = {"original": dict(marker="*", s=160, color="black"),
            "quantize_dynamic": dict(marker="X", s=90, color="tab:red")}
    for ax, (key, xlabel) in zip(axes, panels):
        for name in series:
            pts = sorted((getattr(r, key), r.agreement) for r in rows
                         if r.series == name and not r.error and getattr(r, key) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            if name in refs:
                ax.scatter(xs, ys, label=name, zorder=3, **refs[name])
            else:
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("agreement with the original (worst output)")
    axes[0].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--calib", type=click.Path(), required=True, help="Calibration inputs (as for compressing).")
@click.option("--val", type=click.Path(), help="Validation inputs (default: a held-out share of --calib).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for sweep.csv, sweep.json and sweep.png.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True, help="Comma-separated methods, each a curve.")
@click.option("--sizes", default=",".join(f"{s:g}" for s in DEFAULT_SIZES), show_default=True, help="Comma-separated sizes for --rule.")
@click.option("--rule", type=click.Choice([r.replace("_", "-") for r in RULES]), default="keep", show_default=True, help="The size rule the sizes are for.")
@click.option("--feeds", type=int, help="Use only the first N feeds (files, or samples of a .npz) of --calib and of --val.")
@click.option("--val-feeds", type=int, help="Use only the first N feeds of --val (default: --feeds).")
@click.option("--repeats", type=int, default=15, show_default=True, help="Timed calls per model for the latency median.")
@click.option("--no-quantize", is_flag=True, help="Skip the quantize_dynamic reference.")
@click.option("--keep-models", is_flag=True, help="Keep the compressed models in OUT/models/.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def command(model, calib, val, out_dir, methods, sizes, rule, feeds, val_feeds, repeats, no_quantize, keep_models, quiet, verbose):
    """Compress MODEL with each method at each size, validate each, and write agreement against
    file size, FLOPs and latency (with the original and quantize_dynamic as references) to OUT."""
    from .cli import _fail
    logging.basicConfig(format="onnxcompress: %(levelname)s: %(message)s",
                        level=logging.ERROR if quiet else logging.WARNING)
    try:
        try:
            values = [float(s) for s in sizes.split(",") if s.strip()]
        except ValueError as e:
            raise UsageError(f"--sizes must be comma-separated numbers, got {sizes!r}") from e
        for flag, n in (("--feeds", feeds), ("--val-feeds", val_feeds)):
            if n is not None and n < 1:
                raise UsageError(f"{flag} must be at least 1, got {n}")
        if repeats < 1:
            raise UsageError(f"--repeats must be at least 1, got {repeats}")
        points = default_points([m.strip() for m in methods.split(",") if m.strip()], values, rule.replace("-", "_"))
        rows = run_sweep(model, out_dir, calib=calib, val=val, points=points, feeds=feeds, val_feeds=val_feeds, repeats=repeats,
                         quantize=not no_quantize, keep_models=keep_models,
                         echo=None if quiet else (lambda text: click.echo(text, err=True)))
    except OnnxCompressError as e:
        _fail(e, verbose)
    if not quiet:
        click.echo(f"{len(rows)} rows written to {Path(out_dir) / 'sweep.csv'}")
