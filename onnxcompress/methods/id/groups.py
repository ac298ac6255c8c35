"""Find channel groups: pure analysis of a normalized graph (docs/graph-rules.md).

A group starts at the output channels of one or more producers, follows them through
channel-preserving ops, and ends at exits that are linear in the channels. Groups joined by an
op reading two of their tensors (a residual Add, a squeeze-and-excitation Mul) become one group.
One selection of kept channels serves the whole group; each exit tensor gets its own
interpolation matrix. Every producer that is not compressed, and every linear node that is not a
producer, comes back as `Skipped` with the reason.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ...core.graph import GraphIndex
from ...core.stats import gram_bytes, gram_too_big, over_total
from ...ops.edits import Exit, Member, Mix, Produce, SetAttr, ShapeEntry, Shift, Slice, Stop, Through
from ...ops.compute import HANDLERS
from ..base import Skipped

LINEAR_OPS = ("Conv", "Gemm", "MatMul", "Gather", "ConvTranspose")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class ExitTensor:
    """A group tensor read by exits: its Gram (rows x channels, over `axis`) drives the
    interpolation matrix of every exit reading it."""
    tensor: str
    axis: int


@dataclass(frozen=True)
class Group:
    id: str
    channels: int
    producers: tuple[str, ...]
    nodes: tuple[str, ...]
    tensors: tuple[str, ...]
    exits: tuple[ExitTensor, ...]
    edits: tuple
    weights: tuple[Slice, ...]  # main weight of each producer (norm-based selection)

    def mixes(self, source: str | None = None) -> list[Mix]:
        return [e for e in self.edits if isinstance(e, Mix) and (source is None or e.source == source)]

    def shifts(self, source: str) -> list[Shift]:
        return [e for e in self.edits if isinstance(e, Shift) and e.source == source]

    def can_shift(self, source: str) -> bool:
        """Every consumer reading `source` has a bias to take an intercept."""
        mixes, weights = self.mixes(source), {s.weight for s in self.shifts(source)}
        return bool(mixes) and all(m.tensor in weights for m in mixes)


@dataclass(frozen=True)
class Analysis:
    groups: tuple[Group, ...]
    skipped: tuple[Skipped, ...]

    def to_dict(self) -> dict:
        return {"groups": [{"id": g.id, "channels": g.channels, "producers": list(g.producers),
                            "exits": [e.tensor for e in g.exits]} for g in self.groups],
                "skipped": [vars(s) for s in self.skipped]}


@dataclass
class _Draft:
    """A group while it is being traced: mutable, private to this module."""
    producers: list[int]
    channels: int
    members: dict[str, Member] = field(default_factory=dict)
    edits: set = field(default_factory=set)
    exits: dict[str, ExitTensor] = field(default_factory=dict)
    joins: list[tuple[int, str, int]] = field(default_factory=list)
    nodes: set[int] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    weights: list[Slice] = field(default_factory=list)

    def stop(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


def find_groups(g: GraphIndex, *, exclude: str | None = None, include: str | None = None) -> Analysis:
    """Trace every producer's channels and return the groups that can be compressed, plus a
    reason for every linear node that is left alone. With `include`, only groups with a producer
    whose node name matches are kept (the others are skipped, with that reason)."""
    drafts, skipped = [], []
    for i, node in enumerate(g.nodes):
        handler = HANDLERS.get(node.op_type)
        result = handler.produce(g, i) if handler and node.domain in ("", "ai.onnx") else None
        if isinstance(result, Produce):
            draft = _Draft(producers=[i], channels=result.channels, nodes={i},
                           edits=set(result.edits), weights=[result.weight])
            _trace(g, draft, Member(result.output, result.axis))
            drafts.append(draft)
        elif isinstance(result, str):
            skipped.append(Skipped(g.key(i), node.op_type, result))
        elif node.op_type in LINEAR_OPS and node.op_type != "Gather" and not _is_depthwise(g, i):
            skipped.append(Skipped(g.key(i), node.op_type, "not a channel producer"))
        elif node.op_type in RECURRENT_OPS:
            skipped.append(Skipped(g.key(i), node.op_type, "recurrent layer: its weights are not compressed"))
    merged = _merge(g, drafts)
    subgraph_names = g.subgraph_uses()
    _check_weights(g, merged, subgraph_names)
    pattern = re.compile(exclude) if exclude else None
    wanted = re.compile(include) if include else None
    groups, used = [], 0
    for d in merged:
        _check_members(g, d, subgraph_names, pattern)
        _check_size_and_values(g, d)
        if wanted and not any(wanted.search(g.nodes[p].name) for p in d.producers):
            d.reasons.append(f"no producer matches --include {include!r}")
        if not d.reasons:
            need = len(d.exits) * gram_bytes(d.channels)
            reason = over_total(need, used)
            if reason:
                d.stop(reason)
            used += 0 if reason else need
        if d.reasons:
            reason = "; ".join(d.reasons)
            skipped.extend(Skipped(g.key(p), g.nodes[p].op_type, reason) for p in sorted(d.producers))
        else:
            groups.append(_freeze(g, d))
    order = {g.key(i): i for i in range(len(g.nodes))}
    skipped.sort(key=lambda s: order.get(s.node, 0))
    return Analysis(tuple(groups), tuple(skipped))


def _check_size_and_values(g: GraphIndex, d: _Draft) -> None:
    """Stop a group whose exit Grams would not fit the memory budget, or that edits a weight
    holding NaN or Inf (accepted only with allow_nonfinite; such weights are left as they are)."""
    too_big = gram_too_big(d.channels)
    if too_big:
        d.stop(f"group of {too_big}")
    for name in sorted({e.tensor for e in d.edits if not isinstance(e, SetAttr)}):
        value = g.const(name)
        if value is not None and value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            d.stop(f"weight {name!r} holds NaN or Inf values")
            break


def _is_depthwise(g: GraphIndex, i: int) -> bool:
    node = g.nodes[i]
    w = g.const(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    return w is not None and g.attr(i, "group", 1) == w.shape[0] > 1 and w.shape[1] == 1


def _trace(g: GraphIndex, d: _Draft, start: Member) -> None:
    """Breadth-first walk from the producer output; fills the draft's members, edits and exits."""
    queue = [start]
    d.members[start.tensor] = start
    while queue:
        m = queue.pop(0)
        for j, pos in g.users(m.tensor):
            handler = HANDLERS.get(g.nodes[j].op_type)
            if handler is None or g.nodes[j].domain not in ("", "ai.onnx"):
                d.stop(f"reaches {g.nodes[j].op_type} node {g.key(j)}, which is not understood")
                continue
            result = handler.consume(g, j, pos, m, d.channels)
            d.nodes.add(j)
            if isinstance(result, Stop):
                d.stop(f"{result.reason} (node {g.key(j)})")
            elif isinstance(result, Exit):
                d.edits.update(result.edits)
                d.exits[result.source] = ExitTensor(result.source, result.axis)
            elif isinstance(result, Through):
                d.edits.update(result.edits)
                d.joins.extend((j, name, axis) for name, axis in result.joins)
                for out in result.outputs:
                    known = d.members.get(out.tensor)
                    if known is None:
                        d.members[out.tensor] = out
                        queue.append(out)
                    elif known != out:
                        d.stop(f"tensor {out.tensor!r} is reached with two channel layouts")


