"""Peak memory (RSS, from /usr/bin/time) of the command line on hostile files under 100 MB: a
zip bomb, an .npy whose header lies, huge declared input dims without --calib, a 30000-wide
layer, 100 groups of 3000 channels (their Grams would take 6.7 GiB side by side), and an honest
96 MB .npy beside a small honest run for scale. Each case runs in its own
process; the files are built in a temporary folder (about 130 MB, removed at the end).

    python tools/hostile_memory.py
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import graphs  # noqa: E402


def zip_bomb(path: Path, rows: int) -> None:
    """An .npz whose member `x` holds rows x 16 float32 zeros, deflated (a few MB on disk)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (rows, 16)})
            left = rows * 64
            while left:
                n = min(left, 16 * 2**20)
                f.write(bytes(n))
                left -= n


def lying_npy(path: Path) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**7, 10**7, 16)})
        f.write(bytes(64))


def build(d: Path) -> dict[str, list]:
    np.savez(d / "c.npz", x=graphs.sample_inputs([("x", (16,))], 40)["x"])
    onnx.save(graphs.mlp(), str(d / "m.onnx"))
    zip_bomb(d / "bomb.npz", 100_000_000)  # 6.4 GB of zeros
    lying_npy(d / "lie.npy")
    m = graphs.mlp()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**8
    onnx.save(m, str(d / "huge.onnx"))
    onnx.save(graphs.parallel_mlps(1, 30000), str(d / "wide.onnx"))
    onnx.save(graphs.parallel_mlps(100, 3000), str(d / "many.onnx"))
    rng = np.random.default_rng(0)
    np.save(d / "big_ok.npy", rng.standard_normal((1_500_000, 16)).astype(np.float32))
    return {"baseline (honest small run)": [d / "m.onnx", "--calib", d / "c.npz"],
            "zip bomb (6.4 GB declared)": [d / "m.onnx", "--calib", d / "bomb.npz"],
            "npy lying header (6.4 PB)": [d / "m.onnx", "--calib", d / "lie.npy"],
            "huge dims, no --calib": [d / "huge.onnx"],
            "30000-wide layer, id": [d / "wide.onnx", "--calib", d / "c.npz"],
            "30000-wide layer, aasvd": [d / "wide.onnx", "--calib", d / "c.npz", "--method", "aasvd"],
            "100 groups of 3000 channels": [d / "many.onnx", "--calib", d / "c.npz"],
            "honest 96 MB .npy": [d / "m.onnx", "--calib", d / "big_ok.npy"]}


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="hostile-memory-"))
    try:
        cases = build(d)
        sizes = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
        print("file bytes:", sizes)
        for name, (model, *rest) in cases.items():
            out = d / "o.onnx"
            out.unlink(missing_ok=True)
            cmd = ["/usr/bin/time", "-f", "%M %e", sys.executable, "-m", "onnxcompress", model, out, *rest, "-q"]
            r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines = r.stderr.strip().splitlines()
            message = lines[0][:110] if len(lines) > 1 else ""
            rss, seconds = lines[-1].split()
            print(f"{name:30s} exit {r.returncode}  peak RSS {int(rss) / 1024:6.0f} MiB  {float(seconds):6.1f} s  {message}")
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
