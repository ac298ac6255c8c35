"""Validate: run the original and the compressed model on the same held-out feeds and measure how
far their outputs agree. Returns data; printing is the report's job.

Per output: max |y - y'|, relative L2 error ||y - y'|| / ||y|| over all feeds, mean cosine over
samples (axis 0 of each feed, flattened), and, for outputs that look like scores, top-1 agreement
(argmax over the last axis). Integer outputs (labels, indices) get exact-match agreement.

Padding: with the model's attention-mask input (`calibrate.mask_input`), positions where the mask
is 0 are left out of every figure for token-major outputs ([batch, sequence, ...], rank 3 or
more, the mask's shape in front): both models' values there are set to 0 (no error, no norm, no
part of a sample's cosine) and they are not counted for top-1 or exact-match agreement.

With labels (`Labels`: one integer class per validation sample, in feed order), the labelled
output's accuracy, argmax over its last axis against the labels, is measured for both models.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .calibrate import Progress
from .runtime import make_session, run
from .errors import DataError
from .graph import GraphIndex

_PASS_OPS = {"Reshape", "Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Cast"}


@dataclass(frozen=True)
class Agreement:
    output: str
    samples: int
    max_abs: float
    rel_l2: float
    cosine: float | None
    top1: float | None
    accuracy: dict | None = None  # with labels: {"labels", "samples", "original", "compressed"}

    @property
    def score(self) -> float:
        """The figure the gate reads: top-1 agreement where defined, else cosine."""
        if self.top1 is not None:
            return self.top1
        return self.cosine if self.cosine is not None else 1.0 - self.rel_l2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Labels:
    """True classes of the validation samples (1-D integers, in the order the feeds stream them)
    and where they came from (a file name, for the report)."""
    values: np.ndarray
    name: str


class _Accuracy:
    """Hits of the original and the compressed model's argmax against `labels`, sample by sample."""

    def __init__(self, labels: Labels):
        self.labels, self.n, self.hits = labels, 0, [0, 0]

    def add(self, ref: np.ndarray, new: np.ndarray) -> None:
        if ref.ndim != 2:
            raise DataError(f"data: --val-labels: output scores of shape {ref.shape}; labels need "
                            f"(samples, classes)")
        want = self.labels.values[self.n:self.n + ref.shape[0]]
        if len(want) < ref.shape[0]:
            raise DataError(f"data: --val-labels: {self.labels.name} holds {len(self.labels.values)} labels, "
                            f"fewer than the validation samples")
        for j, y in enumerate((ref, new)):
            self.hits[j] += int(np.sum(np.argmax(y, axis=-1) == want))
        self.n += ref.shape[0]

    def result(self) -> dict:
        if self.n != len(self.labels.values):
            raise DataError(f"data: --val-labels: {self.labels.name} holds {len(self.labels.values)} labels "
                            f"for {self.n} validation samples")
        return {"labels": self.labels.name, "samples": self.n,
                "original": self.hits[0] / self.n, "compressed": self.hits[1] / self.n}


def labelled_output(outputs: list[str], scores: set[str]) -> str:
    """The output the labels are for: the first graph output that looks like class scores."""
    for name in outputs:
        if name in scores:
            return name
    raise DataError("data: --val-labels: the model has no output that looks like class scores "
                    "(a Softmax over the last axis or a Gemm)")


def score_outputs(g: GraphIndex) -> set[str]:
    """Outputs that look like class scores: made by Softmax/LogSoftmax over the last axis or by
    a Gemm (logits), possibly through reshapes, with a last axis of at least 2."""
    found = set()
    for name in g.graph_outputs:
        cur = name
        while cur in g.producer and g.nodes[g.producer[cur]].op_type in _PASS_OPS:
            cur = g.nodes[g.producer[cur]].input[0]
        i = g.producer.get(cur)
        if i is None:
            continue
        op = g.nodes[i].op_type
        shape = g.shape(name)
        wide = shape is None or not shape or shape[-1] is None or shape[-1] >= 2
        last = op in ("Softmax", "LogSoftmax") and g.attr(i, "axis", -1) in (-1, (len(shape) - 1) if shape else -1)
        if wide and (last or op == "Gemm"):
            found.add(name)
    return found


