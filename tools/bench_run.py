"""Speed of a whole run on MiniLM against ONNX Runtime's own yardsticks, measured in one run.

    python tools/bench_run.py [--bench build/bench] [--sentences 256] [--rounds 2] [--keep-files DIR]

Calibration data: the first N sentences of `minilm/calib/` (one feed per file, unpadded) as a
folder, and the same N sentences as one padded `.npz` (padded to the longest with token 0 and
attention_mask 0; `write_padded`). For each data form, in every round, each in a fresh process:

* `ort_pass_s`: one plain ONNX Runtime pass over the data (default session options, the loop
  only): the folder feed by feed, the `.npz` in the batches of 16 samples onnxcompress runs;
* `quantize_static_s`: `onnxruntime.quantization.quantize_static` (QDQ, MinMax, the defaults)
  with a `CalibrationDataReader` over the same feeds (the call only);
* `run_s`: the whole `python -m onnxcompress MODEL --calib DATA --keep 0.75 --force` command,
  wall clock from process start to exit (interpreter start, imports, validation on the held-out
  fifth, save: everything a user waits for); `stages` are its report's seconds per stage.

The acceptance checks, per data form and round: run_s <= quantize_static_s and
run_s <= 3 * ort_pass_s + 5; and the folder and the padded `.npz` keep the same channels
(the plans' kept channel lists are equal). Prints one JSON line per round, then one summary line
with the per-round ratios' medians. On a shared machine the load changes between processes:
the load average is printed with every round, and only ratios within a round are comparable.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

ORT_PASS = r"""
import sys, time, numpy as np, onnxruntime as ort
sys.path.insert(0, sys.argv[3])
from bench_run import feeds
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
data = list(feeds(sys.argv[2]))
start = time.perf_counter()
for f in data:
    session.run(None, f)
print(time.perf_counter() - start)
"""

QUANTIZE = r"""
import sys, time
from onnxruntime.quantization import CalibrationDataReader, quantize_static
sys.path.insert(0, sys.argv[3])
from bench_run import feeds

class Reader(CalibrationDataReader):
    def __init__(self, spec):
        self.it = iter(feeds(spec))
    def get_next(self):
        return next(self.it, None)

start = time.perf_counter()
quantize_static(sys.argv[1], sys.argv[4], Reader(sys.argv[2]))
print(time.perf_counter() - start)
"""


def feeds(spec: str, batch: int = 16):
    """The feeds of a folder (one per file, sorted by name) or of a padded `.npz` (batches of
    `batch` samples), as onnxcompress streams them."""
    p = Path(spec)
    if p.is_dir():
        for f in sorted(p.glob("*.npz")):
            with np.load(f) as z:
                yield {k: z[k] for k in z.files}
        return
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    for start in range(0, n, batch):
        yield {k: v[start:start + batch] for k, v in arrays.items()}


def write_padded(files: list[Path], out: Path, mask: str = "attention_mask") -> dict:
    """One `.npz` holding the sentences of `files` (one [1, L] feed each) padded to the longest:
    every input 0 past the sentence's end, so `mask` is 0 there. Returns {"sentences",
    "longest", "tokens"}."""
    loaded = []
    for f in files:
        with np.load(f) as z:
            loaded.append({k: z[k] for k in z.files})
    longest = max(f[mask].shape[1] for f in loaded)
    arrays = {k: np.zeros((len(loaded), longest), dtype=v.dtype) for k, v in loaded[0].items()}
    for i, f in enumerate(loaded):
        for k, v in f.items():
            arrays[k][i, :v.shape[1]] = v[0]
    np.savez(out, **arrays)
    return {"sentences": len(loaded), "longest": longest, "tokens": int(sum(f[mask].sum() for f in loaded))}


def _seconds(code: str, *args) -> float:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return float(out.stdout.strip().splitlines()[-1])


def _run(model: Path, data: Path, work: Path, name: str) -> dict:
    """The whole command, timed from process start to exit, with its report and plan."""
    report, plan = work / f"{name}.report.json", work / f"{name}.plan.json"
    cmd = [sys.executable, "-m", "onnxcompress", str(model), str(work / f"{name}.onnx"), "--calib", str(data),
           "--keep", "0.75", "--force", "-q", "--report", str(report), "--save-plan", str(plan)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"onnxcompress failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    r = json.loads(report.read_text())
    keep = [e["keep"] for e in json.loads(plan.read_text())["entries"]]
    return {"run_s": round(wall, 2), "stages": {k: round(v, 2) for k, v in r["seconds"].items()},
            "cosine": r["agreement"][0]["cosine"], "padding": r["data"].get("padding"), "keep": keep}


def one_round(model: Path, forms: dict, work: Path) -> dict:
    row = {"load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    keeps = {}
    for name, data in forms.items():
        ort_pass = _seconds(ORT_PASS, model, data, Path(__file__).parent)
        quant = _seconds(QUANTIZE, model, data, Path(__file__).parent, work / f"{name}.qdq.onnx")
        run = _run(model, data, work, name)
        keeps[name] = run.pop("keep")
        budget = 3 * ort_pass + 5
        row[name] = {"ort_pass_s": round(ort_pass, 2), "quantize_static_s": round(quant, 2), **run,
                     "run_over_quantize_static": round(run["run_s"] / quant, 3),
                     "run_over_pass_budget": round(run["run_s"] / budget, 3),
                     "met": run["run_s"] <= quant and run["run_s"] <= budget}
    row["same_kept_channels"] = len(set(json.dumps(k) for k in keeps.values())) == 1
    row["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("build/bench"))
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep-files", type=Path, help="write the data, models and reports here (default: a temporary folder)")
    args = p.parse_args(argv)
    root = args.bench / "minilm"
    if not (root / "model.onnx").exists():
        sys.exit(f"no {root / 'model.onnx'}: run `python tools/real_models.py prepare --out {args.bench}` first")
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        work = args.keep_files or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        files = sorted((root / "calib").glob("*.npz"))[:args.sentences]
        folder = work / "calib"
        folder.mkdir(exist_ok=True)
        for f in files:
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
        padded = work / "calib_padded.npz"
        shape = write_padded(files, padded)
        forms = {"folder": folder, "padded": padded}
        rows = []
        for k in range(args.rounds):
            row = {"round": k, "cpu_count": os.cpu_count(), **shape, **one_round(root / "model.onnx", forms, work)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"rounds": len(rows), "same_kept_channels": all(r["same_kept_channels"] for r in rows)}
    for name in forms:
        for key in ("run_over_quantize_static", "run_over_pass_budget"):
            summary[f"{name}_{key}_median"] = statistics.median(r[name][key] for r in rows)
        summary[f"{name}_met_rounds"] = sum(r[name]["met"] for r in rows)
    summary["acceptance_met"] = (summary["same_kept_channels"] and all(
        summary[f"{n}_run_over_quantize_static_median"] <= 1 and summary[f"{n}_run_over_pass_budget_median"] <= 1
        for n in forms))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
