"""Hypothesis profiles for the property tests (tests/test_properties.py).

* `ci` (the default): a few dozen examples per property, derandomized so every run of the suite
  sees the same graphs, no example database.
* `long`: hundreds of random examples per property, failures saved in `.hypothesis/`.

Select one with `python -m pytest --hypothesis-profile=long tests/test_properties.py` (or the
environment variable `HYPOTHESIS_PROFILE=long`).
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("long", max_examples=400, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
