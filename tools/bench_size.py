"""File size against agreement: onnxcompress's quantization beside ONNX Runtime's quantizers, in
one run, on the same held-out data; every output model also run in OpenVINO.

    nice -n 10 python tools/bench_size.py [--bench build/bench] [--out build/bench_size]
        [--targets 0.1,0.125,0.15,0.2,0.25,0.3] [--fixed ours-gptq-int8,...] [--no-ocr] [--decode load|run]
        [--plot docs/img/minilm-quant.png]

MiniLM (`--bench`/minilm): mean cosine of the mean-pooled sentence embeddings to the original's
on the held-out sentences (tools/bench_metrics.py), against the file size as a fraction of the
original file's, for

* ours: `onnxcompress.compress(..., Config(method="quant", size_target=T))` at every `--targets`
  T (the command line's `--method quant --size-target T`; `--auto-targets`: the same with
  `--method auto`), calibrated on `--calib-limit` sentences, and the fixed-format runs of
  tools/bench_quant.py (`--fixed`);
* ONNX Runtime: `quantize_dynamic` (int8 per-channel weights) and MatMulNBits (8 and 4 bits,
  block 32, RTN and HQQ, on MatMul and Gather; tools/bench_quant.py `ORT_RUNS`).

Ours are read by ONNX Runtime twice: `cos` at its default session settings and `cos_f` at
`session.qdq_matmulnbits_accuracy_level` 0. They differ for a file with DequantizeLinear (`--decode
run`, and the fixed-format runs): ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits
and by default (level 4) quantizes the activations to int8; level 0 keeps them float, what the
model file says. With `--decode load` (the default) the weights are float once loaded and the two
agree. The checks use `cos`, what a user gets by default.

RapidOCR recognition (`--bench`/ocr_rec): `quantize_dynamic` refuses the Paddle export (weights
in Constant nodes), so it runs on our normalized copy (`core.normalize`); its file size sets the
size target of ours (`--method quant --size-target` at that file's share of the original's,
lowered until our file is not larger). Metric: characters agreeing with the original's text
(tools/bench_metrics.py `ocr_rec_metric`, the held-out rendered lines).

Every output model is checked with the full ONNX checker and run in ONNX Runtime; each is also
read and compiled by OpenVINO on CPU (if installed) and run on the first `--ov-feeds` (16) held-out
feeds: max abs difference and mean cosine of its outputs to ONNX Runtime's, at OpenVINO's defaults
(bf16 / dynamic activation quantization where the CPU has them) and at `INFERENCE_PRECISION_HINT`
f32 with `DYNAMIC_QUANTIZATION_GROUP_SIZE` 0 ("exact"); a refusal is recorded with its message.

Checks printed at the end and stored in the JSON: at every file size an ORT quantizer reaches,
one of ours at that size or smaller has a higher mean cosine; one of ours has a mean cosine of at
least 0.99 at no more than 1/8 of the file; RapidOCR: ours at no more than ORT int8's file keeps
at least 99% of the characters.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # a shared machine: one BLAS thread

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import bench_quant as bq  # noqa: E402
from bench_metrics import feed_files, load_feed, load_truth, ocr_rec_metric  # noqa: E402
from onnxcompress import Config, compress  # noqa: E402
from onnxcompress.core.modelio import load_model  # noqa: E402
from onnxcompress.core.normalize import normalize  # noqa: E402
from onnxcompress.sweep import limited  # noqa: E402

TARGETS = (0.1245, 0.14, 0.15, 0.175, 0.2, 0.21, 0.25, 0.3, 0.45, 0.6)
FIXED = ("ours-gptq-int4b32-clip", "ours-gptq-int4ch-clip")
OV_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def first_line(e: Exception) -> str:
    """The error's type and its informative lines: OpenVINO puts the cause (the op and what it
    does not support) after its own frames, so lines that say "support" come first."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    cause = [x for x in lines if "support" in x.lower() or "no conversion rule" in x.lower()]
    rest = [x for x in lines if x not in cause]
    return f"{type(e).__name__}: " + " | ".join(cause + rest)[:700]


