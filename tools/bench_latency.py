"""Latency against FLOPs: does a compressed model run as much faster as its FLOPs say?

    python tools/bench_latency.py --bench build/bench [--out build/latency] [--runs a,b] [--phase compress|time|all]
        [--calib-limit ocr_det=64] [--val-limit 32] [--table]

For every row of the README results table (the runs of tools/benchmark.py) and for the example
CNN (models/digits_cnn.onnx at --keep 0.75, --flops-target 0.5, --flops-target 0.7, --method aasvd
--keep 0.75), plus a few runs of its own (`EXTRA`):

* phase "compress": runs ``python -m onnxcompress`` with the row's flags into OUT/RUN.onnx
  (and RUN.report.json); the FLOPs ratio is the report's (per sample). A run of the results
  table that OUT does not hold is timed from the file tools/benchmark.py wrote
  (BENCH/MODEL/runs/RUN.onnx), so `tools/benchmark.py` followed by `--phase compress` for the
  CNN and `EXTRA` rows and `--phase time` times exactly the table's files;
* phase "time": loads the original and the compressed model in one process, two ONNX Runtime
  CPU sessions each (1 thread, all cores), and calls them interleaved on a realistic feed
  (`feeds`): MiniLM 16 sentences of 64 tokens, OCR recognition 48x320 lines, OCR detection
  320x320 crops, the classifiers their validation inputs, the CNN its validation digits; at
  batch 1 and batch 16 (the CNN: 64). Median of 15 calls after 3 warm-up calls each.

Prints one JSON line per run and, with --table, the README's markdown table. Compressing does not
need a quiet machine; timing does: run the time phase when `uptime` shows little load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

from benchmark import RUNS  # noqa: E402  (tools/benchmark.py)
from onnxcompress.benchmark import interleaved, session  # noqa: E402

CNN = "digits_cnn"
CNN_RUNS = (("cnn-keep75", ("--keep", "0.75")), ("cnn-flops50", ("--flops-target", "0.5")),
            ("cnn-flops70", ("--flops-target", "0.7")), ("cnn-aasvd75", ("--method", "aasvd", "--keep", "0.75")))
# --minimize latency against --minimize flops at one quality target on RapidOCR recognition;
# latency budgets on RapidOCR detection (against ocr_det-flops70; 0.8 ends near 70% of the FLOPs) and MiniLM (minilm-flops70);
# the quantized target row with its weights kept as integers at run time (DequantizeLinear) against minilm-target-cos99
EXTRA = (("ocr_rec-target-top99-latency", "ocr_rec", ("--target", "top1>=0.99", "--minimize", "latency"), False),
         ("ocr_det-latency70", "ocr_det", ("--latency-target", "0.7"), True),
         ("ocr_det-latency80", "ocr_det", ("--latency-target", "0.8"), True),
         ("minilm-latency70", "minilm", ("--latency-target", "0.7"), True),
         ("minilm-target-cos99-run", "minilm", ("--target", "cosine>=0.99", "--decode", "run"), False))
BATCH = 16


def all_runs() -> list[tuple[str, str, tuple, bool]]:
    """(run id, model, flags, pass --val) for every row."""
    rows = [(r.id, r.model, tuple(r.flags), r.val) for r in RUNS]
    rows += [(rid, CNN, flags, True) for rid, flags in CNN_RUNS]
    return rows + list(EXTRA)


def sources(model: str, bench: Path) -> tuple[Path, Path, Path]:
    if model == CNN:
        return REPO / "models" / "digits_cnn.onnx", REPO / "models" / "digits_cnn_calib.npz", REPO / "models" / "digits_cnn_val.npz"
    return bench / model / "model.onnx", bench / model / "calib", bench / model / "val"


def subset(folder: Path, n: int | None, dest: Path) -> Path:
    """`folder` itself, or a folder of links to its first n feeds (a quicker compression)."""
    files = sorted(folder.glob("*.np[yz]")) if folder.is_dir() else []
    if not n or len(files) <= n:
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    for f in files[:n]:
        link = dest / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    return dest


def compress(run, bench: Path, out: Path, limits: dict) -> dict:
    rid, model, flags, val = run
    src, calib, vals = sources(model, bench)
    calib = subset(calib, limits.get(f"{model}:calib"), out / "data" / model / "calib")
    vals = subset(vals, limits.get("val"), out / "data" / model / "val")
    cmd = [sys.executable, "-m", "onnxcompress", str(src), str(out / f"{rid}.onnx"), "--calib", str(calib),
           *(("--val", str(vals)) if val else ()), "--report", str(out / f"{rid}.report.json"), "--force", "-q", *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    return {"run": rid, "exit_code": done.returncode, "seconds": round(time.perf_counter() - start, 1),
            "stderr": done.stderr.strip().splitlines()[-3:]}


def _files(folder: Path, n: int) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.npz"))[:n]:
        with np.load(f) as z:
            out.append({k: z[k] for k in z.files})
    return out


def feeds(model: str, bench: Path) -> dict[str, dict]:
    """{"batch 1": feed, "batch N": feed} as described in the module docstring."""
    _, _, vals = sources(model, bench)
    if model == CNN:
        with np.load(vals) as z:
            x = z[z.files[0]]
        return {"batch 1": {z.files[0]: x[:1]}, "batch 64": {z.files[0]: x[:64]}}
    rows = _files(vals, BATCH)
    if model == "minilm":
        batch = {k: np.zeros((BATCH, 64), dtype=rows[0][k].dtype) for k in rows[0]}
        for i, r in enumerate(rows):
            n = min(64, r["input_ids"].shape[1])
            for k in r:
                batch[k][i, :n] = r[k][0, :n]
    elif model in ("ocr_rec", "ocr_det"):
        size = (48, 320) if model == "ocr_rec" else (320, 320)
        batch = {"x": np.zeros((BATCH, 3, *size), dtype=np.float32)}
        for i, r in enumerate(rows):
            x = r["x"][0, :, :size[0], :size[1]]
            batch["x"][i, :, :x.shape[1], :x.shape[2]] = x
    else:
        batch = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    return {"batch 1": {k: v[:1] for k, v in batch.items()}, f"batch {BATCH}": batch}


def compressed(run, bench: Path, out: Path) -> Path | None:
    """The compressed file of `run`: OUT/RUN.onnx when the compress phase wrote it, else the one
    tools/benchmark.py wrote (BENCH/MODEL/runs/RUN.onnx, the results table's own file), else None."""
    rid, model = run[0], run[1]
    for folder in (out, bench / model / "runs"):
        if (folder / f"{rid}.onnx").exists() and (folder / f"{rid}.report.json").exists():
            return folder / f"{rid}.onnx"
    return None


def time_run(run, bench: Path, out: Path, repeats: int) -> dict:
    rid, model, flags, _ = run
    src, _, _ = sources(model, bench)
    path = compressed(run, bench, out)
    report = json.loads(path.with_name(f"{rid}.report.json").read_text())
    flops = report["flops"]["after"] / report["flops"]["before"]
    row = {"run": rid, "model": model, "flags": list(flags), "flops_ratio": round(flops, 4),
           "params_ratio": round(report["params"]["after"] / report["params"]["before"], 4), "latency": []}
    for threads in sorted({1, os.cpu_count() or 1}):
        pair = [session(src, threads), session(path, threads)]
        for name, feed in feeds(model, bench).items():
            before, after = interleaved(pair, feed, repeats=repeats)
            row["latency"].append({"threads": threads, "batch": name, "original_ms": round(before * 1e3, 3),
                                   "compressed_ms": round(after * 1e3, 3), "ratio": round(after / before, 3),
                                   "ratio_over_flops": round(after / before / flops, 3)})
    row["load_1min"] = os.getloadavg()[0]
    return row


def table(rows: list[dict]) -> str:
    """The README's speed table: per run its flags, FLOPs ratio, the four latency ratios and the
    load average at the end of its timing."""
    lines = ["| run | flags | FLOPs | 1 thread, batch 1 | 1 thread, batch 16 | all cores, batch 1 | all cores, batch 16 | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{x['ratio']:.2f}" for x in r["latency"]]
        flags = " ".join(r["flags"])
        lines.append(f"| {r['run']} | `{flags}` | {r['flops_ratio']:.1%} | " + " | ".join(cells)
                     + f" | {r['load_1min']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=REPO / "build" / "bench")
    p.add_argument("--out", type=Path, default=REPO / "build" / "latency")
    p.add_argument("--runs", help="comma-separated run ids (default: all)")
    p.add_argument("--phase", choices=("compress", "time", "all"), default="all")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--table", action="store_true", help="print the markdown table after the JSON lines")
    p.add_argument("--calib-limit", action="append", default=[], metavar="MODEL=N",
                   help="compress MODEL with its first N calibration feeds only (repeatable)")
    p.add_argument("--val-limit", type=int, help="validate inside the compression on the first N feeds")
    args = p.parse_args(argv)
    limits = {f"{k}:calib": int(v) for k, v in (x.split("=") for x in args.calib_limit)}
    limits["val"] = args.val_limit
    runs = all_runs()
    if args.runs:
        order = [x.strip() for x in args.runs.split(",") if x.strip()]
        by_id = {r[0]: r for r in runs}
        unknown = [x for x in order if x not in by_id]
        if unknown:
            p.error(f"unknown run(s): {', '.join(unknown)}")
        runs = [by_id[x] for x in order]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for run in runs:
        if args.phase in ("compress", "all"):
            result = compress(run, args.bench, args.out, limits)
            print(json.dumps(result), flush=True)
            failed |= result["exit_code"] not in (0, 3)
        if args.phase in ("time", "all") and compressed(run, args.bench, args.out) is not None:
            rows.append(time_run(run, args.bench, args.out, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    if args.table and rows:
        print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
