"""A measured latency model: how long each layer a site shrinks takes in ONNX Runtime at the sizes
the allocator may pick, so sizes can be chosen for speed and slower splits refused.

For a node n of the model, at the shapes of one sample (batch 1), `Probe`s are one- or two-node
ONNX graphs with random weights: the node itself with its input or output channel count set to
w (depthwise Conv: both, and its group), and, for a layer a low-rank split may replace, the split
at rank r (Conv k x k -> r then Conv 1x1 r -> out; X B^T A^T; Gather then MatMul). Each probe is
timed once per machine (the fastest of `REPEATS` calls after warm-up, in its own ONNX Runtime CPU
session at `threads` threads) and cached in a JSON file keyed by the probe, the thread count,
the ONNX Runtime version and the CPU.

Sites get a "latency" `Cost` item per node (base t_n, the node's full-size time):

* ID: factor_j = t_n(w_j) / t_n(full) along the side the group sets (output channels of a
  producer, input channels of a consumer, both for a depthwise Conv), t_n(w) interpolated
  linearly between the timed widths (at most `POINTS` per side, multiples of the curve's N);
  a node between two groups scales with the product of both factors, as its FLOPs do.
  Every other node the group's channels pass through (activations, normalizations, residual
  Adds, Resize, pooling, Concat, attention's products of two activations) is memory-bound work
  over those channels: base t_n from ONNX Runtime's profiler on the whole original model at
  the sample (`node_times`), factor_j = k_j / C, or the kept share of its own Concat window;
  so are the layout conversions ONNX Runtime inserts, given to the groups whose tensors have
  the shape they convert (`_layout_owners`). On a CNN such as a text detector at 320 x 320
  these nodes and conversions take about half the time. With a profile, a layer's base is its
  profiled time too (a Conv alone also pays its own layout conversions); its probes give
  the factor.
* low rank: factor_j = t_split(r_j) / t_n, interpolated the same way over timed ranks; a
  candidate with factor >= 1 (the split is not faster than the layer) is dropped from the curve
  with the reason, except for a Gather (a lookup, which any split slows: its split saves bytes,
  and the whole-model guard judges it).

Latency is thus the product of per-op timings, not a FLOP count; what the model does not see
(per-node overhead, which it scales with the node; layout conversions of a shape that tensors
outside the groups also have; kernels ONNX Runtime fuses under names it cannot map back; a
split's own conversions) is left to `--benchmark` and `tools/bench_latency.py`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .core.runtime import session_source
from .methods.base import Cost, Curve

log = logging.getLogger(__name__)

REPEATS = 9
POINTS = 4
CACHE_DIR = Path(os.path.expanduser("~")) / ".cache" / "onnxcompress"


@dataclass(frozen=True)
class Probe:
    """A tiny graph to time: `nodes` as (op_type, attributes, weight shapes) applied in a chain to
    one input of `shape` (float32; "Gather" takes int64 indices of `shape` into its table;
    "MatMul@left" multiplies its weight from the left)."""
    shape: tuple
    nodes: tuple  # ((op, ((attr, value), ...), (weight shape, ...)), ...)

    def key(self) -> str:
        return json.dumps([list(self.shape), [[op, list(attrs), [list(w) for w in ws]] for op, attrs, ws in self.nodes]])


def build(probe: Probe) -> onnx.ModelProto:
    """The probe as an ONNX model (opset 17), weights random."""
    rng = np.random.default_rng(0)
    gather = probe.nodes[0][0] == "Gather"
    x = helper.make_tensor_value_info("x", TensorProto.INT64 if gather else TensorProto.FLOAT, list(probe.shape))
    nodes, inits, prev = [], [], "x"
    for k, (op, attrs, weights) in enumerate(probe.nodes):
        names = []
        for m, shape in enumerate(weights):
            name = f"w{k}_{m}"
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name))
            names.append(name)
        out = f"y{k}"
        ins = [names[0], prev] if op in ("Gather", "MatMul@left") else [prev, *names]
        nodes.append(helper.make_node(op.split("@")[0], ins, [out], **dict(attrs)))
        prev = out
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "probe", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_probe(probe: Probe, threads: int) -> float:
    """Seconds per call of the probe in ONNX Runtime (CPU, `threads` intra-op threads): the
    fastest of REPEATS calls after warm-up, the figure least disturbed by other work."""
    return time_probes([probe], threads)[0]


def time_probes(probes: list[Probe], threads: int) -> list[float]:
    """`time_probe` of several probes timed together: REPEATS rounds, each calling every probe
    once in turn, the fastest call of each. Probes whose times are compared (one node at
    several widths) are so timed under the same load: a burst of other work slows them alike
    instead of inflating one of them."""
    runs = []
    for probe in probes:
        session = probe_session(probe, threads)
        if probe.nodes[0][0] == "Gather":
            vocab = probe.nodes[0][2][0][0]
            x = np.random.default_rng(0).integers(0, vocab, size=probe.shape).astype(np.int64)
        else:
            x = np.random.default_rng(0).standard_normal(probe.shape).astype(np.float32)
        feed = {"x": x}
        for _ in range(2):
            session.run(None, feed)
        runs.append((session, feed))
    best = [math.inf] * len(probes)
    for _ in range(REPEATS):
        for k, (session, feed) in enumerate(runs):
            start = time.perf_counter()
            session.run(None, feed)
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def probe_session(probe: Probe, threads: int):
    """An ONNX Runtime CPU session of the probe's model with the timing options
    (`benchmark.options`: `threads` intra-op threads, idle threads sleeping)."""
    import onnxruntime as ort
    from .benchmark import options
    return ort.InferenceSession(build(probe).SerializeToString(), options(threads), providers=["CPUExecutionProvider"])


NODE_RUNS = 10


def node_times(model: onnx.ModelProto, feed: dict, threads: int, *, runs: int = NODE_RUNS) -> dict[int, float]:
    """Seconds per call of each node of `model`'s main graph (by its index) at `feed`, from ONNX
    Runtime's profiler (CPU, `threads` intra-op threads): the mean kernel time over `runs` calls
    after two warm-up calls, scaled so that the main graph's kernels (those mapped to a node and
    the rest: layout reorders, nodes ONNX Runtime fuses under a name of its own) add up to the
    median wall time of the same calls, the profiler's own overhead spread in proportion.

    The profiler knows nodes by name: while the session is built, every main-graph node is
    named by its index (`onnxcompress_node_<i>`; the names are given back after), so a node
    inside an If or Loop body, or a repeated name, cannot take a main-graph node's time. Events
    are mapped by that name, by the name's part before a "/" (ONNX Runtime's fused nodes, such
    as `<name>/QuickGeluFusion/`), or, for a blocked-layout Conv named after the tensor it
    writes (`<tensor>_nchwc`), to that Conv (`_fused_into`). Kernels of subgraph nodes are left
    out: an If's or Loop's own kernel time already holds them. ONNX Runtime's layout
    conversions, which are no node of the model, are returned apart (`NodeTimes.layout`, by
    the shape they convert; `_layout_owners` gives them to channel groups)."""
    import onnxruntime as ort
    from .benchmark import options
    nodes = model.graph.node
    original = [(n.name if n.HasField("name") else None) for n in nodes]
    inner = {n.name for node in nodes for n in _subgraph_nodes(node)}
    with tempfile.TemporaryDirectory(prefix="onnxcompress-profile-") as tmp:
        opts = options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        try:
            for i, n in enumerate(nodes):
                n.name = f"{TOKEN}{i}"
            with session_source(model) as src:
                session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        finally:
            for n, name in zip(nodes, original):
                if name is None:
                    n.ClearField("name")
                else:
                    n.name = name
        walls = []
        for k in range(2 + runs):
            start = time.perf_counter()
            session.run(None, feed)
            if k >= 2:
                walls.append(time.perf_counter() - start)
        events = json.loads(Path(session.end_profiling()).read_text())
    seen: dict[str, list[float]] = {}
    shapes: dict[str, tuple] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") == "Node" and name.endswith("_kernel_time"):
            seen.setdefault(name[:-len("_kernel_time")], []).append(float(e.get("dur", 0)) * 1e-6)
            ins = (e.get("args") or {}).get("input_type_shape") or []
            if len(ins) == 1 and isinstance(ins[0], dict) and len(ins[0]) == 1:
                shapes[name[:-len("_kernel_time")]] = tuple(int(d) for d in next(iter(ins[0].values())))
    per_run = max(runs, 1)
    times = {n: sum(v[-per_run:]) / per_run for n, v in seen.items() if n not in inner}  # the last `runs` calls
    total = sum(times.values())
    scale = float(np.median(walls)) / total if total > 0 and walls else 1.0
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    out = NodeTimes()
    for name, t in times.items():
        i = _token_index(name.split("/")[0], len(nodes))
        if i is None and name.endswith(NCHWC):
            i = _fused_into(model, producer, name[:-len(NCHWC)])
        if i is not None:
            out[i] = out.get(i, 0.0) + t * scale
        elif name.startswith(REORDER) and shapes.get(name):
            out.layout.append((name, shapes[name], t * scale))
    return out


REORDER = ("ReorderInput", "ReorderOutput")   # ONNX Runtime's conversions to and from blocked layout


class NodeTimes(dict):
    """node index -> seconds per call (`node_times`), and `layout`: the layout conversions ONNX
    Runtime inserts between nodes, which are no node of the model, as (name, shape of the tensor
    converted, seconds per call)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout: list[tuple[str, tuple, float]] = []


