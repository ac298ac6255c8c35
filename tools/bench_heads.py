"""MiniLM head pruning against onnxsim's, at the same size, in the same run; prints ONE JSON line.

    python tools/bench_heads.py [--data build/bench/minilm] [--out DIR] [--calib-limit N] [--val-limit N]

* ours: ``python -m onnxcompress MODEL OUT --method id --keep 0.75 --calib CALIB --val VAL``.
  Attention heads are ID channel groups (Q, K and V split into heads by a Reshape; the group
  keeps whole heads of 32 channels), so `--keep 0.75` keeps 9 of 12 heads in every layer and
  1152 of 1536 FFN neurons.
* ours, spread: the same with ``--spread``: 75% of all heads (54 of 72) and 75% of all FFN
  neurons are kept, the same parameter count, but each layer keeps as many as the allocator's
  sensitivity-weighted error estimate gives it.
* onnxsim 0.8.1, heads: ``onnxsim.apply_attention_head_wanda_pruning(model, calibration_data,
  sparsity=0.25)`` (the calibrated variant of ``apply_attention_head_pruning``: drops the
  lowest-``||W||_F ||X||_2`` heads of every matched attention block) on the same model. Its
  decomposed-attention matcher wants the Q/K/V MatMul (or Gemm) feeding the head-split Reshape
  directly and a constant Reshape shape; the reported figure says how many heads it removed.
* onnxsim 0.8.1 at our size: heads as above, then ``onnxsim.apply_structured_wanda_pruning`` on
  the FFNs, with the sparsity set so that the parameter count matches ours (one calibration
  run at 0.25 to measure how many parameters a unit of sparsity removes, one at the matched
  value). Its FFN matcher needs the GELU as one op, so the FFNs are first fused by ONNX
  Runtime's own BERT optimizer (``onnxruntime.transformers.optimizer``, opt_level 1: BiasGelu,
  SkipLayerNormalization), which computes the same function.

Every model is scored by `bench_metrics.minilm_metric` on the held-out feeds: cosine between the
original's and the compressed model's mean-pooled sentence embeddings (and its minimum, 5th
percentile, and the Spearman correlation of pairwise similarities).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import bench_metrics

REPO = Path(__file__).resolve().parent.parent
HEAD = 32          # MiniLM-L6: 12 heads of 32 channels, FFN 1536
ONNXSIM_FEEDS = 32  # calibration feeds handed to onnxsim's Wanda-style importance


def params(model: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers (as the onnxcompress report counts them)."""
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)))


