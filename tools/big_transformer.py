"""A decoder transformer of a few billion parameters, end to end: build, compress, check, measure.

    python tools/big_transformer.py [--dir build/transformer] [--layers 35] [--width 4096]
        [--ffn 1024] [--seq 32] [--keep 0.75] [--include gate] [--stats-memory MIB] [--keep-files]

Builds a decoder-style transformer with random float32 weights as `transformer.onnx` +
`transformer.onnx.data`, streaming one block of rows at a time into the data file, so the builder
never holds the weights. input_ids [batch, --seq] (int64) -> Gather embedding
(vocab 32000) -> `--layers` x [LayerNormalization, causal multi-head self-attention written out
with MatMul / Reshape / Transpose / Mul / Add (mask) / Softmax, residual Add; LayerNormalization,
gated feed-forward down(silu(gate(h)) * up(h)) with Sigmoid / Mul, residual Add] ->
LayerNormalization -> MatMul to the vocabulary (logits). With the defaults (35 layers, width
4096, 32 heads of 128, feed-forward width 1024): 3.05e9 parameters, 12.2 GB of weights. Weights
are N(0, 1/fan_in), so activations stay finite.

Then, in a fresh process, `onnxcompress.compress(...)` at `--keep`: ID on the channel groups whose
producer matches `--include` (default: the feed-forward groups, `gate`), calibrated a block of
groups at a time within `--stats-memory` MiB of statistics per pass. The process's peak resident
memory (ru_maxrss from wait4: anonymous memory plus the pages of memory-mapped weight files that
were resident at the time) is compared with the weights' size, and VmRSS and RssAnon sampled
every 10 ms per stage say where it goes. The mapped pages are the page cache's: under memory
pressure the kernel drops some and ru_maxrss stays below what an idle machine would show, so the
bound that holds on any machine is also printed: the peak anonymous memory (what the process
itself allocates) plus the weights' size (every mapped page resident at once). Then, in another process, the output passes the full ONNX checker (from
the file, so external data is followed) and runs in ONNX Runtime. Prints one JSON line.

Needs about 3x the weights' size in free disk under --dir. Nothing here runs in the test suite.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
VOCAB, HEAD = 32000, 128

_spec = importlib.util.spec_from_file_location("big_model", Path(__file__).with_name("big_model.py"))
big_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(big_model)

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import onnxcompress.api as api
from onnxcompress import Config

peaks, anon, current = {}, {}, ["start"]

def rss(key="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

def sample():  # resident memory every 10 ms, per stage (and between stages): all, and anonymous only
    while True:
        label = current[0]
        peaks[label] = max(peaks.get(label, 0), rss())
        anon[label] = max(anon.get(label, 0), rss("RssAnon"))
        time.sleep(0.01)

class PeakTimer(api.StageTimer):
    def __call__(self, stage):
        inner = super().__call__(stage)
        class Ctx:
            def __enter__(_):
                current[0] = stage
                return inner.__enter__()
            def __exit__(_, *exc):
                peaks[stage] = max(peaks.get(stage, 0), rss())
                current[0] = "after " + stage
                return inner.__exit__(*exc)
        return Ctx()

threading.Thread(target=sample, daemon=True).start()
api.StageTimer = PeakTimer
model, out, calib, val, config, result = sys.argv[1:7]
report = api.compress(model, out, config=Config(**json.loads(config)), calib=calib, val=val)
Path(result).write_text(json.dumps({
    "stage_peaks": peaks, "stage_anon_peaks": anon, "seconds": report.seconds, "params": report.params,
    "groups": len(report.groups), "kept": sorted({(g["kept"], g["channels"]) for g in report.groups}),
    "skipped": len(report.skipped), "passes": report.data.get("calibration_passes", 1), "agreement": report.agreement, "warnings": report.warnings}))
"""

CHECK = r"""
import json, sys
import numpy as np, onnx, onnxruntime as ort
path, val = sys.argv[1], sys.argv[2]
onnx.checker.check_model(path, full_check=True)
opts = ort.SessionOptions()
opts.add_session_config_entry("session.disable_prepacking", "1")
s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
ids = np.load(val)["input_ids"][:1]
y = s.run(None, {"input_ids": ids})[0]
print(json.dumps({"checker": True, "runs": True, "output_shape": list(y.shape),
                  "finite": bool(np.all(np.isfinite(y)))}))
"""


