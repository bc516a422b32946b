"""ONNX pass: a multi-branch block of linear ops reading one tensor x becomes one Conv.

Structural re-parameterisation (RepVGG, MobileOne, FastViT, RepGhost, RepViT, ACNet/DBB), found from the
graph alone. A region is every node computing y from one tensor x through ops affine in x: Conv with
constant weights reading x, BatchNormalization, Mul/Add/Sub/Div by a per-channel constant,
Identity/inference Dropout, and Add/Sub/Sum of such values of the same x; its intermediates are read by
the region alone (x and y may be read anywhere). Then y = conv(x, W) + b (kernel.AffineConv): kernels
zero-padded into one window, x itself a Dirac kernel, every scale and shift folded in float64 and
rounded once. This module matches (Term), asks the kernel (evaluate) and rewires (rewrite): the conv
of the region with the largest kernel takes the merged weights and writes y; everything else in the
region dies. A region is merged when it sums at least two branches, one of them a conv (a lone
Conv->BN is the ordinary fold's). When the kernel refuses (strides, groups, padding off one grid),
the region stays as it is, its BatchNorms carry the reason (a note the folder reads when they are
skipped), and the sums inside it are tried on their own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx

from ..core import kernel
from ..core.decisions import Decision, Reason, Skip
from ..core.layouts import Window
from .layout import passthrough
from .nodes import ONNX_DOMAINS, attr, node_label
from .standalone import per_channel

if TYPE_CHECKING:
    from .folder import OnnxFolder

MAX_DEPTH = 200  # terms nested deeper than this are left alone (recursion, not a real block)
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
ROOT_OPS = ("Add", "Sub", "Sum", "BatchNormalization", "Mul", "Div", "Identity", "Dropout")


@dataclass
class Term:
    """How `value` is computed from the region input `base`: a leaf (base itself), a conv reading base,
    an affine op or copy of one child, or a signed sum of children."""

    kind: str                      # leaf | conv | affine | copy | sum
    value: str
    base: str
    node: onnx.NodeProto | None = None
    children: list[tuple[float, "Term"]] = field(default_factory=list)
    rank: int | None = None
    mul: np.ndarray | None = None  # affine: y = x * mul + add, constants as stored (per channel or scalar)
    add: np.ndarray | None = None
    vectors: bool = False          # mul/add are already one value per channel (a BN's s, t)
    convs: int = 0
    branches: int = 1
    sums: int = 0

    @property
    def candidate(self) -> bool:
        return self.sums > 0 and self.convs > 0

    def nodes(self) -> Iterator[onnx.NodeProto]:
        """Every node of the region, root first."""
        if self.node is not None and self.kind != "leaf":
            yield self.node
        for _, c in self.children:
            yield from c.nodes()


def _leaf(f: "OnnxFolder", value: str, rank: int | None = None) -> Term:
    return Term("leaf", value, value, rank=rank if rank is not None else f._rank(value))


def _per_channel_shape(c: np.ndarray, rank: int | None) -> bool:
    """True when a constant of c's shape broadcasts onto axis 1 only, without raising the rank."""
    if c.size == 1:
        return c.ndim <= (rank if rank is not None else 1)
    if rank is None or rank < 2 or c.ndim > rank:
        return False
    padded = (1,) * (rank - c.ndim) + tuple(c.shape)
    return all(d == 1 for i, d in enumerate(padded) if i != 1)


