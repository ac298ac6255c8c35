"""`compress()`: the whole data flow (docs/architecture.md), one stage per call.

load -> normalize -> find sites (every method) -> calibrate (one pass) -> curves -> allocate
(Plan) -> rewrite (each method in turn) -> validate -> report, then the gate, then an atomic
save. The command line is a thin layer over this function.
"""
from __future__ import annotations

import logging
import os
from contextlib import nullcontext
import tempfile
from pathlib import Path

import onnx

from . import blocks as blocks_mod, latency as latency_mod
from .benchmark import benchmark as run_benchmark, one_sample
from .core import data as data_mod, files, weights
from .core.calibrate import Progress, calibrate, mask_input, ticker
from .core.config import SIZE_RULES, Config, flag
from .core.cost import count_params, node_flops
from .core.errors import AgreementError, ModelError, RewriteError, UsageError
from .core.graph import GraphIndex
from .core.modelio import check_finite_weights, check_output_path, load_model, save_model, serialized_size
from .core.normalize import normalize, static_shapes
from .core.plan import Plan
from .core.report import Report, StageTimer, op_counts
from .core.runtime import LARGE_MODEL, check_provider, make_session, observed_shapes, run, weights_bytes
from .core.threads import one_blas_thread, parallel_map
from .core.validate import Reference, load_labels, output_error, score_outputs
from .decide import decide
from .methods import REGISTRY, for_method, for_plan
from .methods.base import Skipped
from .methods import loadtime
from .methods.quant import stage as quant_stage

log = logging.getLogger(__name__)

SYNTHETIC_FEEDS = 32
LOW_AGREEMENT = 0.5  # below this, warn even without --min-agreement


def default_output(model_path: str | os.PathLike) -> Path:
    p = Path(model_path)
    stem = p.name[:-5] if p.name.endswith(".onnx") else p.name
    return p.with_name(stem + ".compressed.onnx")


def _check_arguments(model, output, config, calib, val, plan) -> tuple[Config, Path, Path, list[Path]]:
    """Types and consistency of `compress`'s arguments, before anything is read: a `UsageError`
    for what the caller got wrong. Returns (config, model path, output path, data files)."""
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise UsageError(f"config must be an onnxcompress.Config, got {type(config).__name__}")
    for name, value in (("model", model), ("output", output)):
        if not isinstance(value, (str, os.PathLike)) and not (name == "output" and value is None):
            raise UsageError(f"{name} must be a path, got {type(value).__name__}")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise UsageError(f"plan must be an onnxcompress.Plan, got {type(plan).__name__}")
        given = [n for n in SIZE_RULES if getattr(config, n) is not None] + (["spread"] if config.spread else [])
        if given:
            raise UsageError(f"--plan fixes the sizes; {flag(given[0])} contradicts it")
        if config.quantize and any(getattr(e, "after", False) for e in plan.entries):
            raise UsageError("--plan already quantizes what its other entries leave; --quantize contradicts it")
    elif config.ray is not None:
        from .core.cluster import import_ray
        import_ray()  # not installed: a UsageError naming --ray before any work
    if config.provider != "cpu":
        check_provider(config.provider)
    src = Path(model)
    out = Path(output) if output is not None else default_output(src)
    inputs = []
    for spec in (calib, val):
        if isinstance(spec, (str, os.PathLike)):
            p = Path(spec)
            try:
                inputs += sorted(p.iterdir()) if p.is_dir() else [p]
            except OSError:  # unreadable: the data stage says so
                inputs.append(p)
    return config, src, out, inputs


