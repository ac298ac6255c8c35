"""The README's sweep plot: `onnxcompress sweep` on the MiniLM sentence encoder.

    python tools/sweep_minilm.py [--bench build/bench] [--feeds 256] [--val-feeds 48]
                                 [--out build/sweep-minilm] [--png docs/img/minilm-sweep.png]

Needs the prepared benchmark data (`python tools/real_models.py prepare --out build/bench`) and
matplotlib (`pip install 'onnxcompress[plot]'`). Runs `id` and `aasvd` at keep 0.9, 0.7 and
0.5, calibrated on the first `--feeds` sentences and validated on the first `--val-feeds` held-out
ones, with the original and ONNX Runtime's quantize_dynamic as references, writes
sweep.csv / sweep.json / sweep.png under `--out`, and the titled plot to `--png`. Agreement for
MiniLM is the mean cosine of the per-sentence `last_hidden_state` to the original's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onnxcompress.sweep import default_points, plot, run_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="build/bench", help="folder prepared by tools/real_models.py")
    ap.add_argument("--feeds", type=int, default=256, help="calibration sentences")
    ap.add_argument("--val-feeds", type=int, default=48, help="validation sentences")
    ap.add_argument("--sizes", default="0.9,0.7,0.5")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds per latency figure")
    ap.add_argument("--out", default="build/sweep-minilm")
    ap.add_argument("--png", default="docs/img/minilm-sweep.png")
    args = ap.parse_args()
    bench = Path(args.bench) / "minilm"
    sizes = [float(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    rows = run_sweep(bench / "model.onnx", args.out, calib=bench / "calib", val=bench / "val",
                     points=default_points(("id", "aasvd"), sizes), feeds=args.feeds, val_feeds=args.val_feeds,
                     repeats=args.repeats,
                     echo=lambda text: print(text, file=sys.stderr, flush=True))
    title = (f"all-MiniLM-L6-v2: mean cosine of last_hidden_state to the original, {args.val_feeds} held-out "
             f"sentences ({args.feeds} calibration sentences)")
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    plot(rows, Path(args.png), title=title)
    print(f"{len(rows)} rows in {args.out}/sweep.csv, plot in {args.png}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
