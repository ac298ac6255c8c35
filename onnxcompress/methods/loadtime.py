"""`--decode load`: weights the tool writes compressed, expanded by the runtime once, when it loads
the model.

The file keeps every byte the methods saved, and what a runtime executes per call is the float
layer the original had: quantized weights become Cast(codes) * scales (`quant.storage.
decode_at_load`), a split lookup table becomes Gather(B^T A^T [+ exact rows], idx) with the
product taken before the lookup (`lowrank.rewrite.tables_at_load`). Every such subgraph reads
constants only, so ONNX Runtime folds it when it builds a session; the session then holds the
float weights (memory as the original's) and runs them at the original's speed. Splits of
Gemm / MatMul / Conv layers stay two layers: they save time per call as they are.

With "run" the file is written as the methods made it (DequantizeLinear; a lookup of B^T then a
MatMul by A^T per call): less memory in a runtime that keeps integers, and on a CPU often slower.
Both forms compute the same numbers, up to the order of float sums.
"""
from __future__ import annotations

import onnx

from ..core.config import Config
from .lowrank.rewrite import tables_at_load
from .quant.storage import decode_at_load


def finish(model: onnx.ModelProto, source: onnx.ModelProto, config: Config, *, copy: bool = False) -> onnx.ModelProto:
    """`model` as it is validated and written: with `config.decode` "load", the tool's compressed
    weights in their load-time form (module docstring); the input model's own constants (those of
    `source`) stay as they are. `model` is a rewrite's output, which is changed in place (no
    second copy of the weights) unless `copy`; `source` itself is returned as it is."""
    if config.decode != "load" or model is source:
        return model
    keep = {t.name for t in source.graph.initializer}
    decoded = decode_at_load(model, keep, copy=copy)
    return tables_at_load(decoded, keep, nodes={n.name for n in source.graph.node if n.name},
                          copy=copy and decoded is model)
