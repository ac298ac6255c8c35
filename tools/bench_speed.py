"""Speed and memory of compressing MiniLM (issue 2's targets), measured, never asserted in tests.

    python tools/bench_speed.py [--bench build/bench] [--sentences 256]

For N and 2N calibration sentences, each in a fresh process:
* one plain ONNX Runtime pass over the N sentences (the yardstick),
* `compress(..., keep=0.75)` with the seconds of calibrate + decide + rewrite from its report,
* the process's peak resident memory (ru_maxrss).
Validation runs on the same 32 held-out sentences every time, so only calibration grows.
Prints one JSON line per N, then a summary line with the two targets:
calibrate+decide+rewrite <= 2 x one pass + 10 s, and peak memory flat when N doubles.

Then the low-rank target of issue 3: `--method aasvd --keep 0.9` on every linear and embedding of
MiniLM with N sentences; factorizing (decide + rewrite) must take under 30 s beyond calibration.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, shutil, sys, time, tempfile
from pathlib import Path
import numpy as np, onnxruntime as ort
from onnxcompress import Config, compress
model, calib, val, n, method = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
work = Path(tempfile.mkdtemp())
for sub, src, count in (("calib", calib, n), ("val", val, 32)):
    (work / sub).mkdir()
    for f in sorted(src.glob("*.npz"))[:count]:
        (work / sub / f.name).symlink_to(f.resolve())
files = sorted((work / "calib").glob("*.npz"))
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
start = time.perf_counter()
for f in files:
    with np.load(f) as z:
        session.run(None, {k: z[k] for k in z.files})
one_pass = time.perf_counter() - start
del session
config = Config(keep=0.75) if method == "id" else Config(method=method, keep=0.9)
report = compress(model, work / "out.onnx", config=config, calib=work / "calib", val=work / "val")
s = report.seconds
print(json.dumps({"method": method, "sentences": len(files), "layers_split": len(report.layers), "one_pass_s": round(one_pass, 2),
                  "calibrate_s": round(s["calibrate"], 2), "decide_s": round(s["decide"], 2),
                  "rewrite_s": round(s["rewrite"], 2),
                  "calib_decide_rewrite_s": round(s["calibrate"] + s["decide"] + s["rewrite"], 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
shutil.rmtree(work)
"""


def measure(model: Path, calib: Path, val: Path, n: int, method: str = "id") -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), str(calib), str(val), str(n), method],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=Path("build/bench"))
    p.add_argument("--sentences", type=int, default=256)
    args = p.parse_args(argv)
    root = args.bench / "minilm"
    if not (root / "model.onnx").exists():
        sys.exit(f"no {root / 'model.onnx'}: run `python tools/real_models.py prepare --out {args.bench}` first")
    rows = [measure(root / "model.onnx", root / "calib", root / "val", n)
            for n in (args.sentences, 2 * args.sentences)]
    for row in rows:
        print(json.dumps(row))
    first, second = rows
    budget = 2 * first["one_pass_s"] + 10
    print(json.dumps({"target_time_s": round(budget, 2), "time_met": first["calib_decide_rewrite_s"] <= budget,
                      "peak_rss_growth": round(second["peak_rss_mb"] / first["peak_rss_mb"], 3)}))
    low = measure(root / "model.onnx", root / "calib", root / "val", args.sentences, "aasvd")
    print(json.dumps(low))
    factorize_s = round(low["decide_s"] + low["rewrite_s"], 2)
    print(json.dumps({"factorize_s": factorize_s, "factorize_met": factorize_s < 30}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