def compress(model: str | os.PathLike, output: str | os.PathLike | None = None, *,
             config: Config | None = None, calib=None, val=None, plan: Plan | None = None,
             progress: Progress | None = None, val_labels=None) -> Report:
    """Compress the ONNX model at `model` and write it to `output` (default
    `<stem>.compressed.onnx` beside it). Returns the `Report`.

    calib / val: a `.npz`/`.npy` path, a directory of feeds, an iterable of
    `{input_name: ndarray}`, or an ONNX Runtime `CalibrationDataReader`. Without `calib`, inputs are
    synthesized from the input specs (weak: the report says so). Without `val`, a held-out share
    (`config.holdout`) of `calib` is used. With `plan`, its decisions are applied as they are
    (calibration is skipped; data is still used for validation).

    Every method `config.method` selects (`methods.for_method`) goes through the same stages:
    its sites are found, one calibration pass serves them all, each site gets a curve, one
    allocation covers every site (`decide.py`, `allocate.py`), and each method rewrites its own
    entries in registry order.

    Raises `AgreementError` (exit code 3, carrying the report) when `config.min_agreement` or
    `config.target` is not met; the output is then not written, unless `config.keep_failed`
    (with `min_agreement`), in which case it is written first and the error still raised.

    val_labels: a `.npy` path (or an array) of integer classes, one per sample of `val`; the
    report then gives the accuracy of the original and the compressed model next to the agreement.
    `progress(stage, done, total)` is called during calibrate, decide and validate.
    """
    config, src, out, inputs = _check_arguments(model, output, config, calib, val, plan)
    planned = plan  # a plan given is applied as it is
    check_output_path(out, force=config.force, source=src, inputs=inputs)
    timer = StageTimer()
    if val_labels is not None and val is None:
        raise UsageError("--val-labels needs --val: the labels are for the --val samples, in order")
    labels = load_labels(val_labels) if val_labels is not None else None
    report = Report(input=str(src), output=None, config=config.to_dict(applied=plan is None))
    with timer("load"):
        original = load_model(src)
        report.ops["before"] = op_counts(original.graph)
    with timer("normalize"):
        norm = normalize(original, copy=False)  # validation reads the input file itself
        check_finite_weights(norm, src, allow=config.allow_nonfinite, warnings=report.warnings)
        specs = data_mod.input_specs(norm)
        calib_src, val_src = _sources(calib, val, specs, config, report, plan is not None)
        first = next(iter(calib_src))
        sample = one_sample(first, specs)  # FLOPs and the latency model are per sample
        g = GraphIndex(norm, *shapes_at(norm, sample))
    flops = node_flops(g)
    mask = mask_input(norm)
    before = {"params": count_params(norm), "flops": sum(flops.values()), "bytes": serialized_size(norm),
              "scores": score_outputs(g)}
    large = weights_bytes(norm) > LARGE_MODEL  # how ONNX Runtime gets the input file (validation)
    original = None  # validation reads the input file itself
    methods = {m.name: m for m in (for_plan(plan) if plan is not None else for_method(config.method))
               if not (config.quantize and plan is None and m.name == "quant")}  # --quantize quantizes last
    with timer("find"):
        sites, skipped = _find(g, methods, config)
    reference = chosen = new = scratch = None
    blocks = _blocks(sites, methods, config, norm) if plan is None else None
    try:
        if blocks is not None:
            scratch = tempfile.TemporaryDirectory(prefix=files.SYSTEM_PREFIX + "blocks-")
            new, entries, left = _in_blocks(norm, g, methods, blocks, config, before, flops, calib_src,
                                            report, timer, progress, Path(scratch.name), sample)
            plan = Plan(config.method, config.select, tuple(entries))
            skipped = skipped + left
        elif plan is None:
            with timer("calibrate"), one_blas_thread():
                requests = [r for s in sites for r in methods[s.method].requests(s)]
                with _cluster(config, bool(requests)) as cluster:
                    stats = calibrate(norm, requests, calib_src, types=g.types, progress=progress,
                                      max_rows=config.max_rows, seed=config.seed, provider=config.provider,
                                      cluster=cluster, batch=config.batch_size)
                _note_padding(report, stats.padding)
            with timer("decide"), one_blas_thread():
                tick = ticker(progress, "decide", len(sites))

                def curve(s):
                    c = methods[s.method].curve(g, s, stats, config, flops)
                    tick()
                    return c
                curves = parallel_map(curve, sites)
                _warn_few_rows(curves, config)
            stats = None  # the Grams (8 C^2 bytes per exit) are not needed past the curves
            with timer("latency_model"):
                curves, before["latency"] = latency_mod.prepare(g, curves, config, norm, sample)
            if config.target is not None:
                with timer("validate"):
                    reference = Reference(src, val_src, [vi.name for vi in norm.graph.output], large=large,
                                          scores=before["scores"], progress=progress, labels=labels,
                                          provider=config.provider, mask=mask)
            with one_blas_thread():
                entries, left, chosen = decide(norm, g, methods, curves, config, before, calib_src=calib_src,
                                               reference=reference, report=report, timer=timer, progress=progress,
                                               sample=sample)
            plan = Plan(config.method, config.select, tuple(entries))
            skipped = skipped + left
        late_sites = []
        if chosen is not None:
            new, agreement, late_sites = chosen
        else:
            if new is None:  # (the block path has rewritten already)
                with timer("rewrite"):
                    new, late_sites = _rewrite(norm, g, methods, sites, plan, sample)
                if planned is None and config.latency_check and not large:  # (see `_guard_splits`)
                    with timer("latency_guard"):
                        new, plan, undone = _guard_splits(src, norm, g, methods, sites, plan, new, sample, flops, config,
                                                          report)
                    skipped = skipped + undone
                    if undone and report.allocation.get("measured_latency") is not None:
                        report.warn(f"latency target: {len(undone)} low-rank split(s) undone after the search "
                                    f"(the model ran slower than the original on some thread count); the "
                                    f"measured latency {report.allocation['measured_latency']:.3f} was timed with them")
            if config.quantize and not late_sites:
                found = []
                with timer("quantize"):
                    new, late, late_sites, _ = quant_stage.quantize_rest(
                        new, config.quantize, calib_src, config, sample, progress=progress, warnings=found)
                for w in found:
                    report.warn(w)
                plan = Plan(plan.method, plan.select, plan.entries + tuple(late))
        with timer("rewrite"):
            new = loadtime.finish(new, norm, config)
        rewritten = new is not norm
        # release the input model and its index before the compressed model runs: a large model
        # would otherwise be held twice through the smoke test and validation
        norm = g = None
        if chosen is None:  # the original's outputs first: one model's weights in memory at a time
            with timer("validate"):
                reference = Reference(src, val_src, [vi.name for vi in new.graph.output], scores=before["scores"], large=large,
                                      labels=labels, provider=config.provider, mask=mask)
        with timer("smoke_test"):
            session = _smoke_test(new, first, rewritten=rewritten, provider=config.provider)
        if chosen is None:
            with timer("validate"):
                agreement = reference.compare(new, progress=progress, session=session)
        session = None
        _warn_low_agreement(report, agreement, config)
        _fill(report, new, before, methods, sites, skipped, plan, agreement, sample, late_sites=late_sites)
        if config.benchmark:
            with timer("benchmark"):
                report.latency = run_benchmark(src, new, next(iter(val_src)), specs)
        report.seconds = timer.seconds
        report.plan = plan
        _gate(report, agreement, config)
        if report.gate and not report.gate["passed"] and not config.keep_failed:
            raise AgreementError(report.gate["message"], report)
        with timer("save"):
            written = save_model(new, out, force=config.force, inputs=[src, *inputs], source=src)
    finally:
        if reference is not None:
            reference.close()
        if scratch is not None:  # the weights made block by block are in the output now
            scratch.cleanup()
    report.output = str(out)
    report.file_size["after"] = sum(p.stat().st_size for p in written)
    report.seconds = timer.seconds
    if report.gate and not report.gate["passed"]:
        raise AgreementError(report.gate["message"] + " (output kept: --keep-failed)", report)
    return report


