"""Rendered text data for the PP-OCR models of rapidocr-onnxruntime (used by real_models.py).

Text lines and pages are drawn with PIL in the DejaVu fonts, so the ground truth is known, and
preprocessed exactly as rapidocr_onnxruntime 1.4.4 does before each model:

* rec: resize to height 48 keeping the aspect ratio, width int(48 * max(320/48, w/h)) (the batch
  max width for a batch of one), scale to [-1, 1], zero-pad on the right -> [1, 3, 48, W].
* cls: resize to height 48, width min(ceil(48 w/h), 192), scale to [-1, 1], pad -> [1, 3, 48, 192].
* det: scale so the short side is 736, round both sides to multiples of 32, (x/255 - 0.5) / 0.5
  -> [1, 3, H, W].

Images are BGR uint8, as cv2.imread gives them to RapidOCR.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
CORE_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)  # all in fonts-dejavu-core
MODEL_KEYS = {"ocr_det": "Det", "ocr_rec": "Rec", "ocr_cls": "Cls"}
REC_SHAPE, CLS_SHAPE = (3, 48, 320), (3, 48, 192)
DET_SIDE, DET_MEAN, DET_STD = 736, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
PAGE_SIZES = ((640, 480), (512, 512), (480, 640))  # (width, height)
PUNCT = ",.;:!?-()%/"


class FontsMissing(RuntimeError):
    """No DejaVu font found; the message holds the apt-get command."""


def check_fonts() -> list[Path]:
    """The DejaVu core fonts present; raise FontsMissing with the apt command if there are none."""
    fonts = [FONT_DIR / name for name in CORE_FONTS if (FONT_DIR / name).exists()]
    if not fonts:
        raise FontsMissing(
            f"DejaVu fonts are missing ({FONT_DIR} has none of {', '.join(CORE_FONTS)}).\n"
            "  install them with: apt-get install -y fonts-dejavu-core"
        )
    return fonts


def package_dir() -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).resolve().parent


def copy_model(name: str, dest: Path) -> Path:
    """Copy the model ``name`` (ocr_det/ocr_rec/ocr_cls) named in the package's config.yaml."""
    import yaml

    config = yaml.safe_load((package_dir() / "config.yaml").read_text(encoding="utf-8"))
    src = package_dir() / config[MODEL_KEYS[name]]["model_path"]
    shutil.copyfile(src, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# text and rendering


def word_list() -> list[str]:
    """Sorted distinct whole words of 2-12 ASCII letters in the pydoc_data help topics."""
    from pydoc_data.topics import topics

    return sorted({w for text in topics.values() for w in re.findall(r"\b[A-Za-z]{2,12}\b", text)})


def number_text(rng: random.Random) -> str:
    """A number-like string: integer, decimal, date, time, money or percentage."""
    forms = (
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 7))),
        lambda: f"{rng.uniform(0, 1000):.2f}",
        lambda: f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1950, 2030)}",
        lambda: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        lambda: f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}",
        lambda: f"{rng.randint(0, 100)}%",
    )
    return rng.choice(forms)()


def random_text(rng: random.Random, words: list[str], max_words: int) -> str:
    """A line of 1..max_words tokens: words (lower, Capitalized or UPPER), numbers and some
    punctuation. Every character is in the PP-OCR alphabet."""
    tokens = []
    for _ in range(rng.randint(1, max_words)):
        r = rng.random()
        if r < 0.7:
            word = rng.choice(words)
            tokens.append(rng.choice((word.lower(), word.lower(), word.capitalize(), word.upper())))
        elif r < 0.9:
            tokens.append(number_text(rng))
        else:
            tokens.append(rng.choice(words).lower() + rng.choice(PUNCT))
    return " ".join(tokens)


def _colors(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dark ink, light background) RGB colors."""
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    paper = tuple(rng.randint(200, 255) for _ in range(3))
    return ink, paper


def render_line(rng: random.Random, text: str, fonts: list[Path]) -> np.ndarray:
    """One text line, tightly cropped with a 2-10 px margin: BGR uint8 [h, w, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(22, 40))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = rng.randint(2, 10), rng.randint(2, 10)
    ink, paper = _colors(rng)
    image = Image.new("RGB", (right - left + 2 * pad_x, bottom - top + 2 * pad_y), paper)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    return np.asarray(image)[:, :, ::-1].copy()


def render_page(rng: random.Random, words: list[str], fonts: list[Path]):
    """A page of left-aligned-ish text lines: (BGR uint8 [H, W, 3], boxes [x0, y0, x1, y1] of
    the inked area per line, texts)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = rng.choice(PAGE_SIZES)
    ink, paper = _colors(rng)
    image = Image.new("RGB", (width, height), paper)
    draw, boxes, texts, y = ImageDraw.Draw(image), [], [], rng.randint(8, 30)
    while True:
        font = ImageFont.truetype(str(rng.choice(fonts)), rng.randint(16, 34))
        text = random_text(rng, words, 8)
        while font.getlength(text) > width - 20 and " " in text:
            text = text.rsplit(" ", 1)[0]
        left, top, right, bottom = font.getbbox(text)
        if y + bottom - top > height - 8 or right - left > width - 20:
            break
        x = rng.randint(10, width - 10 - (right - left))
        draw.text((x - left, y - top), text, font=font, fill=ink)
        boxes.append([x, y, x + right - left, y + bottom - top])
        texts.append(text)
        y += bottom - top + rng.randint(6, 30)
    return np.asarray(image)[:, :, ::-1].copy(), boxes, texts


# ---------------------------------------------------------------------------------------------
# RapidOCR preprocessing (mirrors rapidocr_onnxruntime 1.4.4)


def _pad_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize BGR [h, w, 3] to ``height`` x min(ceil(height*w/h), width), scale to [-1, 1],
    zero-pad on the right: float32 [3, height, width] (resize_norm_img of rec and cls)."""
    import cv2

    ratio = img.shape[1] / float(img.shape[0])
    resized_w = min(math.ceil(height * ratio), width)
    resized = cv2.resize(img, (resized_w, height)).astype("float32")
    resized = resized.transpose((2, 0, 1)) / 255
    resized -= 0.5
    resized /= 0.5
    padded = np.zeros((3, height, width), dtype=np.float32)
    padded[:, :, :resized_w] = resized
    return padded


