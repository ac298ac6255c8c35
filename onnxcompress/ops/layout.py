"""Handlers for the ops that move, reshape or join tensors without computing on the channels:
each finds where the channel axis goes (or why it cannot be followed). Registered in
`ops.HANDLERS`."""
from __future__ import annotations

import numpy as np

from .edits import Enter, Handler, Member, ShapeEntry, Stop, Through, through_to


class Transpose(Handler):
    heads = True

    def consume(self, g, i, pos, m, channels):
        perm = g.attr(i, "perm")
        rank = g.rank(m.tensor) if perm is None else len(perm)
        if m.spatial > 1 or rank is None:
            return Stop("Transpose of unknown rank")
        perm = list(perm) if perm is not None else list(range(rank))[::-1]
        return through_to(g, i, m, perm.index(rank + m.axis) - rank,
                          perm.index(rank + m.head_axis) - rank if m.heads else None)


class Resize(Handler):
    """Resize/Upsample with scale 1 (or size = channels) along the channel axis."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        if pos != 0 or m.spatial > 1 or rank is None:
            return Stop(f"{node.op_type} of unknown rank")
        c = rank + m.axis
        names = list(node.input[1:])
        scales_name = names[-1] if node.op_type == "Upsample" else (names[1] if len(names) > 1 else "")
        sizes_name = names[2] if node.op_type == "Resize" and len(names) > 2 else ""
        if sizes_name:
            sizes = g.const(sizes_name)
            if sizes is None or len(sizes) != rank:
                return Stop(f"{node.op_type} sizes are not constant")
            if g.attr(i, "axes") is not None:
                return Stop(f"{node.op_type} with axes")
            return Through(outputs=(Member(node.output[0], m.axis),),
                           edits=(ShapeEntry(sizes_name, c, 1, i),))
        scales = g.const(scales_name) if scales_name else g.attr(i, "scales")
        if scales is None or len(scales) != rank or float(np.ravel(scales)[c]) != 1.0:
            return Stop(f"{node.op_type} scales the channel axis or its scales are not constant")
        return through_to(g, i, m)


class Softmax(Handler):
    heads = True

    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        default = -1 if g.opset >= 13 else 1
        axis = g.attr(i, "axis", default)
        if rank is None or m.spatial > 1:
            return Stop("Softmax of unknown rank")
        if g.opset < 13 and axis % rank <= rank + m.axis:
            return Stop("Softmax (opset < 13) flattens across the channels")
        if any(axis % rank == rank + a for a in m.axes):
            return Stop("Softmax over the channels")
        return through_to(g, i, m)


class Flatten(Handler):
    """Flatten at the channel axis: the channels become channel-major blocks of the last axis."""

    def consume(self, g, i, pos, m, channels):
        shape = g.shape(m.tensor)
        if shape is None or m.spatial > 1:
            return Stop("Flatten of unknown shape")
        rank = len(shape)
        c = rank + m.axis
        axis = g.attr(i, "axis", 1) % max(rank, 1)
        if axis != c:
            return Stop("Flatten does not start at the channel axis")
        spatial = shape[c + 1:]
        if any(d is None for d in spatial):
            return Stop("Flatten of unknown spatial size")
        flat = int(np.prod(spatial, dtype=np.int64))
        return Through(outputs=(Member(g.nodes[i].output[0], -1, flat, m.source if flat > 1 else "", m.axis),))


class Target:
    """A Reshape's target shape: entry j is an int, or None where it is computed at run time.
    Either a constant, or a Concat (axis 0) of 1-D pieces, constant or computed (the
    Shape -> Gather -> Unsqueeze pieces a PyTorch export makes of the dimensions it does not
    know); `entry(j, ...)` edits entry j where it is stored."""

    def __init__(self, output: str, values: list, slots: list):
        self.output, self.values, self.slots = output, values, slots

    def __getitem__(self, j: int):
        return self.values[j]

    def entry(self, j: int, spatial: int, per: int = 1) -> ShapeEntry:
        tensor, index, node = self.slots[j]
        return ShapeEntry(tensor, index, spatial, node, per=per)

    @classmethod
    def of(cls, g, i: int) -> "Target | None":
        node = g.nodes[i]
        name = node.input[1]
        c = g.const(name)
        if c is not None:
            return cls(node.output[0], [int(v) for v in np.ravel(c)], [(name, k, i) for k in range(c.size)])
        j = g.producer.get(name)
        if j is None or g.nodes[j].op_type != "Concat" or g.attr(j, "axis", 0) != 0:
            return None
        values, slots = [], []
        for piece in g.nodes[j].input:
            c, shape = g.const(piece), g.shape(piece)
            if c is not None and c.ndim == 1:
                values += [int(v) for v in c]
                slots += [(piece, k, j) for k in range(c.size)]
            elif shape is not None and len(shape) == 1 and shape[0] is not None:
                values += [None] * shape[0]
                slots += [None] * shape[0]
            else:
                return None
        return cls(node.output[0], values, slots)


class Reshape(Handler):
    """Reshape that keeps the channel axis whole (merging or splitting only other axes), or that
    flattens it channel-major with the axes after it, or that splits it into attention heads
    (C -> H x C/H, adjacent) or merges heads back (H x C/H -> C)."""

    heads = True

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        src, dst = g.shape(m.tensor), g.shape(node.output[0])
        if pos != 0 or src is None or dst is None or None in src or None in dst or m.spatial > 1:
            return Stop("Reshape of unknown shape")
        target = Target.of(g, i)
        if target is None:
            return Stop("Reshape to a computed shape")
        if m.heads:
            return self._merge_heads(node, i, src, dst, target, channels, m)
        c = len(src) + m.axis
        before = int(np.prod(src[:c], dtype=np.int64))
        after = int(np.prod(src[c + 1:], dtype=np.int64))
        for j in range(len(dst)):
            if int(np.prod(dst[:j], dtype=np.int64)) != before:
                continue
            tail = int(np.prod(dst[j + 1:], dtype=np.int64))
            if dst[j] == channels and tail == after:
                return self._through(target, j, len(dst), channels, 1, m, j == c)
            if dst[j] == channels * after and j == len(dst) - 1:
                return self._through(target, j, len(dst), channels, after, m, False)
        for j in range(len(dst) - 1):
            heads, size = dst[j], dst[j + 1]
            if int(np.prod(dst[:j], dtype=np.int64)) != before or heads * size != channels or heads < 2 \
                    or size < 2 or int(np.prod(dst[j + 2:], dtype=np.int64)) != after:
                continue
            # split into heads: the head entry (or, with it inferred, the size entry) names them
            if target[j] == heads:
                edits = (target.entry(j, 1, per=size),)
            elif target[j] == -1 and target[j + 1] == size:
                edits = ()
            else:
                return Stop("Reshape into attention heads with a target that does not name them")
            rank = len(dst)
            return Through(outputs=(Member(node.output[0], j + 1 - rank, heads=heads, head_axis=j - rank),),
                           edits=edits, block=size)
        return Stop("Reshape splits the channel axis")

    @staticmethod
    def _merge_heads(node, i, src, dst, target, channels, m):
        """Heads (H at head_axis, C/H right after it) merged back into one channel axis."""
        rank = len(src)
        h, c = rank + m.head_axis, rank + m.axis
        if m.head_only or c != h + 1:
            return Stop("Reshape of attention heads other than merging them back")
        before = int(np.prod(src[:h], dtype=np.int64))
        after = int(np.prod(src[c + 1:], dtype=np.int64))
        for j in range(len(dst)):
            if int(np.prod(dst[:j], dtype=np.int64)) == before and dst[j] == channels and \
                    int(np.prod(dst[j + 1:], dtype=np.int64)) == after:
                if target[j] == channels:
                    edits = (target.entry(j, 1),)
                elif target[j] == -1:
                    edits = ()
                else:
                    return Stop("Reshape merging attention heads with a target that does not name the channels")
                return Through(outputs=(Member(node.output[0], j - len(dst)),), edits=edits)
        return Stop("Reshape of attention heads other than merging them back")

    @staticmethod
    def _through(target, j, rank, channels, spatial, m, same_axis):
        """Output channel axis at position j of `rank`; the target entry j names the channels
        (edited), is -1 (inferred) or 0 copying the channel axis itself."""
        edits = ()
        entry = target[j]
        if entry == channels * spatial:
            edits = (target.entry(j, spatial),)
        elif not (entry == -1 or (entry == 0 and same_axis)):
            return Stop("Reshape target does not name the channels")
        source = m.source if spatial > 1 else ""
        return Through(outputs=(Member(target.output, j - rank, spatial, source, m.axis),), edits=edits)


class Squeeze(Handler):
    """Squeeze/Unsqueeze of axes other than the channels."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        src, dst = g.rank(m.tensor), g.rank(node.output[0])
        if pos != 0 or src is None or dst is None or m.spatial > 1:
            return Stop(f"{node.op_type} of unknown rank")
        axes = g.attr(i, "axes")
        if axes is None and len(node.input) > 1:
            axes = g.const(node.input[1])
        if axes is None:
            return Stop(f"{node.op_type} over unknown axes")
        c = src + m.axis
        if node.op_type == "Squeeze":
            axes = sorted(int(a) % src for a in np.ravel(axes))
            if c in axes:
                return Stop("Squeeze removes the channel axis")
            newpos = c - sum(a < c for a in axes)
        else:
            axes = sorted(int(a) % dst for a in np.ravel(axes))
            newpos = c
            for a in axes:
                if a <= newpos:
                    newpos += 1
        return through_to(g, i, m, newpos - dst)