def _guard_splits(src, norm, g, methods, sites, plan, new, sample, flops, config, report):
    """Low-rank splits the whole model cannot afford: when the compressed model runs slower than
    the original at one sample on one thread or on all cores (`latency.guard`, timed in ONNX
    Runtime), the splits saving the fewest FLOPs are undone until it does not. Returns (model,
    plan, the undone splits as `Skipped`). The models are timed as they will be written
    (`loadtime.finish`); with `--decode load` a split lookup table is formed at load and costs
    nothing per call, so it is never undone. Not for models past LARGE_MODEL bytes of weights:
    two sessions of the model at once would double the memory a large model is compressed in,
    and each timing would take minutes."""
    splits = [e for e in plan.entries if e.method == "lowrank" and not getattr(e, "after", False)
              and not (config.decode == "load" and e.kind == "gather")]
    if not splits:
        return new, plan, []

    def saved(e) -> float:
        i = g.index_of(e.layer)
        return flops.get(i, 0.0) * (1.0 - e.rank * (e.out + e.inputs) / max(e.out * e.inputs, 1))
    order = sorted(splits, key=saved)

    def plan_without(k: int) -> Plan:
        gone = {id(e) for e in order[:k]}
        return Plan(plan.method, plan.select, tuple(e for e in plan.entries if id(e) not in gone))
    built = {0: new}  # the model as rewritten, and the last one timed: not one per probe

    def without(k: int):
        if k not in built:
            built.clear()
            built.update({0: new, k: _rewrite(norm, g, methods, sites, plan_without(k), sample)[0]})
        return built[k]
    try:
        k, probes = latency_mod.guard(len(order), lambda k: latency_mod.model_ratios(
            str(src), loadtime.finish(without(k), norm, config, copy=True), sample))
    except Exception as e:  # a model the timing sessions cannot load as they are (the rest of the run can)
        log.warning("latency: the whole model could not be timed (%s); its splits are kept unchecked",
                    str(e).splitlines()[0][:200])
        return new, plan, []
    undone = order[:k]
    report.allocation["latency_guard"] = {"slack": latency_mod.GUARD_SLACK, "probes": probes,
                                          "undone": [e.layer for e in undone]}
    if not k:
        return new, plan, []
    log.info("latency: %d of %d low-rank splits undone: the whole model ran slower with them", k, len(order))
    why = (f"low rank: undone, the whole model ran slower than the original with it "
           f"(at one sample, ratios above {latency_mod.GUARD_SLACK})")
    return (without(k), plan_without(k),
            [Skipped(e.layer, g.nodes[g.index_of(e.layer)].op_type, why) for e in undone])


