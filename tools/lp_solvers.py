"""l_p solvers side by side on the same layers: SVD (l_2), IRLS and the Löwner ellipsoid.

    nice -n 10 python tools/lp_solvers.py --model BENCH/minilm/model.onnx [--p 1] [--keep 0.72]

For every 2-D weight initializer with at least --min-params entries (MiniLM: the word embedding
and the encoder MatMul weights of the first layer by default, --match), the rank that keeps
--keep of the layer's parameters, r = floor(keep * n d / (n + d)), and the rows of the layer as
the split sees them (embedding: vocabulary rows; MatMul weight (in x out): W = weight^T, rows =
outputs). Per solver: the l_p cost sum_i dist(row_i, span V)^p relative to plain SVD's, the wall
seconds (one thread), and for the ellipsoid its guaranteed factor and its volume gap. Also the
row-norm spread (max / median, 99.9th percentile / median), the outliers an l_p fit is meant to
resist. With --calib (a directory of .npz feeds with input_ids), for the embedding also the share
of calibration tokens whose rows are the 1% farthest from the l_2 subspace, and each solver's
token-weighted l_2 error (the error the sentences see). Prints a markdown table, writes --out JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from onnxcompress.methods.lowrank import ellipsoid, solvers  # noqa: E402


def layers(model: Path, match: str, min_params: int):
    for t in onnx.load(str(model)).graph.initializer:
        if len(t.dims) == 2 and t.dims[0] * t.dims[1] >= min_params and re.search(match, t.name):
            w = numpy_helper.to_array(t).astype(np.float64)
            yield t.name, (w if "embeddings" in t.name else w.T)


def token_counts(calib: Path, vocab: int) -> np.ndarray:
    """Occurrences of each token id in the calibration feeds (input_ids, masked positions out)."""
    counts = np.zeros(vocab)
    for f in sorted(calib.glob("*.npz")):
        feed = np.load(f)
        ids = feed["input_ids"][feed["attention_mask"] > 0] if "attention_mask" in feed else feed["input_ids"]
        np.add.at(counts, ids.ravel(), 1)
    return counts


def weighted_error(x: np.ndarray, v: np.ndarray, counts: np.ndarray) -> float:
    """sum_i c_i ||x_i - x_i V V^T||^2 / sum_i c_i ||x_i||^2: the error the sentences see."""
    d = x - (x @ v) @ v.T
    return float(np.dot(counts, np.sum(d * d, axis=1)) / np.dot(counts, np.sum(x * x, axis=1)))


def compare(name: str, x: np.ndarray, keep: float, p: float, counts=None) -> dict:
    n, d = x.shape
    rank = int(np.floor(keep * n * d / (n + d)))
    norms = np.linalg.norm(x, axis=1)
    row = {"layer": name, "rows": n, "dim": d, "rank": rank,
           "norm_max_over_median": float(norms.max() / np.median(norms)),
           "norm_p999_over_median": float(np.quantile(norms, 0.999) / np.median(norms))}
    t = time.perf_counter()
    vs = solvers.svd(x).right[:rank].T
    row["svd_seconds"] = time.perf_counter() - t
    base = solvers.lp_objective(x, vs, p)
    t = time.perf_counter()
    v = solvers.lp_subspace(x, rank, p)
    row["irls_seconds"] = time.perf_counter() - t
    row["irls_cost"] = solvers.lp_objective(x, v, p) / base
    t = time.perf_counter()
    sub = ellipsoid.subspace(x, rank, p)
    row["ellipsoid_seconds"] = time.perf_counter() - t
    row["ellipsoid_cost"] = solvers.lp_objective(x, sub.basis, p) / base
    row["ellipsoid_bound"] = sub.bound
    row["ellipsoid_gap"] = sub.ellipsoid.gap if sub.ellipsoid else 0.0
    row["svd_l2_error_of_ellipsoid"] = float(np.sum((x - x @ sub.basis @ sub.basis.T) ** 2) / np.sum(x * x))
    row["svd_l2_error_of_irls"] = float(np.sum((x - x @ v @ v.T) ** 2) / np.sum(x * x))
    if counts is not None and len(counts) == n:
        # which rows are far from the l_2 subspace, and how often the data uses them
        dist = np.linalg.norm(x - x @ vs @ vs.T, axis=1)
        far = dist >= np.quantile(dist, 0.99)
        row["calib_tokens_on_the_farthest_1pct_rows"] = float(counts[far].sum() / counts.sum())
        row["rows_never_seen_in_calib"] = float(np.mean(counts == 0))
        row["token_weighted_error"] = {"svd": weighted_error(x, vs, counts), "irls": weighted_error(x, v, counts),
                                       "ellipsoid": weighted_error(x, sub.basis, counts)}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--keep", type=float, default=0.72)
    ap.add_argument("--match", default=r"word_embeddings|MatMul_6(45|52|53|55|56|57)$")
    ap.add_argument("--min-params", type=int, default=100_000)
    ap.add_argument("--out", type=Path, default=Path("build/lp_solvers.json"))
    ap.add_argument("--calib", type=Path, help="directory of .npz feeds with input_ids: token counts for "
                    "the embedding (token-weighted errors, where the far rows sit)")
    args = ap.parse_args()
    rows = []
    for name, x in layers(args.model, args.match, args.min_params):
        counts = token_counts(args.calib, x.shape[0]) if args.calib and "embeddings" in name else None
        rows.append(compare(name, x, args.keep, args.p, counts))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"p": args.p, "keep": args.keep, "layers": rows}, indent=1))
    print(f"\n| layer (rows x dim, rank) | l_{args.p:g} cost IRLS / SVD | ellipsoid / SVD (bound) | seconds SVD / IRLS / ellipsoid |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} ({r['rows']} x {r['dim']}, {r['rank']}) | {r['irls_cost']:.4f} | "
              f"{r['ellipsoid_cost']:.4f} ({r['ellipsoid_bound']:.0f}) | "
              f"{r['svd_seconds']:.2f} / {r['irls_seconds']:.2f} / {r['ellipsoid_seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
