"""Weight quantization on MiniLM: onnxcompress's GPTQ (methods/quant) beside ONNX Runtime's own
quantizers, in one run, on the same held-out sentences.

    nice -n 10 python tools/bench_quant.py [--bench build/bench/minilm] [--out build/bench_quant]
        [--calib-limit 256] [--val-limit 512] [--runs ours-int8,ort-dynamic-int8,...]

Ours: every MatMul / Gemm with a constant weight quantized from its input Gram (calibration
feeds, `core.calibrate`), and the word embedding (the largest Gather table) rounded per token
(or, in the `-pq3` / `-pq4` runs, product-quantized: a uint8 code per 3 or 4 columns),
the other Gather tables (position, token type) in int8 per row,
stored as integers + DequantizeLinear (standard ops; opset raised to 21 for int4 / blocks).
ORT: `quantize_dynamic` (int8 per-channel weights, uint8 dynamic activations) and
`MatMulNBitsQuantizer` (4 / 8 bit, block 32, RTN and HQQ) on MatMul and Gather.

`--layers`: per-layer table instead (two layers): relative output error and bytes of GPTQ
formats, sparse quantized factors, and activation-aware low rank at SQF's bytes.

Metric: mean cosine between original and quantized mean-pooled sentence embeddings (as
tools/bench_metrics.py). ORT fuses DequantizeLinear + MatMul into MatMulNBits and, at its default
session setting `session.qdq_matmulnbits_accuracy_level` = 4, then quantizes the activations to
int8; the column `cos_f` runs with that level at 0 (float activations, what the model says),
`cos` with ORT's defaults (what a user gets). Prints one JSON line per run and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a shared machine: one BLAS thread

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_metrics import feed_files, load_feed, mean_pool  # noqa: E402
from onnxcompress.api import shapes_at  # noqa: E402
from onnxcompress.core import data as data_mod  # noqa: E402
from onnxcompress.core.calibrate import calibrate  # noqa: E402
from onnxcompress.core.graph import GraphIndex  # noqa: E402
from onnxcompress.core.modelio import load_model  # noqa: E402
from onnxcompress.core.normalize import normalize  # noqa: E402
from onnxcompress.methods.lowrank.layers import find_layers, weight_matrix  # noqa: E402
from onnxcompress.methods.quant import solvers as qs  # noqa: E402
from onnxcompress.methods.quant import storage  # noqa: E402
from onnxcompress.methods.quant.codebook import product_quantize  # noqa: E402

F = qs.Format
#: ours: name -> (MatMul format, solver, embedding format or None[, solver keywords])
OURS = {
    "ours-gptq-int8": (F(8), "gptq", F(8)),
    "ours-rtn-int8": (F(8), "rtn", F(8)),
    "ours-gptq-int8-emb4": (F(8), "gptq", F(4, 32)),
    "ours-gptq-int4b32": (F(4, 32), "gptq", F(4, 32)),
    "ours-rtn-int4b32": (F(4, 32), "rtn", F(4, 32)),
    "ours-gptq-int4b128": (F(4, 128), "gptq", F(4, 128)),
    "ours-gptq-int4b32-clip": (F(4, 32), "gptq", F(4, 32), {"clip": 16}),
    "ours-gptq-int4b128-clip": (F(4, 128), "gptq", F(4, 128), {"clip": 16}),
    "ours-gptq-int4ch-clip": (F(4), "gptq", F(4), {"clip": 16}),
    "ours-gptq-int4b32h-clip": (F(4, 32, half=True), "gptq", F(4, 32, half=True), {"clip": 16}),
    # the word embedding product-quantized (a uint8 code per 3 or 4 columns, methods/quant/codebook.py)
    "ours-gptq-int4ch-clip-pq3": (F(4), "gptq", F(8, dim=3), {"clip": 16}),
    "ours-gptq-int4ch-clip-pq4": (F(4), "gptq", F(8, dim=4), {"clip": 16}),
    "ours-gptq-int4b32h-clip-pq3": (F(4, 32, half=True), "gptq", F(8, dim=3), {"clip": 16}),
    "ours-gptq-int4b32h-clip-pq4": (F(4, 32, half=True), "gptq", F(8, dim=4), {"clip": 16}),
}
ORT_RUNS = ("ort-dynamic-int8", "ort-nbits8-rtn", "ort-nbits8-emb4-rtn", "ort-nbits4-rtn", "ort-nbits4-hqq")


def prepare(model_path: Path, calib_dir: Path, calib_limit: int):
    """(normalized model, GraphIndex, layers, {layer key: Gram or counts})."""
    norm = normalize(load_model(model_path))
    specs = data_mod.input_specs(norm)
    files = feed_files(calib_dir, calib_limit)
    feeds = [load_feed(p) for p in files]
    g = GraphIndex(norm, *shapes_at(norm, feeds[0]))
    found = find_layers(g).layers
    mats = [x for x in found if x.kind in ("matmul", "matmul_left", "gemm")]
    gathers = sorted((x for x in found if x.kind == "gather"), key=lambda x: -x.params)
    layers = mats + gathers
    src = data_mod.open_source(calib_dir if calib_limit is None else feeds, specs, batch_size=1)
    stats = calibrate(norm, [x.request for x in layers], src, types=g.types)
    return norm, g, layers, {x.key: stats[x.request] for x in layers}


def ours(norm, g, layers, stats, fmt, solver, emb_fmt, kw=None) -> tuple[onnx.ModelProto, dict]:
    kw = kw or {}
    edits, errors = [], {}
    largest = max((x for x in layers if x.kind == "gather"), key=lambda x: x.params, default=None)
    for x in layers:
        if x.kind == "gather":
            if emb_fmt is None:
                continue
            if x is largest and emb_fmt.dim:
                q = product_quantize(g.const(x.weight), stats[x.key], emb_fmt)
            else:
                q = qs.quantize_embedding(g.const(x.weight), stats[x.key], emb_fmt if x is largest else F(8), **kw)
        else:
            G = stats[x.key].gram
            q = getattr(qs, solver)(weight_matrix(g, x), G, fmt, kernel=x.kernel, **kw)
        edits.append(storage.QuantEdit(x, q))
        errors[x.key] = q.error
    return storage.apply(norm, edits), errors


def ort_model(name: str, src: Path, dst: Path) -> None:
    """ORT's quantizers. MatMulNBits: MatMul at `bits` (RTN or HQQ), then, in a second pass, the
    Gather tables at 4 bits RTN (ORT quantizes Gather at 4 bits only, and HQQ not at all), except
    for "ort-nbits8-rtn", which asks for 8 bits everywhere and so leaves the Gathers in float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    if name == "ort-dynamic-int8":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    def nbits(model, bits, ops, hqq=False):
        cfg = (mnb.HQQWeightOnlyQuantConfig(block_size=32, bits=bits, op_types_to_quantize=ops) if hqq else
               mnb.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits, op_types_to_quantize=ops))
        q = mnb.MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, algo_config=cfg,
                                     op_types_to_quantize=ops)
        q.process()
        return q.model.model

    bits = 8 if "nbits8" in name else 4
    model = onnx.load(str(src))
    if name == "ort-nbits8-rtn":
        model = nbits(model, 8, ("MatMul", "Gather"))
    else:
        model = nbits(nbits(model, bits, ("MatMul",), hqq=name.endswith("hqq")), 4, ("Gather",))
    onnx.save(model, str(dst))