POOL = 2**24  # float32 normal draws behind every weight (64 MiB); each block starts at a random offset


class Builder:
    """Nodes and initializers of the graph; large weights go to the open data file.

    Drawing 3e9 normal numbers would take most of the build on a busy machine, so each weight is
    written a block of rows at a time from a pool of 2^24 draws, rolled by a fresh random offset
    per block and scaled by 1/sqrt(fan-in): rows differ, columns are not collinear."""

    def __init__(self, f, data_name: str, seed: int):
        self.f, self.data_name = f, data_name
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(POOL, dtype=np.float32)
        self.nodes, self.inits, self.weight_bytes, self.params = [], [], 0, 0

    def weight(self, name: str, rows: int, cols: int) -> str:
        """A (rows, cols) float32 weight of N(0, 1/cols) entries, streamed into the data file."""
        f = self.f
        f.write(b"\0" * ((-f.tell()) % big_model.ALIGN))
        offset = f.tell()
        step = max(1, (POOL // 2) // cols)
        for start in range(0, rows, step):
            n = min(step, rows - start) * cols
            at = int(self.rng.integers(0, POOL - n + 1))
            f.write((self.pool[at:at + n] * np.float32(1 / np.sqrt(cols))).tobytes())
        t = onnx.TensorProto()
        t.name, t.data_type = name, TensorProto.FLOAT
        t.dims.extend((rows, cols))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        self.weight_bytes += rows * cols * 4
        self.params += rows * cols
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        if value.dtype == np.float32:
            self.weight_bytes += value.nbytes
            self.params += value.size
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name


def layer(b: Builder, x: str, i: int, width: int, ffn: int, heads: int) -> str:
    p = f"l{i}."
    ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
    h = b.node("LayerNormalization", [x, b.const(p + "ln1.scale", ones), b.const(p + "ln1.bias", zeros)],
               p + "ln1", axis=-1)
    q, k, v = (b.node("MatMul", [h, b.weight(p + n + ".weight", width, width)], p + n) for n in ("q", "k", "v"))
    split = b.const(p + "heads", np.array([0, 0, heads, HEAD], np.int64))
    q = b.node("Transpose", [b.node("Reshape", [q, split], p + "q.heads")], p + "q.t", perm=[0, 2, 1, 3])
    k = b.node("Transpose", [b.node("Reshape", [k, split], p + "k.heads")], p + "k.t", perm=[0, 2, 3, 1])
    v = b.node("Transpose", [b.node("Reshape", [v, split], p + "v.heads")], p + "v.t", perm=[0, 2, 1, 3])
    s = b.node("Mul", [b.node("MatMul", [q, k], p + "qk"), "scale"], p + "scaled")
    att = b.node("Softmax", [b.node("Add", [s, "mask"], p + "masked")], p + "softmax", axis=-1)
    a = b.node("Transpose", [b.node("MatMul", [att, v], p + "av")], p + "av.t", perm=[0, 2, 1, 3])
    a = b.node("Reshape", [a, b.const(p + "merge", np.array([0, 0, width], np.int64))], p + "merged")
    x = b.node("Add", [x, b.node("MatMul", [a, b.weight(p + "o.weight", width, width)], p + "o")], p + "res1")
    h = b.node("LayerNormalization", [x, b.const(p + "ln2.scale", ones), b.const(p + "ln2.bias", zeros)],
               p + "ln2", axis=-1)
    gate = b.node("MatMul", [h, b.weight(p + "gate.weight", width, ffn)], p + "gate")
    up = b.node("MatMul", [h, b.weight(p + "up.weight", width, ffn)], p + "up")
    silu = b.node("Mul", [gate, b.node("Sigmoid", [gate], p + "sigmoid")], p + "silu")
    m = b.node("Mul", [silu, up], p + "gated")
    down = b.node("MatMul", [m, b.weight(p + "down.weight", ffn, width)], p + "down")
    return b.node("Add", [x, down], p + "res2")


def build(directory: Path, layers: int, width: int, ffn: int, seq: int = 32, seed: int = 0) -> tuple[Path, int, int]:
    """Write transformer.onnx + transformer.onnx.data; return (path, bytes of weights, parameters).

    Every weight matrix is stored (in, out) as MatMul reads it, so ONNX Runtime uses the mapped
    bytes as they are (no transposed copy)."""
    path, data_name = directory / "transformer.onnx", "transformer.onnx.data"
    heads = width // HEAD
    with open(directory / data_name, "wb") as f:
        b = Builder(f, data_name, seed)
        b.const("scale", np.array(1 / np.sqrt(HEAD), np.float32))
        b.inits.append(numpy_helper.from_array(np.triu(np.full((1, 1, seq, seq), -1e4, np.float32), 1), "mask"))
        x = b.node("Gather", [b.weight("embed.weight", VOCAB, width), "input_ids"], "embed", axis=0)
        for i in range(layers):
            x = layer(b, x, i, width, ffn, heads)
        ones, zeros = np.ones(width, np.float32), np.zeros(width, np.float32)
        h = b.node("LayerNormalization", [x, b.const("ln_f.scale", ones), b.const("ln_f.bias", zeros)], "ln_f", axis=-1)
        b.node("MatMul", [h, b.weight("lm_head.weight", width, VOCAB)], "logits")
    graph = helper.make_graph(
        b.nodes, "decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", seq, VOCAB])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))  # the weights already point at the data file
    return path, b.weight_bytes, b.params