TOKEN = "onnxcompress_node_"


def _token_index(name: str, count: int) -> int | None:
    if not name.startswith(TOKEN) or not name[len(TOKEN):].isdigit():
        return None
    i = int(name[len(TOKEN):])
    return i if i < count else None


def _subgraph_nodes(node: onnx.NodeProto):
    """Every node inside `node`'s subgraphs (If branches, Loop and Scan bodies), nested ones too."""
    for a in node.attribute:
        for graph in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                      list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
            for n in graph.node:
                yield n
                yield from _subgraph_nodes(n)


NCHWC = "_nchwc"   # ONNX Runtime's blocked-layout Conv, named after the tensor it writes
FUSED = ("BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh")


def _fused_into(model: onnx.ModelProto, producer: dict[str, int], tensor: str) -> int | None:
    """The Conv that ONNX Runtime's blocked-layout node writing `tensor` stands for: the node
    producing `tensor` (`producer`: tensor -> node index), or, when that is a normalization or
    an activation ONNX Runtime folds into the Conv before it, that Conv (up to a few such nodes
    back). None if `tensor` has no producer."""
    i = producer.get(tensor)
    for _ in range(4):
        if i is None or model.graph.node[i].op_type not in FUSED:
            return i
        j = producer.get(model.graph.node[i].input[0])
        if j is None or model.graph.node[j].op_type not in ("Conv", *FUSED):
            return i
        i = j
    return i