def _merge(g: GraphIndex, drafts: list[_Draft]) -> list[_Draft]:
    """Union drafts that share a tensor or are joined by a two-activation op."""
    parent = list(range(len(drafts)))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[str, int] = {}
    for k, d in enumerate(drafts):
        for name in d.members:
            if name in owner:
                parent[find(k)] = find(owner[name])
            else:
                owner[name] = k
    for k, d in enumerate(drafts):
        for j, name, _axis in d.joins:
            if name in owner:
                parent[find(k)] = find(owner[name])
            else:
                d.stop(f"joined at node {g.key(j)} with {name!r}, which is not in a channel group")
    classes: dict[int, list[_Draft]] = defaultdict(list)
    for k, d in enumerate(drafts):
        classes[find(k)].append(d)
    return [_combine(g, ds) for ds in classes.values()]


def _combine(g: GraphIndex, ds: list[_Draft]) -> _Draft:
    out = _Draft(producers=[], channels=ds[0].channels)
    for d in ds:
        out.producers.extend(d.producers)
        out.edits |= d.edits
        out.exits.update(d.exits)
        out.joins.extend(d.joins)
        out.nodes |= d.nodes
        out.weights.extend(d.weights)
        for r in d.reasons:
            out.stop(r)
        for name, m in d.members.items():
            known = out.members.setdefault(name, m)
            if known != m:
                out.stop(f"tensor {name!r} is reached with two channel layouts")
        if d.channels != out.channels:
            out.stop(f"joins channel groups of different widths ({out.channels} and {d.channels})")
    for j, name, axis in out.joins:
        m = out.members.get(name)
        if m is not None and m.axis != axis:
            out.stop(f"node {g.key(j)} joins tensors with different channel axes")
    return out