def write_feeds(directory: Path, calib: int, val: int, seq: int = 32) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    paths = directory / "calib.npz", directory / "val.npz"
    for p, n in zip(paths, (calib, val)):
        np.savez(p, input_ids=rng.integers(0, VOCAB, (n, seq), dtype=np.int64))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "transformer")
    p.add_argument("--layers", type=int, default=35)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--seq", type=int, default=32, help="tokens per sequence (fixed: the causal mask is a constant)")
    p.add_argument("--calib", type=int, default=4, help="calibration sequences")
    p.add_argument("--val", type=int, default=1, help="validation sequences")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--stats-memory", type=int, default=None, help="MiB of statistics per calibration pass "
                   "(default: the package's 256 MiB)")
    p.add_argument("--include", default="gate", help="compress only the groups whose producer matches "
                   "(default: the feed-forward groups)")
    p.add_argument("--keep-files", action="store_true", help="leave the models under --dir")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, weights, params = build(args.dir, args.layers, args.width, args.ffn, args.seq)
    calib, val = write_feeds(args.dir, args.calib, args.val, args.seq)
    build_s = time.perf_counter() - t0

    out, result = args.dir / "transformer.compressed.onnx", args.dir / "result.json"
    config = {"keep": args.keep, "force": True, "batch_size": args.batch_size, "stats_memory": args.stats_memory,
              "include": args.include}
    code, peak, seconds = big_model.run_measured([sys.executable, "-c", CHILD, str(model), str(out), str(calib),
                                                  str(val), json.dumps(config), str(result)])
    line = {"params": params, "weights_bytes": weights, "build_s": round(build_s, 1), "config": config,
            "compress_exit": code, "compress_s": round(seconds, 1), "peak_rss_bytes": peak,
            "peak_over_weights": round(peak / weights, 3), "target_over_weights": 1.5,
            "peak_below_target": peak < 1.5 * weights}
    if code == 0:
        r = json.loads(result.read_text())
        data = out.with_name(out.name + ".data")
        line.update({
            "output_bytes": out.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "params_after": r["params"].get("after"), "groups": r["groups"], "kept": r["kept"], "calibration_passes": r["passes"],
            "skipped": r["skipped"], "cosine": [a["cosine"] for a in r["agreement"]],
            "top1": [a["top1"] for a in r["agreement"]],
            "anon_peak_bytes": max(r["stage_anon_peaks"].values()),
            "anon_peak_plus_weights_over_weights": round(max(r["stage_anon_peaks"].values()) / weights + 1, 3),
            "stage_peak_bytes": r["stage_peaks"], "stage_anon_peak_bytes": r["stage_anon_peaks"], "stage_seconds": {k: round(v, 1) for k, v in r["seconds"].items()}})
        t1 = time.perf_counter()
        check = subprocess.run([sys.executable, "-c", CHECK, str(out), str(val)], capture_output=True, text=True)
        line["check"] = (json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0
                         else {"error": (check.stderr.strip().splitlines() or ["?"])[-1][:300]})
        line["check_s"] = round(time.perf_counter() - t1, 1)
    print(json.dumps(line))
    if not args.keep_files:
        shutil.rmtree(args.dir, ignore_errors=True)
    ok = code == 0 and line.get("check", {}).get("runs") and line["peak_below_target"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
