"""What every method shares: the site a method can compress, its error and cost curves, and
the interface a method implements.

A method (ID channel pruning, low rank, ...) is one object in the registry (`methods/__init__.py`)
with these verbs, called in this order by `compress()`:

* `sites(g, config) -> (sites, skipped)`: pure analysis of the graph. A `Site` is one thing
  the method can shrink (an ID channel group, a layer to split); everything it leaves alone
  comes back as `Skipped` with the reason.
* `requests(site)`: the statistics the site needs (`core.stats` requests), streamed by one
  calibration pass shared by every method.
* `curve(g, site, stats, config) -> Curve`: the site's candidate sizes, the estimated relative
  error at each (0 at index 0, which is always "unchanged"), and how each of the weights and
  nodes it touches scales with the size (`Curve.costs`).
* `keep_index(curve, fraction)` / `tolerance_index(curve, eps)`: the per-site size rules, in the
  method's own sense of "keep" (channels for ID, parameters for low rank).
* `realize(g, curve, index, config) -> decision`: the plan entry for one size; a decision is
  data (`to_dict` / `from_dict`) with a `method` and a `site` key.
* `probe(g, curve, index, config) -> decision` (optional, default `realize`): the entry a
  sensitivity probe measures, where that must differ (low rank: a table without exact rows).
* `rewrite(model, g, sites, decisions) -> model`: the only verb that changes a graph. Methods
  rewrite in registry order, each on the previous one's output; a method only reads nodes and
  weights it owns from `g` (no two sites of a plan edit the same weight, see `Site.claims`).

Sizes are compared across methods by the allocator (`allocate.py`) in one currency: each curve's
local error scaled by the site's measured end-to-end sensitivity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Skipped:
    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Site:
    """One place a method can compress.

    method:  registry name of the method; key: unique within the method (group id, layer key);
    op:      what it is, for the report; claims: the initializers its rewrite edits (two sites
    that claim the same initializer never both shrink); target: the method's own description
    (a `Group`, a `Layer`)."""
    method: str
    key: str
    op: str
    claims: frozenset
    target: object = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        """Unique over all methods, as the report shows it: `id group fc1`, `lowrank Gemm fc1`."""
        return f"{self.method} {self.op} {self.key}"


@dataclass(frozen=True)
class Cost:
    """A weight or node the site shrinks: its full cost `base` in `metric` ("params", "flops" or
    "bytes") under the model-wide `item` key, and the factor it is scaled by at each candidate
    size. Costs of one item shared by several sites (a Conv between two channel groups) multiply."""
    metric: str
    item: str
    base: float
    factor: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class Curve:
    """A site's candidates: `sizes[j]` (index 0 = unchanged), `error[j]` the estimated relative
    output error energy of the site alone at size j (local to the site: its own calibration
    output error), non-decreasing in practice but not assumed so; `costs` its cost items;
    `state` whatever the method needs to realize a size (Grams, spectra)."""
    site: Site
    sizes: np.ndarray
    error: np.ndarray
    costs: tuple
    state: object = field(compare=False, repr=False, default=None)
    steps: np.ndarray | None = field(compare=False, repr=False, default=None)  # indices the budget walk may take
    multiple: int = 1  # every size the rules pick is a multiple of this (or the full size), `rounding.py`
    dropped: dict = field(compare=False, repr=False, default_factory=dict)  # index -> why it is no candidate

    @property
    def id(self) -> str:
        return self.site.id

    @property
    def grid(self) -> np.ndarray:
        """The indices the budget walk may take: `steps`, or every index."""
        return np.asarray(self.steps if self.steps is not None else np.arange(len(self.sizes)), dtype=np.int64)


def step_grid(n: int, floor: int, parts: int = 64) -> np.ndarray:
    """Indices 0..n-1 of a curve whose sizes are full, full-1, ..., thinned to about `parts`
    evenly spaced steps down to `floor` (always included)."""
    last = max(0, n - 1 - floor)
    step = max(1, n // parts)
    idx = list(range(0, last + 1, step))
    if idx[-1] != last:
        idx.append(last)
    return np.asarray(idx, dtype=np.int64)
