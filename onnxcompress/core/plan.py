"""The Plan: what the rewrite will do, as data. It can be written to JSON, read back and applied
to the same model without calibrating again.

Per group (ID): the kept channels (sorted, so channel order is preserved) and, per exit tensor,
the interpolation matrix T (k x C) that the consumers' weights absorb (W' -> W' T^T).
Per layer (low rank): the rank and the factors A (out x r), B (r x in) with W ~ A B, W viewed as
`layers.weight_matrix` defines it.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError

PLAN_VERSION = 2


@dataclass(frozen=True)
class GroupPlan:
    method = "id"  # the registry key of the method that made it (not a field)

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

    @property
    def site(self) -> str:
        return self.group

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
class LayerPlan:
    method = "lowrank"

    layer: str
    kind: str
    out: int
    inputs: int
    rank: int
    left: np.ndarray = field(compare=False)    # A (out x rank)
    right: np.ndarray = field(compare=False)   # B (rank x inputs)
    error: float = 0.0        # relative calibration output error of A B (NaN: no statistic)
    best_error: float = 0.0   # the activation-aware optimum at this rank, same measure
    statistic: str = ""       # what the input statistic was: channels / patches / counts / none

    @property
    def site(self) -> str:
        return self.layer

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"layer": self.layer, "kind": self.kind, "shape": [self.out, self.inputs], "rank": self.rank,
             "params_before": self.out * self.inputs, "params_after": self.rank * (self.out + self.inputs),
             "error": self.error, "best_error": self.best_error, "statistic": self.statistic}
        if matrices:
            d["left"], d["right"] = _encode(self.left), _encode(self.right)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(layer=d["layer"], kind=d["kind"], out=int(d["shape"][0]), inputs=int(d["shape"][1]),
                   rank=int(d["rank"]), left=_decode(d["left"]), right=_decode(d["right"]),
                   error=float(d.get("error", 0.0)), best_error=float(d.get("best_error", 0.0)),
                   statistic=d.get("statistic", ""))


@dataclass(frozen=True)
class Plan:
    """Every decision of a run: `entries` are the methods' decisions (`GroupPlan`, `LayerPlan`,
    ...), each naming its method (`entry.method`, a key of `methods.REGISTRY`) and its site.
    `method` is the run's `--method` (auto, id, svd, ...), `select` ID's selection rule."""
    method: str
    select: str
    entries: tuple = ()

    @property
    def groups(self) -> tuple:
        return tuple(e for e in self.entries if e.method == "id")

    @property
    def layers(self) -> tuple:
        return tuple(e for e in self.entries if e.method == "lowrank")

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "method": self.method, "select": self.select,
                "entries": [{"method": e.method, **e.to_dict()} for e in self.entries]}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        from ..methods import REGISTRY  # the methods know their decisions' formats
        version = d.get("version")
        if version == 1:  # one method per plan: ID groups, then low-rank layers
            entries = [GroupPlan.from_dict(g) for g in d["groups"]] + [LayerPlan.from_dict(x) for x in d.get("layers", [])]
        elif version == PLAN_VERSION:
            entries = []
            for e in d["entries"]:
                if e.get("method") not in REGISTRY:
                    raise UsageError(f"plan: unknown method {e.get('method')!r} in an entry")
                entries.append(REGISTRY[e["method"]].decision.from_dict(e))
        else:
            raise UsageError(f"plan: unsupported plan version {version!r}")
        return cls(method=d["method"], select=d["select"], entries=tuple(entries))

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
