"""Task metrics for the real-model benchmark (docs/measuring.md).

Each metric runs an original and a compressed ONNX model with ONNX Runtime on the same held-out
feeds (a directory of ``.npz`` files written by ``tools/real_models.py prepare``, one feed per
file, batch dimension 1) and returns a flat dict of floats.

    python tools/bench_metrics.py NAME ORIGINAL.onnx COMPRESSED.onnx VAL_DIR [--truth JSON]

NAME is one of minilm, ocr_det, ocr_rec, ocr_cls, magika. Ground truth is read from
``VAL_DIR/../val_truth.json`` unless ``--truth`` says otherwise. Passing the original model twice
gives the baseline (original against ground truth; agreement figures are then 1 by construction).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]
TRUTH_FILE = "val_truth.json"
DET_THRESH = 0.3  # RapidOCR's DBPostProcess "thresh" for the probability map


# ---------------------------------------------------------------------------------------------
# feeds and sessions


def feed_files(directory: Path, limit: int | None = None) -> list[Path]:
    """Sorted ``*.npz`` files in a feed directory (sorted names = the order ground truth uses)."""
    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz feeds in {directory}")
    return files[:limit] if limit else files


def load_feed(path: Path) -> Feed:
    """One feed: ``{input_name: array}`` with batch dimension 1 on every array."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def make_session(model: Path | str):
    """A CPU ONNX Runtime session with default threading and warnings silenced."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def paired_outputs(
    original: Path, compressed: Path, files: list[Path]
) -> Iterator[tuple[Path, Feed, np.ndarray, np.ndarray]]:
    """Yield ``(file, feed, first output of original, first output of compressed)`` per feed.

    Streams one feed at a time so large outputs (detection maps) never pile up. When both paths
    are the same file the model runs once and the output is yielded twice.
    """
    same = Path(original).resolve() == Path(compressed).resolve()
    sess_o = make_session(original)
    sess_c = sess_o if same else make_session(compressed)
    for path in files:
        feed = load_feed(path)
        out_o = sess_o.run(None, feed)[0]
        out_c = out_o if same else sess_c.run(None, feed)[0]
        yield path, feed, out_o, out_c


def time_one_pass(model: Path, files: list[Path]) -> float:
    """Seconds for one ONNX Runtime pass over ``files`` (one feed per run, after one warm-up)."""
    import time

    sess = make_session(model)
    feeds = [load_feed(p) for p in files]
    sess.run(None, feeds[0])
    start = time.perf_counter()
    for feed in feeds:
        sess.run(None, feed)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# MiniLM: sentence embeddings


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask-weighted mean over tokens: hidden [B, S, H], mask [B, S] -> [B, H]."""
    weights = mask.astype(np.float64)[:, :, None]
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of x [N, H] scaled to unit L2 norm."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def minilm_metric(original, compressed, files, truth) -> dict:
    """Cosine between original and compressed mean-pooled embeddings, per sentence, and the
    Spearman correlation of the two pairwise cosine-similarity matrices (upper triangle)."""
    from scipy.stats import spearmanr

    emb_o, emb_c = [], []
    for _, feed, out_o, out_c in paired_outputs(original, compressed, files):
        emb_o.append(mean_pool(out_o, feed["attention_mask"])[0])
        emb_c.append(mean_pool(out_c, feed["attention_mask"])[0])
    a, b = _unit_rows(np.array(emb_o)), _unit_rows(np.array(emb_c))
    cos = (a * b).sum(axis=1)
    upper = np.triu_indices(len(a), k=1)
    rho = spearmanr((a @ a.T)[upper], (b @ b.T)[upper]).statistic if len(a) > 2 else float("nan")
    return {
        "n": len(a),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "p05_cosine": float(np.percentile(cos, 5)),
        "spearman_pairwise": float(rho),
    }


# ---------------------------------------------------------------------------------------------
# OCR recognition: CTC text