def widths(model: onnx.ModelProto) -> dict:
    """Kept heads per layer (output width of each query projection / 32) and FFN widths, read
    from the 2-D weights: (384, w) query weights and (384, f) / (f, 384) FFN weights."""
    by_name = {t.name: tuple(t.dims) for t in model.graph.initializer}
    heads, ffn = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in by_name:
            continue
        dims = by_name[node.input[1]]
        if len(dims) != 2:
            continue
        if "query" in node.name:
            heads.append(dims[1] // HEAD)
        elif "intermediate" in node.name:
            ffn.append(dims[1])
    return {"heads": heads, "ffn": ffn}


def subset(directory: Path, limit: int | None, tmp: Path, name: str) -> Path:
    """`directory`, or a folder of links to its first `limit` feeds."""
    if not limit:
        return directory
    out = tmp / name
    out.mkdir()
    for f in bench_metrics.feed_files(directory, limit):
        os.symlink(f.resolve(), out / f.name)
    return out


def score(original: Path, model: Path, val: Path, truth) -> dict:
    return bench_metrics.minilm_metric(original, model, bench_metrics.feed_files(val), truth)


def ours(model: Path, calib: Path, val: Path, out: Path, flags: tuple[str, ...] = ()) -> tuple[dict, Path]:
    name = "ours-id-keep75" + "".join(f.replace("--", "-") for f in flags)
    dst, report = out / f"{name}.onnx", out / f"{name}.report.json"
    cmd = [sys.executable, "-m", "onnxcompress", str(model), str(dst), "--method", "id", "--keep", "0.75",
           *flags, "--calib", str(calib), "--val", str(val), "--report", str(report), "--force", "-q"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"onnxcompress failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    r = json.loads(report.read_text())
    return {"command": " ".join(["onnxcompress MODEL OUT --method id --keep 0.75", *flags, "--calib CALIB --val VAL"]),
            "seconds": round(time.perf_counter() - start, 1), "params": r["params"]["after"],
            "flops_per_sample": r["flops"]["after"]}, dst


def onnxsim_heads(model: onnx.ModelProto, feeds: list[dict], sparsity: float) -> onnx.ModelProto:
    import onnxsim
    return onnxsim.apply_attention_head_wanda_pruning(model, calibration_data=feeds, sparsity=sparsity)


def onnxsim_ffn(model: onnx.ModelProto, feeds: list[dict], sparsity: float) -> onnx.ModelProto:
    import onnxsim
    return onnxsim.apply_structured_wanda_pruning(model, calibration_data=feeds, sparsity=sparsity)


def ort_fused(path: Path) -> onnx.ModelProto:
    """ONNX Runtime's BERT fusions (opt_level 1): the same function with BiasGelu and
    SkipLayerNormalization nodes."""
    from onnxruntime.transformers import optimizer
    return optimizer.optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384, opt_level=1).model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "build" / "bench" / "minilm",
                        help="folder with model.onnx, calib/, val/ (tools/real_models.py prepare)")
    parser.add_argument("--out", type=Path, help="where the compressed models go (default: a temporary folder)")
    parser.add_argument("--calib-limit", type=int, help="use only the first N calibration feeds")
    parser.add_argument("--val-limit", type=int, help="score on the first N held-out feeds only")
    args = parser.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    src = args.data / "model.onnx"
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        out = args.out or tmp
        out.mkdir(parents=True, exist_ok=True)
        calib = subset(args.data / "calib", args.calib_limit, tmp, "calib")
        val = subset(args.data / "val", args.val_limit, tmp, "val")
        truth = bench_metrics.load_truth(args.data / "val")
        original = onnx.load(str(src))
        base = params(original)
        result = {"model": str(src), "params_before": base, "calib_feeds": len(bench_metrics.feed_files(calib)),
                  "val_feeds": len(bench_metrics.feed_files(val))}

        for key, flags in (("ours", ()), ("ours_spread", ("--spread",))):
            row, path = ours(src, calib, val, out, flags)
            row.update(widths(onnx.load(str(path))), size=row["params"] / base)
            row.update(score(src, path, val, truth))
            result[key] = row
        mine = result["ours"]

        feeds = [bench_metrics.load_feed(f) for f in bench_metrics.feed_files(calib, ONNXSIM_FEEDS)]
        start = time.perf_counter()
        heads = onnxsim_heads(original, feeds, 0.25)
        path = out / "onnxsim-heads75.onnx"
        onnx.save(heads, str(path))
        row = {"call": "onnxsim.apply_attention_head_wanda_pruning(model, calibration_data, sparsity=0.25)",
               "seconds": round(time.perf_counter() - start, 1), "params": params(heads),
               "size": params(heads) / base, **widths(heads)}
        row["heads_removed"] = 12 * len(row["heads"]) - sum(row["heads"])
        row.update(score(src, path, val, truth))
        result["onnxsim_heads"] = row

        # the same size: onnxsim's heads, then its FFN pruning sized to our parameter count
        start = time.perf_counter()
        fused_path = out / "onnxsim-fused-input.onnx"
        onnx.save(heads, str(fused_path))
        fused = ort_fused(fused_path)
        want = base - mine["params"] - (base - params(heads))   # parameters the FFNs must give up
        trial = onnxsim_ffn(fused, feeds, 0.25)
        per_unit = (params(fused) - params(trial)) / 0.25
        sparsity = float(min(0.95, max(0.0, want / per_unit))) if per_unit > 0 else 0.0
        same = onnxsim_ffn(fused, feeds, sparsity) if sparsity > 0 else fused
        path = out / "onnxsim-same-size.onnx"
        onnx.save(same, str(path))
        row = {"call": "onnxruntime.transformers.optimizer (bert, opt_level 1), then "
                       f"onnxsim.apply_structured_wanda_pruning(model, calibration_data, sparsity={sparsity:.4f})",
               "ffn_sparsity": sparsity, "seconds": round(time.perf_counter() - start, 1), "params": params(same),
               "size": params(same) / base, **widths(same)}
        row.update(score(src, path, val, truth))
        result["onnxsim_same_size"] = row

        spread = result["ours_spread"]
        same_counts = (sum(spread["heads"]) == sum(mine["heads"]) and sum(spread["ffn"]) == sum(mine["ffn"])
                       and spread["params"] == mine["params"])
        result["acceptance"] = {"want": "mean_cosine >= 0.97 keeping 75% of the heads and 75% of the FFN neurons",
                                "uniform_met": bool(mine["mean_cosine"] >= 0.97),
                                "spread_same_counts": bool(same_counts),
                                "spread_met": bool(same_counts and spread["mean_cosine"] >= 0.97)}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
