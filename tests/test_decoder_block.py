"""The decoder block of tools/decoder_block.py (RMSNorm, decomposed multi-head causal attention,
SwiGLU feed-forward; random weights, exported with torch) compressed end to end: keeping
everything reproduces the outputs; at keep 0.5 whole heads and gated channels are pruned and the
output is a valid model of the same interface."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from checks import assert_valid_output, kept
from onnxcompress import Config, compress

pytest.importorskip("torch")
_spec = importlib.util.spec_from_file_location(
    "decoder_block", Path(__file__).resolve().parent.parent / "tools" / "decoder_block.py")
decoder_block = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoder_block)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return decoder_block.export(tmp_path_factory.mktemp("decoder") / "decoder.onnx")


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_decoder_block_compresses_end_to_end(tmp_path, exported, keep):
    val = decoder_block.feeds(4, 2)
    out = tmp_path / "out.onnx"
    report = compress(exported, out, config=Config(keep=keep, force=True), calib=decoder_block.feeds(24, 1), val=val)
    width, hidden, heads = decoder_block.WIDTH, decoder_block.HIDDEN, decoder_block.HEADS
    assert kept(report) == {"/q/MatMul": (round(width * keep), width), "/gate/MatMul": (round(hidden * keep), hidden)}
    plan = {g.group: g for g in report.plan.groups}
    size = width // heads
    heads_kept = np.asarray(plan["/q/MatMul"].keep).reshape(-1, size)
    assert np.array_equal(heads_kept, heads_kept[:, :1] + np.arange(size)) and np.all(heads_kept[:, 0] % size == 0)
    assert_valid_output(exported, out, val, same=keep == 1.0, rtol=1e-4, atol=1e-5)


def test_spread_budgets_heads_and_gated_channels_apart(tmp_path, exported):
    """One heads group and one gated-FFN group: with `--spread` each is the only site of its
    kind, so each keeps exactly plain `--keep`'s share (one budget for both would trade them)."""
    out = tmp_path / "out.onnx"
    report = compress(exported, out, config=Config(keep=0.5, spread=True, force=True),
                      calib=decoder_block.feeds(24, 1), val=decoder_block.feeds(4, 2))
    width, hidden = decoder_block.WIDTH, decoder_block.HIDDEN
    assert kept(report) == {"/q/MatMul": (width // 2, width), "/gate/MatMul": (hidden // 2, hidden)}
    assert sorted(r["kind"] for r in report.allocation["spread"]) == ["attention heads", "channel group"]
    assert_valid_output(exported, out, decoder_block.feeds(4, 2))