def rec_characters(model: Path) -> list[str]:
    """CTC alphabet of a PP-OCR rec model: blank, the ``character`` metadata lines, then space
    (the same order rapidocr_onnxruntime's CTCLabelDecode builds)."""
    meta = make_session(model).get_modelmeta().custom_metadata_map
    if "character" not in meta:
        raise KeyError(f"{model} has no 'character' metadata; is it the PP-OCR rec model?")
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_greedy_decode(probs: np.ndarray, chars: list[str]) -> str:
    """Greedy CTC decode of probs [T, C] (C = len(chars)): argmax per step, merge repeats,
    drop blank (index 0)."""
    idx = probs.argmax(axis=-1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    return "".join(chars[i] for i in idx[keep])


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute costs)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(hyps: list[str], refs: list[str]) -> float:
    """Corpus character error rate: total edit distance / total reference length."""
    edits = sum(edit_distance(h, r) for h, r in zip(hyps, refs))
    return edits / max(sum(len(r) for r in refs), 1)


def _nospace(texts: list[str]) -> list[str]:
    return [t.replace(" ", "") for t in texts]


def ocr_rec_metric(original, compressed, files, truth) -> dict:
    """CER of original and compressed text against the rendered ground truth (with and without
    spaces), CER of compressed against original, and characters agreeing = 1 - that CER."""
    chars = rec_characters(original)
    text_o, text_c, refs = [], [], []
    for path, _, out_o, out_c in paired_outputs(original, compressed, files):
        text_o.append(ctc_greedy_decode(out_o[0], chars))
        text_c.append(ctc_greedy_decode(out_c[0], chars))
        if truth is not None:
            refs.append(truth[path.name])
    result = {"n": len(text_o), "cer_comp_vs_orig": cer(text_c, text_o)}
    result["char_agreement"] = 1.0 - result["cer_comp_vs_orig"]
    result["line_agreement"] = float(np.mean([a == b for a, b in zip(text_o, text_c)]))
    if refs:
        result["cer_orig_vs_truth"] = cer(text_o, refs)
        result["cer_comp_vs_truth"] = cer(text_c, refs)
        result["cer_orig_vs_truth_nospace"] = cer(_nospace(text_o), _nospace(refs))
        result["cer_comp_vs_truth_nospace"] = cer(_nospace(text_c), _nospace(refs))
        result["line_exact_orig_vs_truth"] = float(np.mean([a == b for a, b in zip(text_o, refs)]))
    return result


# ---------------------------------------------------------------------------------------------
# OCR direction classifier and magika: top-1 labels


def _top1_metric(original, compressed, files, truth, truth_key: str) -> dict:
    """Top-1 agreement of original vs compressed scores [1, K]; accuracy of both against
    ``truth[file][truth_key]`` (an integer class index) when ground truth is given."""
    top_o, top_c, ref = [], [], []
    for path, _, out_o, out_c in paired_outputs(original, compressed, files):
        top_o.append(int(out_o[0].argmax()))
        top_c.append(int(out_c[0].argmax()))
        if truth is not None:
            ref.append(int(truth[path.name][truth_key]))
    top_o, top_c = np.array(top_o), np.array(top_c)
    result = {"n": len(top_o), "top1_agreement": float((top_o == top_c).mean())}
    if ref:
        result[f"orig_vs_{truth_key}"] = float((top_o == np.array(ref)).mean())
        result[f"comp_vs_{truth_key}"] = float((top_c == np.array(ref)).mean())
    return result


def ocr_cls_metric(original, compressed, files, truth) -> dict:
    """Top-1 agreement of the 0/180 degree classifier; accuracy against the rendered rotation."""
    return _top1_metric(original, compressed, files, truth, "rotation_class")


def magika_metric(original, compressed, files, truth) -> dict:
    """Top-1 label agreement; both models against magika's own deep-learning label (sanity)."""
    return _top1_metric(original, compressed, files, truth, "magika_class")


# ---------------------------------------------------------------------------------------------
# OCR detection: probability maps


