"""A read-only index over a graph: who produces and who consumes each tensor, constant values,
attributes and display names. Analysis reads through it; only `rewrite` changes a graph.
"""
from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
import onnx
from onnx import helper

from . import weights

CACHE_BYTES = 16 * 2**20
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16}


class GraphIndex:
    """Index of the main graph of a (normalized) model.

    Nodes are referred to by their position in `graph.node`; `key(i)` gives a stable, unique
    display name (the node's name, or `<OpType #i>` for unnamed or duplicate-named nodes).
    """

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple] | None = None,
                 types: dict[str, int] | None = None):
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.shapes = shapes or {}
        self.types = types or {}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for out in node.output:
                if out:
                    self.producer[out] = i
            for pos, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((i, pos))
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.graph_inputs = [vi.name for vi in self.graph.input if vi.name not in self.initializers]
        self.graph_outputs = {vi.name for vi in self.graph.output}
        self._consts: dict[str, np.ndarray] = {}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    @cached_property
    def _keys(self) -> list[str]:
        counts = defaultdict(int)
        for node in self.nodes:
            counts[node.name] += 1
        return [node.name if node.name and counts[node.name] == 1 else f"<{node.op_type} #{i}>"
                for i, node in enumerate(self.nodes)]

    def key(self, i: int) -> str:
        return self._keys[i]

    def index_of(self, key: str) -> int:
        return self._keys.index(key)

    def const(self, name: str) -> np.ndarray | None:
        """The value of initializer `name`, or None if the tensor is not a constant. Values up to
        CACHE_BYTES are kept; larger ones are read again on each call, so the index never holds
        a second copy of a model's big weights; an external-data weight is a read-only memory
        map of its bytes (`weights.array`)."""
        if name not in self.initializers:
            return None
        value = self._consts.get(name)
        if value is None:
            value = weights.array(self.initializers[name])
            if value.nbytes <= CACHE_BYTES and not isinstance(value, np.memmap):  # maps are cheap to redo
                self._consts[name] = value
        return value

    def attr(self, i: int, name: str, default=None):
        for a in self.nodes[i].attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def users(self, tensor: str) -> list[tuple[int, int]]:
        return self.consumers.get(tensor, [])

    def subgraph_uses(self) -> set[str]:
        """Names read from inside If/Loop/Scan bodies (they must not change shape)."""
        names: set[str] = set()

        def walk(graph):
            for node in graph.node:
                names.update(node.input)
                for a in node.attribute:
                    for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        walk(g)

        for node in self.nodes:
            for a in node.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(g)
        return names

    def shape(self, name: str) -> tuple | None:
        return self.shapes.get(name)

    def rank(self, name: str) -> int | None:
        s = self.shapes.get(name)
        return None if s is None else len(s)