def openvino_check(path: Path, feeds: list[dict], ort_outputs: list[list[np.ndarray]]) -> dict:
    """Read and compile `path` with OpenVINO (CPU), run `feeds`, compare every output with ONNX
    Runtime's (`ort_outputs`, same order). {"error": message} when OpenVINO refuses the model."""
    try:
        import openvino as ov
    except ImportError:
        return {"error": "openvino is not installed"}
    result = {"version": ov.__version__}
    core = ov.Core()
    for name, cfg in (("default", {}), ("exact", OV_EXACT)):
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
            diffs, cosines = [], []
            for feed, want in zip(feeds, ort_outputs):
                got = compiled(feed)
                for k, w in enumerate(want):
                    g = np.asarray(got[k], dtype=np.float64).reshape(-1)
                    w = np.asarray(w, dtype=np.float64).reshape(-1)
                    diffs.append(float(np.max(np.abs(g - w))) if g.size else 0.0)
                    cosines.append(float(g @ w / max(np.linalg.norm(g) * np.linalg.norm(w), 1e-30)))
            result[name] = {"max_abs_diff": max(diffs), "min_cosine": min(cosines),
                            "mean_cosine": float(np.mean(cosines)), "feeds": len(feeds)}
        except Exception as e:  # OpenVINO raises its own RuntimeError subclasses; the message is the result
            result[name] = {"error": first_line(e)}
    return result


def ort_outputs(path: Path, feeds: list[dict], accuracy_level: str | None) -> list[list[np.ndarray]]:
    s = bq.session(path, accuracy_level)
    return [s.run(None, f) for f in feeds]


def cosines(emb: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(np.sum(emb * reference, axis=1)))


def minilm_point(name: str, path: Path, base: int, val, reference, ov_feeds: int, ours: bool, extra=None) -> dict:
    """One MiniLM row: checker, size, cosines through ONNX Runtime, OpenVINO against ONNX Runtime."""
    onnx.checker.check_model(str(path), full_check=True)
    row = {"run": name, "who": "ours" if ours else "ort", "bytes": path.stat().st_size,
           "size": path.stat().st_size / base, "checker": "full check passed"}
    row["cos"] = cosines(bq.embeddings(path, val), reference)
    row["cos_f"] = cosines(bq.embeddings(path, val, "0"), reference) if ours else row["cos"]
    feeds = val[:ov_feeds]
    row["openvino"] = openvino_check(path, feeds, ort_outputs(path, feeds, "0" if ours else None))
    row.update(extra or {})
    return row


def ours_compress(model: Path, dst: Path, method: str, target: float, calib, val_small, decode: str = "load") -> dict:
    """`compress()` as `onnxcompress MODEL --method M --size-target T --decode D` does; the report's figures."""
    t0 = time.perf_counter()
    report = compress(model, dst, config=Config(method=method, size_target=target, force=True, decode=decode),
                      calib=calib, val=val_small)
    formats: dict[str, int] = {}
    for r in report.sections.get("quantized", []):
        formats[r["format"]] = formats.get(r["format"], 0) + 1
    out = onnx.load(str(dst), load_external_data=False)
    return {"method": method, "size_target": target, "reached": report.allocation.get("reached"),
            "formats": formats, "other_entries": sum(1 for e in report.plan.entries if e.method != "quant"),
            "opset": next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx")),
            "seconds": round(time.perf_counter() - t0, 1)}


def minilm_tasks(args) -> list[tuple[str, object]]:
    """(kind, argument) per unit of work: an ORT quantizer, one `compress()` size target, or all
    fixed-format runs (they share one calibration)."""
    tasks = [("ort", name) for name in args.ort]
    tasks += [("compress", (method, t)) for method, targets in (("quant", args.targets), ("auto", args.auto_targets))
              for t in targets]
    if args.fixed:
        tasks.append(("fixed", tuple(args.fixed)))
    return tasks