class Concat(Handler):
    """Concatenation along an axis other than the channels joins its inputs into one group.

    Along the channels, input `pos` becomes channels [offset, offset + C_pos) of the output
    (offset = sum of the widths of the inputs before it): the group continues in the
    concatenated index space (`Enter`), where one selection S serves every input and the
    consumers of the output read one interpolation matrix over all the channels."""

    def consume(self, g, i, pos, m, channels):
        node = g.nodes[i]
        rank = g.rank(m.tensor)
        if rank is None or m.spatial > 1:
            return Stop("Concat of unknown rank")
        if g.attr(i, "axis") % rank == rank + m.axis:
            c = rank + m.axis
            if any(g.const(n) is not None for n in node.input if n):
                return Stop("Concat along the channels with a constant")
            shapes = [g.shape(n) for n in node.input]
            if any(s is None or len(s) != rank or s[c] is None for s in shapes):
                return Stop("Concat along the channels of unknown widths")
            widths = [int(s[c]) for s in shapes]
            return Enter(node.output[0], m.axis, sum(widths[:pos]), sum(widths), i)
        joins = tuple((n, m.axis) for k, n in enumerate(node.input) if k != pos and n)
        if any(g.const(n) is not None for n, _ in joins):
            return Stop("Concat with a constant")
        return Through(outputs=(Member(node.output[0], m.axis),), joins=joins)


class ShapeOf(Handler):
    """Shape: harmless when only dimensions other than the channels are read from it."""

    def consume(self, g, i, pos, m, channels):
        rank = g.rank(m.tensor)
        if rank is None or g.attr(i, "start") is not None or g.attr(i, "end") is not None:
            return Stop("its shape is read by a Shape node")
        c = rank + m.axis
        for j, p in g.users(g.nodes[i].output[0]):
            idx = g.const(g.nodes[j].input[1]) if g.nodes[j].op_type == "Gather" and p == 0 else None
            if idx is None or any(int(k) % rank == c for k in np.ravel(idx)):
                return Stop("its channel count is read by a Shape node")
        if g.nodes[i].output[0] in g.graph_outputs:
            return Stop("its shape is a graph output")
        return Through()