class Timings:
    """Probe timings of this machine, cached in `CACHE_DIR/latency-<machine>.json`.

    With `fresh`, cached figures are not read: every probe is timed once in this run (and the
    cache updated). A latency budget compares a node's times at several widths, and figures
    cached by runs under different load would give wrong ratios: a full-width MatMul cached
    while the machine was busy at 1.4 times its quiet time makes every narrower width look 30%
    cheaper than it is."""

    def __init__(self, threads: int = 1, timer: Callable[[Probe, int], float] | None = None,
                 cache_dir: Path | None = None, fresh: bool = False):
        import onnxruntime as ort
        self.threads = threads
        self.timer = timer
        # (idle threads sleep in every timing session since this cache's second version)
        self.machine = f"ort{ort.__version__}-{platform.machine()}-{_cpu()}-v2"
        self.path = None if timer is not None else (cache_dir or CACHE_DIR) / f"latency-{_digest(self.machine)}.json"
        self.values: dict[str, float] = {} if fresh else self._load()
        self.measured = 0

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text()) if self.path is not None and self.path.exists() else {}
        except (OSError, ValueError):
            return {}

    def __call__(self, probe: Probe) -> float:
        return self.batch([probe])[0]

    def batch(self, probes: list[Probe]) -> list[float]:
        """The times of `probes`; those not known yet are timed together (`time_probes`)."""
        keys = [f"{self.threads}|{p.key()}" for p in probes]
        todo = {k: p for k, p in zip(keys, probes) if k not in self.values}
        if todo:
            if self.timer is not None:
                found = [self.timer(p, self.threads) for p in todo.values()]
            else:
                found = time_probes(list(todo.values()), self.threads)
            for k, t in zip(todo, found):
                self.values[k] = float(t)
            self.measured += len(todo)
        return [self.values[k] for k in keys]

    def save(self) -> None:
        if self.path is None or not self.measured:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            merged = {**self._load(), **self.values}  # other Timings (thread counts, runs) share the file
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("latency: cannot write the timing cache %s (%s)", self.path, e)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------
# probes of a model's nodes, and the sites' latency costs


