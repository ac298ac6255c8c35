"""The method registry: one entry per method, in the order their rewrites run (see `base.py` for
the interface every method implements). Adding a method is one module and one line in
`REGISTRY`: `--method auto` then runs it with the others (a `--method` of its own is one more
line in `CHOICES` and the name in `core.config.METHODS`)."""
from __future__ import annotations

from .block import BlockMethod
from .id import IdMethod
from .lowrank import LowRankMethod
from .quant import QuantMethod
from .sqf import SqfMethod

REGISTRY = {
    "id": IdMethod(),
    "lowrank": LowRankMethod(),
    "quant": QuantMethod(),
    "sqf": SqfMethod(),
    "block": BlockMethod(),
}

# what each --method runs (the low-rank variant is read from the config by the method)
CHOICES = {
    "id": ("id",),
    "svd": ("lowrank",),
    "aasvd": ("lowrank",),
    "lp": ("lowrank",),
    "quant": ("quant",),
    "sqf": ("sqf",),
    "block": ("block",),
    "auto": tuple(m for m in REGISTRY if m != "sqf"),  # sqf: minutes of solves per model (its docstring)
}


def for_method(method: str) -> list:
    """The method objects `--method` runs, in registry order."""
    return [m for name, m in REGISTRY.items() if name in CHOICES[method]]


def for_plan(plan) -> list:
    """The method objects a saved plan needs, in registry order."""
    used = {e.method for e in plan.entries}
    return [m for name, m in REGISTRY.items() if name in used]
