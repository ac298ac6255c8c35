"""A model over 2 GB, end to end: build, compress, check, and measure peak memory.

    python tools/big_model.py [--dir build/big] [--inputs 65536] [--hidden 6144] [--keep 0.75]

Builds x[N, inputs] -> Gemm hidden -> Relu -> Gemm hidden -> Relu -> Gemm inputs (random float32
weights, > 2 GB with the defaults: 3.4 GB) as `big.onnx` + `big.onnx.data`, streaming one tensor
at a time so the builder never holds the weights. Then, each in a fresh process:

1. `onnxcompress.compress(...)` at `--keep` with a small calibration set; the process's peak
   resident memory (ru_maxrss from wait4) is compared with the weights' size (target: below 3x),
   and the peak resident memory seen in every stage (VmRSS sampled every 10 ms) says where
   memory goes;
2. the checks: the output is written with external data, passes the full ONNX checker (from the
   file, so external data is followed), and runs in ONNX Runtime with the original's output shape.

Prints one JSON line. Needs about 4x the weights' size in free disk under --dir and, for the
compression, the peak it measures in RAM. Nothing here runs in the test suite.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parent.parent
ALIGN = 4096

CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import onnxcompress.api as api
from onnxcompress import Config

peaks, hwm, current = {}, {}, ["start"]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

def rss():
    return status("VmRSS")

def sample():  # resident memory every 10 ms, per stage (and between stages)
    while True:
        label = current[0]
        peaks[label] = max(peaks.get(label, 0), rss())
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
                hwm[stage] = status("VmHWM")
                current[0] = "after " + stage
                return inner.__exit__(*exc)
        return Ctx()

threading.Thread(target=sample, daemon=True).start()
api.StageTimer = PeakTimer
model, out, calib, keep, result = sys.argv[1:6]
report = api.compress(model, out, config=Config(keep=float(keep), force=True), calib=calib)
Path(result).write_text(json.dumps({
    "stage_peaks": peaks, "hwm_after_stage": hwm, "seconds": report.seconds, "params": report.params,
    "groups": [(g["group"], g["kept"], g["channels"]) for g in report.groups],
    "agreement": report.agreement, "file_size": report.file_size}))
"""

CHECK = r"""
import json, sys
import numpy as np, onnx, onnxruntime as ort
path, calib, n_out = sys.argv[1], sys.argv[2], int(sys.argv[3])
onnx.checker.check_model(path, full_check=True)
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
x = np.load(calib)["x"][:2]
y = s.run(None, {"x": x})[0]
print(json.dumps({"checker": True, "runs": True, "output_shape": list(y.shape),
                  "finite": bool(np.all(np.isfinite(y))), "expected_shape": [2, n_out]}))
"""


def write_weight(f, rng: np.random.Generator, shape: tuple[int, int], name: str, data_name: str) -> onnx.TensorProto:
    """Append a random float32 (fan-in scaled) tensor to the open data file `f`, row block by
    row block, and return its external-data TensorProto."""
    pad = (-f.tell()) % ALIGN
    f.write(b"\0" * pad)
    offset = f.tell()
    rows, cols = shape
    step = max(1, (64 * 2**20) // (4 * cols))
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        block *= np.float32(1 / np.sqrt(cols))
        f.write(block.tobytes())
    t = onnx.TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(rows * cols * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def build(directory: Path, inputs: int, hidden: int, seed: int = 0) -> tuple[Path, int]:
    """Write big.onnx + big.onnx.data; return (path, bytes of weights)."""
    rng = np.random.default_rng(seed)
    path, data_name = directory / "big.onnx", "big.onnx.data"
    layers = [("fc1", hidden, inputs), ("fc2", hidden, hidden), ("fc3", inputs, hidden)]
    inits, nodes, cur, total = [], [], "x", 0
    with open(directory / data_name, "wb") as f:
        for k, (name, n_out, n_in) in enumerate(layers):
            inits.append(write_weight(f, rng, (n_out, n_in), f"{name}.weight", data_name))
            bias = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
            inits.append(onnx.numpy_helper.from_array(bias, f"{name}.bias"))
            total += n_out * n_in * 4 + bias.nbytes
            out = f"{name}.out" if k == len(layers) - 1 else f"{name}.pre"
            nodes.append(helper.make_node("Gemm", [cur, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1))
            if k < len(layers) - 1:
                nodes.append(helper.make_node("Relu", [out], [f"{name}.act"], name=f"{name}.relu"))
                cur = f"{name}.act"
    graph = helper.make_graph(nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", inputs])],
                              [helper.make_tensor_value_info("fc3.out", TensorProto.FLOAT, ["N", inputs])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))  # the weights already point at big.onnx.data
    return path, total


def run_measured(argv: list[str]) -> tuple[int, int, float]:
    """Run argv in a child; return (exit code, peak RSS bytes of the child, seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "big")
    p.add_argument("--inputs", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=6144)
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--keep-files", action="store_true", help="leave the models under --dir")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, weights = build(args.dir, args.inputs, args.hidden)
    calib = args.dir / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((args.samples, args.inputs), dtype=np.float32))
    build_s = time.perf_counter() - t0

    out, result = args.dir / "big.compressed.onnx", args.dir / "result.json"
    code, peak, seconds = run_measured([sys.executable, "-c", CHILD, str(model), str(out), str(calib),
                                        str(args.keep), str(result)])
    line = {"weights_bytes": weights, "over_2gb": weights > 2**31, "build_s": round(build_s, 1),
            "compress_exit": code, "compress_s": round(seconds, 1), "peak_rss_bytes": peak,
            "peak_over_weights": round(peak / weights, 2), "target_over_weights": 3.0,
            "peak_below_target": peak < 3 * weights}
    if code == 0:
        r = json.loads(result.read_text())
        data = out.with_name(out.name + ".data")
        line.update({
            "output_external_data": data.exists() and any(
                onnx.external_data_helper.uses_external_data(t)
                for t in onnx.load(str(out), load_external_data=False).graph.initializer),
            "output_bytes": out.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "params": r["params"], "groups": r["groups"],
            "cosine": [a["cosine"] for a in r["agreement"]],
            "stage_peak_bytes": r["stage_peaks"], "high_water_after_stage": r["hwm_after_stage"], "stage_seconds": {k: round(v, 1) for k, v in r["seconds"].items()}})
        check = subprocess.run([sys.executable, "-c", CHECK, str(out), str(calib), str(args.inputs)],
                               capture_output=True, text=True)
        line["check"] = (json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0
                         else {"error": (check.stderr.strip().splitlines() or ["?"])[-1][:300]})
    print(json.dumps(line))
    if not args.keep_files:
        shutil.rmtree(args.dir, ignore_errors=True)
    ok = code == 0 and line.get("output_external_data") and line.get("check", {}).get("runs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