def _cluster(config: Config, needed: bool):
    """The Ray cluster calibration runs on (`--ray`), for a `with` block; None without --ray or
    when nothing is to be calibrated. Ray is imported only here, and only then."""
    if config.ray is None or not needed:
        return nullcontext(None)
    from .core.cluster import connect
    return connect(config.ray, config.ray_workers)


def _blocks(sites: list, methods: dict, config: Config, model) -> list | None:
    """The blocks of sites to calibrate one pass each (`blocks.py`), or None (one pass, one
    rewrite) when the size rule needs every curve at once, or when every site's statistics fit
    one pass and the weights are in memory anyway (no external data)."""
    if not blocks_mod.applies(config) or not sites:
        return None
    found = blocks_mod.partition(sites, methods, blocks_mod.budget(config))
    return found if len(found) > 1 or weights.has_external(model) else None


def _in_blocks(norm, g, methods, blocks, config, before, flops, calib_src, report, timer, progress, scratch, sample):
    """Calibrate, decide and rewrite block by block (`blocks.run`); returns (model, entries, left)."""
    few, done, total = [], [], sum(len(c) for b in blocks for c in b)

    def curve(site, stats):
        c = methods[site.method].curve(g, site, stats, config, flops)
        if 0 < c.state.rows < site.target.channels:
            few.append((site.key, c.state.rows, site.target.channels))
        if progress:
            progress("decide", len(done) + 1, total)
        done.append(site.key)
        return c

    def choose(curves):
        entries, left, _ = decide(norm, g, methods, curves, config, before, calib_src=calib_src, reference=None,
                                  report=report, timer=timer, progress=progress)
        return entries, left

    def rewrite(model, block, plan):
        return _rewrite(model, g, methods, block, plan, sample)[0]

    report.data["calibration_passes"] = len(blocks)
    found = blocks_mod.run(norm, g, methods, blocks, config, calib_src=calib_src, curve=curve, decide=choose,
                           rewrite=rewrite, scratch=scratch, timer=timer, progress=progress)
    if few and config.select == "id":
        key, rows, channels = few[0]
        log.warning("decide: %d of %d channel groups have fewer calibration rows than channels (%s: %d rows, "
                    "%d channels); their interpolation fits the calibration data and may miss held-out "
                    "data: give more calibration data", len(few), total, key, rows, channels)
    return found


