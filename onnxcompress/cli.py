"""The command line: a thin layer over `onnxcompress.compress` (docs/cli.md).

Exit codes: 0 success, 1 error (one line, no traceback unless -v), 2 bad usage, 3 the agreement
gate (--min-agreement) was not met, 130 interrupted (SIGINT), 143 terminated (SIGTERM), 129 hung
up (SIGHUP). Nothing is written on any non-zero exit except the --report JSON (and the model
itself with --keep-failed on exit 3): the model, the report and the plan are committed together
(`files.Transaction`), and a failure after the model is in place puts back what was there.
"""
from __future__ import annotations

import importlib
import logging
import signal
import sys
import traceback
import unicodedata
from contextlib import contextmanager
from pathlib import Path

import click

from .api import compress, default_output
from .core.config import DECODE, METHODS, MINIMIZE, PROVIDERS, QUANTIZE, SELECTIONS, Config
from .core.errors import AgreementError, OnnxCompressError, OutputError, UsageError
from .core import files
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
    def main(self, args=None, **extra):
        """`onnxcompress inspect ...` and `onnxcompress sweep ...` go to their own commands; anything
        else is `onnxcompress MODEL [OUTPUT] ...` (a model file named `inspect`: write `./inspect`)."""
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in SUBCOMMANDS:
            module = importlib.import_module(SUBCOMMANDS[args[0]], __package__)
            extra["prog_name"] = f"onnxcompress {args[0]}"
            return module.command.main(args[1:], **extra)
        return super().main(args, **extra)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _OneLineUsageError(e.format_message()) from e


EXAMPLES = """\b
Examples:
  onnxcompress model.onnx --calib calib.npz                      keep 75% of the channels (ID)
  onnxcompress model.onnx small.onnx --calib data/ --flops-target 0.7 --report r.json
  onnxcompress model.onnx --calib calib.npz --method aasvd --params-target 0.7
  onnxcompress model.onnx --calib calib.npz --val val.npz --val-labels labels.npy --min-agreement 0.99
  onnxcompress model.onnx --calib calib.npz --save-plan plan.json   (then --plan plan.json)
  onnxcompress inspect model.onnx                                what could be compressed, no data needed
  onnxcompress sweep model.onnx --calib calib.npz --out sweep/   agreement against size, with a plot

Exit codes: 0 success, 1 error, 2 bad usage, 3 --min-agreement not met, 130 interrupted.
"""

SUBCOMMANDS = {"inspect": ".inspect", "sweep": ".sweep"}


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLES)
@click.argument("model", type=click.Path())
@click.argument("output", required=False, type=click.Path())
@click.option("--calib", type=click.Path(), help=".npz (keys = input names, samples on axis 0), .npy, or a directory of such files, one feed each.")
@click.option("--val", type=click.Path(), help="Validation inputs, same formats (default: a held-out share of --calib).")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--keep", type=float, help="Fraction of channels kept in every group (default 0.75).")
@click.option("--spread", is_flag=True, help="With --keep F: keep F of the attention heads, of the other channels, and of each low-rank method's parameters over the whole model, spread across layers by estimated error (one sensitivity probe per site), rather than F in every group.")
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
                   "low-rank factors (plain, activation-aware, robust l_p); quant: int8/int4 weights; block: drop whole residual "
                   "blocks; auto (default with --target): all of them but sqf, the allocator choosing per site; "
                   "sqf: sparse quantized factors W ~ Z C (not in auto).")