def session(path: Path, accuracy_level: str | None):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if accuracy_level is not None:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embeddings(path: Path, feeds, accuracy_level=None) -> np.ndarray:
    s = session(path, accuracy_level)
    rows = [mean_pool(s.run(None, f)[0], f["attention_mask"])[0] for f in feeds]
    e = np.array(rows)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def make(name: str, prepared, src: Path, dst: Path) -> dict | None:
    """Write run `name`'s model to `dst`; ours return their per-layer error summary."""
    if name not in OURS:
        ort_model(name, src, dst)
        return None
    model, errors = ours(*prepared, *OURS[name])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(dst))
    return {"mean_layer_error": float(np.mean(list(errors.values()))), "max_layer_error": float(max(errors.values()))}


def plot(rows: list[dict], path: Path) -> None:
    """File size (% of the original) against mean cosine, ours and ORT's, if matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for who, marker in (("ours", "o"), ("ort", "s")):
        pts = [r for r in rows if r["run"].startswith(who)]
        ax.scatter([100 * r["size"] for r in pts], [r["cos_f"] for r in pts], marker=marker, label=who)
        for r in pts:
            ax.annotate(r["run"].split("-", 1)[1], (100 * r["size"], r["cos_f"]), fontsize=7)
    ax.set_xlabel("file size, % of the original")
    ax.set_ylabel("mean cosine (held-out sentences)")
    ax.set_title("MiniLM weight quantization")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def layer_table(prepared, keys: int = 2) -> list[dict]:
    """Per layer (the first attention and the first FFN output projection): relative output error
    and bytes of GPTQ formats, SQF formats, and the activation-aware low rank at SQF's bytes."""
    from onnxcompress.methods.sqf import solvers as sq
    norm, g, layers, stats = prepared
    picks = [x for x in layers if x.kind != "gather"]
    picks = [picks[0], next(x for x in picks if x.inputs > x.out)]
    rows = []
    for x in picks:
        W, G = weight_matrix(g, x), stats[x.key].gram
        for p in qs.error_curve(W, G):
            rows.append({"layer": x.key, "what": f"gptq {p.format.name}", "bytes": p.bytes, "error": p.error})
        k = min(W.shape)
        for fmt in (sq.SQFFormat(k // 2, k // 8, 8, 8), sq.SQFFormat(k, k // 8, 8, 4), sq.SQFFormat(k // 4, k // 4, 8, 8)):
            c = sq.versus_lowrank(W, G, fmt, iters=20)
            rows.append({"layer": x.key, "what": fmt.name, "bytes": c.bytes, "error": c.error,
                         "lowrank_rank": c.lowrank_rank, "lowrank_error": c.lowrank_error})
        rows.append({"layer": x.key, "what": "float32", "bytes": 4 * W.size, "error": 0.0})
    return rows


def main(argv=None) -> int:
    import logging
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path("build/bench/minilm"))
    ap.add_argument("--out", type=Path, default=Path("build/bench_quant"))
    ap.add_argument("--calib-limit", type=int, default=256)
    ap.add_argument("--val-limit", type=int, default=512)
    ap.add_argument("--runs", default=",".join([*OURS, *ORT_RUNS]))
    ap.add_argument("--keep", action="store_true", help="keep the quantized models in --out")
    ap.add_argument("--layers", action="store_true", help="only the per-layer GPTQ / SQF / low-rank table")
    args = ap.parse_args(argv)
    if args.layers:
        for row in layer_table(prepare(args.bench / "model.onnx", args.bench / "calib", args.calib_limit)):
            print(json.dumps(row), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.bench / "model.onnx"
    runs = args.runs.split(",")
    val = [load_feed(p) for p in feed_files(args.bench / "val", args.val_limit)]
    reference = embeddings(src, val)
    base = src.stat().st_size
    t0 = time.perf_counter()
    prepared = prepare(src, args.bench / "calib", args.calib_limit) if any(r in OURS for r in runs) else None
    print(json.dumps({"prepare_seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    rows = []
    for name in runs:
        dst = args.out / f"{name}.onnx"
        t0 = time.perf_counter()
        try:
            made = make(name, prepared, src, dst)
        except Exception as e:  # one quantizer failing must not lose the other rows
            print(json.dumps({"run": name, "failed": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        extra = made or {}
        seconds = time.perf_counter() - t0
        onnx.checker.check_model(str(dst), full_check=True)
        cos = float(np.mean(np.sum(embeddings(dst, val) * reference, axis=1)))
        # only a DequantizeLinear -> MatMul pair is fused at a session-chosen accuracy level; ORT's
        # own quantizers write MatMulNBits nodes that carry theirs (measured: no difference)
        cos_f = float(np.mean(np.sum(embeddings(dst, val, "0") * reference, axis=1))) if name in OURS else cos
        row = {"run": name, "bytes": dst.stat().st_size, "size": dst.stat().st_size / base,
               "cos": cos, "cos_f": cos_f, "seconds": round(seconds, 1), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            dst.unlink()
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "size_vs_cosine.png")
    print(f"\n{'run':30s} {'size':>7s} {'cos':>8s} {'cos_f':>8s}")
    for r in sorted(rows, key=lambda r: r["size"]):
        print(f"{r['run']:30s} {100 * r['size']:6.1f}% {r['cos']:8.4f} {r['cos_f']:8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