def rec_input(img: np.ndarray) -> np.ndarray:
    """TextRecognizer for a batch of one: float32 [1, 3, 48, int(48 * max(320/48, w/h))]."""
    _, height, width = REC_SHAPE
    max_wh_ratio = max(width / height, img.shape[1] / float(img.shape[0]))
    return _pad_resize(img, height, int(height * max_wh_ratio))[None]


def cls_input(img: np.ndarray) -> np.ndarray:
    """TextClassifier: float32 [1, 3, 48, 192]."""
    return _pad_resize(img, CLS_SHAPE[1], CLS_SHAPE[2])[None]


def det_input(img: np.ndarray) -> np.ndarray:
    """DetPreProcess(limit_side_len=736, limit_type='min'): float32 [1, 3, H, W] with the short
    side scaled up to 736 (never down) and both sides rounded to multiples of 32."""
    import cv2

    h, w = img.shape[:2]
    ratio = DET_SIDE / min(h, w) if min(h, w) < DET_SIDE else 1.0
    resize_h, resize_w = round(int(h * ratio) / 32) * 32, round(int(w * ratio) / 32) * 32
    resized = cv2.resize(img, (resize_w, resize_h))
    norm = (resized.astype("float32") * (1 / 255.0) - np.array(DET_MEAN)) / np.array(DET_STD)
    return norm.transpose((2, 0, 1))[None].astype(np.float32)


# ---------------------------------------------------------------------------------------------
# samples


def samples(name: str, count: int, seed: str) -> Iterator[tuple[np.ndarray, object]]:
    """``count`` (model input, ground truth) pairs for ``name``, deterministic in ``seed``.

    rec: truth = the line's text. cls: half the lines turned by 180 degrees, truth = {"text",
    "rotation", "rotation_class"} (class 0 = '0', 1 = '180'). det: truth = {"boxes" in input
    pixels, "texts"}.
    """
    rng, words, fonts = random.Random(f"{seed}-{name}"), word_list(), check_fonts()
    for _ in range(count):
        if name == "ocr_det":
            yield page_sample(rng, words, fonts)
        elif name == "ocr_rec":
            text = random_text(rng, words, 6)
            yield rec_input(render_line(rng, text, fonts)), text
        else:
            text = random_text(rng, words, 3)
            img, turned = render_line(rng, text, fonts), rng.random() < 0.5
            img = np.ascontiguousarray(img[::-1, ::-1]) if turned else img
            truth = {"text": text, "rotation": 180 if turned else 0, "rotation_class": int(turned)}
            yield cls_input(img), truth


def page_sample(rng: random.Random, words: list[str], fonts: list[Path]):
    """A rendered page as det input and its line boxes scaled to the input's pixels."""
    img, boxes, texts = render_page(rng, words, fonts)
    x = det_input(img)
    sy, sx = x.shape[2] / img.shape[0], x.shape[3] / img.shape[1]
    scaled = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in boxes]
    return x, {"boxes": scaled, "texts": texts}


def self_check(name: str, n: int = 8) -> dict:
    """Compare this module's preprocessing with RapidOCR's own code on ``n`` rendered samples:
    max abs difference of the model inputs (0 expected); for rec also the share of lines where
    RapidOCR's own TextRecognizer reads the same text as greedy decoding of our input."""
    from rapidocr_onnxruntime import RapidOCR

    engine, rng, fonts, words = RapidOCR(), random.Random("self-check"), check_fonts(), word_list()
    diffs, same_text = [], []
    for _ in range(n):
        if name == "ocr_det":
            img = render_page(rng, words, fonts)[0]
            theirs = engine.text_det.get_preprocess(max(img.shape[:2]))(img)
            diffs.append(np.abs(det_input(img) - theirs).max())
            continue
        img = render_line(rng, random_text(rng, words, 6), fonts)
        if name == "ocr_cls":
            diffs.append(np.abs(cls_input(img) - engine.text_cls.resize_norm_img(img)[None]).max())
            continue
        ratio = max(REC_SHAPE[2] / REC_SHAPE[1], img.shape[1] / img.shape[0])
        diffs.append(
            np.abs(rec_input(img) - engine.text_rec.resize_norm_img(img, ratio)[None]).max()
        )
        same_text.append(engine.text_rec([img])[0][0][0] == _decode(engine, rec_input(img)))
    result = {"preprocess_max_diff_vs_rapidocr": float(max(diffs))}
    if same_text:
        result["rec_text_same_as_rapidocr"] = float(np.mean(same_text))
    return result


def _decode(engine, x: np.ndarray) -> str:
    """Greedy CTC text of rec input x [1, 3, 48, W] through RapidOCR's own session, decoded with
    the alphabet in the model metadata (as tools/bench_metrics.py does)."""
    from bench_metrics import ctc_greedy_decode

    chars = ["blank", *engine.text_rec.session.get_character_list(), " "]
    return ctc_greedy_decode(engine.text_rec.session(x)[0][0], chars)