def _check_members(g: GraphIndex, d: _Draft, subgraph_names: set[str], pattern) -> None:
    for name in d.members:
        if name in g.graph_outputs:
            d.stop(f"reaches graph output {name!r}")
        if name in subgraph_names:
            d.stop(f"tensor {name!r} is used inside a subgraph")
    if not d.exits and not d.reasons:
        d.stop("no linear consumer to absorb the correction")
    if pattern:
        hits = sorted(g.key(i) for i in d.nodes | set(d.producers) if pattern.search(g.key(i)))
        if hits:
            d.stop(f"excluded by --exclude (node {hits[0]})")


def _check_weights(g: GraphIndex, drafts: list[_Draft], subgraph_names: set[str]) -> None:
    """A constant may only be edited where every node reading it edits it the same way: a weight
    shared with a node outside the group (also one inside an If/Loop/Scan body, or a graph
    input or output), or edited by two groups through different nodes, stops the groups
    involved."""
    by_tensor: dict[str, list[tuple[_Draft, object]]] = defaultdict(list)
    for d in drafts:
        for e in d.edits:
            if not isinstance(e, SetAttr):
                by_tensor[e.tensor].append((d, e))
    graph_inputs = {vi.name for vi in g.graph.input}
    for name, uses in by_tensor.items():
        editors = {e.node for _, e in uses}
        readers = {j for j, _ in g.users(name)}
        per_axis: dict[tuple, set[int]] = defaultdict(set)
        for d, e in uses:
            per_axis[_edit_slot(e)].add(id(d))
        reason = None
        if name in graph_inputs:
            reason = f"weight {name!r} is also a graph input"
        elif name in g.graph_outputs:
            reason = f"weight {name!r} is also a graph output"
        elif name in subgraph_names:
            reason = f"weight {name!r} is also read inside a subgraph"
        elif readers - editors:
            other = g.key(min(readers - editors))
            reason = f"weight {name!r} is shared with node {other} outside the group"
        elif any(len(owners) > 1 for owners in per_axis.values()):
            reason = f"weight {name!r} is shared by two groups editing one axis"
        elif len(editors) > 1 and len(per_axis) > 1:
            reason = f"weight {name!r} is shared by nodes that edit it differently"
        if reason:
            for d, _ in uses:
                d.stop(reason)


def _edit_slot(e) -> tuple:
    """What part of a constant an edit changes: an axis (Slice, Mix), an entry, or the values
    (Shift). Two groups may not change the same part."""
    if isinstance(e, ShapeEntry):
        return ("entry", e.index)
    if isinstance(e, Shift):
        return ("shift",)
    return ("axis", e.axis)


def _freeze(g: GraphIndex, d: _Draft) -> Group:
    producers = tuple(g.key(p) for p in sorted(d.producers))
    return Group(
        id=producers[0], channels=d.channels, producers=producers,
        nodes=tuple(g.key(i) for i in sorted(d.nodes | set(d.producers))),
        tensors=tuple(sorted(d.members)),
        exits=tuple(sorted(d.exits.values(), key=lambda e: e.tensor)),
        edits=tuple(sorted(d.edits, key=_edit_key)),
        weights=tuple(d.weights),
    )


def _edit_key(e) -> tuple:
    return (type(e).__name__, getattr(e, "tensor", ""), getattr(e, "node", 0), getattr(e, "axis", 0))