def _attrs(g, i: int, names=("strides", "pads", "dilations", "auto_pad", "kernel_shape")) -> tuple:
    out = []
    for name in names:
        value = g.attr(i, name)
        if value is not None:
            out.append((name, value.decode() if isinstance(value, bytes) else (tuple(value) if isinstance(value, (list, tuple)) else value)))
    return tuple(out)


def node_probe(g, i: int, w_in: int | None = None, w_out: int | None = None, *, rank: int | None = None) -> Probe | None:
    """Node `i` (Conv, Gemm, MatMul or Gather with a constant weight, at `g`'s shapes) as a probe,
    with its input / output channel count set to `w_in` / `w_out`; with `rank`, its low-rank split
    at that rank instead. None when the shapes are unknown or the node is not such a layer."""
    node = g.nodes[i]
    op = node.op_type
    if op == "Conv":
        x, w = g.shape(node.input[0]), g.const(node.input[1])
        if x is None or w is None or None in x:
            return None
        group = int(g.attr(i, "group", 1))
        cin, cout, kernel = int(x[1]), int(w.shape[0]), tuple(int(d) for d in w.shape[2:])
        attrs = _attrs(g, i)
        if group > 1:
            if group != cin or cout != cin or rank is not None:
                return None
            c = w_out or w_in or cin
            return Probe((1, c, *x[2:]), (("Conv", attrs + (("group", c),), ((c, 1, *kernel),)),))
        cin, cout = w_in or cin, w_out or cout
        if rank is not None:
            return Probe((1, cin, *x[2:]), (("Conv", attrs, ((rank, cin, *kernel),)),
                                            ("Conv", (), ((cout, rank, *(1 for _ in kernel)),))))
        return Probe((1, cin, *x[2:]), (("Conv", attrs, ((cout, cin, *kernel),)),))
    if op == "Gather":
        table, idx = g.const(node.input[0]), g.shape(node.input[1])
        if table is None or idx is None or None in idx or table.ndim != 2 or g.attr(i, "axis", 0) != 0:
            return None
        vocab, d = table.shape
        d = w_out or d
        if rank is not None:
            return Probe(tuple(idx), (("Gather", (), ((vocab, rank),)), ("MatMul", (), ((rank, d),))))
        return Probe(tuple(idx), (("Gather", (), ((vocab, d),)),))
    if op not in ("Gemm", "MatMul"):
        return None
    left = op == "MatMul" and g.const(node.input[0]) is not None and g.const(node.input[1]) is None
    w = g.const(node.input[0 if left else 1])
    x = g.shape(node.input[1 if left else 0])
    if w is None or w.ndim != 2 or x is None or None in x or len(x) < 1:
        return None
    if left:  # W (out x in) @ X (..., in, cols)
        cout, cin = w.shape
        cols = int(np.prod(x, dtype=np.int64)) // int(x[-2]) if len(x) >= 2 else 1
        cin, cout = w_in or cin, w_out or cout
        chain = ((("MatMul@left", (), ((rank, cin),)), ("MatMul@left", (), ((cout, rank),))) if rank is not None
                 else (("MatMul@left", (), ((cout, cin),)),))
        return Probe((cin, cols), chain)
    if op == "Gemm":
        cin, cout = (w.shape[1], w.shape[0]) if g.attr(i, "transB", 0) else w.shape
    else:
        cin, cout = w.shape
    rows = int(np.prod(x, dtype=np.int64)) // int(cin) if int(cin) else 0
    cin, cout = int(w_in or cin), int(w_out or cout)
    if rows < 1:
        return None
    chain = ((("MatMul", (), ((cin, rank),)), ("MatMul", (), ((rank, cout),))) if rank is not None
             else (("MatMul", (), ((cin, cout),)),))
    return Probe((rows, cin), chain)