def minilm_task(task, args, reference) -> list[dict]:
    """Make and measure the models of one task (`minilm_tasks`); runs in a worker process."""
    kind, arg = task
    bench = args.bench / "minilm"
    src = bench / "model.onnx"
    base = src.stat().st_size
    out = args.out / "minilm"
    out.mkdir(parents=True, exist_ok=True)
    val = [load_feed(p) for p in feed_files(bench / "val", args.val_limit)]
    rows = []

    def add(name, make, ours):
        dst = out / f"{name}.onnx"
        t0 = time.perf_counter()
        try:
            extra = make(dst) or {}
            extra.setdefault("seconds", round(time.perf_counter() - t0, 1))
            row = minilm_point(name, dst, base, val, reference, args.ov_feeds, ours, extra)
        except Exception as e:  # one run failing must not lose the others: it is a row
            row = {"run": name, "who": "ours" if ours else "ort", "failed": first_line(e)}
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
        if not args.keep and dst.exists():
            dst.unlink()

    if kind == "ort":
        add(arg, lambda dst: bq.ort_model(arg, src, dst), ours=False)
    elif kind == "compress":
        method, t = arg
        calib = limited(bench / "calib", args.calib_limit)
        add(f"ours-{method}-size{t:g}", lambda dst: ours_compress(src, dst, method, t, calib, val[:args.compress_val], args.decode),
            ours=True)
    else:
        prepared = bq.prepare(src, bench / "calib", args.calib_limit)
        for name in arg:
            add(name, lambda dst, n=name: bq.make(n, prepared, src, dst), ours=True)
    return rows


