"""Do smooth-trained models compress better? (seed 001's claim, on rendered glyphs.)

    nice -n 10 python tools/smooth_study.py [--out build/smooth_study] [--seeds 3] [--epochs 6]

One command, CPU, one thread. Steps:

1. Data: the 10 digits and 26 capital letters rendered with every DejaVu font in
   /usr/share/fonts/truetype/dejavu (Debian's fonts-dejavu-core), 32x32 grey, each sample
   augmented (random scale, rotation within +-15 degrees, shift within +-3 pixels, Gaussian
   noise). Fixed seeds; train / calibration / test sets are drawn independently.
2. Model: 3 Conv-BatchNorm-ReLU-MaxPool blocks (16, 32, 64 channels) and a Gemm head
   (1024 -> 128 -> 36). Trained twice per seed, identically except for the loss: "plain"
   (cross-entropy) and "smooth" (cross-entropy + the penalties of `onnxcompress.smooth`:
   nuclear norm and first / second differences along output channels and kernel taps).
3. Both exported with `onnxcompress.smooth.export_onnx` and compressed through the CLI
   (`python -m onnxcompress`) with --method svd, aasvd and id at several --params-target levels,
   calibrated on the calibration set; test accuracy of every result on the test set.
4. Writes OUT/smooth_study.json (every run, and the per-level summary: mean and standard
   deviation over seeds) and OUT/smooth_study.png (test accuracy against parameters kept).

Each finished model is kept in OUT/VARIANT_sSEED.json and reused, so an interrupted study resumes
where it stopped, and `--only-seed N` runs one seed (for example, seeds in parallel processes; a
final run without it summarizes).

torch and matplotlib are tool-time dependencies (`pip install 'onnxcompress[torch]' matplotlib`).
"""
from __future__ import annotations

import argparse
import json
import os
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FONTS = Path("/usr/share/fonts/truetype/dejavu")
CLASSES = string.digits + string.ascii_uppercase
SIZE = 32
METHODS = ("svd", "aasvd", "id")
LEVELS = (0.8, 0.6, 0.45, 0.3, 0.2)
#: penalty weights of the smooth runs (per term; sums over all Conv and Gemm weights)
PENALTIES = {"nuclear": 1e-3, "first": 1e-3, "second": 1e-3}


def fonts() -> list[Path]:
    found = sorted(p for p in FONTS.glob("DejaVu*.ttf") if "Math" not in p.name)
    if not found:
        sys.exit(f"no DejaVu fonts in {FONTS}: apt-get install -y fonts-dejavu-core")
    return found


def render(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, 1, 32, 32) float32 in [0, 1] plus noise, y (N,) int64), N = 36 * n_per_class."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    faces = fonts()
    xs, ys = [], []
    for label, ch in enumerate(CLASSES):
        for _ in range(n_per_class):
            font = ImageFont.truetype(str(faces[rng.integers(len(faces))]), int(rng.integers(18, 27)))
            canvas = Image.new("L", (48, 48), 0)
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            draw.text(((48 - right - left) / 2, (48 - bottom - top) / 2), ch, fill=255, font=font)
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
            dx, dy = rng.integers(-3, 4, size=2)
            crop = canvas.crop((8 + dx, 8 + dy, 8 + dx + SIZE, 8 + dy + SIZE))
            img = np.asarray(crop, dtype=np.float32) / 255.0
            img = img + rng.normal(0.0, 0.1, img.shape).astype(np.float32)
            xs.append(img[None])
            ys.append(label)
    return np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64)


def make_cnn(torch):
    nn = torch.nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(),
                         nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, len(CLASSES)))


def train(torch, data, seed: int, smooth: bool, epochs: int) -> tuple[object, dict]:
    from onnxcompress.smooth import Penalties, add_penalties

    torch.manual_seed(seed)
    x, y = (torch.from_numpy(a) for a in data)
    model = make_cnn(torch)
    penalties = Penalties(**PENALTIES) if smooth else Penalties()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss = add_penalties(loss, model, penalties)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        terms = {k: float(v) for k, v in Penalties(nuclear=1, first=1, second=1).terms(model).items()}
    return model, {"train_seconds": time.perf_counter() - start, "penalty_terms": terms}


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"input": x[i:i + 512]})[0] for i in range(0, len(x), 512)])
    return float(np.mean(np.argmax(logits, axis=1) == y))


