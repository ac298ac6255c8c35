"""Hypothesis profiles for the property tests (tests/test_properties.py).

* `ci` (the default): a few dozen examples per property, derandomized so every run of the suite
  sees the same graphs, no example database.
* `long`: hundreds of random examples per property, failures saved in `.hypothesis/`.

Select one with `python -m pytest --hypothesis-profile=long tests/test_properties.py` (or the
environment variable `HYPOTHESIS_PROFILE=long`).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=400, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _portable_speed_defaults(monkeypatch, tmp_path_factory):
    """Tests run on tiny graphs, where hardware rounding and timed latencies would decide
    everything: by default every size is allowed (`--round 1`) and the latency model's probes
    are costed by their weights' element counts instead of being timed (so a split is "faster"
    exactly when it is smaller, and no timing ever enters a test); the whole-model guard sees
    every compressed model as fast as its original, and a latency budget's whole-model timing
    sees its weights' element count. Tests of rounding and of the latency model
    set their own."""
    from onnxcompress import latency
    from onnxcompress.methods import rounding
    monkeypatch.setattr(rounding, "defaults", lambda: {"conv": 1, "gemm": 1})
    monkeypatch.setattr(latency, "time_probes", lambda probes, threads: [_weights(p) for p in probes])
    monkeypatch.setattr(latency, "model_ratios", lambda original, compressed, feed: {1: 1.0})  # never slower
    monkeypatch.setattr(latency, "measured_ratio",   # a --latency-target probe "runs" as its weights' size
                        lambda original, compressed, feed, threads: _elements(compressed) / _elements(original))
    monkeypatch.setattr(latency, "CACHE_DIR", tmp_path_factory.mktemp("latency-cache"))


def _elements(model) -> float:
    return float(sum(np.prod(t.dims) for t in model.graph.initializer))


def _weights(probe) -> float:
    return float(sum(np.prod(w) for _, _, ws in probe.nodes for w in ws))
