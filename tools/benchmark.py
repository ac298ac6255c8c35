"""Run the onnxcompress CLI on the real models and measure each result (docs/measuring.md).

    python tools/real_models.py prepare --out build/bench     # once
    python tools/benchmark.py [--runs minilm-keep75,magika-keep75] [--bench build/bench]
    python tools/benchmark.py --list
    python tools/benchmark.py --model minilm --flags "--keep 0.6"   # one ad-hoc run

Every run calls ``python -m onnxcompress MODEL OUT --calib DIR --val DIR --report R.json
--force FLAGS...`` in a subprocess, then computes the task metric of tools/bench_metrics.py on
the val feeds and prints ONE JSON line: run, model, flags, exit code, metric, wall seconds, and
whatever the report holds under "params", "flops", "seconds" (and file sizes). Outputs go to
``BENCH/NAME/runs/RUN.onnx`` and ``RUN.report.json``. Exit code 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import bench_metrics

# Never touch a model hub: every model comes from an installed package (subprocesses inherit this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent
REPORT_KEYS = ("params", "flops", "seconds", "file_size", "file_sizes", "sizes")


@dataclass(frozen=True)
class Run:
    """One benchmark run: a prepared model name and the extra CLI flags."""

    id: str
    model: str
    flags: tuple[str, ...]
    val: bool = True  # pass the held-out val feeds as --val (False: the tool holds out part of --calib)


RUNS = (
    Run("minilm-keep75", "minilm", ("--keep", "0.75")),
    Run("minilm-keep75-norm", "minilm", ("--keep", "0.75", "--select", "norm")),
    Run("minilm-keep50", "minilm", ("--keep", "0.5")),
    Run("minilm-keep50-norm", "minilm", ("--keep", "0.5", "--select", "norm")),
    Run("minilm-flops70", "minilm", ("--flops-target", "0.7")),
    Run("ocr_rec-keep75", "ocr_rec", ("--keep", "0.75")),
    Run("ocr_rec-flops70", "ocr_rec", ("--flops-target", "0.7")),
    Run("ocr_rec-flops70-norm", "ocr_rec", ("--flops-target", "0.7", "--select", "norm")),
    Run("ocr_det-flops70", "ocr_det", ("--flops-target", "0.7")),
    Run("ocr_det-keep75", "ocr_det", ("--keep", "0.75")),
    Run("ocr_cls-keep75", "ocr_cls", ("--keep", "0.75")),
    Run("ocr_cls-keep90", "ocr_cls", ("--keep", "0.9")),
    Run("magika-keep75", "magika", ("--keep", "0.75")),
    Run("magika-flops70", "magika", ("--flops-target", "0.7")),
    # low rank (issue 3): the word embedding at 72% of its parameters, l_2 / l_1 / frequency-weighted
    Run("minilm-emb72-svd", "minilm", ("--method", "svd", "--include", "word_embeddings", "--keep", "0.72")),
    Run("minilm-emb72-l1", "minilm", ("--method", "lp", "--p", "1", "--include", "word_embeddings", "--keep", "0.72")),
    Run("minilm-emb72-aasvd", "minilm", ("--method", "aasvd", "--include", "word_embeddings", "--keep", "0.72")),
    # every encoder linear at 90% of its parameters: plain vs activation-aware SVD
    Run("minilm-lin90-svd", "minilm", ("--method", "svd", "--include", "encoder", "--keep", "0.9")),
    Run("minilm-lin90-aasvd", "minilm", ("--method", "aasvd", "--include", "encoder", "--keep", "0.9")),
    # the whole model, embedding included, ranks allocated greedily
    Run("minilm-params70-aasvd", "minilm", ("--method", "aasvd", "--params-target", "0.7")),
    # RapidOCR recognition: Conv and MatMul layers at 80% of their parameters
    Run("ocr_rec-aasvd80", "ocr_rec", ("--method", "aasvd", "--keep", "0.8")),
    # ID at the parameter count aasvd80 reaches (80.5% of the model)
    Run("ocr_rec-params80-id", "ocr_rec", ("--params-target", "0.805")),
    # one allocator over every method: ID in channel groups, activation-aware low rank elsewhere
    Run("minilm-params70-auto", "minilm", ("--method", "auto", "--params-target", "0.7")),
    # quality targets: the tool validates on a held-out share of --calib; the metric is measured
    # on the separate val sentences / lines
    Run("minilm-target-cos99", "minilm", ("--target", "cosine>=0.99"), val=False),
    Run("minilm-target-cos99-params", "minilm", ("--target", "cosine>=0.99", "--minimize", "params"), val=False),
    Run("ocr_rec-target-top99-flops", "ocr_rec", ("--target", "top1>=0.99", "--minimize", "flops"), val=False),
    # composition: the plan, then every weight it leaves quantized (--quantize)
    Run("minilm-keep75-q8", "minilm", ("--keep", "0.75", "--quantize", "int8")),
    Run("minilm-keep75-q4", "minilm", ("--keep", "0.75", "--quantize", "int4")),
    Run("minilm-q4", "minilm", ("--keep", "1", "--quantize", "int4")),
    Run("minilm-target-cos99-q8", "minilm", ("--target", "cosine>=0.99", "--quantize", "int8"), val=False),
    Run("ocr_rec-target-top99-flops-q8", "ocr_rec", ("--target", "top1>=0.99", "--minimize", "flops",
                                                     "--quantize", "int8"), val=False),
    # seed 002's solver: l_1 by the Löwner ellipsoid of the l_p body, beside IRLS (minilm-emb72-l1)
    Run("minilm-emb72-l1-ellipsoid", "minilm", ("--method", "lp", "--p", "1", "--solver", "ellipsoid",
                                                "--include", "word_embeddings", "--keep", "0.72")),
)


def cli_available(python: str) -> bool:
    """True if ``python -m onnxcompress`` can start from the repo root (installed or not)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('onnxcompress.__main__') is None)"
    done = subprocess.run([python, "-c", probe], cwd=REPO, capture_output=True, check=False)
    return done.returncode == 0