class _Tally:
    def __init__(self):
        self.n = 0
        self.max_abs = 0.0
        self.diff2 = self.ref2 = 0.0
        self.cos_sum = 0.0
        self.cos_n = 0
        self.top_hits = self.top_n = 0

    def add(self, ref: np.ndarray, new: np.ndarray, scores: bool, mask: np.ndarray | None = None) -> None:
        """One feed's outputs; `mask` ([batch, sequence] booleans, True = real) leaves padded
        positions of a token-major output out (module docstring)."""
        if ref.shape != new.shape:
            raise ValueError(f"shape {new.shape} differs from the original {ref.shape}")
        self.n += ref.shape[0] if ref.ndim else 1
        real = None
        if mask is not None and ref.ndim >= 3 and ref.shape[:2] == mask.shape and not mask.all():
            real = np.broadcast_to(mask.reshape(mask.shape + (1,) * (ref.ndim - 2)), ref.shape)
        if ref.dtype.kind in "iub":
            same = ref == new
            self.top_hits += int(np.sum(same if real is None else same & real))
            self.top_n += ref.size if real is None else int(np.count_nonzero(real))
            return
        r, c = ref.astype(np.float64), new.astype(np.float64)
        if real is not None:
            r, c = np.where(real, r, 0.0), np.where(real, c, 0.0)
        with np.errstate(all="ignore"):  # NaN/Inf outputs (allow_nonfinite) must not print warnings
            self._add_floats(r, c, scores, None if real is None else real[..., 0])

    def _add_floats(self, r: np.ndarray, c: np.ndarray, scores: bool, positions: np.ndarray | None = None) -> None:
        """NaN anywhere, or an Inf the other side does not match, is a disagreement: its row gets
        cosine 0 and misses top-1, and max abs and the L2 error become inf."""
        nonfinite = ~(np.isfinite(r) & np.isfinite(c))
        bad = None
        if nonfinite.any():
            bad = nonfinite & (r != c)
            r, c = np.where(nonfinite, 0.0, r), np.where(nonfinite, 0.0, c)
        self.max_abs = max(self.max_abs, float(np.max(np.abs(r - c))) if r.size else 0.0)
        self.diff2 += float(np.sum((r - c) ** 2))
        self.ref2 += float(np.sum(r * r))
        rows_r = r.reshape(r.shape[0], -1) if r.ndim > 1 else r.reshape(1, -1)
        rows_c = c.reshape(rows_r.shape)
        nr, nc = np.linalg.norm(rows_r, axis=1), np.linalg.norm(rows_c, axis=1)
        both_zero = (nr == 0) & (nc == 0)
        cos = np.where(both_zero, 1.0, np.sum(rows_r * rows_c, axis=1) / np.maximum(nr * nc, 1e-300))
        if bad is not None and bad.any():
            self.max_abs, self.diff2 = float("inf"), float("inf")
            cos = np.where(bad.reshape(rows_r.shape).any(axis=1), 0.0, cos)
        self.cos_sum += float(np.sum(cos))
        self.cos_n += len(cos)
        if scores and r.ndim >= 1:
            hits = np.argmax(r, axis=-1) == np.argmax(c, axis=-1)
            if bad is not None:
                hits = hits & ~bad.any(axis=-1)
            if positions is not None:  # real positions only
                hits = hits & positions
            self.top_hits += int(np.sum(hits))
            self.top_n += int(np.prod(r.shape[:-1], dtype=np.int64)) if positions is None else int(np.count_nonzero(positions))

    def result(self, name: str, integer: bool) -> Agreement:
        top1 = self.top_hits / self.top_n if self.top_n else None
        if integer:
            return Agreement(name, self.n, 0.0, 0.0, None, top1)
        with np.errstate(all="ignore"):
            rel = float(np.sqrt(self.diff2 / self.ref2)) if self.ref2 > 0 else float(np.sqrt(self.diff2))
        return Agreement(name, self.n, self.max_abs, rel, self.cos_sum / max(self.cos_n, 1), top1)


