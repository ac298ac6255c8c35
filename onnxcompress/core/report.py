"""Report: the run's figures as one JSON-ready dict and as a terminal table."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


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
    skipped: list = field(default_factory=list)
    agreement: list = field(default_factory=list)
    gate: dict | None = None
    allocation: dict = field(default_factory=dict)  # size rule, sensitivities, target probes, estimated vs measured error
    warnings: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    plan: object = field(default=None, repr=False)  # the Plan applied (not part of the JSON)
    latency: dict | None = None                     # --benchmark: measured latency of both models

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "plan"}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=float) + "\n")

    def table(self) -> str:
        """A compact human-readable summary."""
        lines = [f"{self.input} -> {self.output or '(not written)'}"]
        lines += _size_lines(self)
        if self.groups:
            lines.append("")
            lines.append(f"{'group':<40} {'kept':>11} {'error':>8} {'best':>8}")
            for grp in self.groups:
                kept = f"{grp['kept']}/{grp['channels']}"
                lines.append(f"{_short(grp['group'], 40):<40} {kept:>11} {grp['error']:8.4f} {grp['best_error']:8.4f}")
        if self.layers:
            lines.append("")
            lines.append(f"{'layer':<40} {'rank':>6} {'params':>9} {'error':>8} {'optimum':>8}")
            for x in self.layers:
                kept = x["params_after"] / x["params_before"]
                lines.append(f"{_short(x['layer'], 40):<40} {x['rank']:>6} {kept:9.1%} {x['error']:8.4f} "
                             f"{x['best_error']:8.4f}")
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
        lines += _allocation_lines(self.allocation)
        lines += _latency_lines(self.latency)
        for w in self.warnings:
            lines.append(f"warning: {w}")
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


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
    return out


def _allocation_lines(a: dict) -> list[str]:
    """The target search's probes, and the estimated output error next to the measured one."""
    out = []
    if a.get("probes"):
        out += ["", f"target {a['target']}, minimizing {a['metric']}: {len(a['probes'])} validation passes"]
        out.append(f"  {'probe':>5} {'position':>9} {'params':>8} {'FLOPs':>8} {'bytes':>8} {'est. err':>9} "
                   f"{'meas. err':>9} {'score':>8}")
        for k, p in enumerate(a["probes"], 1):
            c = p["cost"]
            out.append(f"  {k:>5} {p['position']:>9} {c['params']:8.1%} {c['flops']:8.1%} {c['bytes']:8.1%} "
                       f"{p['estimated_error']:9.2e} {p['measured_error']:9.2e} {p['score']:8.4f}"
                       f"{'  met' if p['passed'] else ''}")
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