def _points(sizes: np.ndarray, steps: np.ndarray | None) -> np.ndarray:
    """At most POINTS + 1 sizes to time: the full size and evenly spread candidates of the walk."""
    cand = np.asarray(sizes)[steps if steps is not None else np.arange(len(sizes))]
    cand = cand[1:] if len(cand) > 1 else cand[:0]
    if len(cand) > POINTS:
        cand = cand[np.linspace(0, len(cand) - 1, POINTS).round().astype(int)]
    return np.unique(np.concatenate([[sizes[0]], cand]))


def _interp(sizes: np.ndarray, points: np.ndarray, times: list[float]) -> np.ndarray:
    order = np.argsort(points)
    return np.interp(np.asarray(sizes, dtype=np.float64), np.asarray(points, dtype=np.float64)[order],
                     np.asarray(times)[order])


def _sides(g, grp) -> dict[int, dict]:
    """Per node whose weight the group edits: the sides it narrows ("in", "out", "both" for a
    depthwise Conv), each with the Concat window it is in ((offset, width), width 0: the whole
    group), and how many weight columns one group channel is (`spatial`, a Flatten's size). A
    Conv that reads the group and writes into it narrows both its input and its output."""
    from .ops.edits import Mix, SetAttr, Slice
    out: dict[int, dict] = {}
    for e in grp.edits:
        if isinstance(e, SetAttr):
            out.setdefault(e.node, {"spatial": 1}).setdefault("both", (e.offset, e.width))
        elif isinstance(e, (Slice, Mix)):
            node = g.nodes[e.node]
            pos = 0 if node.op_type == "Gather" else 1
            if len(node.input) <= pos or node.input[pos] != e.tensor:
                continue
            w = g.const(e.tensor)
            trans = node.op_type == "Gemm" and g.attr(e.node, "transB", 0)
            if node.op_type == "Conv" or trans:
                side = "out" if e.axis == 0 else "in"
            elif node.op_type == "Gather":
                side = "out"
            else:
                side = "in" if e.axis == 0 else "out"
            width = e.width or grp.channels
            spatial = int(w.shape[e.axis]) // width if width else 1
            entry = out.setdefault(e.node, {"spatial": max(1, spatial)})
            entry.setdefault(side, (e.offset, e.width))
    return out


