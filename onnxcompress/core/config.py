"""The one configuration object. The command line fills it from flags; the library takes it as is.

Sizes are chosen by exactly one of `keep`, `tolerance`, `flops_target`, `params_target`,
`size_target`, `target` (`keep=0.75` when none is given).
"""
from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass

from .target import parse_target
from .errors import UsageError

METHODS = ("auto", "id", "svd", "aasvd", "lp", "quant", "sqf", "block")
MINIMIZE = ("size", "params", "flops", "latency")
SIZE_RULES = ("keep", "tolerance", "flops_target", "params_target", "size_target", "target", "latency_target")
SELECTIONS = ("id", "norm")
SOLVERS = ("irls", "ellipsoid")
QUANTIZE = ("int8", "int4")
#: when the integers of quantized weights become floats (`decode` below)
DECODE = ("load", "run")
PROVIDERS = ("cpu", "cuda")  # ONNX Runtime execution providers (`runtime.PROVIDERS`)


@dataclass(frozen=True, kw_only=True)
class Config:
    """How to compress.

    method:          "auto" (the default with `target`): every method at once, the allocator
                     choosing per site (ID in channel groups, activation-aware low rank in the
                     other layers, frequency-weighted factors for embedding tables); "id" (the
                     default otherwise): interpolative-decomposition channel pruning (seed 000); or a low-rank
                     split of each Gemm/MatMul/Conv/Gather weight into two nodes: "svd" (plain,
                     seed 001), "aasvd" (activation-aware: the calibration-output optimum;
                     frequency-weighted for embedding tables), "lp" (robust l_p subspace, seed 002); "quant": weights
                     as integers with DequantizeLinear; "sqf": each Gemm/MatMul/Conv weight as
                     sparse quantized factors W ~ Z C (seed 003, `methods/sqf`; not in "auto").
                     "block": residual blocks dropped whole.
    select:          "id" picks channels by pivoted Cholesky of the (consumer-weighted) Gram and
                     folds the interpolation matrix into the consumers; "norm" keeps the
                     largest-norm producer channels with no correction (a baseline).
    keep:            fraction of channels kept in every group (id), or of parameters kept in
                     every split layer (low rank), in (0, 1].
    spread:          with `keep` F: keep F of each kind of site's parameters over the whole model
                     (attention heads, other channel groups, each low-rank method's layers)
                     rather than F in every site; the budget walk over sensitivity-weighted
                     curves decides how much each site keeps (one sensitivity probe per site).
    tolerance:       per group, the smallest size whose relative ID error is at most this.
    flops_target:    keep at most this fraction of the model's Conv/Gemm/MatMul FLOPs, sizes chosen
                     greedily by estimated error per FLOP saved.
    params_target:   the same for the parameter count.
    size_target:     the same for the bytes of the weights (the file size, less the graph).
    target:          a quality target on the worst output, "cosine>=0.99", "top1>=0.99" or
                     "rel_l2<=0.05": the most compressed allocation whose validation outputs
                     meet it, found with at most 8 validation passes.
    minimize:        with `target`, what "most compressed" means: "size" (bytes), "params",
                     "flops".
    sensitivity:     for budgets and targets, scale each site's error curve by its end-to-end
                     sensitivity, measured by one probe per site on `probe_feeds` calibration
                     feeds (off: local relative errors are compared as they are).
    probe_feeds:     calibration feeds used by the sensitivity probes.
    min_keep:        no group is shrunk below this fraction of its channels (budget modes).
    exclude:         regular expression; groups touching a node whose name matches are left alone.
    include:         regular expression; only layers whose node name matches are split (low
                     rank), only groups with a matching producer are pruned (id).
    p:               the exponent of "lp", in [1, 2] (2 is plain SVD).
    lp_weighted:     "lp" on an embedding table weighs its rows by smoothed token counts.
    smoothing:       pseudo-counts for token weights, as a multiple of the mean count (so an unseen
                     token weighs `smoothing` times an average one); inf means no weighting; None
                     picks it from the data (`lowrank.token_weights`).
    max_patch:       Conv inputs use the Gram of their im2col patches up to this patch length,
                     their channel Gram (G ~ kron(G_c, I)) beyond.
    batch_size:      samples per ONNX Runtime run: arrays are cut into batches of this many, and
                     calibration merges feeds of equal shapes (a folder) up to this many.
    max_rows:        per feed and exit tensor, at most this many positions (rows of Z) enter the
                     Gram, sampled uniformly with `seed` (large feature maps); 0 takes all.
    stats_memory:    MiB of statistics one calibration pass may accumulate (default: the
                     256 MiB budget of `core/stats.py`). With `method="id"` and `keep` or
                     `tolerance`, groups whose statistics do not fit together are calibrated,
                     decided and rewritten a block at a time (one pass per block); with other
                     rules, groups past the budget are left alone, with the reason.
    holdout:         share of the calibration data held out for validation when no `val` is given.
    ridge:           relative ridge added to G[S,S] before solving for the interpolation matrix.
    weighted:        weight Gram columns by the consumers' input-column norms before pivoting.
    intercept:       fit Z ~ Z[:,S] T + 1 c0 and fold c0 into the consumers' biases where every
                     consumer has one (no padding); off: the plain seed-000 ID.
    best:            also compute each ID group's floor: the relative error of the best
                     k-dimensional approximation of its exit tensors (any subspace, not only k of
                     the channels), the report's `best` column. One eigendecomposition per group
                     (seconds on groups of thousands of channels), so off by default (`best_error`
                     is then null).
    min_agreement:   the gate: every output must reach this agreement (top-1 for score outputs,
                     cosine otherwise); below it the output is not written and exit code is 3.
    keep_failed:     write the output even when the gate fails.
    force:           overwrite an existing output file.
    seed:            seed for synthesized inputs and for the rows `max_rows` samples.
    allow_nonfinite: accept NaN/Inf weights and data (refused otherwise): layers with such weights
                     are left alone, and validation counts a NaN output as a disagreement.
    solver:          how "lp" finds its subspace: "irls" (iteratively reweighted least squares, a
                     local optimum from the SVD) or "ellipsoid" (seed 002: the Löwner ellipsoid of
                     the l_p body, a provable approximation; `methods/lowrank/ellipsoid.py`).
    round:           every kept width (id) and rank (low rank) is a multiple of this, or the
                     full width when rounding would remove a narrow group; the budget walk
                     steps by it. None: per op (Conv: ONNX Runtime's NCHWc block, 16 with
                     AVX-512, else 8; Gemm/MatMul/Gather: 16; `methods/rounding.py`); 1: any size.
    latency_target:  keep at most this fraction of the model's latency at one sample: the latency
                     model's estimate (`latency.py`) orders the allocations, and a few of them are
                     timed against the original for the least compressed one within it
                     (`decide._latency_budget`; the estimate alone with `latency_check` off).
    latency_check:   time every low-rank split against the layer it replaces (cached per machine)
                     and never emit one that is not faster; then time the whole compressed model
                     against the original at one sample (1 thread, all cores) and undo the splits
                     saving the fewest FLOPs while it runs slower (`latency.guard`); and time the
                     candidates of a `latency_target`.
    latency_threads: ONNX Runtime threads of the latency model's timings and of a
                     `latency_target`'s whole-model timings.
    benchmark:       time the original and the compressed model on the validation feed (batch 1
                     and the feed's batch; one thread and all cores) and put it in the report.
    quantize:        "int8" (one scale per output channel) or "int4" (blocks of 32 inputs; the
                     opset is raised to 21 when that is safe, else int8): after the size rule's
                     plan is applied, every float weight left in a Gemm, MatMul, Conv or Gather
                     (ID-shrunk weights and low-rank factors included) is quantized with error
                     feedback against its input Gram in the rewritten model, from one more
                     calibration pass (`methods/quant/stage.py`). With `target`, every probe
                     is quantized before it is validated.
    decode:          when the weights the tool stores compressed become the float weights a layer
                     reads (`methods/loadtime.py`). "load": the file holds the integers and their
                     scales (`quant`, `sqf`, `--quantize`) and the factors of split lookup tables,
                     and standard nodes on those constants form the float weight (Cast and Mul;
                     the table's product before its Gather), which a runtime computes once when
                     it loads the model (ONNX Runtime folds them): the smallest file, and those
                     layers run as fast as the original's, in float memory. "run":
                     DequantizeLinear, which runtimes with quantized kernels keep as integers in
                     memory (ONNX Runtime turns int4/int8 blocks feeding a MatMul into
                     MatMulNBits, which on a CPU can be slower than the float layer), and a table
                     split looked up in B^T and multiplied by A^T at every call.
    ray:             calibrate on a Ray cluster (the `ray` extra; docs/scale.md): "local" starts
                     one on this machine, anything else is the address of a running cluster to
                     join ("auto", "HOST:6379", "ray://HOST:10001"); None calibrates in this
                     process. The statistics equal a single-process run's up to round-off.
    ray_workers:     with `ray`, the number of shards (one worker task each) the calibration
                     feeds are cut into, and for "local" the CPUs of the instance it starts;
                     None: every CPU of the cluster.
    provider:        ONNX Runtime execution provider of calibration and of the compressed model
                     in validation: "cpu" or "cuda" (onnxruntime-gpu and a GPU); the original's
                     reference outputs are always computed on the CPU.
    """

    method: str | None = None
    select: str = "id"
    keep: float | None = None
    spread: bool = False
    tolerance: float | None = None
    flops_target: float | None = None
    params_target: float | None = None
    size_target: float | None = None
    target: str | None = None
    minimize: str = "size"
    sensitivity: bool = True
    probe_feeds: int = 32
    min_keep: float = 0.05
    exclude: str | None = None
    include: str | None = None
    p: float = 1.0
    lp_weighted: bool = False
    smoothing: float | None = None
    max_patch: int = 4096
    batch_size: int = 16
    max_rows: int = 8192
    stats_memory: int | None = None
    holdout: float = 0.2
    ridge: float = 1e-9
    weighted: bool = True
    intercept: bool = True
    best: bool = False
    min_agreement: float | None = None
    keep_failed: bool = False
    force: bool = False
    seed: int = 0
    allow_nonfinite: bool = False
    solver: str = "irls"
    round: int | None = None
    latency_target: float | None = None
    latency_check: bool = True
    latency_threads: int = 1
    benchmark: bool = False
    quantize: str | None = None
    decode: str = "load"
    ray: str | None = None
    ray_workers: int | None = None
    provider: str = "cpu"

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "auto" if self.target is not None else "id")
        _check_types(self)
        chosen = [n for n in SIZE_RULES if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise UsageError(f"{' and '.join(map(_named, chosen))} contradict each other: give only one size rule")
        if self.method not in METHODS:
            raise UsageError(f"{_named('method')}: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.select not in SELECTIONS:
            raise UsageError(f"{_named('select')}: unknown selection {self.select!r}; choose from {', '.join(SELECTIONS)}")
        for name in ("keep", "flops_target", "params_target", "size_target"):
            _check_fraction(name, getattr(self, name), open_low=True)
        _check_fraction("min_keep", self.min_keep, open_low=False)
        _check_fraction("min_agreement", self.min_agreement, open_low=False)
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise UsageError(f"{_named('tolerance')} must be in [0, 1), got {self.tolerance}")
        if not 0 <= self.holdout < 1:
            raise UsageError(f"{_named('holdout')} must be in [0, 1), got {self.holdout}")
        if self.max_rows < 0:
            raise UsageError(f"{_named('max_rows')} must be non-negative, got {self.max_rows}")
        if self.stats_memory is not None and self.stats_memory < 1:
            raise UsageError(f"{_named('stats_memory')} must be at least 1 (MiB), got {self.stats_memory}")
        if self.batch_size < 1:
            raise UsageError(f"{_named('batch_size')} must be at least 1, got {self.batch_size}")
        if not self.ridge >= 0:  # also refuses NaN
            raise UsageError(f"{_named('ridge')} must be non-negative, got {self.ridge}")
        if self.select != "id" and self.method != "id":
            raise UsageError(f"{_named('select')} {self.select} applies to {_named('method')} id only, not {self.method}")
        if self.target is not None:
            try:
                parse_target(self.target)
            except ValueError as e:
                raise UsageError(f"{_named('target')} {self.target!r}: {e}") from None
        if self.spread and self.size_rule[0] != "keep":
            raise UsageError(f"{_named('spread')} spreads {_named('keep')} over the model; "
                             f"{_named(self.size_rule[0])} has its own allocation")
        if self.minimize not in MINIMIZE:
            raise UsageError(f"{_named('minimize')} must be one of {', '.join(MINIMIZE)}, got {self.minimize!r}")
        if self.probe_feeds < 1:
            raise UsageError(f"{_named('probe_feeds')} must be at least 1, got {self.probe_feeds}")
        if not 1 <= self.p <= 2:
            raise UsageError(f"{_named('p')} must be in [1, 2], got {self.p}")
        if self.smoothing is not None and not self.smoothing >= 0:
            raise UsageError(f"{_named('smoothing')} must be non-negative, got {self.smoothing}")
        if self.max_patch < 1:
            raise UsageError(f"{_named('max_patch')} must be at least 1, got {self.max_patch}")
        for name in ("exclude", "include"):
            if getattr(self, name) is not None:
                try:
                    re.compile(getattr(self, name))
                except re.error as e:
                    raise UsageError(f"{_named(name)} is not a valid regular expression: {e}") from e
        if self.solver not in SOLVERS:
            raise UsageError(f"{_named('solver')}: unknown solver {self.solver!r}; choose from {', '.join(SOLVERS)}")
        if self.solver != "irls" and self.method != "lp":
            raise UsageError(f"{_named('solver')} {self.solver} applies to {_named('method')} lp only, not {self.method}")
        _check_speed(self)
        _check_scale(self)
        if self.decode not in DECODE:
            raise UsageError(f"{_named('decode')} must be one of {', '.join(DECODE)}, got {self.decode!r}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE:
                raise UsageError(f"{_named('quantize')} must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
            if self.method == "quant":
                raise UsageError(f"{_named('quantize')} quantizes what the plan leaves; {_named('method')} quant "
                                 "already quantizes every weight: give one of them")

    @property
    def size_rule(self) -> tuple[str, float]:
        """The size rule in force, as (name, value)."""
        for name in ("target", "tolerance", "flops_target", "params_target", "size_target", "latency_target", "keep"):
            value = getattr(self, name)
            if value is not None:
                return name, value
        return "keep", 0.75

    @property
    def per_site(self) -> bool:
        """Whether each site's size follows from its own curve alone (`keep` without `spread`,
        `tolerance`), so the sites can be calibrated and decided a block at a time."""
        rule = self.size_rule[0]
        return rule == "tolerance" or (rule == "keep" and not self.spread)

    @property
    def quality_target(self):
        """The parsed `target` (`core.target.Target`), or None."""
        return parse_target(self.target) if self.target is not None else None

    def to_dict(self, *, applied: bool = False) -> dict:
        """The fields as a dict; with `applied`, the size rule in force is filled in (`keep`: 0.75
        when no rule was given), as the report records it."""
        d = dataclasses.asdict(self)
        if applied:
            name, value = self.size_rule
            d[name] = value
        return d


_OPTIONAL = ("keep", "tolerance", "flops_target", "params_target", "size_target", "target", "min_agreement",
             "exclude", "include", "smoothing", "quantize", "ray", "ray_workers",
             "stats_memory")
_KINDS = {"a number": (("keep", "tolerance", "flops_target", "params_target", "size_target", "min_keep", "holdout",
                        "ridge", "min_agreement", "p", "smoothing"), lambda v: isinstance(v, numbers.Real)),
          "an integer": (("batch_size", "max_rows", "seed", "max_patch", "probe_feeds", "ray_workers",
                         "stats_memory"),
                         lambda v: isinstance(v, numbers.Integral)),
          "True or False": (("weighted", "intercept", "best", "spread", "keep_failed", "force", "lp_weighted", "allow_nonfinite",
                             "sensitivity"), lambda v: True),
          "a string": (("method", "select", "exclude", "include", "target", "minimize", "solver", "quantize", "decode", "ray",
                        "provider"),
                       lambda v: isinstance(v, str))}


def _check_types(config: Config) -> None:
    """From Python, a wrong type is a usage error too (the command line's parser checks its own)."""
    for kind, (names, ok) in _KINDS.items():
        for name in names:
            value = getattr(config, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) != (kind == "True or False") or not ok(value):
                raise UsageError(f"{_named(name)} must be {kind}, got {value!r}")


_NO_FLAG = ("ridge", "weighted")


def flag(name: str) -> str:
    """A field as the user types it: `min_agreement` -> `--min-agreement`; fields without a flag
    (`ridge`, `weighted`) keep their Python name."""
    return name if name in _NO_FLAG else "--" + name.replace("_", "-")


_named = flag


def _check_fraction(name: str, value: float | None, *, open_low: bool) -> None:
    if value is None:
        return
    low_ok = value > 0 if open_low else value >= 0
    if not (low_ok and value <= 1):
        bound = "(0, 1]" if open_low else "[0, 1]"
        raise UsageError(f"{_named(name)} must be in {bound}, got {value}")


def _check_speed(config: Config) -> None:
    """The speed options: `round` and `latency_threads` positive integers, `latency_target` in (0, 1]."""
    for name in ("round", "latency_threads"):
        value = getattr(config, name)
        if value is None and name == "round":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise UsageError(f"{_named(name)} must be an integer of at least 1, got {value!r}")
    if config.latency_target is not None and (isinstance(config.latency_target, bool)
                                              or not isinstance(config.latency_target, numbers.Real)):
        raise UsageError(f"{_named('latency_target')} must be a number, got {config.latency_target!r}")
    _check_fraction("latency_target", config.latency_target, open_low=True)
    for name in ("latency_check", "benchmark"):
        if not isinstance(getattr(config, name), bool):
            raise UsageError(f"{_named(name)} must be True or False, got {getattr(config, name)!r}")


def _check_scale(config: Config) -> None:
    """`ray` a non-empty address, `ray_workers` a positive integer that needs `ray`, `provider`
    one of PROVIDERS. Whether Ray is installed and the provider available is checked by
    `compress` (`cluster.import_ray`, `runtime.check_provider`), not here: a Config is data."""
    if config.ray is not None and not config.ray.strip():
        raise UsageError(f"{_named('ray')} needs an address, or local to start Ray on this machine")
    if config.ray_workers is not None:
        if config.ray_workers < 1:
            raise UsageError(f"{_named('ray_workers')} must be at least 1, got {config.ray_workers}")
        if config.ray is None:
            raise UsageError(f"{_named('ray_workers')} needs {_named('ray')}")
    if config.provider not in PROVIDERS:
        raise UsageError(f"{_named('provider')}: unknown provider {config.provider!r}; choose from {', '.join(PROVIDERS)}")
