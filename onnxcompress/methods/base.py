"""What every method shares: `Skipped`, the record of a node a method leaves alone and why."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Skipped:
    node: str
    op: str
    reason: str
