"""Report: the run's figures as one JSON-ready dict and as a terminal table."""
from __future__ import annotations

import json
import math
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import write_atomic
log = logging.getLogger(__name__)


class StageTimer:
    """Seconds spent per stage, in the order the stages ran."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class Report:
    """Everything a run measured. `to_dict()` is the `--report` JSON."""
    input: str
    output: str | None
    config: dict
    params: dict = field(default_factory=dict)      # before / after
    flops: dict = field(default_factory=dict)       # before / after, per sample (batch 1; shapes in at_input_shapes)
    file_size: dict = field(default_factory=dict)   # before / after, bytes
    data: dict = field(default_factory=dict)        # calibration / validation source and counts
    groups: list = field(default_factory=list)
    layers: list = field(default_factory=list)      # low-rank splits
    sections: dict = field(default_factory=dict)    # other methods' rows, by the method's section name
    skipped: list = field(default_factory=list)
    agreement: list = field(default_factory=list)
    gate: dict | None = None
    allocation: dict = field(default_factory=dict)  # size rule, sensitivities, target probes, estimated vs measured error
    warnings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    plan: object = field(default=None, repr=False)  # the Plan applied (not part of the JSON)
    versions: dict = field(default_factory=lambda: versions())  # onnxcompress, onnx, onnxruntime, ...
    ops: dict = field(default_factory=dict)         # before / after: node count per op type

    def warn(self, message: str) -> None:
        """Record a warning in the report and log it once, when it arises (stderr); the table
        does not repeat it."""
        log.warning(message)
        self.warnings.append(message)
    latency: dict | None = None                     # --benchmark: measured latency of both models

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("plan", "sections")}
        out.update(self.sections)
        return out

    def rows(self, section: str) -> list:
        """The list of rows a method's decisions go to (`groups`, `layers`, or a section of its own)."""
        return getattr(self, section) if section in ("groups", "layers") else self.sections.setdefault(section, [])

    def to_json(self) -> str:
        """Strict JSON (RFC 8259): a NaN or infinite figure is written as null."""
        return json.dumps(strict(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> None:
        """Write the JSON through a temporary file beside `path` and a rename (never in place)."""
        write_atomic(path, self.to_json())

    def table(self) -> str:
        """A compact human-readable summary."""
        lines = [f"{self.input} -> {self.output or '(not written)'}"]
        lines += _size_lines(self)
        if self.groups:
            lines.append("")
            lines.append(f"{'group':<40} {'kept':>11} {'error':>8} {'best':>8}")
            lines.append("  error: estimated relative error of the group's exit tensors rebuilt from the kept channels")
            lines.append("  best:  the same for the best k-dimensional approximation, a floor no k channels can beat"
                         + ("" if any(grp["best_error"] is not None for grp in self.groups) else " (--best)"))
            for grp in self.groups:
                kept = f"{grp['kept']}/{grp['channels']}"
                lines.append(f"{_short(grp['group'], 40):<40} {kept:>11} {grp['error']:8.4f} {_figure(grp['best_error'])}")
        if self.layers:
            lines.append("")
            lines.append(f"{'layer':<40} {'rank':>6} {'params':>9} {'error':>8} {'optimum':>8}")
            lines.append("  error:   relative error of the layer's output on the calibration data")
            lines.append("  optimum: the same for activation-aware SVD at that rank, the least any split reaches")
            for x in self.layers:
                kept = x["params_after"] / x["params_before"]
                lines.append(f"{_short(x['layer'], 40):<40} {x['rank']:>6} {kept:9.1%} {x['error']:8.4f} "
                             f"{_figure(x['best_error'])}")
        if self.skipped:
            lines.append("")
            lines.append(f"{len(self.skipped)} layers left alone:")
            for s in self.skipped[:12]:
                lines.append(f"  {_short(s['node'], 40)} ({s['op']}): {s['reason']}")
            if len(self.skipped) > 12:
                lines.append(f"  ... {len(self.skipped) - 12} more (see --report)")
        if self.agreement:
            lines.append("")
            lines.append(f"{'output':<28} {'samples':>7} {'max abs':>10} {'rel L2':>9} {'cosine':>8} {'top-1':>7}")
            for a in self.agreement:
                cos = "-" if a["cosine"] is None else f"{a['cosine']:.5f}"
                top = "-" if a["top1"] is None else f"{a['top1']:.4f}"
                lines.append(f"{_short(a['output'], 28):<28} {a['samples']:>7} {a['max_abs']:10.4g} "
                             f"{a['rel_l2']:9.4g} {cos:>8} {top:>7}")
        for a in self.agreement:
            acc = a.get("accuracy")
            if acc:
                lines.append(f"accuracy of {a['output']!r} against {acc['labels']} ({acc['samples']} samples): "
                             f"original {acc['original']:.4f}, compressed {acc['compressed']:.4f}")
        for x in self.sections.get("quantized", []):
            if x is self.sections["quantized"][0]:
                lines += ["", f"{'quantized layer':<40} {'format':>12} {'bytes':>9} {'error':>8}"]
            lines.append(f"{_short(x['layer'], 40):<40} {x['format']:>12} "
                         f"{x['bytes_after'] / max(x['bytes_before'], 1):9.1%} {x['error'] or 0:8.4f}")
        for x in self.sections.get("sqf", []):
            if x is self.sections["sqf"][0]:
                lines += ["", f"{'sparse quantized factors':<40} {'format':>18} {'bytes':>7} {'error':>8} {'low rank':>8}"]
            lines.append(f"{_short(x['layer'], 40):<40} {x['format']:>18} {x['bytes_after'] / max(x['bytes_before'], 1):7.1%} "
                         f"{x['error'] or 0:8.4f} {x['lowrank_error'] or 0:8.4f}")
        for x in self.sections.get("blocks", []):
            if x is self.sections["blocks"][0]:
                lines += ["", f"{'dropped block (y := x)':<40} {'nodes':>6} {'error':>8}"]
            lines.append(f"{_short(x['block'], 40):<40} {x['nodes']:>6} {x['error'] or 0:8.4f}")
        lines += _allocation_lines(self.allocation)
        lines += _latency_lines(self.latency)
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def strict(value):
    """`value` with numpy scalars made plain and non-finite floats made None, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return strict(float(value))
def versions() -> dict:
    """Versions of the tool and of what it ran on, as recorded in the report."""
    import platform

    import numpy
    import onnx
    import onnxruntime

    from .. import __version__
    return {"onnxcompress": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def op_counts(graph) -> dict[str, int]:
    """Nodes per op type in a GraphProto's main graph (subgraphs not counted), sorted by op type."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _op_line(ops: dict) -> list[str]:
    """`nodes       14 -> 19 (MatMul 6 -> 12, Gemm 4 -> 1)`: only the op types whose count changed."""
    before, after = ops.get("before"), ops.get("after")
    if not before or after is None:
        return []
    changed = [f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in sorted(set(before) | set(after))
               if before.get(op, 0) != after.get(op, 0)]
    line = f"{'nodes':<11} {sum(before.values()):>14,} -> {sum(after.values()):>14,}"
    return [line + (f" ({', '.join(changed)})" if changed else " (same op types and counts)")]


def _size_lines(r: Report) -> list[str]:
    out = []
    for label, d in (("parameters", r.params), ("FLOPs", r.flops), ("file bytes", r.file_size)):
        before, after = d.get("before"), d.get("after")
        if not before:
            continue
        line = f"{label:<11} {before:>14,.0f}"
        if after is not None:
            line += f" -> {after:>14,.0f} ({after / before:.1%})"
        out.append(line)
    return out + _op_line(r.ops)


def _allocation_lines(a: dict) -> list[str]:
    """The target search's probes, and the estimated output error next to the measured one."""
    out = []
    if a.get("probes"):
        out += ["", f"target {a['target']}, minimizing {a['metric']}: {len(a['probes'])} validation passes"]
        latency = any("latency" in p["cost"] for p in a["probes"])   # the estimate, when it was the objective
        out.append(f"  {'probe':>5} {'position':>9} {'params':>8} {'FLOPs':>8} {'bytes':>8} "
                   + (f"{'latency':>8} " if latency else "") + f"{'est. err':>9} {'meas. err':>9} {'score':>8}")
        for k, p in enumerate(a["probes"], 1):
            c = p["cost"]
            lat = "" if not latency else f"{c['latency']:8.1%} " if "latency" in c else " " * 9
            out.append(f"  {k:>5} {p['position']:>9} {c['params']:8.1%} {c['flops']:8.1%} {c['bytes']:8.1%} "
                       f"{lat}{p['estimated_error']:9.2e} {p['measured_error']:9.2e} {p['score']:8.4f}"
                       f"{'  met' if p['passed'] else ''}")
    if a.get("latency_probes"):
        threads = a.get("threads", 1)
        out += ["", f"latency target {a['value']}: {len(a['latency_probes'])} timings against the original "
                    f"(one sample, {threads} thread{'s' if threads != 1 else ''})",
                f"  {'probe':>5} {'position':>9} {'estimated':>10} {'measured':>9}"]
        written = min((p["position"] for p in a["latency_probes"] if p["passed"]), default=None)
        for k, p in enumerate(a["latency_probes"], 1):
            out.append(f"  {k:>5} {p['position']:>9} {p['estimated']:10.1%} {p['measured']:9.1%}"
                       f"{'  met' if p['passed'] else ''}{' (written)' if p['position'] == written else ''}")
    if a.get("measured_error") is not None:
        out.append(f"output error energy (mean rel L2^2): estimated {a['estimated_error']:.3e}, "
                   f"measured {a['measured_error']:.3e}")
    return out


def _latency_lines(lat: dict | None) -> list[str]:
    """--benchmark: median latency of both models per thread count and batch."""
    if not lat:
        return []
    out = ["", f"latency (median of {lat['repeats']} interleaved calls, {lat['provider']}, "
               f"ONNX Runtime {lat['onnxruntime']}):"]
    for r in lat["runs"]:
        batch = next(iter(r["shapes"].values()), [None])[0] if r["shapes"] else None
        out.append(f"  {r['threads']:>2} thread{'s' if r['threads'] > 1 else ' '} {r['batch']:<10} (batch {batch}) "
                   f"{r['original_s'] * 1e3:10.3f} ms -> {r['compressed_s'] * 1e3:10.3f} ms ({r['ratio']:.2f}x)")
    return out


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _figure(x) -> str:
    """An 8-wide figure of the table, "-" where there is none (not computed, or no statistic)."""
    return f"{'-':>8}" if x is None or not np.isfinite(x) else f"{x:8.4f}"