def id_costs(g, curve: Curve, timings: Timings, times: dict[int, float] | None = None) -> list[Cost]:
    """One "latency" item per node the group's edits narrow (see the module docstring), timed at
    the widths the node really gets: k for the whole group, or the kept channels of its own
    window of a Concat (`GroupStats.windows`). With `times` (`node_times` of the original
    model), one more item per other node the group's channels pass through: its profiled time,
    scaling with the kept share of the channels it carries."""
    grp = curve.site.target
    sizes = np.asarray(curve.sizes)
    index = {int(k): j for j, k in enumerate(sizes)}
    shares = getattr(curve.state, "windows", None) or {}
    points = _points(sizes, curve.steps)

    def width(window, k: int, spatial: int) -> int | None:
        if window is None:
            return None
        offset, span = window
        if span and (offset, span) in shares:
            return max(1, int(round(shares[(offset, span)][index[int(k)]] * span))) * spatial
        return int(k) * spatial

    out, timed = [], set()
    sides = _sides(g, grp)
    for i, node_sides in sorted(sides.items()):
        spatial = node_sides["spatial"]
        probes = [node_probe(g, i, width(node_sides.get("in"), k, spatial),
                             width(node_sides.get("out", node_sides.get("both")), k, spatial)) for k in points]
        if any(p is None for p in probes):
            continue
        times_at = timings.batch(probes)
        if times_at[-1] <= 0:
            continue
        full = times_at[list(points).index(sizes[0])]
        # the probes give how the node's time scales with the widths; the profile of the whole
        # model, where there is one, its time there (a node alone also pays layout conversions)
        base = times.get(i, full) if times else full
        out.append(Cost("latency", g.key(i), base, _interp(sizes, points, times_at) / full))
        timed.add(i)
    if times:   # the others (PRelu, InstanceNormalization, a bias Add: no probe) by their profile
        out.extend(_through_costs(g, grp, sizes, shares, times, timed))
    return out


def _through_costs(g, grp, sizes: np.ndarray, shares: dict, times: dict[int, float], timed: set) -> list[Cost]:
    """Items for the group's nodes that have no probe item (`timed` are those that do):
    profiled time x the kept share of the channels of the node's output (the window's share
    for a tensor before a Concat, k / C otherwise). The nodes the group's edits touch without a
    probe (a PRelu's slope, a normalization's scale, a bias Add) are among them."""
    spans = {t: (o, w) for t, o, w in grp.spans}
    fraction = sizes / grp.channels
    out = []
    for key in grp.nodes:
        i = g.index_of(key)
        if i in timed:
            continue
        t = times.get(i)
        if not t or t <= 0:
            continue
        span = next((spans[o] for o in g.nodes[i].output if o in spans), None)
        factor = shares.get(span, fraction) if span is not None else fraction
        out.append(Cost("latency", g.key(i), float(t), np.asarray(factor, dtype=np.float64)))
    return out


def lowrank_costs(g, curve: Curve, timings: Timings, others: tuple = (), *,
                  tables_at_load: bool = False) -> tuple[list[Cost], dict[int, str]]:
    """The layer's "latency" item (factor t_split(r) / t_layer at `timings`' thread count) and the
    candidates whose split is not faster than the layer, with the reason: at that thread count or
    at any of `others` (`Timings` at other thread counts, e.g. all cores). With `tables_at_load`
    (`--decode load`), a split lookup table is formed when the model loads and looked up as the
    original is: no item, nothing dropped, nothing timed."""
    layer = curve.site.target
    if tables_at_load and g.nodes[layer.node].op_type == "Gather":
        return [], {}
    whole = node_probe(g, layer.node)
    if whole is None:
        return [], {}
    # a Gather is a lookup: any split of its table (a smaller lookup, then a MatMul) takes longer
    # than the lookup alone, and saves bytes, not time. Its splits are not dropped here; the
    # whole-model guard (`guard`) undoes them if the model as a whole runs slower.
    gather = g.nodes[layer.node].op_type == "Gather"
    sizes = np.asarray(curve.sizes)
    ranks = _points(sizes[1:], None if curve.steps is None else np.asarray(curve.steps)[1:] - 1) if len(sizes) > 1 else []
    if not len(ranks):
        return [], {}
    items, dropped = [], {}
    for t in (timings, *others):
        base, *times = t.batch([whole, *(node_probe(g, layer.node, rank=int(r)) for r in ranks)])
        if base <= 0:
            continue
        factor = np.concatenate([[1.0], _interp(sizes[1:], np.asarray(ranks), times) / base])
        if t is timings:
            items = [Cost("latency", layer.key, base, factor)]
        for j in range(1, len(sizes)):
            if factor[j] >= 1.0 and j not in dropped and not gather:
                dropped[j] = (f"latency: the split at rank {int(sizes[j])} takes {factor[j] * base * 1e6:.0f} us "
                              f"against {base * 1e6:.0f} us for the layer ({t.threads} thread"
                              f"{'s' if t.threads > 1 else ''})")
    return items, dropped