def _find(g: GraphIndex, methods: dict, config: Config) -> tuple[list, list]:
    """Every method's sites, and the nodes left alone. A node that one method compresses is not
    reported as skipped by another; a node every method skips is reported once, with each reason."""
    sites, reasons = [], {}
    for m in methods.values():
        found, left = m.sites(g, config)
        sites += found
        for s in left:
            reasons.setdefault((s.node, s.op), []).append(s.reason)
    covered = {s.key for s in sites} | {p for s in sites for p in getattr(s.target, "producers", ())}
    skipped = [Skipped(node, op, "; ".join(dict.fromkeys(r))) for (node, op), r in reasons.items()
               if node not in covered]
    return sites, skipped


def _rewrite(norm, g: GraphIndex, methods: dict, sites: list, plan: Plan, sample: dict):
    """Each method rewrites its own entries, in registry order, on the previous one's output;
    then the `--quantize` entries (made for that output) are replayed on it. Returns (model, the
    sites of the replayed `--quantize` entries)."""
    new = norm
    late = [e for e in plan.entries if getattr(e, "after", False)]
    for name, m in methods.items():
        new = m.rewrite(new, g, [s for s in sites if s.method == name],
                        [e for e in plan.entries if e.method == name and not getattr(e, "after", False)])
    return quant_stage.replay(new, late, sample)


def _sources(calib, val, specs, config: Config, report: Report, planned: bool = False):
    if calib is None:
        if not planned:
            report.warn("no calibration data: statistics come from random inputs, so the choice of "
                        "channels and the agreement figures say little about real inputs; pass --calib")
        elif val is None:  # the plan fixed the channels; only validation uses the data
            report.warn("no data: the plan fixed the channels, but validation ran on random inputs, "
                        "so the agreement figures say little about real inputs; pass --val")
        calib_src = data_mod.synthesize(specs, count=SYNTHETIC_FEEDS, seed=config.seed)
    else:
        calib_src = data_mod.open_source(calib, specs, batch_size=config.batch_size,
                                         allow_nonfinite=config.allow_nonfinite)
    if val is not None:
        val_src = data_mod.open_source(val, specs, batch_size=config.batch_size, label="validation",
                                       allow_nonfinite=config.allow_nonfinite)
    else:
        calib_src, val_src = data_mod.split(calib_src, config.holdout)
        if val_src is calib_src:
            report.warn("validation ran on the calibration data (too little data to hold out)")
    report.data = {"calibration": calib_src.name, "validation": val_src.name,
                   "calibration_feeds": calib_src.feeds, "validation_feeds": val_src.feeds}
    return calib_src, val_src


def shapes_at(model: onnx.ModelProto, feed: dict) -> tuple[dict, dict]:
    """(shapes, types) of every tensor for `feed`: shape inference, then one ONNX Runtime run for
    the node outputs whose shapes inference left open."""
    shapes, types = static_shapes(model, {k: v.shape for k, v in feed.items()})
    open_ = [o for node in model.graph.node for o in node.output
             if o and (shapes.get(o) is None or None in shapes[o])]
    shapes.update(observed_shapes(model, feed, open_, types))
    return shapes, types


def _smoke_test(model: onnx.ModelProto, feed: dict, *, rewritten: bool = True, provider: str = "cpu"):
    """The rewritten model must load and run in ONNX Runtime before anything else is measured.
    When nothing was rewritten, a failure is the input model's (`ModelError`), not the rewrite's.
    Returns the session (on `provider`), which validation then uses: one session build, not two."""
    try:
        session = make_session(model, provider=provider)
        run(session, [o.name for o in model.graph.output], feed, "the first feed")
    except Exception as e:
        if not rewritten:
            raise ModelError(f"run: ONNX Runtime cannot run the model ({str(e).splitlines()[0]})") from e
        raise RewriteError(f"rewrite: the compressed model does not run ({str(e).splitlines()[0]})") from e
    return session