def run_minilm(args) -> list[dict]:
    """Every MiniLM task, `--jobs` at a time (each a process of its own), against one reference."""
    bench = args.bench / "minilm"
    val = [load_feed(p) for p in feed_files(bench / "val", args.val_limit)]
    reference = bq.embeddings(bench / "model.onnx", val)
    tasks = minilm_tasks(args)
    if args.jobs <= 1:
        return [r for t in tasks for r in minilm_task(t, args, reference)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = [pool.submit(minilm_task, t, args, reference) for t in tasks]
        return [r for f in done for r in f.result()]


def checks_minilm(rows: list[dict], key: str = "cos") -> dict:
    """At every size an ORT quantizer reaches, the best of ours at that size or smaller, and
    whether it is higher; the headline (ours >= 0.99 at <= 1/8 of the file)."""
    ok = [r for r in rows if "failed" not in r]
    ours = [r for r in ok if r["who"] == "ours"]
    per = []
    for o in sorted((r for r in ok if r["who"] == "ort"), key=lambda r: r["size"]):
        fits = [r for r in ours if r["size"] <= o["size"]]
        best = max(fits, key=lambda r: r[key], default=None)
        per.append({"ort": o["run"], "size": o["size"], "ort_cos": o[key],
                    "ours": best and best["run"], "ours_size": best and best["size"], "ours_cos": best and best[key],
                    "higher": bool(best is not None and best[key] > o[key])})
    small = [r for r in ours if r["size"] <= 1 / 8]
    head = max(small, key=lambda r: r[key], default=None)
    return {"measure": key, "every_ort_size": all(p["higher"] for p in per), "per_ort_run": per,
            "headline": {"ours": head and head["run"], "size": head and head["size"], "cos": head and head[key],
                         "met": bool(head is not None and head[key] >= 0.99)}}


def run_ocr(args, log) -> dict:
    """RapidOCR recognition at ORT int8's file size."""
    bench = args.bench / "ocr_rec"
    src = bench / "model.onnx"
    base = src.stat().st_size
    out = args.out / "ocr_rec"
    out.mkdir(parents=True, exist_ok=True)
    files = feed_files(bench / "val", args.ocr_val_limit)
    truth = load_truth(bench / "val")
    feeds = [load_feed(p) for p in files[:args.ov_feeds]]
    result: dict = {"n": len(files)}
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(str(src), str(out / "ort-refused.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        result["ort_on_original"] = "accepted"
    except Exception as e:
        result["ort_on_original"] = first_line(e)
    norm = out / "normalized.onnx"
    onnx.save(normalize(load_model(src)), str(norm))
    ort_path = out / "ort-dynamic-int8.onnx"
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(norm), str(ort_path), weight_type=QuantType.QInt8, per_channel=True)
    rows = []

    def point(name, path, who, extra=None):
        onnx.checker.check_model(str(path), full_check=True)
        metric = ocr_rec_metric(src, path, files, truth)
        row = {"run": name, "who": who, "bytes": path.stat().st_size, "size": path.stat().st_size / base,
               "char_agreement": metric["char_agreement"], "line_agreement": metric["line_agreement"],
               "cer_comp_vs_truth": metric.get("cer_comp_vs_truth"), "cer_orig_vs_truth": metric.get("cer_orig_vs_truth"),
               "checker": "full check passed", **(extra or {})}
        row["openvino"] = openvino_check(path, feeds, ort_outputs(path, feeds, None))
        rows.append(row)
        log(row)
        return row

    ort_row = point("ort-dynamic-int8 (normalized)", ort_path, "ort")
    calib = limited(bench / "calib", args.calib_limit)
    val_small = [load_feed(p) for p in files[:args.compress_val]]
    target = ort_row["size"]
    for attempt in range(4):  # the graph is not weights: lower the target until the file fits
        dst = out / f"ours-quant-size{target:.4f}.onnx"
        extra = ours_compress(src, dst, "quant", target, calib, val_small, args.decode)
        size = dst.stat().st_size
        if size <= ort_row["bytes"] or attempt == 3:
            break
        dst.unlink()
        target *= min(ort_row["bytes"] / size, 0.995)
    ours_row = point(f"ours-quant-size{target:.4f}", dst, "ours", extra)
    result["rows"] = rows
    result["check"] = {"ours_size_le_ort": ours_row["bytes"] <= ort_row["bytes"],
                       "char_agreement": ours_row["char_agreement"],
                       "met": ours_row["bytes"] <= ort_row["bytes"] and ours_row["char_agreement"] >= 0.99}
    if not args.keep:
        for p in out.glob("*.onnx"):
            p.unlink()
    return result


def plot(rows: list[dict], path: Path) -> Path | None:
    """File size (% of the original) against mean cosine: ours (at ORT's default session) as a
    line over the size targets plus fixed formats, each ORT quantizer as a marker."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "failed" not in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    curve = sorted((r for r in ok if r["run"].startswith("ours-quant-size")), key=lambda r: r["size"])
    if curve:
        ax.plot([100 * r["size"] for r in curve], [r["cos"] for r in curve], "o-", color="tab:blue",
                label="onnxcompress --method quant --size-target T")
        ax.plot([100 * r["size"] for r in curve], [r["cos_f"] for r in curve], ".:", color="tab:blue", alpha=0.6,
                label="same, ORT float activations (level 0)")
    for r in ok:
        if r["who"] == "ours" and not r["run"].startswith("ours-quant-size"):
            mark = "^" if r["run"].startswith("ours-auto") else "D"
            ax.scatter(100 * r["size"], r["cos"], marker=mark, color="tab:cyan", zorder=3)
            ax.annotate(r["run"].replace("ours-", ""), (100 * r["size"], r["cos"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")
    for r in ok:
        if r["who"] == "ort":
            ax.scatter(100 * r["size"], r["cos"], marker="s", color="tab:red", zorder=3)
            ax.annotate(r["run"].replace("ort-", "ORT "), (100 * r["size"], r["cos"]), fontsize=7, color="tab:red",
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(100 / 8, color="grey", lw=0.8, ls="--")
    ax.axhline(0.99, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("file size, % of the original (90.4 MB)")
    ax.set_ylabel("mean cosine to the original (held-out sentences)")
    ax.set_title("all-MiniLM-L6-v2: onnxcompress quantization (blue) vs ONNX Runtime (red)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, default=Path("build/bench"))
    ap.add_argument("--out", type=Path, default=Path("build/bench_size"))
    ap.add_argument("--targets", type=floats, default=list(TARGETS))
    ap.add_argument("--auto-targets", type=floats, default=[])
    ap.add_argument("--fixed", type=names, default=list(FIXED))
    ap.add_argument("--ort", type=names, default=list(bq.ORT_RUNS))
    ap.add_argument("--decode", choices=("load", "run"), default="load",
                    help="ours: --decode (load: Cast and Mul folded at load; run: DequantizeLinear)")
    ap.add_argument("--calib-limit", type=int, default=256)
    ap.add_argument("--val-limit", type=int, default=512)
    ap.add_argument("--ocr-val-limit", type=int, default=256)
    ap.add_argument("--compress-val", type=int, default=16, help="feeds compress() validates on itself")
    ap.add_argument("--ov-feeds", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=3, help="MiniLM models made and measured at once")
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--no-ocr", action="store_true")
    ap.add_argument("--plot", type=Path, default=None, help="default: OUT/minilm-quant.png")
    ap.add_argument("--keep", action="store_true", help="keep the models in --out")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None,
                    help="no runs: the checks, table, JSON and plot from the JSON lines an earlier run printed")
    args = ap.parse_args(argv)
    if args.from_log:
        return from_log(args)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def log(row):
        print(json.dumps(row, default=str), flush=True)

    result: dict = {"versions": versions()}
    if not args.no_minilm:
        rows = run_minilm(args)
        result["minilm"] = {"rows": rows, "check": checks_minilm(rows, "cos"), "check_float": checks_minilm(rows, "cos_f")}
        result["minilm"]["plot"] = str(plot(rows, args.plot or args.out / "minilm-quant.png"))
    if not args.no_ocr:
        result["ocr_rec"] = run_ocr(args, log)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    summary(result)
    return 0


def from_log(args) -> int:
    """Rebuild results.json, the checks and the plot from the rows (JSON lines) a run printed,
    e.g. when it was stopped before its end: nothing is run again."""
    minilm, ocr = [], []
    for path in args.from_log:
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "run" in row:
                (ocr if "char_agreement" in row else minilm).append(row)
    result: dict = {"versions": versions(), "from_log": [str(p) for p in args.from_log]}
    if minilm:
        result["minilm"] = {"rows": minilm, "check": checks_minilm(minilm, "cos"),
                            "check_float": checks_minilm(minilm, "cos_f")}
        result["minilm"]["plot"] = str(plot(minilm, args.plot or args.out / "minilm-quant.png"))
    if ocr:
        o = next(r for r in ocr if r["who"] == "ort")
        m = max((r for r in ocr if r["who"] == "ours"), key=lambda r: r["char_agreement"], default=None)
        result["ocr_rec"] = {"ort_on_original": "see the run's log", "rows": ocr, "check": m and {
            "ours_size_le_ort": m["bytes"] <= o["bytes"], "char_agreement": m["char_agreement"],
            "met": m["bytes"] <= o["bytes"] and m["char_agreement"] >= 0.99}}
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    summary(result)
    return 0


def versions() -> dict:
    import onnxruntime
    v = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino
        v["openvino"] = openvino.__version__
    except ImportError:
        v["openvino"] = None
    return v


def _ov(r: dict) -> str:
    ov = r.get("openvino", {})
    parts = []
    for k in ("default", "exact"):
        x = ov.get(k, {})
        parts.append("refused" if "error" in x else f"{x.get('max_abs_diff', float('nan')):.2g}")
    return "/".join(parts) if ov and "error" not in ov else "n/a"


def summary(result: dict) -> None:
    if "minilm" in result:
        print(f"\n{'MiniLM run':34s} {'size':>7s} {'cos':>8s} {'cos_f':>8s}  OV maxdiff default/exact")
        for r in sorted((r for r in result["minilm"]["rows"] if "failed" not in r), key=lambda r: r["size"]):
            print(f"{r['run']:34s} {100 * r['size']:6.2f}% {r['cos']:8.4f} {r['cos_f']:8.4f}  {_ov(r)}")
        for r in result["minilm"]["rows"]:
            if "failed" in r:
                print(f"{r['run']:34s} failed: {r['failed']}")
        for key in ("check", "check_float"):
            c = result["minilm"][key]
            print(f"[{c['measure']}] ours higher at every ORT size: {c['every_ort_size']}; "
                  f"headline >= 0.99 at <= 1/8: {c['headline']}")
            for p in c["per_ort_run"]:
                print(f"    {p['ort']:22s} {100 * p['size']:6.2f}% {p['ort_cos']:.4f}  vs  {p['ours']} "
                      f"{100 * (p['ours_size'] or 0):6.2f}% {p['ours_cos'] or float('nan'):.4f}  higher={p['higher']}")
    if "ocr_rec" in result:
        o = result["ocr_rec"]
        print(f"\nRapidOCR rec (quantize_dynamic on the original: {o['ort_on_original']})")
        for r in o.get("rows", []):
            print(f"{r['run']:34s} {100 * r['size']:6.2f}% chars {r['char_agreement']:.4f} "
                  f"lines {r['line_agreement']:.3f}  OV {_ov(r)}")
        print(f"check: {o.get('check')}")


if __name__ == "__main__":
    sys.exit(main())
