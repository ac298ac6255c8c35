"""A small decoder block with random weights, exported with torch, compressed end to end.

    python tools/decoder_block.py --out build/decoder [--keep 0.75]

The block is what modern decoders are made of: RMSNorm, multi-head causal self-attention written
out as PyTorch models do (Linear, view into heads, transpose, Q K^T / sqrt(d), mask, softmax,
@ V, merge the heads, output Linear) and a SwiGLU feed-forward block (down(silu(gate(h)) *
up(h))), each with a residual. It is exported with the TorchScript exporter at a fixed shape
(so the head Reshapes have constant targets), then compressed twice with the library: keeping
everything (the outputs must be the original's) and at `--keep` (the attention heads and the
gated channels are pruned; the mean cosine to the original's outputs is printed). Prints one
JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

SHAPE = (2, 16)   # batch, sequence
WIDTH, HEADS, HIDDEN = 64, 4, 160


def make_block(seed: int = 0):
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    class Block(nn.Module):
        def __init__(self, d: int = WIDTH, heads: int = HEADS, hidden: int = HIDDEN, seq: int = SHAPE[1]):
            super().__init__()
            self.heads, self.size = heads, d // heads
            self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.down = nn.Linear(hidden, d, bias=False)
            self.register_buffer("mask", torch.triu(torch.full((1, 1, seq, seq), -1e4), diagonal=1))

        def forward(self, x):
            b, s, d = x.shape
            h = self.norm1(x)
            q = self.q(h).view(b, s, self.heads, self.size).transpose(1, 2)
            k = self.k(h).view(b, s, self.heads, self.size).permute(0, 2, 3, 1)
            v = self.v(h).view(b, s, self.heads, self.size).transpose(1, 2)
            p = torch.softmax(q @ k / math.sqrt(self.size) + self.mask, dim=-1)
            x = x + self.o((p @ v).transpose(1, 2).reshape(b, s, d))
            h = self.norm2(x)
            return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))

    torch.manual_seed(seed)
    return Block().eval()


def export(path: Path, seed: int = 0) -> Path:
    """Export the block (random weights from `seed`) to `path` at the fixed SHAPE."""
    import torch

    block = make_block(seed)
    x = torch.randn(*SHAPE, WIDTH)
    with torch.no_grad():
        torch.onnx.export(block, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False)
    return path


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((*SHAPE, WIDTH)).astype(np.float32)} for _ in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the models and reports")
    parser.add_argument("--keep", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import onnxruntime as ort
    from onnxcompress import Config, compress

    args.out.mkdir(parents=True, exist_ok=True)
    src = export(args.out / "decoder.onnx", args.seed)
    calib, val = feeds(48, 1), feeds(8, 2)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    for keep in (1.0, args.keep):
        out = args.out / f"decoder.keep{keep:g}.onnx"
        report = compress(src, out, config=Config(keep=keep, force=True), calib=calib, val=val)
        new = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        diffs, cosines = [], []
        for feed in val:
            a, b = ref.run(None, feed)[0].astype(np.float64), new.run(None, feed)[0].astype(np.float64)
            diffs.append(float(np.abs(a - b).max()))
            a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
            cosines.append(float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))))
        print(json.dumps({"keep": keep, "groups": [{"producers": g["producers"], "kept": g["kept"],
                                                      "channels": g["channels"]} for g in report.groups],
                          "skipped": len(report.skipped), "params": report.params, "flops": report.flops,
                          "max_abs_diff": max(diffs), "mean_cosine": float(np.mean(cosines))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