def attach(g, curves: list[Curve], timings: Timings, *, costs: bool, drop_slower: bool,
           others: tuple = (), times: dict[int, float] | None = None, tables_at_load: bool = False) -> list[Curve]:
    """The curves with "latency" items (`costs`; `times`: the original's profiled node times,
    `node_times`) and, for low-rank sites, splits slower than their layer (at `timings`' thread
    count or any of `others`') dropped from the walk's steps and listed in `Curve.dropped`
    (`drop_slower`)."""
    out = []
    layout = _layout_owners(g, curves, getattr(times, "layout", ())) if costs and times else {}
    for ci, c in enumerate(curves):
        if c.site.method == "lowrank":
            items, dropped = lowrank_costs(g, c, timings, others if drop_slower else (), tables_at_load=tables_at_load)
        elif costs and c.site.method == "id":
            items, dropped = id_costs(g, c, timings, times) + layout.get(ci, []), {}
        else:
            items, dropped = [], {}
        new = {}
        if costs and items:
            new["costs"] = tuple(c.costs) + tuple(items)
        if drop_slower and dropped:
            new["steps"] = np.asarray([j for j in c.grid if int(j) not in dropped], dtype=np.int64)
            new["dropped"] = {**c.dropped, **dropped}
        out.append(dataclasses.replace(c, **new) if new else c)
    for t in (timings, *others):
        t.save()
    return out


def _layout_owners(g, curves: list[Curve], layout) -> dict[int, list[Cost]]:
    """Per ID curve, "latency" items for the layout conversions (`NodeTimes.layout`) of tensor
    shapes that only channel groups' tensors have in the graph (at the sample): a conversion
    moves a group's channels, so its time scales with the kept share, k / C (or the share of the
    one Concat window all the group's tensors of that shape are in). Which of several groups
    with tensors of that shape a conversion moves is not known: each gets an equal part. A shape
    that some tensor outside every group also has is left in the model's fixed time."""
    owners: dict[tuple, set] = {}
    for name, shape in g.shapes.items():
        if shape is not None and None not in shape:
            owners.setdefault(tuple(int(d) for d in shape), set()).add(name)
    member = {}
    for ci, c in enumerate(curves):
        if c.site.method == "id":
            for t in c.site.target.tensors:
                member[t] = ci
    out: dict[int, list[Cost]] = {}
    for name, shape, seconds in layout:
        tensors = owners.get(tuple(shape), set())
        sites = {member.get(t) for t in tensors}
        if not tensors or None in sites:
            continue
        for ci in sorted(sites):
            c = curves[ci]
            grp = c.site.target
            spans = {t: (o, w) for t, o, w in grp.spans}
            found = {spans.get(t) for t in tensors if member[t] == ci}   # None: a tensor of the whole group
            window = found.pop() if len(found) == 1 else None
            shares = getattr(c.state, "windows", None) or {}
            factor = shares[window] if window in shares else np.asarray(c.sizes) / grp.channels
            # one item per group: items of one key are a node between groups, whose factors multiply
            out.setdefault(ci, []).append(Cost("latency", f"layout {name} ({grp.id})", float(seconds) / len(sites),
                                               np.asarray(factor, dtype=np.float64)))
    return out


def needs_costs(config) -> bool:
    """The size rule reads the "latency" metric."""
    return config.latency_target is not None or (config.target is not None and config.minimize == "latency")


