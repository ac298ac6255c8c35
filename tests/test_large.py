"""The code paths large models take (over 1 GB of weights, over the 2 GB protobuf limit), run on
tiny models by lowering the thresholds: sessions from temporary files with external weights,
block-wise float64 maths in decide and rewrite, sizes computed without serializing."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import graphs
from checks import assert_valid_output, save
from onnxcompress import Config, compress
from onnxcompress.core import runtime as calibrate
from onnxcompress.methods.id import rewrite as rewrite_mod
from onnxcompress.ops.edits import Shift
from onnxcompress.core.modelio import serialized_size, without_initializers


@pytest.mark.parametrize("name", ["mlp", "conv_bn_relu", "flatten_gemm"])
def test_serialized_size_without_serializing(name):
    model = graphs.BUILDERS[name][0]()
    exact = model.ByteSize()
    assert abs(serialized_size(model) - exact) <= 4 * len(model.graph.initializer)
    shell = without_initializers(model)
    assert len(shell.graph.initializer) == 0
    assert [n.name for n in shell.graph.node] == [n.name for n in model.graph.node]
    assert shell.opset_import == model.opset_import and shell.ir_version == model.ir_version


def test_large_model_path_gives_the_same_model(tmp_path, monkeypatch):
    """With every model treated as large, ONNX Runtime gets files with page-aligned external
    weights and no pre-packing; the compressed model is the one the in-memory path makes."""
    spec = graphs.BUILDERS["residual"][1]
    path = save(tmp_path, graphs.residual(dup=True))
    feed = graphs.sample_inputs(spec, 64, 1)
    small = compress(path, tmp_path / "small.onnx", config=Config(keep=0.5), calib=feed, val=feed)
    opened = []
    real = calibrate._write_external
    monkeypatch.setattr(calibrate, "LARGE_MODEL", 0)
    monkeypatch.setattr(calibrate, "_write_external", lambda *a, **k: (opened.append(a[2]), real(*a, **k)))
    monkeypatch.setattr(rewrite_mod, "_BLOCK", 5)
    large = compress(path, tmp_path / "large.onnx", config=Config(keep=0.5), calib=feed, val=feed)
    assert opened  # the file route was taken
    assert [g.keep for g in large.plan.groups] == [g.keep for g in small.plan.groups]
    a = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "small.onnx")).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "large.onnx")).graph.initializer}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7)
    assert_valid_output(path, tmp_path / "large.onnx", feed, same=True, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("axis,spatial", [(0, 1), (1, 1), (1, 3), (2, 1)])
def test_blockwise_mix_and_shift_match_the_formula(monkeypatch, axis, spatial):
    rng = np.random.default_rng(0)
    c, k = 4, 3
    shape = [5, 6, 7]
    shape[axis] = c * spatial
    w = rng.standard_normal(shape).astype(np.float32)
    t = rng.standard_normal((k, c))
    moved = np.moveaxis(w.astype(np.float64), axis, -1).reshape(*np.delete(shape, axis), c, spatial)
    want = np.moveaxis(np.einsum("...cs,kc->...ks", moved, t).reshape(*np.delete(shape, axis), k * spatial), -1, axis)
    out_axis = (axis + 1) % 3
    c0 = rng.standard_normal(c)
    bias = rng.standard_normal(shape[out_axis])
    e = Shift("b", "w", axis, out_axis, spatial, "src", 0, 0.5)
    resp = np.einsum("...cs,c->...", moved, c0)
    resp_axis = out_axis if out_axis < axis else out_axis - 1
    want_shift = bias + 0.5 * np.moveaxis(resp, resp_axis, 0).reshape(shape[out_axis], -1).sum(axis=1)
    for block in (2**22, 1, 7):
        monkeypatch.setattr(rewrite_mod, "_BLOCK", block)
        np.testing.assert_allclose(rewrite_mod.mix(w, axis, spatial, t), want, rtol=1e-12, atol=1e-12)
        assert rewrite_mod.mix(w, axis, spatial, t, np.float32).dtype == np.float32
        np.testing.assert_allclose(rewrite_mod.shift(bias, w, e, c0), want_shift, rtol=1e-12, atol=1e-12)