@click.option("--include", help="Regular expression: only layers (low rank) or groups with a producer (id) whose node name matches.")
@click.option("--p", "p", type=float, default=1.0, show_default=True, help="Exponent of --method lp, in [1, 2].")
@click.option("--lp-weighted", is_flag=True, help="--method lp weighs an embedding table's rows by token counts.")
@click.option("--smoothing", type=float, help="Token-count smoothing for embedding tables, as a multiple of the mean count (default: from the data).")
@click.option("--max-patch", type=int, default=4096, show_default=True, help="Conv inputs: Gram of im2col patches up to this length, channel Gram beyond.")
@click.option("--intercept/--no-intercept", default=True, show_default=True, help="Fold each kept tensor's mean correction into the consumers' biases where they have one.")
@click.option("--best", is_flag=True, help="Also compute each channel group's floor, the error of the best k-dimensional approximation (the report's best column; one eigendecomposition per group, seconds on wide groups).")
@click.option("--exclude", help="Regular expression: groups touching a node whose name matches are left alone.")
@click.option("--min-agreement", type=float, help="Gate: every output must reach this (top-1 agreement for score outputs, cosine otherwise); exit 3 below it.")
@click.option("--keep-failed", is_flag=True, help="Write the output even when the gate fails.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Samples per run: array inputs are cut into batches of N; calibration merges feeds of equal shapes up to N.")
@click.option("--max-rows", type=int, default=8192, show_default=True, help="Per feed and tensor, at most this many positions enter the statistics (0: all).")
@click.option("--stats-memory", type=int, help="MiB of statistics one calibration pass may hold (default 256). ID with --keep/--tolerance takes the groups a block at a time within it, one pass per block.")
@click.option("--holdout", type=float, default=0.2, show_default=True, help="Share of --calib held out for validation when --val is not given.")
@click.option("--save-plan", type=click.Path(), help="Write the decisions (kept channels, interpolation matrices) as JSON.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, exists=True), help="Apply a plan saved with --save-plan instead of calibrating.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (its permissions are kept).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="More logging, and tracebacks on errors.")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf weights and data (refused otherwise): such layers are left alone, NaN outputs count as disagreement.")
@click.option("--solver", default="irls", show_default=True, help="--method lp: irls (reweighted least squares) or ellipsoid (Löwner ellipsoid of the l_p body, seed 002).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthesized inputs and for the rows --max-rows samples.")
@click.option("--val-labels", type=click.Path(), help=".npy of integer classes, one per --val sample: report the accuracy of both models.")
@click.option("--round", "round_", type=click.IntRange(min=1), help="Every kept width (id) and rank (low rank) a multiple of N (default per op: Conv 16 with AVX-512, else 8; Gemm/MatMul/Gather 16; 1: any size). A group narrower than N keeps its width.")
@click.option("--latency-target", type=float, help="Keep at most this fraction of the model's latency at one sample: the latency model orders the allocations, a few are timed against the original.")
@click.option("--latency-check/--no-latency-check", default=True, show_default=True, help="Time each low-rank split against the layer it replaces (cached per machine) and never emit one that is not faster; then time the whole model against the original and undo the least-saving splits while it is slower; and time --latency-target's candidates (off: the estimate alone).")
@click.option("--latency-threads", type=click.IntRange(min=1), default=1, show_default=True, help="ONNX Runtime threads of the latency model's timings and of --latency-target's whole-model timings.")
@click.option("--benchmark", is_flag=True, help="Time the original and the compressed model on the validation feed (batch 1 and the feed's batch, one thread and all cores) and report it.")
@click.option("--quantize", type=click.Choice(QUANTIZE), help="After the size rule's plan, quantize every float weight left (ID-shrunk weights and low-rank factors included) with error feedback against its input Gram: int8 per output channel, or int4 in blocks of 32 (opset raised to 21 when safe).")
@click.option("--decode", type=click.Choice(DECODE), default="load", show_default=True, help="When weights stored compressed become floats: load (the file holds integers and table factors; standard nodes on those constants form the float weight once, when a runtime loads the model: smallest file, original speed) or run (DequantizeLinear kept as integers in memory, split tables multiplied at every call: less memory, on a CPU often slower).")
@click.option("--ray", help="Calibrate on a Ray cluster: local starts one on this machine; anything else is the address of a running cluster to join (auto, HOST:6379, ray://HOST:10001). Needs pip install 'onnxcompress[ray]'.")
@click.option("--ray-workers", type=int, help="With --ray: the number of shards (one worker task each) the calibration feeds are cut into, and the CPUs of a local instance (default: every CPU of the cluster).")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True, help="ONNX Runtime execution provider for calibration and for the compressed model in validation (cuda needs onnxruntime-gpu and a GPU); the original's reference outputs are computed on the CPU.")
@click.version_option(package_name="onnxcompress")
def main(model, output, calib, val, report_path, keep, spread, tolerance, flops_target, params_target, size_target, target,
         minimize, sensitivity, probe_feeds, min_keep,
         select, method, include, p, lp_weighted, smoothing, max_patch, intercept, best, exclude, min_agreement, keep_failed, batch_size, max_rows, stats_memory, holdout, save_plan, plan_path,
         force, quiet, verbose, allow_nonfinite, solver, seed, val_labels, round_, latency_target, latency_check,
         latency_threads, benchmark, quantize, decode, ray, ray_workers, provider):
    """Compress MODEL.onnx into OUTPUT (default: MODEL.compressed.onnx beside it)."""
    logging.basicConfig(format="onnxcompress: %(levelname)s: %(message)s",
                        level=logging.ERROR if quiet else (logging.INFO if verbose else logging.WARNING))
    _printable_logs()
    txn = files.Transaction()
    with _signals_raise():
        try:
            config = Config(keep=keep, spread=spread, tolerance=tolerance, flops_target=flops_target, params_target=params_target,
                            size_target=size_target, target=target, minimize=minimize, sensitivity=sensitivity,
                            probe_feeds=probe_feeds, min_keep=min_keep, select=select, method=method, intercept=intercept, best=best, exclude=exclude,
                            include=include, p=p, lp_weighted=lp_weighted, smoothing=smoothing, max_patch=max_patch,
                            min_agreement=min_agreement, keep_failed=keep_failed, batch_size=batch_size, max_rows=max_rows,
                            stats_memory=stats_memory,
                            holdout=holdout, force=force, allow_nonfinite=allow_nonfinite, solver=solver,
                            seed=seed, round=round_, latency_target=latency_target, latency_check=latency_check,
                            latency_threads=latency_threads, benchmark=benchmark, quantize=quantize, decode=decode, ray=ray,
                            ray_workers=ray_workers, provider=provider)
            out = _check_side_outputs(model, output, calib, val, plan_path, force, report=report_path,
                                      save_plan=save_plan, labels=val_labels)
            files.remove_stale({Path(x).parent for x in (out, report_path, save_plan) if x})
            plan = Plan.load(plan_path) if plan_path else None
            txn.guard(out)  # a failure after the model is in place puts back what was there
            txn.guard(str(out) + ".data")
            try:
                report = compress(model, output, config=config, calib=calib, val=val, plan=plan,
                                  progress=ProgressBar(not quiet and sys.stderr.isatty()), val_labels=val_labels)
            except AgreementError as e:
                _finish(txn, e.report, report_path, None, quiet)
                raise
            _finish(txn, report, report_path, save_plan, quiet)
        except OnnxCompressError as e:
            txn.rollback()
            _fail(e, verbose)
        except KeyboardInterrupt as e:
            if not txn.committed:
                txn.rollback()
            signum = getattr(e, "signum", signal.SIGINT)
            what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
            click.echo(f"onnxcompress: {what}; " + ("the output had been written" if txn.committed
                                                   else "no output was written"), err=True)
            sys.exit(128 + signum)
        except Exception as e:  # a bug: say so in one line, traceback with -v
            txn.rollback()
            if verbose:
                traceback.print_exc()
            click.echo(printable(f"onnxcompress: internal error: {type(e).__name__}: {e}").replace("\n", "\\n"), err=True)
            sys.exit(1)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C: every `finally` runs, so
    temporary files are removed and nothing half-written stays."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_raise():
    """SIGTERM and SIGHUP raise `Stopped` while the run lasts (main thread only)."""
    def stop(signum, frame):
        raise Stopped(signum)

    old = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                old[sig] = signal.signal(sig, stop)
            except ValueError:  # not the main thread
                pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _check_side_outputs(model, output, calib, val, plan_path, force, labels=None, **paths) -> Path:
    """Every path the run writes is checked before any work against every file it reads
    (`files.Inputs`): the output model (replaced only with --force), --report and --save-plan (an
    existing report or plan is replaced), and each against the others. Returns the output path."""
    given = {"--" + name.replace("_", "-"): Path(p) for name, p in paths.items() if p}
    out = Path(output) if output else default_output(model)
    inputs = files.Inputs.of_run(model, calib, val, plan_path, labels)
    files.check_output(out, inputs=inputs, replace=force)
    for flag, path in given.items():
        if files.same_file(path, out) or files.same_file(path, Path(str(out) + ".data")):
            raise OutputError(f"{flag}: {path} is the output model")
        try:
            files.check_output(path, inputs=inputs, replace=True)
        except OutputError as e:
            raise OutputError(f"{flag}: {e}") from e
    if len(given) == 2 and files.same_file(given["--report"], given["--save-plan"]):
        raise UsageError("--report and --save-plan name the same file")
    return out