def prepare(g, curves: list[Curve], config, model, sample: dict, *, timer=None,
            times: dict[int, float] | None = None) -> tuple[list[Curve], float | None]:
    """The curves with latency items and slower splits dropped (as `config` asks), and the
    original model's measured latency at `sample` (the total of the "latency" metric; None when
    the size rule does not read it). `timer` replaces the ONNX Runtime timing of probes and
    `times` the profiled node times (tests)."""
    costs = needs_costs(config)
    drop = config.latency_check and any(c.site.method == "lowrank" for c in curves)
    if not (costs or drop):
        return curves, None
    timings = Timings(config.latency_threads, timer=timer, fresh=costs)   # a budget compares widths: this run's timings
    # a split must be faster on one thread and on all cores: the check times both
    cores = os.cpu_count() or 1
    others = tuple(Timings(n, timer=timer) for n in {1, cores} if n != config.latency_threads) if drop else ()
    if costs and times is None and timer is None:
        times = node_times(model, sample, config.latency_threads)
    curves = attach(g, curves, timings, costs=costs, drop_slower=drop, others=others, times=times,
                    tables_at_load=config.decode == "load")
    if timings.measured:
        log.info("latency: timed %d probes (cached in %s)", timings.measured, timings.path)
    if not costs:
        return curves, None
    if timer is not None:
        return curves, sum(float(c.base) for cv in curves for c in cv.costs if c.metric == "latency")
    from .benchmark import model_latency
    return curves, model_latency(model, sample, config.latency_threads)


# ---- the whole-model guard -------------------------------------------------------------------

GUARD_SLACK = 1.02   # a whole-model ratio above this counts as slower (timing noise on a 50 us model is ~2%)
GUARD_REPEATS = 15


def model_ratios(original, compressed, feed: dict) -> dict[int, float]:
    """Per thread count (1 and all cores), `measured_ratio`: the compressed model's median
    latency over the original's at `feed`, the two interleaved call by call in this process."""
    from .benchmark import thread_counts
    return {threads: measured_ratio(original, compressed, feed, threads) for threads in thread_counts()}


def measured_ratio(original, compressed, feed: dict, threads: int) -> float:
    """The compressed model's median latency over the original's at `feed` on `threads` intra-op
    threads, the two interleaved call by call in this process (`--latency-target`'s probes, the
    whole-model guard)."""
    from .benchmark import interleaved, session
    before, after = interleaved([session(original, threads), session(compressed, threads)], feed,
                                repeats=GUARD_REPEATS)
    return after / before if before > 0 else 1.0


def guard(splits: int, ratios: Callable[[int], dict]) -> tuple[int, list[dict]]:
    """The fewest splits k to undo, the least saving first, so that the whole model is not
    slower than the original on any thread count: `ratios(k)` times the model with the first k
    undone (`model_ratios`). What the per-op check (`attach`) cannot see, the layout conversions
    and per-node overhead that a split adds between ops, shows here.

    k = 0 is timed first, and nothing else when the model is not slower. Otherwise k = `splits`
    (no split left) is timed: when that is slower too, the splits are not the cause and k = 0;
    else a bisection for the smallest k that is not slower, taking the slowdown to shrink as
    splits are undone. A model counts as slower only when a second timing agrees: a burst of
    other load on the machine can slow one side of one timing, rarely two in a row. At most
    2 (2 + log2(splits)) timings. Returns (k, every timing as {"undone", "ratios"}, in order)."""
    probes = []

    def timed(k: int) -> bool:
        found = ratios(k)
        probes.append({"undone": k, "ratios": {str(t): round(r, 4) for t, r in found.items()}})
        return any(r > GUARD_SLACK for r in found.values())

    def slower(k: int) -> bool:
        return timed(k) and timed(k)

    if splits == 0 or not slower(0) or slower(splits):  # not slower, or not for the splits' sake
        return 0, probes
    low, high = 0, splits   # slower at low, not at high
    while high - low > 1:
        mid = (low + high) // 2
        if slower(mid):
            low = mid
        else:
            high = mid
    return high, probes
