"""Turn `tools/benchmark.py` JSON lines into the README's markdown table.

    python tools/benchmark.py > build/bench/results.jsonl
    python tools/results_table.py build/bench/results.jsonl
    python tools/results_table.py --file build/bench/results.jsonl   (with the file size kept)

One row per run: the flags, parameters and FLOPs kept, the task metric (mean sentence-embedding
cosine for MiniLM, character agreement with the original model's text for RapidOCR recognition,
top-1 agreement for the classifiers, IoU of the thresholded text maps for detection) and wall seconds.
"""
from __future__ import annotations

import json
import sys

METRICS = (  # first key present wins
    ("mean_cosine", "mean cosine"), ("char_agreement", "char agreement"),
    ("top1_agreement", "top-1 agreement"), ("iou_vs_orig", "map IoU vs original"),
)


def metric(d: dict) -> str:
    m = d.get("metric") or {}
    for key, label in METRICS:
        if key in m and m[key] is not None:
            return f"{label} {m[key]:.4f}"
    return "-"


def ratio(d: dict, key: str) -> str:
    v = d.get(key) or {}
    if not v.get("before") or v.get("after") is None:
        return "-"
    return f"{v['after'] / v['before']:.1%}"


def main(path: str, file: bool = False) -> None:
    extra = " file |" if file else ""
    print("| run | flags |" + extra + " params | FLOPs | metric (n held-out) | exit | seconds |")
    print("|---|---|" + ("---|" if file else "") + "---|---|---|---|---|")
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            n = (d.get("metric") or {}).get("n", "-")
            size = f" {ratio(d, 'file_size')} |" if file else ""
            print(f"| {d['run']} | `{' '.join(d['flags'])}` |{size} {ratio(d, 'params')} | {ratio(d, 'flops')} | "
                  f"{metric(d)} ({n}) | {d['exit_code']} | {d.get('wall_seconds', 0):.0f} |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--file"]
    main(args[0] if args else "build/bench/results.jsonl", file="--file" in sys.argv[1:])