class Regions:
    """Terms of one graph's values, memoised; merges the regions they describe."""

    def __init__(self, f: "OnnxFolder") -> None:
        self.f, self.ix = f, f.ix
        self.memo: dict[str, Term] = {}
        self.notes: dict[str, Skip] = {}  # BN label -> why the block it sits in was not merged

    # -- match ----------------------------------------------------------------------------------
    def private(self, value: str) -> bool:
        """Read by one node, once, and not a graph output: a value a region may swallow."""
        return value not in self.ix.graph_outputs and len(self.ix.consumers.get(value, ())) == 1

    def operand(self, value: str, depth: int) -> Term:
        return self.term(value, depth + 1) if self.private(value) else _leaf(self.f, value)

    def term(self, value: str, depth: int = 0) -> Term:
        """The term computing `value` (itself, as a leaf, when no region op does)."""
        t = self.memo.get(value)
        if t is None:
            t = self._term(value, depth) if depth < MAX_DEPTH else _leaf(self.f, value)
            self.memo[value] = t
        return t

    def _term(self, value: str, depth: int) -> Term:
        f, ix = self.f, self.ix
        p = ix.producer.get(value)
        if p is None or p.domain not in ONNX_DOMAINS or not p.output or p.output[0] != value or not p.input:
            return _leaf(f, value)
        op = p.op_type
        if op == "Conv" and len(p.input) > 1 and p.input[0] and p.input[1]:
            w = ix.inits.get(p.input[1])
            rank = len(w.dims) if w is not None else f._rank(value)
            return Term("conv", value, p.input[0], p, rank=rank, convs=1)
        if op == "BatchNormalization" and p.input[0]:
            if f.opts.reverted(f.scope + node_label(p)) is not None:
                return _leaf(f, value)  # its fold failed a proof once: it stays, and bounds any region
            try:
                s, t, _ = f._bn_params(p)
            except Skip:
                return _leaf(f, value)
            return self._affine(p, p.input[0], depth, s, t, vectors=True)
        if op in AFFINE_OPS and len(p.input) == 2 and all(p.input):
            return self._binary(p, depth)
        if op == "Sum" and all(p.input) and len(p.input) > 1 and not any(self._const(i) is not None for i in p.input):
            return self._sum(p, [(1.0, i) for i in p.input], depth)
        if passthrough(f, p):
            child = self.operand(p.input[0], depth)
            return Term("copy", value, child.base, p, [(1.0, child)], rank=child.rank, convs=child.convs,
                        branches=child.branches, sums=child.sums)
        return _leaf(f, value)

    def _const(self, name: str) -> np.ndarray | None:
        try:
            return np.asarray(self.ix.const(name, "constant"))
        except Skip:
            return None

    def _affine(self, p: onnx.NodeProto, data: str, depth: int, mul: np.ndarray | None,
                add: np.ndarray | None, vectors: bool = False) -> Term:
        child = self.operand(data, depth)
        return Term("affine", p.output[0], child.base, p, [(1.0, child)], rank=child.rank, mul=mul, add=add,
                    vectors=vectors, convs=child.convs, branches=child.branches, sums=child.sums)

    def _binary(self, p: onnx.NodeProto, depth: int) -> Term:
        a, b = p.input[0], p.input[1]
        ca, cb = self._const(a), self._const(b)
        if ca is None and cb is None:
            if p.op_type in ("Add", "Sub"):
                return self._sum(p, [(1.0, a), (-1.0 if p.op_type == "Sub" else 1.0, b)], depth)
            return _leaf(self.f, p.output[0])
        if ca is not None and cb is not None:
            return _leaf(self.f, p.output[0])
        data, c, data_first = (a, cb, True) if cb is not None else (b, ca, False)
        if c.dtype.kind != "f" and c.dtype.name != "bfloat16":
            return _leaf(self.f, p.output[0])
        child_rank = self.operand(data, depth).rank
        if not _per_channel_shape(c, child_rank):
            return _leaf(self.f, p.output[0])
        c64 = c.astype(np.float64)
        op = p.op_type
        if op == "Mul":
            return self._affine(p, data, depth, c64, None)
        if op == "Add":
            return self._affine(p, data, depth, None, c64)
        if op == "Sub":
            return self._affine(p, data, depth, None, -c64) if data_first else \
                self._affine(p, data, depth, np.array(-1.0), c64)
        if not data_first or not np.isfinite(c64).all() or (c64 == 0).any():
            return _leaf(self.f, p.output[0])  # c / x is not affine; x / 0 is not a scale
        return self._affine(p, data, depth, 1.0 / c64, None)

    def _sum(self, p: onnx.NodeProto, items: list[tuple[float, str]], depth: int) -> Term:
        children = [(sign, self.operand(v, depth)) for sign, v in items]
        if len({c.base for _, c in children}) != 1:
            self._near_miss(p, [c for _, c in children], depth)
            return _leaf(self.f, p.output[0])
        rank = next((c.rank for _, c in children if c.rank is not None), None)
        return Term("sum", p.output[0], children[0][1].base, p, children, rank=rank,
                    convs=sum(c.convs for _, c in children), branches=sum(c.branches for _, c in children),
                    sums=1 + sum(c.sums for _, c in children))

    def _near_miss(self, p: onnx.NodeProto, children: list[Term], depth: int) -> None:
        """A sum whose branches would share one input but for a branch value read elsewhere: note that on
        the block's BatchNorms (PRODUCER_FANOUT), so their reason says why the block stayed."""
        opened = [self.term(c.value, depth + 1) if c.kind == "leaf" and c.value in self.ix.producer else c
                  for c in children]
        if len({c.base for c in opened}) != 1 or not any(c.convs for c in opened):
            return
        shared = [c.value for c, o in zip(children, opened) if c.kind == "leaf" and o.kind != "leaf"]
        if not shared:
            return
        readers = [node_label(u) for u in self.ix.consumers.get(shared[0], []) if u is not p][:3]
        where = ", ".join(readers) or "a graph output"
        why = Skip(Reason.PRODUCER_FANOUT, f"the block summed by {node_label(p)} is not merged: its branch value "
                                           f"{shared[0]!r} is also read by {where}")
        for t in opened:
            for n in t.nodes():
                if n.op_type == "BatchNormalization":
                    self.notes.setdefault(self.f.scope + node_label(n), why)

    # -- check ----------------------------------------------------------------------------------
    def evaluate(self, t: Term) -> tuple[kernel.AffineConv, list[onnx.NodeProto], np.dtype]:
        """The region as one AffineConv, its convs, and their weight dtype. Raises Skip."""
        convs = [n for n in t.nodes() if n.op_type == "Conv"]
        maps: dict[int, kernel.AffineConv] = {}
        dtypes = set()
        for n in convs:
            w = np.asarray(self.ix.const(n.input[1], f"{node_label(n)} weight"))
            b = self.ix.const(n.input[2], f"{node_label(n)} bias") if len(n.input) > 2 and n.input[2] else None
            if w.dtype.kind != "f" and w.dtype.name != "bfloat16":
                raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{node_label(n)} has a {w.dtype} weight")
            dtypes.add(w.dtype)
            maps[id(n)] = kernel.AffineConv.conv(w, b, int(attr(n, "group", 1)), conv_windows(self.f, n, w))
        if len(dtypes) != 1:
            raise Skip(Reason.BRANCH_MISMATCH, f"the branches' weights have different dtypes ({sorted(map(str, dtypes))})")
        cins = {m.in_channels for m in maps.values()}
        if len(cins) != 1:
            raise Skip(Reason.BRANCH_MISMATCH, f"the branches read {sorted(cins)} channels of one tensor")
        return self._eval(t, cins.pop(), maps), convs, dtypes.pop()

    def _eval(self, t: Term, channels: int, maps: dict[int, kernel.AffineConv]) -> kernel.AffineConv:
        if t.kind == "leaf":
            return kernel.AffineConv.identity(channels)
        if t.kind == "conv":
            return maps[id(t.node)]
        if t.kind == "copy":
            return self._eval(t.children[0][1], channels, maps)
        if t.kind == "affine":
            inner = self._eval(t.children[0][1], channels, maps)
            n = inner.out_channels
            if t.vectors:
                return inner.then(t.mul, t.add)  # type: ignore[arg-type]
            s = np.ones(n) if t.mul is None else per_channel(t.mul, n, t.rank)
            sh = np.zeros(n) if t.add is None else per_channel(t.add, n, t.rank)
            if s is None or sh is None:
                shape = (t.mul if t.mul is not None else t.add).shape  # type: ignore[union-attr]
                raise Skip(Reason.AXIS_MISMATCH, f"{node_label(t.node)}'s constant of shape {list(shape)} is not one "
                                                 f"value per channel of its {n}")
            return inner.then(s.astype(np.float64), sh.astype(np.float64))
        total: kernel.AffineConv | None = None
        for sign, c in t.children:
            one = self._eval(c, channels, maps)
            total = one.then(np.full(one.out_channels, sign), np.zeros(one.out_channels)) if total is None \
                else total.plus(one, sign)
        return total  # type: ignore[return-value]

    # -- rewrite --------------------------------------------------------------------------------
    def merge_all(self) -> list[Decision]:
        """Merge every multi-branch region of the graph, latest first (so a region is taken whole)."""
        claimed: set[int] = set()
        decisions: list[Decision] = []
        for node in reversed(list(self.ix.graph.node)):
            if (node.op_type not in ROOT_OPS or node.domain not in ONNX_DOMAINS or not node.output
                    or id(node) in claimed):
                continue
            t = self.term(node.output[0])
            if t.candidate:
                decisions += self.merge(t, claimed)
        return decisions

    def explain(self, label: str, skip: Skip) -> Skip:
        """A BN left with nothing to fold into that sat in a block which could not be merged: the block's
        reason first (the deeper one), then why the BN alone could not fold."""
        note = self.notes.get(label)
        if note is None or skip.reason not in (Reason.NO_PRODUCER, Reason.UNSUPPORTED_PRODUCER):
            return skip
        return Skip(note.reason, f"{note.detail}; alone: {skip.detail}", skip.producer)

    def merge(self, top: Term, claimed: set[int]) -> list[Decision]:
        """Merge `top`'s region, or else the largest regions inside it; one Decision per absorbed BN."""
        out: list[Decision] = []
        stack = [top]
        while stack:
            t = stack.pop()
            nodes = list(t.nodes())
            if not t.candidate or any(id(n) in claimed for n in nodes):
                continue
            bns = [n for n in nodes if n.op_type == "BatchNormalization"]
            labels = [self.f.scope + node_label(n) for n in bns] or [self.f.scope + node_label(t.node)]
            why = self.f.opts.reverted(labels[0]) if not bns else None
            if why is not None:  # a BN-free block whose merge failed its proof once
                claimed.update(id(n) for n in nodes)
                out.append(Decision.skipped(labels[0], Reason.VERIFICATION_FAILED, f"merge reverted: {why}"))
                continue
            try:
                ac, convs, dtype = self.evaluate(t)
                folded = ac.rounded(dtype)
            except Skip as e:
                for label in labels:
                    self.notes.setdefault(label, Skip(e.reason, f"the block summed by {node_label(t.node)} is not "
                                                                f"merged: {e.detail}"))
                stack.extend(_inner_candidates(t))
                continue
            host = max(convs, key=lambda n: int(np.prod(self.ix.inits[n.input[1]].dims))
                       if n.input[1] in self.ix.inits else 0)
            self._rewrite(t, nodes, host, ac, folded)
            claimed.update(id(n) for n in nodes)
            pattern = f"RepBlock({t.branches} branches)->Conv"
            into = self.f.scope + node_label(host)
            for label in labels:
                d = Decision.folded(label, into, pattern, "merge")
                out.append(self.f.located(d, t.base, t.value))
        return out

    def _rewrite(self, t: Term, nodes: list[onnx.NodeProto], host: onnx.NodeProto, ac: kernel.AffineConv,
                 folded: kernel.Folded) -> None:
        f, ix = self.f, self.ix
        label = node_label(host)
        f._replace_input(host, 1, f._write_const(host.input[1], folded.weight, host))
        bias = host.input[2] if len(host.input) > 2 and host.input[2] else f"{label}_bias"
        f._replace_input(host, 2, f._write_const(bias, folded.bias, host))
        for a in [a for a in host.attribute if a.name == "auto_pad"]:
            host.attribute.remove(a)
        w = ac.windows
        set_conv_attrs(host, w)
        y, old = t.value, host.output[0]
        for n in nodes:
            if n is host:
                continue
            f.unlink(n)
            for o in n.output:
                if o and o != y:
                    f.dead_values.add(o)
                    if ix.producer.get(o) is n:
                        ix.producer.pop(o)
                    ix.consumers.pop(o, None)
        if old != y:
            host.output[0] = y
            ix.producer.pop(old, None)
            ix.consumers.pop(old, None)
            f.dead_values.add(old)
        ix.producer[y] = host


