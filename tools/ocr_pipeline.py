"""Character agreement through RapidOCR's own pipeline, with a compressed model swapped in.

    python tools/ocr_pipeline.py --det build/bench/ocr_det/runs/ocr_det-adhoc.onnx [--rec ...] [--pages 64]

Renders `--pages` text pages (tools/ocr_data.py's renderer, a seed of their own, so none is a
calibration or validation page), runs rapidocr_onnxruntime 1.4.4 end to end (detection, angle
classification, recognition, its own pre- and post-processing) once with its stock models and
once with the given model(s) in their place, and compares the recognized text of each page
(lines in reading order, one per line): character agreement = 1 - sum of edit distances /
sum of the original texts' lengths. The same with every space removed from both texts first
(`char_agreement_without_spaces`): how much of the disagreement is where the recognizer puts word
breaks, which moves with the crop a detection box gives it. Also the character error rate of
both against the rendered text. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ocr_data  # noqa: E402
from bench_metrics import edit_distance  # noqa: E402


def page_text(result) -> str:
    """RapidOCR's lines in reading order (top to bottom, then left to right), one per line."""
    if not result:
        return ""
    lines = sorted(result, key=lambda r: (min(p[1] for p in r[0]), min(p[0] for p in r[0])))
    return "\n".join(r[1] for r in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--det", type=Path, help="detection model to use instead of RapidOCR's")
    parser.add_argument("--rec", type=Path, help="recognition model to use instead of RapidOCR's")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--seed", default="pipeline")
    args = parser.parse_args(argv)

    from rapidocr_onnxruntime import RapidOCR

    swapped = {}
    if args.det:
        swapped["det_model_path"] = str(args.det)
    if args.rec:
        swapped["rec_model_path"] = str(args.rec)
    stock, mine = RapidOCR(), RapidOCR(**swapped)
    rng, fonts, words = random.Random(args.seed), ocr_data.check_fonts(), ocr_data.word_list()
    dist = length = dist_o = dist_c = truth_len = dist_ns = length_ns = 0
    for _ in range(args.pages):
        img, _, texts = ocr_data.render_page(rng, words, fonts)
        a, b = page_text(stock(img)[0]), page_text(mine(img)[0])
        truth = "\n".join(texts)
        dist += edit_distance(a, b)
        length += len(a)
        dist_ns += edit_distance(a.replace(" ", ""), b.replace(" ", ""))
        length_ns += len(a.replace(" ", ""))
        dist_o += edit_distance(truth, a)
        dist_c += edit_distance(truth, b)
        truth_len += len(truth)
    print(json.dumps({"pages": args.pages, "swapped": swapped,
                      "char_agreement": 1 - dist / max(length, 1),
                      "char_agreement_without_spaces": 1 - dist_ns / max(length_ns, 1),
                      "cer_orig_vs_truth": dist_o / max(truth_len, 1),
                      "cer_comp_vs_truth": dist_c / max(truth_len, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
