"""The command line: a thin layer over `onnxcompress.compress` (design.md section 4).

Exit codes: 0 success, 1 error (one line, no traceback unless -v), 2 bad usage, 3 the agreement
gate (--min-agreement) was not met, 130 interrupted. Nothing is written on any non-zero exit
except the --report JSON (and the model itself with --keep-failed on exit 3).
"""
from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import click

from .api import compress, default_output
from .core.config import METHODS, MINIMIZE, SELECTIONS, Config
from .core.errors import AgreementError, OnnxCompressError, OutputError, UsageError
from .core.modelio import check_output_path
from .core.plan import Plan

log = logging.getLogger("onnxcompress")


class ProgressBar:
    """A one-line progress display on stderr; silent when stderr is not a terminal or with -q."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._stage = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        if total:
            filled = int(30 * done / total)
            text = f"\r{stage:<10} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        else:
            text = f"\r{stage:<10} {done} feeds"
        sys.stderr.write(text)
        if total and done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


class _OneLineUsageError(click.ClickException):
    """A parse error (unknown flag, bad value, missing argument) shown as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"onnxcompress: error: {' '.join(self.format_message().split())} (see --help)", err=True)


class _Command(click.Command):
    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _OneLineUsageError(e.format_message()) from e


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path())
@click.argument("output", required=False, type=click.Path())
@click.option("--calib", type=click.Path(), help=".npz (keys = input names, samples on axis 0), .npy, or a directory of such files, one feed each.")
@click.option("--val", type=click.Path(), help="Validation inputs, same formats (default: a held-out share of --calib).")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--keep", type=float, help="Fraction of channels kept in every group (default 0.75).")
@click.option("--tolerance", type=float, help="Per group, the smallest size whose relative ID error is at most this.")
@click.option("--flops-target", type=float, help="Keep at most this fraction of the model's FLOPs (greedy allocation).")
@click.option("--params-target", type=float, help="Keep at most this fraction of the model's parameters (greedy allocation).")
@click.option("--size-target", type=float, help="Keep at most this fraction of the model's weight bytes (greedy allocation).")
@click.option("--target", help="Quality target on the worst output, e.g. cosine>=0.99, top1>=0.99, rel_l2<=0.05: the most compressed model that meets it on the validation data (at most 8 validation passes). Implies --method auto unless --method is given.")
@click.option("--minimize", type=click.Choice(MINIMIZE), default="size", show_default=True, help="With --target: what to make smallest (weight bytes, parameters, FLOPs, or latency as the measured latency model estimates it).")
@click.option("--sensitivity/--no-sensitivity", default=True, show_default=True, help="Budgets and targets: weigh each site by its measured end-to-end sensitivity (one probe per site).")
@click.option("--probe-feeds", type=int, default=32, show_default=True, help="Calibration feeds used by each sensitivity probe.")
@click.option("--min-keep", type=float, default=0.05, show_default=True, help="Budget modes never shrink a group below this fraction.")
@click.option("--select", type=click.Choice(SELECTIONS), default="id", show_default=True, help="id: interpolative decomposition with correction; norm: largest-norm channels, no correction (baseline).")
@click.option("--method", type=click.Choice(METHODS), default=None,
              help="id (default): prune channels (interpolative decomposition); svd / aasvd / lp: split each layer in two "
                   "low-rank factors (plain, activation-aware, robust l_p); auto (default with --target): all of them, "
                   "the allocator choosing per site.")