def compress(model: Path, out: Path, calib: Path, method: str, level: float) -> dict:
    """One CLI run; returns the report (params before / after) or raises on failure."""
    report = out.with_suffix(".report.json")
    cmd = [sys.executable, "-m", "onnxcompress", str(model), str(out), "--calib", str(calib),
           "--method", method, "--params-target", str(level), "--report", str(report), "--force", "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> exit {done.returncode}: {done.stderr.strip()}")
    return json.loads(report.read_text())


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation (ddof=1) of test accuracy and parameters over seeds."""
    keys = sorted({(r["variant"], r["method"], r["level"]) for r in runs},
                  key=lambda k: (k[1], -k[2], k[0]))
    rows = []
    for variant, method, level in keys:
        sel = [r for r in runs if (r["variant"], r["method"], r["level"]) == (variant, method, level)]
        acc = np.array([r["accuracy"] for r in sel])
        frac = np.array([r["params_after"] / r["params_before"] for r in sel])
        rows.append({"variant": variant, "method": method, "level": level, "seeds": len(sel),
                     "accuracy_mean": float(acc.mean()),
                     "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "params_fraction_mean": float(frac.mean())})
    return rows


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(4.2 * len(METHODS), 3.6), sharey=True)
    for ax, method in zip(axes, METHODS):
        for variant, colour in (("plain", "tab:blue"), ("smooth", "tab:orange")):
            rows = sorted((r for r in summary if r["method"] in (method, "none") and r["variant"] == variant),
                          key=lambda r: r["params_fraction_mean"])
            ax.errorbar([r["params_fraction_mean"] for r in rows], [r["accuracy_mean"] for r in rows],
                        yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3, color=colour,
                        label=variant)
        ax.set_title(f"--method {method}")
        ax.set_xlabel("parameters kept (fraction)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean +- sd over seeds)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "build" / "smooth_study")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--per-class", type=int, default=300, help="training samples per class")
    ap.add_argument("--only-seed", type=int, help="train and compress this seed only, no summary "
                    "(finished models are kept in OUT/VARIANT_sSEED.json and reused by later runs)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))

    args.out.mkdir(parents=True, exist_ok=True)
    train_set = render(args.per_class, seed=1)
    calib_x, _ = render(30, seed=2)
    test_x, test_y = render(60, seed=3)
    calib = args.out / "calib.npz"
    np.savez(calib, input=calib_x)
    print(f"data: train {len(train_set[1])}, calib {len(calib_x)}, test {len(test_y)}, "
          f"{len(fonts())} fonts, {len(CLASSES)} classes", flush=True)

    runs, trained = [], []
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    for seed in seeds:
        for variant in ("plain", "smooth"):
            done = args.out / f"{variant}_s{seed}.json"       # finished models are not redone
            if not done.exists():
                done.write_text(json.dumps(one_model(torch, train_set, calib, test_x, test_y, seed,
                                                     variant, args)))
            record = json.loads(done.read_text())
            trained.append(record["trained"])
            runs.extend(record["runs"])
    if args.only_seed is not None:
        return 0
    summary = summarize(runs)
    result = {"classes": CLASSES, "fonts": [f.name for f in fonts()], "epochs": args.epochs,
              "seeds": args.seeds, "penalties": PENALTIES, "levels": LEVELS, "trained": trained,
              "runs": runs, "summary": summary}
    (args.out / "smooth_study.json").write_text(json.dumps(result, indent=1))
    plot(summary, args.out / "smooth_study.png")
    print(table(summary))
    return 0


def one_model(torch, train_set, calib, test_x, test_y, seed, variant, args) -> dict:
    """Train, export, measure, and compress one model at every method and level."""
    from onnxcompress.smooth import export_onnx

    model, info = train(torch, train_set, seed, variant == "smooth", args.epochs)
    path = export_onnx(model, args.out / f"{variant}_s{seed}.onnx", test_x[:8])
    base = accuracy(path, test_x, test_y)
    n = sum(p.numel() for p in model.parameters())
    trained = {"variant": variant, "seed": seed, "accuracy": base, "params": n, **info}
    runs = [{"variant": variant, "seed": seed, "method": "none", "level": 1.0,
             "accuracy": base, "params_before": n, "params_after": n}]
    print(f"{variant} seed {seed}: test accuracy {base:.4f} "
          f"({info['train_seconds']:.0f} s, terms {info['penalty_terms']})", flush=True)
    for method in METHODS:
        for level in LEVELS:
            out = args.out / f"{variant}_s{seed}_{method}_{level}.onnx"
            report = compress(path, out, calib, method, level)
            acc = accuracy(out, test_x, test_y)
            runs.append({"variant": variant, "seed": seed, "method": method, "level": level,
                         "accuracy": acc, "params_before": report["params"]["before"],
                         "params_after": report["params"]["after"]})
            print(f"  {method} {level}: accuracy {acc:.4f}, params "
                  f"{report['params']['after']}/{report['params']['before']}", flush=True)
            out.unlink()
    return {"trained": trained, "runs": runs}


def table(summary: list[dict]) -> str:
    """Markdown: one row per method and level, plain vs smooth accuracy (mean +- sd)."""
    lines = ["| method | --params-target | params kept plain / smooth | plain acc. | smooth acc. |",
             "|---|---|---|---|---|"]
    index = {(r["variant"], r["method"], r["level"]): r for r in summary}
    for (variant, method, level), p in sorted(index.items(), key=lambda kv: (kv[0][1] != "none", kv[0][1], -kv[0][2])):
        if variant != "plain":
            continue
        s = index[("smooth", method, level)]
        lines.append(f"| {method} | {level} | {p['params_fraction_mean']:.3f} / {s['params_fraction_mean']:.3f} | "
                     f"{p['accuracy_mean']:.4f} +- {p['accuracy_std']:.4f} | "
                     f"{s['accuracy_mean']:.4f} +- {s['accuracy_std']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
