"""Assertions shared by the robustness tests: a compressed model is a valid ONNX model that ONNX
Runtime runs, with the original's outputs (names, element types, shapes), and where asked the
original's values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def session(model_or_path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def run(model_or_path, feed) -> list[np.ndarray]:
    return session(model_or_path).run(None, feed)


def assert_valid_output(original, output, feeds, *, same: bool = False, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    """`output` (a path) passes the full ONNX checker, loads and runs in ONNX Runtime on every
    feed of `feeds` (a feed or a list of feeds), and its outputs have the names, element types
    and shapes of `original`'s; with `same`, also their values (to rtol/atol)."""
    onnx.checker.check_model(str(output), full_check=True)
    before, after = session(original), session(output)
    assert [o.name for o in after.get_outputs()] == [o.name for o in before.get_outputs()]
    for feed in feeds if isinstance(feeds, list) else [feeds]:
        ref, new = before.run(None, feed), after.run(None, feed)
        for r, n, info in zip(ref, new, before.get_outputs()):
            assert n.dtype == r.dtype, f"output {info.name}: dtype {n.dtype}, original {r.dtype}"
            assert n.shape == r.shape, f"output {info.name}: shape {n.shape}, original {r.shape}"
            if same:
                np.testing.assert_allclose(n.astype(np.float64), r.astype(np.float64), rtol=rtol, atol=atol,
                                           err_msg=f"output {info.name}")


def save(directory: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    p = Path(directory) / name
    onnx.save(model, str(p))
    return p


def reasons(report) -> dict[str, str]:
    """Skipped node -> reason, from a Report."""
    return {s["node"]: s["reason"] for s in report.skipped}


def kept(report) -> dict[str, tuple[int, int]]:
    """Group id -> (kept, channels), from a Report."""
    return {g["group"]: (g["kept"], g["channels"]) for g in report.groups}