def _stage(txn: files.Transaction, what: str, path, save) -> None:
    try:
        txn.stage(path, save)
    except OSError as e:
        raise OutputError(f"{what}: {path}: cannot write ({e.strerror or e})") from e


def _finish(txn: files.Transaction, report, report_path, plan_path, quiet: bool) -> None:
    """Stage the plan and the report beside their destinations, then move every file into place
    together; print the table."""
    if report is not None and plan_path:
        _stage(txn, "plan", plan_path, report.plan.save)
    if report is not None and report_path:
        _stage(txn, "report", report_path, report.save)
    try:
        txn.commit()
    except OSError as e:
        raise OutputError(f"cannot move the outputs into place ({e.strerror or e}); nothing was written") from e
    if report is not None and not quiet:
        click.echo(printable(report.table()))


def _fail(e: OnnxCompressError, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(e)
    click.echo(printable(f"onnxcompress: error: {e}").replace("\n", "\\n"), err=True)
    sys.exit(e.exit_code)


def printable(text: str) -> str:
    """`text` with control and format characters (terminal escape sequences, bidirectional
    overrides) shown as escapes, so names from a model cannot drive the terminal; newlines and
    tabs stay."""
    if text.isprintable():
        return text
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
                   else ascii(ch)[1:-1] for ch in text)


class _PrintableFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = printable(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def _printable_logs() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _PrintableFilter) for f in handler.filters):
            handler.addFilter(_PrintableFilter())
