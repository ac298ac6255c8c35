"""The Plan: what the rewrite will do, as data. It can be written to JSON, read back and applied
to the same model without calibrating again.

Per group (ID): the kept channels (sorted, so channel order is preserved) and, per exit tensor,
the interpolation matrix T (k x C) that the consumers' weights absorb (W' -> W' T^T). Where
T[:, keep] is the identity (a kept channel passes through), only the other C - k columns are
written (`"columns": "dropped"`): a plan keeping 3/4 of the channels holds a quarter of T.
Per layer (low rank): the rank and the factors A (out x r), B (r x in) with W ~ A B, W viewed as
`layers.weight_matrix` defines it.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files
from .errors import UsageError

PLAN_VERSION = 3  # 3: interpolation matrices may hold only their dropped columns; entries as in 2


@dataclass(frozen=True)
class GroupPlan:
    method = "id"  # the registry key of the method that made it (not a field)

    group: str
    channels: int
    keep: tuple[int, ...]
    interpolation: dict[str, np.ndarray] = field(compare=False)
    error: float = 0.0        # relative (consumer-weighted) error of the selection, estimated
    # relative error of the best rank-k approximation, same weighting (NaN: not computed, `Config.best`);
    # a diagnostic, not a decision: plans that differ only in it are equal
    best_error: float = field(default=math.nan, compare=False)
    intercept: dict[str, np.ndarray] = field(default_factory=dict, compare=False)  # exit -> c0 (C,)

    @property
    def kept(self) -> int:
        return len(self.keep)

    @property
    def site(self) -> str:
        return self.group

    def to_dict(self, *, matrices: bool = True) -> dict:
        d = {"group": self.group, "channels": self.channels, "kept": self.kept,
             "keep": list(self.keep), "error": self.error, "best_error": _finite(self.best_error)}
        if matrices:
            d["interpolation"] = {k: _encode_interpolation(v, self.keep) for k, v in self.interpolation.items()}
            d["intercept"] = {k: _encode(v) for k, v in self.intercept.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GroupPlan":
        return cls(group=d["group"], channels=int(d["channels"]), keep=tuple(int(k) for k in d["keep"]),
                   interpolation={k: _decode_interpolation(v, d["keep"], int(d["channels"]))
                                  for k, v in d.get("interpolation", {}).items()},
                   error=float(d.get("error", 0.0)), best_error=_float(d.get("best_error")),
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
    # a table only: the tokens whose rows are stored exactly (sorted ids) and their residual rows
    # R = E[rows] - (A B)^T[rows] (len(rows) x out), added back by an index map (`lowrank/rewrite.py`)
    rows: np.ndarray | None = field(default=None, compare=False)
    residual: np.ndarray | None = field(default=None, compare=False)

    @property
    def site(self) -> str:
        return self.layer

    def to_dict(self, *, matrices: bool = True) -> dict:
        exact = 0 if self.rows is None else len(self.rows)
        rows = 0 if self.rows is None else (exact + 1) * self.out    # the residual rows and the zero row
        d = {"layer": self.layer, "kind": self.kind, "shape": [self.out, self.inputs], "rank": self.rank,
             "params_before": self.out * self.inputs, "params_after": self.rank * (self.out + self.inputs)
             + rows, "error": _finite(self.error), "best_error": _finite(self.best_error),
             "statistic": self.statistic, "exact_rows": exact}
        if matrices:
            d["left"], d["right"] = _encode(self.left), _encode(self.right)
            if self.rows is not None:
                d["rows"], d["residual"] = _encode(np.asarray(self.rows, dtype=np.int64)), _encode(self.residual)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(layer=d["layer"], kind=d["kind"], out=int(d["shape"][0]), inputs=int(d["shape"][1]),
                   rank=int(d["rank"]), left=_decode(d["left"]), right=_decode(d["right"]),
                   error=_float(d.get("error", 0.0)), best_error=_float(d.get("best_error", 0.0)),
                   statistic=d.get("statistic", ""),
                   rows=_decode(d["rows"]).astype(np.int64) if d.get("rows") is not None else None,
                   residual=_decode(d["residual"]) if d.get("residual") is not None else None)


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
        check_plan_dict(d)
        version = d.get("version")
        if version == 1:  # one method per plan: ID groups, then low-rank layers
            entries = [GroupPlan.from_dict(g) for g in d["groups"]] + [LayerPlan.from_dict(x) for x in d.get("layers", [])]
        elif version in (2, PLAN_VERSION):
            entries = []
            for e in d["entries"]:
                if e.get("method") not in REGISTRY:
                    raise UsageError(f"plan: unknown method {e.get('method')!r} in an entry")
                entries.append(REGISTRY[e["method"]].decision.from_dict(e))
        else:
            raise UsageError(f"plan: unsupported plan version {version!r}")
        return cls(method=d["method"], select=d["select"], entries=tuple(entries))

    def save(self, path: str | Path) -> None:
        files.write_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            with files.open_regular(path) as f:
                text = f.read(MAX_PLAN_BYTES + 1)
            if len(text) > MAX_PLAN_BYTES:
                raise ValueError(f"over {MAX_PLAN_BYTES // 2**20} MiB")
            return cls.from_dict(json.loads(text))
        except UsageError as e:
            raise UsageError(f"plan: {path}: {str(e).removeprefix('plan: ')}") from e
        except (OSError, ValueError, KeyError, TypeError, RecursionError, AttributeError) as e:
            text = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
            raise UsageError(f"plan: {path}: not a readable plan ({text})") from e


MAX_PLAN_BYTES = 1024 * 2**20


def check_plan_dict(d) -> None:
    """The structure `Plan.from_dict` reads, checked before anything is built from it: types,
    whole non-negative sizes, kept channels sorted, unique and in range, matrices whose declared
    shape matches their bytes and the sizes around them, finite numbers. Raises `UsageError`
    naming the entry; keys it does not know are left to `from_dict`."""
    from .config import METHODS, SELECTIONS

    _need(isinstance(d, dict), "the file does not hold a JSON object")
    for key, known in (("method", METHODS), ("select", SELECTIONS)):
        _need(d.get(key) in known, f"{key!r} must be one of {', '.join(known)}, not {d.get(key)!r}")
    _need(d.get("version") in (1, 2, PLAN_VERSION), f"unsupported plan version {d.get('version')!r}")
    if d["version"] == 1:
        groups, layers = d.get("groups"), d.get("layers", [])
        _need(isinstance(groups, list) and isinstance(layers, list), "'groups' and 'layers' must be lists")
        _need(not (groups if d["method"] != "id" else layers),
              f"a plan of method {d['method']!r} holds {'groups' if d['method'] != 'id' else 'layers'}")
        entries = [("id", g, f"groups[{n}]") for n, g in enumerate(groups)] + \
                  [("lowrank", x, f"layers[{n}]") for n, x in enumerate(layers)]
    else:
        raw = d.get("entries")
        _need(isinstance(raw, list), "'entries' must be a list")
        _need(all(isinstance(e, dict) for e in raw), "every entry must be an object")
        entries = [(e.get("method"), e, f"entries[{n}]") for n, e in enumerate(raw)]
    from ..methods import REGISTRY  # other methods check their own entries (`decision.check`)
    checks = {"id": _check_group, "lowrank": _check_layer}
    seen = set()
    for method, e, where in entries:
        check = checks.get(method) or getattr(getattr(REGISTRY.get(method), "decision", None), "check", None)
        _need(check is not None, f"{where}: unknown method {method!r}")
        check(e, where)
        key = (method, e.get("group") if method == "id" else e.get("layer", e.get("block")))
        _need(key not in seen, f"a {'group' if method == 'id' else 'layer'} appears twice")
        seen.add(key)


def _check_group(g, where: str) -> None:
    _need(isinstance(g, dict) and isinstance(g.get("group"), str), f"{where} must name its group")
    channels, keep = g.get("channels"), g.get("keep")
    _need(_whole(channels) and channels >= 1, f"{where}: 'channels' must be a positive integer")
    _need(isinstance(keep, list) and keep and all(_whole(k) for k in keep),
          f"{where}: 'keep' must be a non-empty list of integers")
    _need(all(0 <= k < channels for k in keep), f"{where}: kept channels must lie in [0, {channels})")
    _need(all(a < b for a, b in zip(keep, keep[1:])), f"{where}: kept channels must be sorted and unique")
    for key, want in (("interpolation", (len(keep), channels)), ("intercept", (channels,))):
        mats = g.get(key, {})
        _need(isinstance(mats, dict), f"{where}: {key!r} must be an object")
        for name, m in mats.items():
            dropped = key == "interpolation" and isinstance(m, dict) and m.get("columns") == "dropped"
            _check_matrix(m, f"{where}.{key}[{name!r}]", want, stored=(want[0], want[1] - len(keep)) if dropped else None)
    _check_numbers(g, where)


def _check_layer(x, where: str) -> None:
    _need(isinstance(x, dict) and isinstance(x.get("layer"), str) and isinstance(x.get("kind"), str),
          f"{where} must name its layer and kind")
    shape, rank = x.get("shape"), x.get("rank")
    _need(isinstance(shape, list) and len(shape) == 2 and all(_whole(v) and v >= 1 for v in shape),
          f"{where}: 'shape' must be two positive integers")
    _need(_whole(rank) and 1 <= rank <= min(shape), f"{where}: 'rank' must be an integer in [1, {min(shape)}]")
    _check_matrix(x.get("left"), f"{where}.left", (shape[0], rank))
    _check_matrix(x.get("right"), f"{where}.right", (rank, shape[1]))
    _check_numbers(x, where)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(f"plan: {message}")


def _whole(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_numbers(entry: dict, where: str) -> None:
    for key in ("error", "best_error"):
        v = entry.get(key, 0.0)
        _need(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)), f"{where}: {key!r} must be a number")


def _check_matrix(m, where: str, want: tuple | None, stored: tuple | None = None) -> None:
    """`stored`: the shape the data holds when it is not `shape` (an interpolation's dropped columns)."""
    _need(isinstance(m, dict) and isinstance(m.get("shape"), list) and isinstance(m.get("float64"), str),
          f"{where} must hold 'shape' and 'float64'")
    shape = m["shape"]
    _need(all(_whole(v) and v >= 0 for v in shape), f"{where}: the shape must be non-negative integers")
    _need(want is None or tuple(shape) == want, f"{where}: shape {shape}, expected {list(want or ())}")
    count = 1
    for v in stored or shape:
        count *= v
    _need(len(m["float64"]) == 4 * (-(-8 * count // 3)), f"{where}: the data does not hold {shape} float64 values")
    try:
        raw = base64.b64decode(m["float64"], validate=True)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"plan: {where}: the data is not base64") from e
    _need(len(raw) == 8 * count, f"{where}: the data does not hold {shape} float64 values")
    _need(bool(np.all(np.isfinite(np.frombuffer(raw, dtype="<f8")))), f"{where} holds NaN or Inf values")


def _finite(x: float) -> float | None:
    """A figure for strict JSON: None where it is NaN or infinite (no statistic)."""
    return float(x) if np.isfinite(x) else None


def _float(x) -> float:
    return float("nan") if x is None else float(x)


def _encode(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(a, dtype="<f8")
    return {"shape": list(a.shape), "float64": base64.b64encode(a.tobytes()).decode("ascii")}


def _encode_interpolation(t: np.ndarray, keep) -> dict:
    """T (k x C) as `_encode` writes it, or only its columns outside `keep` where T[:, keep] is
    exactly the identity (`"columns": "dropped"`)."""
    keep = np.asarray(keep, dtype=np.int64)
    if t.shape != (len(keep), t.shape[1]) or not np.array_equal(t[:, keep], np.eye(len(keep))):
        return _encode(t)
    rest = np.setdiff1d(np.arange(t.shape[1]), keep)
    return {**_encode(t[:, rest]), "shape": list(t.shape), "columns": "dropped"}


def _decode_interpolation(d: dict, keep, channels: int) -> np.ndarray:
    if d.get("columns") != "dropped":
        return _decode(d)
    keep = np.asarray(keep, dtype=np.int64)
    rest = np.setdiff1d(np.arange(channels), keep)
    t = np.zeros((len(keep), channels))
    t[np.arange(len(keep)), keep] = 1.0
    t[:, rest] = np.frombuffer(base64.b64decode(d["float64"]), dtype="<f8").reshape(len(keep), len(rest))
    return t


def _decode(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["float64"])
    return np.frombuffer(raw, dtype="<f8").reshape(d["shape"]).copy()