def _inner_candidates(t: Term) -> Iterator[Term]:
    """The largest candidate terms strictly inside `t`."""
    for _, c in t.children:
        if c.candidate:
            yield c
        else:
            yield from _inner_candidates(c)


def set_conv_attrs(node: onnx.NodeProto, windows: tuple[Window, ...]) -> None:
    """Write `windows` as an ONNX Conv's kernel_shape, strides, dilations and explicit pads."""
    from .nodes import set_attr
    set_attr(node, "kernel_shape", [w.kernel for w in windows])
    set_attr(node, "strides", [w.stride for w in windows])
    set_attr(node, "dilations", [w.dilation for w in windows])
    set_attr(node, "pads", [w.pad_begin for w in windows] + [w.pad_end for w in windows])


def conv_windows(f: "OnnxFolder", node: onnx.NodeProto, weight: np.ndarray) -> tuple[Window, ...]:
    """How an ONNX Conv reads each spatial axis; Skip when automatic padding depends on an unknown size."""
    label = node_label(node)
    kernel_shape = [int(k) for k in weight.shape[2:]]
    n = len(kernel_shape)
    declared = attr(node, "kernel_shape")
    if declared is not None and [int(k) for k in declared] != kernel_shape:
        raise Skip(Reason.AXIS_MISMATCH, f"{label} declares kernel_shape {list(declared)} for a weight of "
                                         f"{kernel_shape}", producer=label)
    strides = [int(s) for s in (attr(node, "strides") or [1] * n)]
    dilations = [int(d) for d in (attr(node, "dilations") or [1] * n)]
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", "VALID"):
        pads = [int(p) for p in (attr(node, "pads") or [0] * 2 * n)] if auto == "NOTSET" else [0] * 2 * n
        begin, end = pads[:n], pads[n:]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        dims = f.dims(node.input[0]) or []
        begin, end = [], []
        for i, (k, s, d) in enumerate(zip(kernel_shape, strides, dilations)):
            if s == 1:
                total = (k - 1) * d
            else:
                length = dims[2 + i] if len(dims) == n + 2 else None
                if length is None:
                    raise Skip(Reason.BRANCH_MISMATCH, f"{label} pads automatically ({auto}) with stride {s} on an "
                                                       "axis of unknown length", producer=label)
                total = max((-(-length // s) - 1) * s + (k - 1) * d + 1 - length, 0)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    else:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label} has auto_pad={auto}", producer=label)
    if not (len(strides) == len(dilations) == n and len(begin) == len(end) == n):
        raise Skip(Reason.AXIS_MISMATCH, f"{label}'s attributes do not match its {n} spatial axes", producer=label)
    return tuple(Window(k, s, d, b, e) for k, s, d, b, e in zip(kernel_shape, strides, dilations, begin, end))
