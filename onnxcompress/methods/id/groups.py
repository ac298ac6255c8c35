"""Find channel groups: pure analysis of a normalized graph (docs/graph-rules.md).

A group starts at the output channels of one or more producers, follows them through
channel-preserving ops, and ends at exits that are linear in the channels. Groups joined by an
op reading two of their tensors (a residual Add, a squeeze-and-excitation Mul) become one group.
One selection of kept channels serves the whole group; each exit tensor gets its own
interpolation matrix. Every producer that is not compressed, and every linear node that is not a
producer, comes back as `Skipped` with the reason.

Concat along the channels: the Concat output starts a draft of its own, as wide as the
concatenation, and each input's draft is placed in it at the input's offset (`edits.Enter`).
Drafts linked by shared tensors or joins sit at the same offset; a draft reaching the same index
space at two different offsets stops the group. The merged group's channel space is the union
of the windows; each tensor before a Concat is a window [offset, offset + width) of it, and every
edit on it carries that window. An exit reading a window gets the Gram of its own tensor
(`exit_request`), embedded at the window in the group's space (`embed_stats`): zero outside, so
its interpolation matrix, restricted to the window, is the window's own least-squares fit.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ...core.graph import GraphIndex
from ...core.stats import ChannelGram, Stats, gram_bytes, gram_too_big, over_total
from ...ops.edits import (Enter, Exit, Member, Mix, Produce, SetAttr, ShapeEntry, Shift, Slice, Stop,
                          Through, windowed)
from ...ops.compute import HANDLERS, NORM_THROUGH
from ..base import Skipped

LINEAR_OPS = ("Conv", "Gemm", "MatMul", "Gather", "ConvTranspose")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class ExitTensor:
    """A group tensor read by exits: its Gram (rows x channels, over `axis`) drives the
    interpolation matrix of every exit reading it. A tensor before a Concat holds the window
    [offset, offset + width) of the group's channels (width 0: all of them)."""
    tensor: str
    axis: int
    offset: int = 0
    width: int = 0


def exit_request(channels: int, e: ExitTensor) -> ChannelGram:
    """The statistic an exit tensor needs: the Gram over its own channels."""
    return ChannelGram(e.tensor, e.axis, e.width or channels)