class Reference:
    """The original model's outputs on `feeds`, computed once and spooled to a temporary folder, so
    any number of compressed candidates can be compared with them (the target search, the final
    validation) without running the original again. Use as a context manager, or `close()`.

    The original's session is released before any candidate runs, so peak memory is one model's
    weights, not two. The original always runs on the CPU, so the reference does not depend on
    the device; candidates run on `provider` (`runtime.PROVIDERS`)."""

    def __init__(self, original: onnx.ModelProto | str | os.PathLike, feeds, names: list[str], *,
                 scores: set[str], progress: Progress | None = None, labels: Labels | None = None,
                 provider: str = "cpu", mask: str | None = None, large: bool | None = None):
        self.names, self.scores, self.feeds, self.labels = list(names), scores, feeds, labels
        self.provider = provider
        self.mask = mask  # the attention-mask input: its padded positions are left out
        self._tmp = tempfile.TemporaryDirectory(prefix="onnxcompress-validate-")
        self.count = 0
        total = getattr(feeds, "feeds", None)
        session = make_session(original, large=large)  # large: `runtime.make_session`, when known
        for k, feed in enumerate(feeds):
            ref = run(session, self.names, feed, f"validation feed {k} (original model)")
            np.savez(Path(self._tmp.name) / f"{k}.npz", *ref)
            self.count += 1
            if progress:
                progress("reference", k + 1, total)
        del session

    def compare(self, compressed: onnx.ModelProto, *, progress: Progress | None = None,
                labels: Labels | None = None, session=None) -> tuple[Agreement, ...]:
        """Agreement of every graph output of `compressed` with the original on the same feeds;
        with `labels`, the accuracy of both models on the labelled output too. `session`: an
        ONNX Runtime session of `compressed` already built (on this reference's provider)."""
        labels = labels if labels is not None else self.labels
        labelled = labelled_output(self.names, self.scores) if labels is not None else None
        accuracy = _Accuracy(labels) if labels is not None else None
        session = session if session is not None else make_session(compressed, provider=self.provider)
        tallies = {n: _Tally() for n in self.names}
        integer = {}
        for k, feed in enumerate(self.feeds):
            if k >= self.count:
                break
            new = run(session, self.names, feed, f"validation feed {k} (compressed model)")
            real = np.asarray(feed[self.mask]) != 0 if self.mask in feed and np.ndim(feed[self.mask]) == 2 else None
            with np.load(Path(self._tmp.name) / f"{k}.npz", allow_pickle=False) as z:
                ref = [z[f"arr_{j}"] for j in range(len(self.names))]
            for name, r, c in zip(self.names, ref, new):
                integer[name] = r.dtype.kind in "iub"
                tallies[name].add(np.asarray(r), np.asarray(c), name in self.scores, real)
                if name == labelled:
                    accuracy.add(np.asarray(r), np.asarray(c))
            if progress:
                progress("validate", k + 1, self.count)
        found = tuple(tallies[n].result(n, integer.get(n, False)) for n in self.names)
        if accuracy is None:
            return found
        return tuple(replace(a, accuracy=accuracy.result()) if a.output == labelled else a for a in found)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def validate(original: onnx.ModelProto | str | os.PathLike, compressed: onnx.ModelProto, feeds, *,
             scores: set[str], progress: Progress | None = None,
             labels: Labels | None = None, provider: str = "cpu", mask: str | None = None) -> tuple[Agreement, ...]:
    """Agreement of every graph output of `compressed` (run on `provider`) with `original` (a
    model, or the path of the input file, which ONNX Runtime then reads itself; run on the CPU)
    on `feeds` (see `Reference`); `mask`: the attention-mask input, whose padded positions are
    left out."""
    names = [vi.name for vi in compressed.graph.output]
    with Reference(original, feeds, names, scores=scores, provider=provider, mask=mask) as ref:
        return ref.compare(compressed, progress=progress, labels=labels)


def output_error(agreement) -> float:
    """The relative output error energy of a comparison: the mean over float outputs of
    rel_l2^2 (the currency the allocator estimates)."""
    values = [a.rel_l2 ** 2 for a in agreement if a.cosine is not None]
    return float(np.mean(values)) if values else 0.0


def load_labels(spec) -> Labels:
    """`--val-labels`: a `.npy` file (or, from Python, an array) of integer class labels, one per
    validation sample."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"data: --val-labels: {path}: cannot read a .npy array "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        name = str(path)
    else:
        values, name = np.asarray(spec), "the labels given"
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise DataError(f"data: --val-labels: {name}: expected a 1-D integer array, got {values.dtype} "
                        f"of shape {values.shape}")
    return Labels(values, name)
