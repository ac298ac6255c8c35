"""`onnxcompress inspect MODEL`: what each method would find in a model, without calibrating.

Loads and normalizes the model, finds the ID channel groups and the low-rank layers exactly as
`compress()` does, and reports for each its size, the parameters and FLOPs that scale with it,
and for every linear node left alone the reason. FLOPs are counted at one feed's shapes: the
first feed of `calib` if given, else the input specs with every dynamic dimension set as
synthesized inputs set it (1 for the batch axis, 16 elsewhere).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import click

from .core import data as data_mod
import numpy as np

from .core.cost import count_params, node_flops
from .core.errors import OnnxCompressError
from .core.graph import GraphIndex
from .core.modelio import load_model
from .core.normalize import normalize
from .benchmark import one_sample
from .core.report import op_counts
from .methods.id import group_costs
from .methods.id.groups import find_groups
from .methods.lowrank.layers import find_layers


@dataclass
class Inspection:
    """What `inspect_model` found. `to_dict()` is the `--json` output."""
    model: str
    params: int
    flops: float
    at_input_shapes: dict
    ops: dict
    groups: list = field(default_factory=list)      # id: channel groups
    layers: list = field(default_factory=list)      # low rank: layers a split can replace
    skipped: dict = field(default_factory=dict)     # method -> [{node, op, reason}]

    def to_dict(self) -> dict:
        return dict(vars(self))

    def table(self) -> str:
        shapes = ", ".join(f"{k} {v}" for k, v in self.at_input_shapes.items())
        lines = [f"{self.model}: {sum(self.ops.values())} nodes, {self.params:,} parameters, "
                 f"{self.flops:,.0f} FLOPs at {shapes}"]
        lines += ["", f"channel groups (--method id): {len(self.groups)}"]
        if self.groups:
            lines.append(f"  {'group':<40} {'channels':>8} {'params':>12} {'FLOPs':>14}  exits")
            for grp in self.groups:
                lines.append(f"  {_short(grp['group'], 40):<40} {grp['channels']:>8} {grp['params']:>12,.0f} "
                             f"{grp['flops']:>14,.0f}  {', '.join(grp['exits'])}")
            lines.append("  (params, FLOPs: the part of the model that shrinks with the group's width; a layer "
                         "between two groups counts in both)")
        lines += ["", f"low-rank layers (--method svd, aasvd, lp): {len(self.layers)}"]
        if self.layers:
            lines.append(f"  {'layer':<40} {'kind':<11} {'W (out x in)':>14} {'params':>12} {'FLOPs':>14} {'max rank':>8}")
            for x in self.layers:
                shape = f"{x['out']} x {x['inputs']}"
                lines.append(f"  {_short(x['layer'], 40):<40} {x['kind']:<11} {shape:>14} {x['params']:>12,} "
                             f"{x['flops']:>14,.0f} {x['max_rank']:>8}")
            lines.append("  (max rank: the largest rank whose split is smaller than the layer)")
        for method, rows in self.skipped.items():
            if rows:
                lines += ["", f"left alone by {method}: {len(rows)}"]
                lines += [f"  {_short(s['node'], 40)} ({s['op']}): {s['reason']}" for s in rows]
        return "\n".join(lines)


def inspect_model(model: str | os.PathLike, *, calib=None, include: str | None = None,
                  exclude: str | None = None, max_patch: int = 4096) -> Inspection:
    """Find groups and layers in the model at `model` (see the module docstring). Raises the same
    `OnnxCompressError`s as `compress()` for a model or data at fault."""
    from .api import shapes_at  # the same shapes compress() counts FLOPs at

    norm = normalize(load_model(model), copy=False)
    specs = data_mod.input_specs(norm)
    source = (data_mod.open_source(calib, specs, batch_size=16) if calib is not None
              else data_mod.synthesize(specs, count=1, seed=0))
    first = one_sample(next(iter(source)), specs)  # FLOPs per sample, as compress() counts them
    g = GraphIndex(norm, *shapes_at(norm, first))
    flops = node_flops(g)
    groups = find_groups(g, exclude=exclude, include=include)
    layers = find_layers(g, include=include, exclude=exclude, max_patch=max_patch)
    scaled = {}
    for grp in groups.groups:
        costs = group_costs(g, grp, np.ones(1), flops)
        scaled[grp.id] = [sum(c.base for c in costs if c.metric == m) for m in ("params", "flops")]
    return Inspection(
        model=str(model), params=count_params(norm), flops=float(sum(flops.values())),
        at_input_shapes={k: list(v.shape) for k, v in first.items()}, ops=op_counts(norm.graph),
        groups=[{"group": grp.id, "channels": grp.channels, "producers": list(grp.producers),
                 "exits": [e.tensor for e in grp.exits], "params": scaled[grp.id][0],
                 "flops": scaled[grp.id][1]} for grp in groups.groups],
        layers=[{"layer": x.key, "kind": x.kind, "out": x.out, "inputs": x.inputs, "params": x.params,
                 "flops": flops.get(x.node, 0.0), "max_rank": x.max_rank, "statistic": x.statistic}
                for x in layers.layers],
        skipped={"id": [vars(s) for s in groups.skipped], "low rank": [vars(s) for s in layers.skipped]})


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path())
@click.option("--calib", type=click.Path(), help="Read only the first feed, for the shapes FLOPs are counted at.")
@click.option("--include", help="Regular expression: only layers / groups with a producer whose node name matches.")
@click.option("--exclude", help="Regular expression: leave groups and layers touching matching node names alone.")
@click.option("--max-patch", type=int, default=4096, show_default=True, help="Conv inputs: im2col patch length up to which a split uses the patch Gram.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write what was found as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Tracebacks on errors.")
def command(model, calib, include, exclude, max_patch, json_path, verbose):
    """Print the channel groups (ID) and low-rank layers found in MODEL, with their sizes, FLOPs
    and the reason for every linear node left alone. Nothing is calibrated or written (except
    --json)."""
    from .cli import _fail
    try:
        found = inspect_model(model, calib=calib, include=include, exclude=exclude, max_patch=max_patch)
    except OnnxCompressError as e:
        _fail(e, verbose)
    click.echo(found.table())
    if json_path:
        Path(json_path).write_text(json.dumps(found.to_dict(), indent=2) + "\n")