def embed_stats(st: Stats, e: ExitTensor, channels: int) -> Stats:
    """A window's statistics placed in the group's channel space (zero outside the window)."""
    if not e.width or e.width == channels:
        return st
    window = slice(e.offset, e.offset + e.width)
    gram = np.zeros((channels, channels))
    gram[window, window] = st.gram
    sums = np.zeros(channels)
    sums[window] = st.sums
    return Stats(gram, sums, st.rows)


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
    block: int = 1              # keep whole blocks of this many consecutive channels
    # tensors before a Concat along the channels: (tensor, offset, width), the window they hold
    spans: tuple[tuple[str, int, int], ...] = ()

    def mixes(self, source: str | None = None) -> list[Mix]:
        return [e for e in self.edits if isinstance(e, Mix) and (source is None or e.source == source)]

    def shifts(self, source: str) -> list[Shift]:
        return [e for e in self.edits if isinstance(e, Shift) and e.source == source]

    @property
    def windows(self) -> tuple[tuple[int, int], ...]:
        """The (offset, width) windows of the tensors before a Concat, narrowest first."""
        found = {(e.offset, e.width) for e in self.edits if getattr(e, "width", 0)}
        found |= {(e.offset, e.width) for e in self.exits if e.width}
        return tuple(sorted(found, key=lambda w: (w[1], w[0])))

    def kept_channels(self, order, k: int) -> np.ndarray:
        """The channels to keep, sorted: the first k of `order` (whole blocks), except that every
        window keeps at least its first block in `order` (a producer cannot lose all its
        channels), in place of the last blocks of `order` taken (so k grows only when there
        are more windows than k allows)."""
        b = self.block
        units = [int(c) // b for c in np.asarray(order)[::b]]
        required = self.required_units(units)
        n = max(-(-k // b), len(required))
        chosen = set(required)
        for u in units:
            if len(chosen) >= n:
                break
            chosen.add(u)
        return np.sort(np.concatenate([np.arange(u * b, (u + 1) * b) for u in chosen]))

    def required_units(self, units) -> list[int]:
        """Of `units` (block indices in pivot order), the first of every window: the blocks a
        selection keeps whatever its size, so that no producer loses all its channels."""
        b, required = self.block, []
        for offset, width in self.windows:
            if not any(offset <= u * b < offset + width for u in required):
                required.append(int(next(u for u in units if offset <= u * b < offset + width)))
        return required

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

    def requests(self) -> dict[str, ChannelGram]:
        """Exit tensor -> the statistic it needs (a window's Gram over its own channels)."""
        return {e.tensor: exit_request(grp.channels, e) for grp in self.groups for e in grp.exits}


@dataclass
class _Draft:
    """A group while it is being traced: mutable, private to this module."""
    producers: list[int]
    channels: int
    members: dict[str, Member] = field(default_factory=dict)
    edits: set = field(default_factory=set)
    exits: dict[str, ExitTensor] = field(default_factory=dict)
    joins: list[tuple] = field(default_factory=list)   # (node, tensor, axis[, head axis])
    nodes: set[int] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    weights: list[Slice] = field(default_factory=list)
    concat: int | None = None        # the Concat node whose output starts this draft
    block: int = 1                   # channels go in whole blocks (GroupNormalization, grouped Conv)
    enters: list[Enter] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)   # tensor -> (offset, width)

    def stop(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)


def find_groups(g: GraphIndex, *, exclude: str | None = None, include: str | None = None,
                total_budget: bool = True) -> Analysis:
    """Trace every producer's channels and return the groups that can be compressed, plus a
    reason for every linear node that is left alone. With `include`, only groups with a producer
    whose node name matches are kept (the others are skipped, with that reason). With
    `total_budget`, groups whose Grams would pass the budget for all statistics together
    (`stats.STATS_BUDGET`) are skipped; without it, only a single group over `GRAM_BUDGET` is
    (the caller calibrates in blocks)."""
    skipped: list[Skipped] = []
    merged = _drafts(g, HANDLERS, skipped)
    subgraph_names = g.subgraph_uses()
    _check_weights(g, merged, subgraph_names)
    pattern = re.compile(exclude) if exclude else None
    wanted = re.compile(include) if include else None
    groups, used, what_if = [], 0, None
    for d in merged:
        _check_members(g, d, subgraph_names, pattern)
        _check_size_and_values(g, d)
        if wanted and not any(wanted.search(g.nodes[p].name) for p in d.producers):
            d.reasons.append(f"no producer matches --include {include!r}")
        if not d.reasons and total_budget:
            need = len(d.exits) * gram_bytes(d.channels)
            reason = over_total(need, used)
            if reason:
                d.stop(reason)
            used += 0 if reason else need
        if d.reasons:
            if what_if is None and any(NORMALIZING in r for r in d.reasons):
                what_if = _drafts(g, {**HANDLERS, **NORM_THROUGH}, [])
            reason = "; ".join(d.reasons) + (_at_stake(g, d, what_if) if what_if else "")
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


def _drafts(g: GraphIndex, handlers: dict, skipped: list[Skipped]) -> list[_Draft]:
    """Trace every producer with `handlers`, add the Concat drafts, merge; producers that are
    not and linear nodes that are no producers go to `skipped`."""
    drafts = []
    for i, node in enumerate(g.nodes):
        handler = handlers.get(node.op_type)
        result = handler.produce(g, i) if handler and node.domain in ("", "ai.onnx") else None
        if isinstance(result, Produce):
            draft = _Draft(producers=[i], channels=result.channels, nodes={i},
                           edits=set(result.edits), weights=[result.weight])
            _trace(g, draft, Member(result.output, result.axis), handlers)
            drafts.append(draft)
        elif isinstance(result, str):
            skipped.append(Skipped(g.key(i), node.op_type, result))
        elif node.op_type in LINEAR_OPS and node.op_type != "Gather" and not _is_depthwise(g, i):
            skipped.append(Skipped(g.key(i), node.op_type, "not a channel producer"))
        elif node.op_type in RECURRENT_OPS:
            skipped.append(Skipped(g.key(i), node.op_type, "recurrent layer: its weights are not compressed"))
    _concat_drafts(g, drafts, handlers)
    return _merge(g, drafts)


def _is_depthwise(g: GraphIndex, i: int) -> bool:
    node = g.nodes[i]
    w = g.const(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    return w is not None and g.attr(i, "group", 1) == w.shape[0] > 1 and w.shape[1] == 1


def _concat_drafts(g: GraphIndex, drafts: list[_Draft], handlers: dict) -> None:
    """Add a draft for the output of every Concat some draft enters along the channels (and for
    the Concats those reach, and so on)."""
    started: set[int] = set()
    k = 0
    while k < len(drafts):
        for enter in drafts[k].enters:
            if enter.node in started:
                continue
            started.add(enter.node)
            d = _Draft(producers=[], channels=enter.total, nodes={enter.node}, concat=enter.node)
            _trace(g, d, Member(enter.output, enter.axis), handlers)
            drafts.append(d)
        k += 1


def _trace(g: GraphIndex, d: _Draft, start: Member, handlers: dict) -> None:
    """Breadth-first walk from the producer output; fills the draft's members, edits and exits."""
    queue = [start]
    d.members[start.tensor] = start
    while queue:
        m = queue.pop(0)
        for j, pos in g.users(m.tensor):
            handler = handlers.get(g.nodes[j].op_type)
            if handler is None or g.nodes[j].domain not in ("", "ai.onnx"):
                d.stop(f"reaches {g.nodes[j].op_type} node {g.key(j)}, which is not understood")
                continue
            if m.heads and not handler.heads:
                d.stop(f"attention heads reach {g.nodes[j].op_type} node {g.key(j)}, which does not handle them")
                continue
            result = handler.consume(g, j, pos, m, d.channels)
            d.nodes.add(j)
            if isinstance(result, Stop):
                d.stop(f"{result.reason} (node {g.key(j)})")
            elif isinstance(result, Exit):
                d.edits.update(result.edits)
                d.exits[result.source] = ExitTensor(result.source, result.axis)
            elif isinstance(result, Enter):
                d.enters.append(result)
            elif isinstance(result, Through):
                d.edits.update(result.edits)
                d.block = math.lcm(d.block, result.block)
                d.joins.extend((j, *join) for join in result.joins)
                for out in result.outputs:
                    known = d.members.get(out.tensor)
                    if known is None:
                        d.members[out.tensor] = out
                        queue.append(out)
                    elif known != out:
                        d.stop(f"tensor {out.tensor!r} is reached with two channel layouts")


def _merge(g: GraphIndex, drafts: list[_Draft]) -> list[_Draft]:
    """Union drafts that share a tensor, are joined by a two-activation op, or meet at a
    Concat; place each in its class's channel space: links[a] holds (b, delta, why) meaning
    offset(b) = offset(a) + delta."""
    links: dict[int, list[tuple[int, int, str]]] = defaultdict(list)

    def link(a: int, b: int, delta: int | None, why: str) -> None:
        if delta is None:  # the same channels: same offset, same width
            delta = 0
            if drafts[a].channels != drafts[b].channels:
                conflicts.setdefault(a, []).append(f"joins channel groups of different widths "
                                                   f"({drafts[a].channels} and {drafts[b].channels})")
        links[a].append((b, delta, why))
        links[b].append((a, -delta, why))

    conflicts: dict[int, list[str]] = {}

    owner: dict[str, int] = {}
    for k, d in enumerate(drafts):
        for name in d.members:
            if name in owner:
                link(owner[name], k, None, f"tensor {name!r}")
            else:
                owner[name] = k
    concat_of = {d.concat: k for k, d in enumerate(drafts) if d.concat is not None}
    for k, d in enumerate(drafts):
        for j, name, *_axes in d.joins:
            if name in owner:
                link(k, owner[name], None, f"node {g.key(j)}")
            else:
                d.stop(f"joined at node {g.key(j)} with {name!r}, which is not in a channel group")
        for e in d.enters:
            link(concat_of[e.node], k, e.offset, f"node {g.key(e.node)}")
    out, seen = [], set()
    for start in range(len(drafts)):
        if start in seen:
            continue
        offset, queue, problems = {start: 0}, [start], []
        seen.add(start)
        while queue:
            a = queue.pop()
            problems.extend(conflicts.get(a, []))
            for b, delta, why in links[a]:
                if b not in offset:
                    offset[b] = offset[a] + delta
                    seen.add(b)
                    queue.append(b)
                elif offset[b] != offset[a] + delta:
                    problems.append(f"channels meet at {why} at two different offsets")
        ks = sorted(offset)
        low = min(offset.values())
        out.append(_combine(g, [drafts[k] for k in ks], [offset[k] - low for k in ks], problems))
    return out


def _combine(g: GraphIndex, ds: list[_Draft], offsets: list[int], conflicts: list[str]) -> _Draft:
    """One draft from linked drafts at their offsets: edits and exits of a draft narrower than
    the whole space are placed at its window."""
    total = max(o + d.channels for d, o in zip(ds, offsets))
    out = _Draft(producers=[], channels=total)
    for r in conflicts:
        out.stop(r)
    for d, o in zip(ds, offsets):
        out.block = math.lcm(out.block, d.block)
    for d, o in zip(ds, offsets):
        if out.block > 1 and (o % out.block or d.channels % out.block):
            out.stop(f"channels [{o}, {o + d.channels}) do not split into whole blocks of {out.block}")
        window = d.channels != total
        place = (lambda e: windowed(e, o, d.channels)) if window else (lambda e: e)
        out.producers.extend(d.producers)
        out.edits |= {place(e) for e in d.edits}
        for name, e in d.exits.items():
            out.exits[name] = ExitTensor(e.tensor, e.axis, o, d.channels) if window else e
        out.joins.extend(d.joins)
        out.nodes |= d.nodes
        out.weights.extend(place(w) for w in d.weights)
        for r in d.reasons:
            out.stop(r)
        for name, m in d.members.items():
            known = out.members.setdefault(name, m)
            if known != m:
                out.stop(f"tensor {name!r} is reached with two channel layouts")
            if window:
                out.spans[name] = (o, d.channels)
        if d.concat is not None:
            enters = [e for x in ds for e in x.enters if e.node == d.concat]
            entered, start = {e.offset for e in enters}, 0
            for name in g.nodes[d.concat].input:
                if start not in entered:
                    out.stop(f"Concat node {g.key(d.concat)} joins {name!r}, which is not in a channel group")
                shape = g.shape(name)
                start += shape[len(shape) + enters[0].axis]
    for j, name, *axes in out.joins:
        m = out.members.get(name)
        if m is not None and (m.axis != axes[0] or (len(axes) > 1 and m.head_axis != axes[1])):
            out.stop(f"node {g.key(j)} joins tensors with different channel axes")
    return out


NORMALIZING = "normalizes across the channels"


def _at_stake(g: GraphIndex, d: _Draft, what_if: list[_Draft]) -> str:
    """For a group blocked by a normalization over its channels (LayerNormalization, ...): the
    parameters and FLOPs (at the analysed shapes) of the producers and exits that would scale
    with its channels if normalizations let the channels through (`what_if`: the groups traced
    with `NORM_THROUGH`), i.e. what pruning these channels could act on at most."""
    if not any(NORMALIZING in r for r in d.reasons):
        return ""
    from ...core.cost import node_flops  # cost imports this module
    mine = set(d.producers)
    wider = [w for w in what_if if mine & set(w.producers)] or [d]
    producers = set().union(*(w.producers for w in wider))
    edits = set().union(*(w.edits for w in wider))
    tensors = {e.tensor for e in edits if isinstance(e, (Slice, Mix))}
    exits = {e.node for e in edits if isinstance(e, Mix)}
    params = sum(int(np.prod(g.initializers[t].dims, dtype=np.int64)) for t in tensors if t in g.initializers)
    flops = node_flops(g)
    f = sum(flops.get(i, 0.0) for i in producers | exits)
    return (f" (at stake: {params} parameters and {f:.3g} FLOPs of {len(producers)} producer(s) and "
            f"{len(exits)} exit(s) would scale with these {d.channels} channels)")


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
            if not isinstance(e, (SetAttr, ShapeEntry)):  # shape entries are edited in copies
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
        return ("entry", e.index, e.offset, e.width)
    if isinstance(e, Shift):
        return ("shift",)
    return ("axis", e.axis, e.offset, e.width)


def _freeze(g: GraphIndex, d: _Draft) -> Group:
    producers = tuple(g.key(p) for p in sorted(d.producers))
    return Group(
        id=producers[0], channels=d.channels, producers=producers,
        nodes=tuple(g.key(i) for i in sorted(d.nodes | set(d.producers))),
        tensors=tuple(sorted(d.members)),
        exits=tuple(sorted(d.exits.values(), key=lambda e: e.tensor)),
        edits=tuple(sorted(d.edits, key=_edit_key)),
        weights=tuple(d.weights), block=d.block,
        spans=tuple(sorted((name, o, w) for name, (o, w) in d.spans.items())),
    )


def _edit_key(e) -> tuple:
    return (type(e).__name__, getattr(e, "tensor", ""), getattr(e, "node", 0), getattr(e, "axis", 0),
            getattr(e, "offset", 0))
