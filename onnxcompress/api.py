"""`compress()`: the whole data flow of design.md section 2, one stage per call.

load -> normalize -> find groups -> calibrate -> decide (Plan) -> rewrite -> validate -> report,
then the gate, then an atomic save. The command line is a thin layer over this function.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx

from .core import data as data_mod
from .core.calibrate import Progress, calibrate
from .core.runtime import make_session, observed_shapes, run
from .core.stats import ChannelGram
from .core.config import Config
from .core.cost import cost_items, count_params, node_flops
from .methods.id.select import Budget, decide
from .core.errors import AgreementError, ModelError, RewriteError, UsageError
from .methods.lowrank.ranks import factorize
from .core.graph import GraphIndex
from .methods.id.groups import Analysis, find_groups
from .methods.lowrank.layers import find_layers
from .core.modelio import check_output_path, load_model, save_model
from .core.normalize import normalize, static_shapes
from .core.plan import Plan
from .core.report import Report, StageTimer
from .methods.id.rewrite import rewrite
from .methods.lowrank.rewrite import split
from .core.validate import score_outputs, validate

log = logging.getLogger(__name__)

SYNTHETIC_FEEDS = 32


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
        given = [n for n in ("keep", "tolerance", "flops_target", "params_target") if getattr(config, n) is not None]
        if given:
            raise UsageError(f"a plan fixes the sizes; {given[0]} contradicts it")
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
             progress: Progress | None = None) -> Report:
    """Compress the ONNX model at `model` and write it to `output` (default
    `<stem>.compressed.onnx` beside it). Returns the `Report`.

    calib / val: a `.npz`/`.npy` path, a directory of feeds, an iterable of
    `{input_name: ndarray}`, or an ONNX Runtime `CalibrationDataReader`. Without `calib`, inputs are
    synthesized from the input specs (weak: the report says so). Without `val`, a held-out share
    (`config.holdout`) of `calib` is used. With `plan`, its decisions are applied as they are
    (calibration is skipped; data is still used for validation).

    Raises `AgreementError` (exit code 3, carrying the report) when `config.min_agreement` is not
    met; the output is then not written, unless `config.keep_failed`, in which case it is written
    first and the error still raised.
    """
    config, src, out, inputs = _check_arguments(model, output, config, calib, val, plan)
    check_output_path(out, force=config.force, source=src, inputs=inputs)
    timer = StageTimer()
    report = Report(input=str(src), output=None, config=config.to_dict())
    with timer("load"):
        original = load_model(src)
    with timer("normalize"):
        norm = normalize(original, copy=False)  # validation reads the input file itself
        specs = data_mod.input_specs(norm)
        calib_src, val_src = _sources(calib, val, specs, config, report)
        first = next(iter(calib_src))
        g = GraphIndex(norm, *shapes_at(norm, first))
    before = {"params": count_params(norm), "flops": sum(node_flops(g).values()), "scores": score_outputs(g)}
    original = None  # validation reads the input file itself
    stage = _prune if (plan.method if plan is not None else config.method) == "id" else _split
    analysis, new, plan = stage(norm, g, config, calib_src, plan, before, timer, progress)
    rewritten = new is not norm
    # release the input model and its index before the compressed model runs: a large model
    # would otherwise be held twice through the smoke test and validation
    norm = g = None
    with timer("smoke_test"):
        _smoke_test(new, first, rewritten=rewritten)
    with timer("validate"):
        agreement = validate(src, new, val_src, scores=before["scores"], progress=progress)
    _fill(report, new, before, analysis, plan, agreement, first)
    report.seconds = timer.seconds
    report.plan = plan
    _gate(report, agreement, config)
    if report.gate and not report.gate["passed"] and not config.keep_failed:
        raise AgreementError(report.gate["message"], report)
    with timer("save"):
        written = save_model(new, out, force=config.force, inputs=[src, *inputs])
    report.output = str(out)
    report.file_size["after"] = sum(p.stat().st_size for p in written)
    report.seconds = timer.seconds
    if report.gate and not report.gate["passed"]:
        raise AgreementError(report.gate["message"] + " (output kept: --keep-failed)", report)
    return report


def _prune(norm, g: GraphIndex, config: Config, calib_src, plan, before: dict, timer, progress):
    """find groups -> calibrate -> decide -> rewrite, for ID channel pruning."""
    with timer("find"):
        analysis = find_groups(g, exclude=config.exclude, include=config.include)
    if plan is None:
        with timer("calibrate"):
            requests = _exit_requests(analysis)
            found = calibrate(norm, requests.values(), calib_src, types=g.types, progress=progress,
                              max_rows=config.max_rows, seed=config.seed)
            stats = {name: found[r] for name, r in requests.items()}
        with timer("decide"):
            plan = decide(g, analysis, stats, config, _budget(g, analysis, before))
        stats = None  # the Grams (8 C^2 bytes per exit) are not needed past decide
    with timer("rewrite"):
        new = rewrite(norm, g, analysis, plan) if plan.groups else norm
    return analysis, new, plan


def _split(norm, g: GraphIndex, config: Config, calib_src, plan, before: dict, timer, progress):
    """find layers -> calibrate -> factorize -> split, for the low-rank methods."""
    with timer("find"):
        layers = find_layers(g, include=config.include, exclude=config.exclude, max_patch=config.max_patch)
    skipped = layers.skipped
    if plan is None:
        with timer("calibrate"):
            stats = calibrate(norm, [x.request for x in layers.layers], calib_src, types=g.types,
                              progress=progress, max_rows=config.max_rows, seed=config.seed)
        with timer("decide"):
            plans, left = factorize(g, layers, stats, config, (float(before["params"]), float(before["flops"])))
            plan = Plan(config.method, config.select, (), plans)
            skipped = skipped + left
    with timer("rewrite"):
        new = split(norm, g, {x.key: x for x in layers.layers}, plan) if plan.layers else norm
    return Analysis((), tuple(skipped)), new, plan


def _sources(calib, val, specs, config: Config, report: Report):
    if calib is None:
        msg = ("no calibration data: statistics come from random inputs, so the choice of channels "
               "and the agreement figures say little about real inputs; pass --calib")
        log.warning(msg)
        report.warnings.append(msg)
        calib_src = data_mod.synthesize(specs, count=SYNTHETIC_FEEDS, seed=config.seed)
    else:
        calib_src = data_mod.open_source(calib, specs, batch_size=config.batch_size)
    if val is not None:
        val_src = data_mod.open_source(val, specs, batch_size=config.batch_size, label="validation")
    else:
        calib_src, val_src = data_mod.split(calib_src, config.holdout)
        if val_src is calib_src:
            report.warnings.append("validation ran on the calibration data (too little data to hold out)")
    report.data = {"calibration": calib_src.name, "validation": val_src.name,
                   "calibration_feeds": calib_src.feeds, "validation_feeds": val_src.feeds}
    return calib_src, val_src


def _exit_requests(analysis: Analysis) -> dict[str, ChannelGram]:
    return analysis.requests()


def shapes_at(model: onnx.ModelProto, feed: dict) -> tuple[dict, dict]:
    """(shapes, types) of every tensor for `feed`: shape inference, then one ONNX Runtime run for
    the node outputs whose shapes inference left open."""
    shapes, types = static_shapes(model, {k: v.shape for k, v in feed.items()})
    open_ = [o for node in model.graph.node for o in node.output
             if o and (shapes.get(o) is None or None in shapes[o])]
    shapes.update(observed_shapes(model, feed, open_, types))
    return shapes, types


def _budget(g: GraphIndex, analysis: Analysis, before: dict) -> Budget:
    p_items, f_items = cost_items(g, analysis, node_flops(g))
    return Budget(float(before["params"]), float(before["flops"]), tuple(p_items), tuple(f_items))


def _smoke_test(model: onnx.ModelProto, feed: dict, *, rewritten: bool = True) -> None:
    """The rewritten model must load and run in ONNX Runtime before anything else is measured.
    When nothing was rewritten, a failure is the input model's (`ModelError`), not the rewrite's."""
    try:
        session = make_session(model)
        run(session, [o.name for o in model.graph.output], feed, "the first feed")
    except Exception as e:
        if not rewritten:
            raise ModelError(f"run: ONNX Runtime cannot run the model ({str(e).splitlines()[0]})") from e
        raise RewriteError(f"rewrite: the compressed model does not run ({str(e).splitlines()[0]})") from e


def _fill(report: Report, new, before: dict, analysis: Analysis, plan: Plan, agreement, first) -> None:
    after = GraphIndex(new, *shapes_at(new, first))
    report.params = {"before": before["params"], "after": count_params(new)}
    report.flops = {"before": before["flops"], "after": sum(node_flops(after).values()),
                    "at_input_shapes": {k: list(v.shape) for k, v in first.items()}}
    report.file_size = {"before": os.path.getsize(report.input)}
    by_id = {grp.id: grp for grp in analysis.groups}
    report.groups = [{**gp.to_dict(matrices=False), "keep": None,
                      "producers": list(by_id[gp.group].producers),
                      "exits": [e.tensor for e in by_id[gp.group].exits],
                      "error_ratio": (gp.error / gp.best_error) if gp.best_error > 0 else None}
                     for gp in plan.groups]
    for row in report.groups:
        row.pop("keep")
    report.layers = [{**lp.to_dict(matrices=False),
                      "error_ratio": (lp.error / lp.best_error) if lp.best_error > 0 else None}
                     for lp in plan.layers]
    report.skipped = [vars(s) for s in analysis.skipped]
    report.agreement = [a.to_dict() for a in agreement]
    if not plan.groups and not plan.layers:
        what = "channel group" if plan.method == "id" else "layer to split"
        report.warnings.append(f"no compressible {what} was found; the output computes the same function")


def _gate(report: Report, agreement, config: Config) -> None:
    if config.min_agreement is None:
        return
    worst = min(agreement, key=lambda a: a.score)
    passed = worst.score >= config.min_agreement
    message = (f"agreement gate: output {worst.output!r} reaches {worst.score:.4f}, "
               f"below --min-agreement {config.min_agreement}")
    report.gate = {"min_agreement": config.min_agreement, "worst_output": worst.output,
                   "worst_score": worst.score, "passed": passed, "message": None if passed else message}