def _fill(report: Report, new, before: dict, methods: dict, sites: list, skipped: list, plan: Plan,
          agreement, first, *, late_sites=()) -> None:
    after = GraphIndex(new, *shapes_at(new, first))
    report.params = {"before": before["params"], "after": count_params(new)}
    report.flops = {"before": before["flops"], "after": sum(node_flops(after).values()),
                    "at_input_shapes": {k: list(v.shape) for k, v in first.items()}, "per": "sample"}
    report.file_size = {"before": os.path.getsize(report.input)}
    report.ops["after"] = op_counts(new.graph)
    by_key = {(s.method, s.key, False): s for s in sites}
    by_key.update({(s.method, s.key, True): s for s in late_sites})
    for e in plan.entries:
        m = methods.get(e.method) or REGISTRY[e.method]  # `--quantize` entries: the quant method's rows
        site = by_key.get((e.method, e.site, bool(getattr(e, "after", False))))
        row = m.describe(site, e) if site is not None else e.to_dict(matrices=False)
        report.rows(m.section).append(row)
    report.skipped = [vars(s) for s in skipped]
    report.agreement = [a.to_dict() for a in agreement]
    if report.allocation.get("estimated_error") is not None:
        report.allocation["measured_error"] = output_error(agreement)
    if not plan.entries:
        what = {"id": "channel group", "auto": "site", "quant": "layer to quantize",
                "block": "residual block"}.get(plan.method, "layer to split")
        report.warn(f"no compressible {what} was found; the output computes the same function")


def _note_padding(report: Report, padding: dict) -> None:
    """The report's `data.padding`; a warning when padded positions entered some statistic."""
    report.data["padding"] = padding
    if padding["padded"] and padding["counted"]:
        names = padding["counted"]
        report.warn(f"calibrate: {padding['padded']} padded positions ({padding['mask']} = 0) were counted in the "
                    f"statistics of {len(names)} tensor(s) whose shape does not match the mask (first: "
                    f"{names[0]}); feed unpadded sequences (a folder of files) to leave them out")


def _warn_few_rows(curves: list, config: Config) -> None:
    """T is fitted to the calibration rows: with fewer rows than channels, G is rank-deficient,
    the kept channels reproduce the calibration rows almost exactly and held-out rows poorly."""
    groups = [c for c in curves if c.site.method == "id"]
    few = [c for c in groups if 0 < c.state.rows < c.site.target.channels]
    if few and config.select == "id":
        c = few[0]
        log.warning("decide: %d of %d channel groups have fewer calibration rows than channels (%s: %d rows, "
                    "%d channels); their interpolation fits the calibration data and may miss held-out "
                    "data: give more calibration data", len(few), len(groups), c.site.key, c.state.rows,
                    c.site.target.channels)


def _warn_low_agreement(report: Report, agreement, config: Config) -> None:
    """Without a gate, a model that barely agrees with the original still earns a warning."""
    if config.min_agreement is not None or not agreement:
        return
    worst = min(agreement, key=lambda a: a.score)
    if worst.score < LOW_AGREEMENT:
        what = "top-1 agreement" if worst.top1 is not None else "cosine" if worst.cosine is not None else "1 - rel L2"
        report.warn(f"output {worst.output!r} barely agrees with the original ({what} {worst.score:.4f}, "
                    f"below {LOW_AGREEMENT}); compress less, or set --min-agreement to refuse such a model")


def _gate(report: Report, agreement, config: Config) -> None:
    if config.min_agreement is None:
        return
    worst = min(agreement, key=lambda a: a.score)
    passed = worst.score >= config.min_agreement
    message = (f"agreement gate: output {worst.output!r} reaches {worst.score:.4f}, "
               f"below --min-agreement {config.min_agreement}")
    report.gate = {"min_agreement": config.min_agreement, "worst_output": worst.output,
                   "worst_score": worst.score, "passed": passed, "message": None if passed else message}