def report_figures(path: Path) -> dict:
    """The report's top-level entries under REPORT_KEYS (whatever shape they have), or an
    ``report_error`` entry if the file is missing or not JSON."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"report_error": f"{type(exc).__name__}: {exc}"}
    if not isinstance(report, dict):
        return {"report_error": "report is not a JSON object"}
    return {key: report[key] for key in REPORT_KEYS if key in report}


def compress(run: Run, bench: Path, python: str, timeout: float) -> tuple[dict, Path]:
    """Call the CLI for ``run``; return (figures for the JSON line, output model path)."""
    src = bench / run.model
    out_dir = src / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    output, report = out_dir / f"{run.id}.onnx", out_dir / f"{run.id}.report.json"
    report.unlink(missing_ok=True)
    cmd = [
        python,
        "-m",
        "onnxcompress",
        str(src / "model.onnx"),
        str(output),
        "--calib",
        str(src / "calib"),
        *(("--val", str(src / "val")) if run.val else ()),
        "--report",
        str(report),
        "--force",
        *run.flags,
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
        code, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = None, f"timed out after {timeout:.0f} s\n{exc.stderr or ''}"
    figures = {
        "exit_code": code,
        "wall_seconds": round(time.perf_counter() - start, 3),
        **report_figures(report),
    }
    if code != 0:
        figures["stderr_tail"] = str(stderr).strip().splitlines()[-5:]
    figures["command"] = shlex.join(cmd)
    return figures, output


def bench_one(run: Run, bench: Path, python: str, timeout: float, limit: int | None) -> dict:
    """One JSON-ready result: the CLI figures and, if it produced a model, the task metric."""
    result = {"run": run.id, "model": run.model, "flags": list(run.flags)}
    figures, output = compress(run, bench, python, timeout)
    command = figures.pop("command")
    result["exit_code"] = figures.pop("exit_code")
    if result["exit_code"] in (0, 3) and output.exists():  # 3: agreement gate, model written
        src = bench / run.model
        try:
            result["metric"] = bench_metrics.compute_metric(
                run.model, src / "model.onnx", output, src / "val", limit=limit
            )
        except Exception as exc:  # noqa: BLE001 - report and go on with the next run
            result["metric_error"] = f"{type(exc).__name__}: {exc}"
    return {**result, **figures, "command": command}


def select_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Run]:
    """The runs named by --runs (all by default), or the ad-hoc --model/--flags run."""
    if args.model:
        flags = tuple(shlex.split(args.flags or ""))
        return [Run(f"{args.model}-adhoc", args.model, flags)]
    if not args.runs:
        return list(RUNS)
    by_id = {run.id: run for run in RUNS}
    wanted = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in by_id]
    if unknown:
        parser.error(f"unknown run(s) {', '.join(unknown)}; see --list")
    return [by_id[name] for name in wanted]


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bench",
        type=Path,
        default=REPO / "build" / "bench",
        help="folder written by real_models.py prepare",
    )
    parser.add_argument("--runs", help="comma-separated run ids (default: all)")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument(
        "--model",
        choices=sorted(bench_metrics.METRICS),
        help="ad-hoc run on this model (with --flags)",
    )
    parser.add_argument("--flags", help="ad-hoc CLI flags, one string")
    parser.add_argument("--limit", type=int, help="metric on the first N val feeds only")
    parser.add_argument("--extra", default="", help="CLI flags appended to every run (e.g. \"--round 1 --no-latency-check\")")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per CLI call")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the CLI")
    return parser, parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.list:
        for run in RUNS:
            print(f"{run.id:22s} {run.model:8s} {shlex.join(run.flags)}")
        return 0
    runs = select_runs(args, parser)
    if args.extra:
        runs = [Run(r.id, r.model, (*r.flags, *shlex.split(args.extra)), r.val) for r in runs]
    missing = sorted({r.model for r in runs if not (args.bench / r.model / "model.onnx").exists()})
    if missing:
        print(
            f"benchmark: no prepared model for {', '.join(missing)} under {args.bench}; run "
            f"python tools/real_models.py prepare --out {args.bench}",
            file=sys.stderr,
        )
        return 1
    if not cli_available(args.python):
        print(
            "benchmark: `python -m onnxcompress` is not importable (no onnxcompress/__main__.py "
            f"from {REPO}); install the project (pip install -e .) once the CLI exists",
            file=sys.stderr,
        )
        return 1
    failed = 0
    for run in runs:
        result = bench_one(run, args.bench, args.python, args.timeout, args.limit)
        failed += result["exit_code"] != 0 or "metric" not in result
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
