"""Seed 001's smoothness penalties (the optional torch extra) against hand computations."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxcompress import smooth  # noqa: E402


def t(a):
    return torch.tensor(np.asarray(a, dtype=np.float64))


def test_nuclear_norm_of_the_matricized_weight():
    w = t(np.arange(24).reshape(2, 3, 2, 2) % 5 - 1.5)        # (out, in, kh, kw)
    expected = np.linalg.svd(w.numpy().reshape(2, 12), compute_uv=False).sum()
    assert float(smooth.nuclear_norm(w)) == pytest.approx(expected)
    assert float(smooth.nuclear_norm(t(np.diag([3.0, -4.0])))) == pytest.approx(7.0)


def test_first_and_second_differences_by_hand():
    w = t([[1.0, 2.0], [4.0, 0.0], [9.0, 1.0]])                # linear layer: out axis only
    # D_out = [[3, -2], [5, 1]] -> 9 + 4 + 25 + 1; D2_out = [[2, 3]] -> 4 + 9
    assert float(smooth.first_difference(w)) == pytest.approx(39.0)
    assert float(smooth.second_difference(w)) == pytest.approx(13.0)
    k = t(np.array([0.0, 1.0, 3.0, 0.0, 0.0, 2.0, 1.0, 1.0, 5.0]).reshape(1, 1, 3, 3))
    # one filter: out axis has length 1; kernel rows then columns
    rows = np.diff(k.numpy()[0, 0], axis=0)
    cols = np.diff(k.numpy()[0, 0], axis=1)
    assert float(smooth.first_difference(k)) == pytest.approx(np.sum(rows ** 2) + np.sum(cols ** 2))
    assert float(smooth.first_difference(k, axes=("out",))) == 0.0
    rows2 = k.numpy()[0, 0, 2] - 2 * k.numpy()[0, 0, 1] + k.numpy()[0, 0, 0]
    cols2 = k.numpy()[0, 0, :, 2] - 2 * k.numpy()[0, 0, :, 1] + k.numpy()[0, 0, :, 0]
    assert float(smooth.second_difference(k)) == pytest.approx(np.sum(rows2 ** 2) + np.sum(cols2 ** 2))


def test_constant_and_linear_weights_are_not_penalized():
    const = t(np.full((4, 3, 3, 3), 0.7))
    o, i, a, b = np.meshgrid(*(np.arange(n) for n in (4, 3, 3, 3)), indexing="ij")
    linear = t(0.5 * o - 2.0 * a + 0.25 * b + i * i)             # affine in out, kh, kw (not in `in`)
    assert float(smooth.first_difference(const)) == 0.0
    assert float(smooth.second_difference(linear)) == pytest.approx(0.0, abs=1e-20)
    assert float(smooth.first_difference(linear)) > 0
    bumped = linear.clone()
    bumped[2, 0, 1, 1] += 1.0
    assert float(smooth.second_difference(bumped)) > 0


def test_penalties_weight_each_term_and_gradients_flow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3))
    pen = smooth.Penalties(nuclear=0.5, first=2.0, second=0.0)
    terms = pen.terms(model)
    ws = smooth.penalized_weights(model)
    assert len(ws) == 2
    assert float(terms["nuclear"].detach()) == pytest.approx(sum(float(smooth.nuclear_norm(w).detach()) for w in ws), rel=1e-6)
    assert float(pen(model).detach()) == pytest.approx(0.5 * float(terms["nuclear"].detach()) + 2.0 * float(terms["first"].detach()), rel=1e-6)
    x = torch.randn(5, 2, 6, 6)
    loss = model(x).pow(2).mean()
    total = smooth.add_penalties(loss, model, pen)
    total.backward()
    for w in ws:
        assert w.grad is not None and float(w.grad.abs().sum()) > 0
    # the penalty's own gradient reaches the weights: a step against it lowers it
    model.zero_grad()
    before = float(pen(model).detach())
    pen(model).backward()
    with torch.no_grad():
        for w in ws:
            w -= 1e-3 * w.grad
    assert float(pen(model).detach()) < before
    assert model[1].weight.grad is None or float(model[1].weight.grad.abs().sum()) == 0   # BN not penalized


def test_penalties_reject_bad_settings():
    with pytest.raises(ValueError, match="nuclear"):
        smooth.Penalties(nuclear=-1)
    with pytest.raises(ValueError, match="axis"):
        smooth.Penalties(axes=("in",))


def test_export_writes_what_the_tool_reads(tmp_path):
    import onnxruntime as ort
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 5, 2))
    x = torch.randn(4, 1, 5, 5)
    path = smooth.export_onnx(model, tmp_path / "m.onnx", x)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == smooth.OPSET
    assert [i.name for i in proto.graph.input] == ["input"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"input": np.random.default_rng(0).standard_normal((7, 1, 5, 5)).astype(np.float32)})[0]
    assert y.shape == (7, 2)
    with torch.no_grad():
        ref = model(torch.from_numpy(np.random.default_rng(0).standard_normal((7, 1, 5, 5)).astype(np.float32)))
    assert np.allclose(y, ref.numpy(), atol=1e-5)


def test_the_core_never_imports_torch():
    import subprocess
    import sys
    code = ("import sys, onnxcompress, onnxcompress.api, onnxcompress.cli, onnxcompress.methods.lowrank.ranks; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_torch_is_an_extra_not_a_dependency():
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("torch") for d in project["dependencies"])
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["torch"])