@click.option("--include", help="Regular expression: only layers (low rank) or groups with a producer (id) whose node name matches.")
@click.option("--p", "p", type=float, default=1.0, show_default=True, help="Exponent of --method lp, in [1, 2].")
@click.option("--lp-weighted", is_flag=True, help="--method lp weighs an embedding table's rows by token counts.")
@click.option("--smoothing", type=float, help="Token-count smoothing for embedding tables, as a multiple of the mean count (default: from the data).")
@click.option("--max-patch", type=int, default=4096, show_default=True, help="Conv inputs: Gram of im2col patches up to this length, channel Gram beyond.")
@click.option("--intercept/--no-intercept", default=True, show_default=True, help="Fold each kept tensor's mean correction into the consumers' biases where they have one.")
@click.option("--exclude", help="Regular expression: groups touching a node whose name matches are left alone.")
@click.option("--min-agreement", type=float, help="Gate: every output must reach this (top-1 agreement for score outputs, cosine otherwise); exit 3 below it.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the gate fails.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per run for array inputs.")
@click.option("--max-rows", type=int, default=8192, show_default=True, help="Per feed and tensor, at most this many positions enter the statistics (0: all).")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Share of --calib held out for validation when --val is not given.")
@click.option("--save-plan", type=click.Path(), help="Write the decisions (kept channels, interpolation matrices) as JSON.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, exists=True), help="Apply a plan saved with --save-plan instead of calibrating.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="More logging, and tracebacks on errors.")
@click.option("--round", "round_", type=click.IntRange(min=1), help="Every kept width (id) and rank (low rank) a multiple of N (default per op: Conv 16 with AVX-512, else 8; Gemm/MatMul/Gather 16; 1: any size). A group narrower than N keeps its width.")
@click.option("--latency-target", type=float, help="Keep at most this fraction of the model's latency, as the measured per-op latency model estimates it (greedy allocation).")
@click.option("--latency-check/--no-latency-check", default=True, show_default=True, help="Time each low-rank split against the layer it replaces (cached per machine) and never emit one that is not faster.")
@click.option("--latency-threads", type=click.IntRange(min=1), default=1, show_default=True, help="ONNX Runtime threads of the latency model's timings.")
@click.option("--benchmark", is_flag=True, help="Time the original and the compressed model on the validation feed (batch 1 and the feed's batch, one thread and all cores) and report it.")
@click.version_option(package_name="onnxcompress")
def main(model, output, calib, val, report_path, keep, tolerance, flops_target, params_target, size_target, target,
         minimize, sensitivity, probe_feeds, min_keep,
         select, method, include, p, lp_weighted, smoothing, max_patch, intercept, exclude, min_agreement, keep_failed, batch_size, max_rows, holdout, save_plan, plan_path,
         force, quiet, verbose, round_, latency_target, latency_check, latency_threads, benchmark):
    """Compress MODEL.onnx into OUTPUT (default: MODEL.compressed.onnx beside it)."""
    logging.basicConfig(format="onnxcompress: %(levelname)s: %(message)s",
                        level=logging.ERROR if quiet else (logging.INFO if verbose else logging.WARNING))
    written = False
    try:
        config = Config(keep=keep, tolerance=tolerance, flops_target=flops_target, params_target=params_target,
                        size_target=size_target, target=target, minimize=minimize, sensitivity=sensitivity,
                        probe_feeds=probe_feeds,
                        min_keep=min_keep, select=select, method=method, intercept=intercept, exclude=exclude,
                        include=include, p=p, lp_weighted=lp_weighted, smoothing=smoothing, max_patch=max_patch,
                        min_agreement=min_agreement, keep_failed=keep_failed, batch_size=batch_size, max_rows=max_rows,
                        holdout=holdout, force=force, round=round_, latency_target=latency_target,
                        latency_check=latency_check, latency_threads=latency_threads, benchmark=benchmark)
        _check_side_outputs(model, output, calib, val, plan_path, report=report_path, save_plan=save_plan)
        plan = Plan.load(plan_path) if plan_path else None
        try:
            report = compress(model, output, config=config, calib=calib, val=val, plan=plan,
                              progress=ProgressBar(not quiet and sys.stderr.isatty()))
        except AgreementError as e:
            written = e.report is not None and e.report.output is not None
            _finish(e.report, report_path, quiet)
            raise
        written = True
        if save_plan:
            _write("plan", save_plan, report.plan.save)
        _finish(report, report_path, quiet)
    except OnnxCompressError as e:
        _fail(e, verbose)
    except KeyboardInterrupt:
        click.echo("onnxcompress: interrupted; " + ("the output model had been written" if written
                                                     else "no output was written"), err=True)
        sys.exit(130)
    except Exception as e:  # a bug: say so in one line, traceback with -v
        if verbose:
            traceback.print_exc()
        click.echo(f"onnxcompress: internal error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


def _check_side_outputs(model, output, calib, val, plan_path, **paths) -> None:
    """--report and --save-plan are checked before any work: an existing folder, writable, not a
    directory, not an input and not the output model (an existing report or plan is replaced)."""
    given = {"--" + name.replace("_", "-"): Path(p) for name, p in paths.items() if p}
    out = Path(output) if output else default_output(model)
    inputs = [Path(p) for p in (model, calib, val, plan_path) if p]
    for flag, path in given.items():
        if path.resolve() == out.resolve():
            raise OutputError(f"{flag}: {path} is the output model")
        try:
            check_output_path(path, force=True, source=Path(model), inputs=inputs)
        except OutputError as e:
            raise OutputError(f"{flag}: {e}") from e
    if len(given) == 2 and given["--report"].resolve() == given["--save-plan"].resolve():
        raise UsageError("--report and --save-plan name the same file")


def _write(what: str, path, save) -> None:
    try:
        save(path)
    except OSError as e:
        raise OutputError(f"{what}: {path}: cannot write ({e.strerror or e})") from e


def _finish(report, report_path, quiet: bool) -> None:
    if report is None:
        return
    if report_path:
        _write("report", report_path, report.save)
    if not quiet:
        click.echo(report.table())


def _fail(e: OnnxCompressError, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(e)
    click.echo(f"onnxcompress: error: {e}", err=True)
    sys.exit(e.exit_code)
