"""The Plan: what the rewrite will do, as data. It can be written to JSON, read back and applied
to the same model without calibrating again.

Per group: the kept channels (sorted, so channel order is preserved) and, per exit tensor, the
interpolation matrix T (k x C) that the consumers' weights absorb (W' -> W' T^T).
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    group: str
    channels: int
    keep: tuple[int, ...]
    interpolation: dict[str, np.ndarray] = field(compare=False)
    error: float = 0.0        # relative (consumer-weighted) error of the selection, estimated
    best_error: float = 0.0   # relative error of the best rank-k approximation, same weighting
    intercept: dict[str, np.ndarray] = field(default_factory=dict, compare=False)  # exit -> c0 (C,)

    @property
    def kept(self) -> int:
        return len(self.keep)

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"group": self.group, "channels": self.channels, "kept": self.kept,
             "keep": list(self.keep), "error": self.error, "best_error": self.best_error}
        if matrices:
            d["interpolation"] = {k: _encode(v) for k, v in self.interpolation.items()}
            d["intercept"] = {k: _encode(v) for k, v in self.intercept.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GroupPlan":
        return cls(group=d["group"], channels=int(d["channels"]), keep=tuple(int(k) for k in d["keep"]),
                   interpolation={k: _decode(v) for k, v in d.get("interpolation", {}).items()},
                   error=float(d.get("error", 0.0)), best_error=float(d.get("best_error", 0.0)),
                   intercept={k: _decode(v) for k, v in d.get("intercept", {}).items()})


@dataclass(frozen=True)
class Plan:
    method: str
    select: str
    groups: tuple[GroupPlan, ...]

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "method": self.method, "select": self.select,
                "groups": [gp.to_dict() for gp in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise UsageError(f"plan: unsupported plan version {d.get('version')!r}")
        return cls(method=d["method"], select=d["select"],
                   groups=tuple(GroupPlan.from_dict(g) for g in d["groups"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"plan: {path}: not a readable plan ({e})") from e


def _encode(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"shape": list(a.shape), "float64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["float64"])
    return np.frombuffer(raw, dtype="<f8").reshape(d["shape"]).copy()