def box_mask(shape: tuple[int, int], boxes: list[list[float]]) -> np.ndarray:
    """Boolean [H, W] mask that is True inside the axis-aligned boxes [x0, y0, x1, y1]."""
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0), 0) : int(np.ceil(y1)), max(int(x0), 0) : int(np.ceil(x1))] = True
    return mask


def det_truth_scores(binary: np.ndarray, boxes: list[list[float]]) -> tuple[float, float]:
    """(line recall, pixel precision) of a thresholded map [H, W] against text-line boxes.

    A line counts as found when at least half of its box's columns hold a text pixel (DB maps
    mark a shrunk band inside each line). Precision is the share of text pixels that fall inside
    some box grown by 4 pixels.
    """
    found = []
    for x0, y0, x1, y1 in boxes:
        patch = binary[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
        found.append(patch.any(axis=0).mean() >= 0.5 if patch.size else False)
    grown = [[x0 - 4, y0 - 4, x1 + 4, y1 + 4] for x0, y0, x1, y1 in boxes]
    inside = binary & box_mask(binary.shape, grown)
    precision = inside.sum() / binary.sum() if binary.any() else 1.0
    return float(np.mean(found)) if found else 1.0, float(precision)


def ocr_det_metric(original, compressed, files, truth) -> dict:
    """Mean IoU of the maps [1, 1, H, W] thresholded at 0.3 (original vs compressed), mean
    absolute difference of the maps, and line recall / pixel precision against the rendered boxes."""
    ious, maes, scores_o, scores_c = [], [], [], []
    for path, _, out_o, out_c in paired_outputs(original, compressed, files):
        bin_o, bin_c = out_o[0, 0] > DET_THRESH, out_c[0, 0] > DET_THRESH
        union = (bin_o | bin_c).sum()
        ious.append((bin_o & bin_c).sum() / union if union else 1.0)
        maes.append(float(np.abs(out_o - out_c).mean()))
        if truth is not None:
            boxes = truth[path.name]["boxes"]
            scores_o.append(det_truth_scores(bin_o, boxes))
            scores_c.append(det_truth_scores(bin_c, boxes))
    result = {"n": len(ious), "iou_vs_orig": float(np.mean(ious)), "map_mae": float(np.mean(maes))}
    for tag, scores in (("orig", scores_o), ("comp", scores_c)):
        if scores:
            result[f"line_recall_{tag}_vs_truth"] = float(np.mean([s[0] for s in scores]))
            result[f"pixel_precision_{tag}_vs_truth"] = float(np.mean([s[1] for s in scores]))
    return result


# ---------------------------------------------------------------------------------------------
# entry points

METRICS: dict[str, Callable[..., dict]] = {
    "minilm": minilm_metric,
    "ocr_det": ocr_det_metric,
    "ocr_rec": ocr_rec_metric,
    "ocr_cls": ocr_cls_metric,
    "magika": magika_metric,
}


def load_truth(val_dir: Path, truth: Path | None = None) -> dict | None:
    """Ground truth keyed by feed file name: ``truth`` or ``val_dir/../val_truth.json``."""
    path = Path(truth) if truth else Path(val_dir).parent / TRUTH_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def compute_metric(
    name: str, original, compressed, val_dir, truth: Path | None = None, limit: int | None = None
) -> dict:
    """The task metric of model ``name`` for ``compressed`` against ``original`` on ``val_dir``."""
    if name not in METRICS:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(METRICS)}")
    files = feed_files(Path(val_dir), limit)
    return METRICS[name](Path(original), Path(compressed), files, load_truth(val_dir, truth))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(METRICS))
    parser.add_argument("original", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("val_dir", type=Path)
    parser.add_argument("--truth", type=Path, help="ground truth JSON (default: beside val_dir)")
    parser.add_argument("--limit", type=int, help="use only the first N feeds")
    args = parser.parse_args(argv)
    result = compute_metric(
        args.name, args.original, args.compressed, args.val_dir, args.truth, args.limit
    )
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
