"""Quality targets (`--target METRIC>=VALUE`): parsed once, read by the allocator's search and
the report."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A quality target on the worst output: `metric` (cosine, top1 or rel_l2) `op` (>= or <=)
    `value`."""
    metric: str
    op: str
    value: float

    def met(self, score: float) -> bool:
        return score >= self.value if self.op == ">=" else score <= self.value

    def as_error(self, score: float) -> float:
        """A score as the relative output error energy it roughly corresponds to (a first guess
        that ties the estimate to the target; the search then corrects it by measurement):
        rel_l2 r -> r^2; cosine c -> 2 (1 - c); top-1 t -> 2 (1 - t)."""
        if self.metric == "rel_l2":
            return score * score
        return 2.0 * max(0.0, 1.0 - score)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str) -> Target:
    """'cosine>=0.99', 'top1>=0.99', 'rel_l2<=0.05' -> Target; ValueError with the reason."""
    for op in (">=", "<="):
        if op in text:
            name, _, value = text.partition(op)
            name = name.strip().lower().replace("-", "_")
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"{value.strip()!r} is not a number") from None
            if name not in ("cosine", "top1", "rel_l2"):
                raise ValueError(f"unknown metric {name!r}; use cosine, top1 or rel_l2")
            want = "<=" if name == "rel_l2" else ">="
            if op != want:
                raise ValueError(f"{name} must be {want} a value")
            if not math.isfinite(v) or v < 0 or (name != "rel_l2" and v > 1):
                raise ValueError(f"{name} value {value.strip()} is out of range")
            return Target(name, op, v)
    raise ValueError("expected METRIC>=VALUE or rel_l2<=VALUE, e.g. cosine>=0.99")
