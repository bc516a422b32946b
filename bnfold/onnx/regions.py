"""ONNX pass: a multi-branch block of linear ops reading one tensor x becomes one Conv (or Gemm).

Structural re-parameterisation (RepVGG, MobileOne, FastViT, RepGhost, RepViT, ACNet/DBB), found from the
graph alone. A region is every node computing y from one tensor x through ops affine in x: Conv (or
Gemm/MatMul on a rank-2 x) with constant weights reading x, BatchNormalization, Mul/Add/Sub/Div by a
per-channel constant, Identity/inference Dropout, and Add/Sub/Sum of such values of the same x; its
intermediates are read by the region alone (x and y may be read anywhere). Then y = conv(x, W) + b
(kernel.AffineConv): kernels zero-padded into one window, x itself a Dirac kernel, every scale and shift
folded in float64 and rounded once. This module matches (Term), asks the kernel (evaluate) and rewires
(rewrite): the layer of the region with the largest weight takes the merged one and writes y (onnx/
branches.py reads and writes layers); everything else in the region dies. A region is merged when it
sums at least two branches, one of them a layer (a lone Conv->BN is the ordinary fold's).

Near-misses stay as they are, with the reason noted on the block's BatchNorms (BRANCH_MISMATCH for
strides, dilations, groups, or kernels not centred on one grid; PRODUCER_FANOUT for a branch value read
elsewhere):
a BN that then cannot fold alone is skipped with it, one that folds alone says why its block was not
merged (`not_merged`). The sums inside a refused block are tried on their own. The pass runs before
the per-BN folds and once more after them (`again`): a BN folded into the conv after it can leave that
conv reading the block's x.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np
import onnx

from ..core import kernel
from ..core.decisions import Decision, Reason, Skip
from .branches import LAYER_OPS, constant, could_be_constant, layer_rank, read_layer, write_layer
from .layout import passthrough, shape_reader
from .nodes import ONNX_DOMAINS, node_label
from .standalone import per_channel

if TYPE_CHECKING:
    from .folder import OnnxFolder

MAX_DEPTH = 200  # terms nested deeper than this are left alone (recursion, not a real block)
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
ROOT_OPS = ("Add", "Sub", "Sum", "BatchNormalization", "Mul", "Div", "Identity", "Dropout")
SUM_OPS = frozenset({"Add", "Sub", "Sum"})  # a region closes at one of these (see may_hold_sum)


@dataclass
class Term:
    """How `value` is computed from the region input `base`: a leaf (base itself), a layer reading base,
    an affine op or copy of one child, or a signed sum of children."""

    kind: str                      # leaf | layer | affine | copy | sum
    value: str
    base: str
    node: onnx.NodeProto | None = None
    children: list[tuple[float, "Term"]] = field(default_factory=list)
    rank: int | None = None
    mul: np.ndarray | None = None  # affine: y = x * mul + add, constants as stored (per channel or scalar)
    add: np.ndarray | None = None
    vectors: bool = False          # a BatchNorm: its (s, t), one value per channel, read when evaluated
    layers: int = 0
    branches: int = 1
    sums: int = 0
    blocked: Skip | None = None    # a sum that would be one block but for this (a branch value read elsewhere)

    @property
    def candidate(self) -> bool:
        return self.sums > 0 and self.layers > 0

    def block(self) -> Skip | None:
        """Why this region cannot be merged as a whole, found without computing it."""
        if self.blocked is not None:
            return self.blocked
        return next((b for _, c in self.children if (b := c.block()) is not None), None)

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
        self.sums_behind: dict[str, bool] = {}
        self.notes: dict[str, Skip] = {}  # BN label -> why the block it sits in was not merged

    # -- match ----------------------------------------------------------------------------------
    def private(self, value: str) -> bool:
        """Read by one node, once, and not a graph output: a value a region may swallow. Shape/Size readers
        do not count: every value inside a region has the shape of its output, and they move there."""
        readers = [u for u in self.ix.consumers.get(value, ()) if not shape_reader(u)]
        return value not in self.ix.graph_outputs and len(readers) == 1

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
        if op in LAYER_OPS:
            rank = layer_rank(f, p)
            return _leaf(f, value) if rank is None else Term("layer", value, p.input[0], p, rank=rank, layers=1)
        if op == "BatchNormalization" and p.input[0]:
            if f.opts.reverted(f.scope + node_label(p)) is not None:
                return _leaf(f, value)  # its fold failed a proof once: it stays, and bounds any region
            # its parameters are read (and checked) only if the region is evaluated
            return self._affine(p, p.input[0], depth, None, None, vectors=True)
        if op in AFFINE_OPS and len(p.input) == 2 and all(p.input):
            return self._binary(p, depth)
        if op == "Sum" and all(p.input) and len(p.input) > 1 and not any(self._const(i) is not None for i in p.input):
            return self._sum(p, [(1.0, i) for i in p.input], depth)
        if passthrough(f, p):
            child = self.operand(p.input[0], depth)
            return Term("copy", value, child.base, p, [(1.0, child)], rank=child.rank, layers=child.layers,
                        branches=child.branches, sums=child.sums)
        return _leaf(f, value)

    def _const(self, name: str) -> np.ndarray | None:
        return constant(self.f, name)

    def may_hold_sum(self, value: str) -> bool:
        """Cheaply, before any term is built: does a private chain of affine ops back from `value` reach a sum of
        two computed values? Only then can `value` close a block (plain Conv->BN chains cost nothing here)."""
        path, cur, found = [], value, False
        while True:
            if cur in self.sums_behind:
                found = self.sums_behind[cur]
                break
            p = self.ix.producer.get(cur)
            if p is None or p.domain not in ONNX_DOMAINS or not p.output or p.output[0] != cur:
                break
            if p.op_type in ("BatchNormalization", "Identity", "Dropout"):
                data = p.input[:1]  # the data input; the rest are parameters
            else:
                data = [i for i in p.input if i and not could_be_constant(self.f, i)]
            if p.op_type in SUM_OPS and len(data) >= 2:
                found = True
                break
            if p.op_type not in ROOT_OPS or len(data) != 1 or not self.private(data[0]) or len(path) > MAX_DEPTH:
                break
            path.append(cur)
            cur = data[0]
        for v in path + [cur]:
            self.sums_behind[v] = found
        return found

    def _affine(self, p: onnx.NodeProto, data: str, depth: int, mul: np.ndarray | None,
                add: np.ndarray | None, vectors: bool = False) -> Term:
        child = self.operand(data, depth)
        return Term("affine", p.output[0], child.base, p, [(1.0, child)], rank=child.rank, mul=mul, add=add,
                    vectors=vectors, layers=child.layers, branches=child.branches, sums=child.sums)

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
        blocked = None
        if len({c.base for _, c in children}) != 1:
            # a branch value read elsewhere cuts the block: seen through it, is it one block all the same?
            opened = [(sign, self.term(c.value, depth + 1) if c.kind == "leaf" else c) for sign, c in children]
            shared = [c.value for (_, c), (_, o) in zip(children, opened) if c.kind == "leaf" and o.kind != "leaf"]
            if len({c.base for _, c in opened}) != 1 or not shared:
                return _leaf(self.f, p.output[0])
            children, blocked = opened, self._cut(p, shared[0])
        rank = next((c.rank for _, c in children if c.rank is not None), None)
        return Term("sum", p.output[0], children[0][1].base, p, children, rank=rank, blocked=blocked,
                    layers=sum(c.layers for _, c in children), branches=sum(c.branches for _, c in children),
                    sums=1 + sum(c.sums for _, c in children))

    def _cut(self, p: onnx.NodeProto, shared: str) -> Skip:
        if shared in self.ix.graph_outputs:
            return Skip(Reason.INTERMEDIATE_IS_OUTPUT, f"its branch value {shared!r} is a graph output")
        readers = [node_label(u) for u in self.ix.consumers.get(shared, []) if u is not p and not shape_reader(u)][:3]
        return Skip(Reason.PRODUCER_FANOUT, f"its branch value {shared!r} is also read by {', '.join(readers)}")

    # -- check ----------------------------------------------------------------------------------
    def evaluate(self, t: Term) -> tuple[kernel.AffineConv, list[onnx.NodeProto], np.dtype]:
        """The region as one AffineConv, its layers, and their weight dtype. Raises Skip."""
        layers = [c.node for c in _layer_terms(t)]
        maps: dict[int, kernel.AffineConv] = {}
        dtypes = set()
        for n in layers:
            maps[id(n)], dt = read_layer(self.f, n)
            dtypes.add(dt)
        if any(n.op_type == "MatMul" for n in layers) and self.f._rank(t.base) != 2 and \
                not any(n.op_type == "Gemm" for n in layers):
            # MatMul contracts x's last axis; only on a rank-2 x is that the channel axis 1
            raise Skip(Reason.AXIS_MISMATCH, f"the rank of {t.base!r}, read by a MatMul, is not known to be 2")
        if len(dtypes) != 1:
            raise Skip(Reason.BRANCH_MISMATCH, f"the branches' weights have different dtypes ({sorted(map(str, dtypes))})")
        cins = {m.in_channels for m in maps.values()}
        if len(cins) != 1:
            raise Skip(Reason.BRANCH_MISMATCH, f"the branches read {sorted(cins)} channels of one tensor")
        return self._eval(t, cins.pop(), maps), layers, dtypes.pop()

    def _eval(self, t: Term, channels: int, maps: dict[int, kernel.AffineConv]) -> kernel.AffineConv:
        if t.kind == "leaf":
            return kernel.AffineConv.identity(channels)
        if t.kind == "layer":
            return maps[id(t.node)]
        if t.kind == "copy":
            return self._eval(t.children[0][1], channels, maps)
        if t.kind == "affine":
            inner = self._eval(t.children[0][1], channels, maps)
            n = inner.out_channels
            if t.vectors:
                s, sh, _ = self.f._bn_params(t.node)  # type: ignore[arg-type]
                return inner.then(s, sh)
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
        if self.ix.op_types.isdisjoint(SUM_OPS):
            return []  # no region can close here (may_hold_sum would say so of every node, at ~40 us each)
        nodes = self.ix.graph.node[:]
        claimed: set[int] = set(self.f.dead_nodes)
        decisions: list[Decision] = []
        for node in reversed(nodes):
            if (node.op_type not in ROOT_OPS or node.domain not in ONNX_DOMAINS or not node.output
                    or id(node) in claimed or not self.may_hold_sum(node.output[0])):
                continue
            t = self.term(node.output[0])
            if t.candidate:
                decisions += self.merge(t, claimed)
        return decisions

    def again(self, decisions: list[Decision]) -> None:
        """After the other folds: merge the blocks they made (a BN now folded into a conv of the block, so
        that conv reads x), then say why the rest were not merged. A BN kept before and merged now has
        its decision replaced."""
        self.memo.clear()
        self.sums_behind.clear()
        merged = self.merge_all()
        now = {d.bn for d in merged}
        decisions[:] = [d for d in decisions if d.is_folded or d.bn not in now] + merged
        self.annotate(decisions)

    def explain(self, label: str, skip: Skip) -> Skip:
        """A BN left with nothing to fold into that sat in a block which could not be merged: the block's
        reason first (the deeper one), then why the BN alone could not fold."""
        note = self.notes.get(label)
        if note is None or skip.reason not in (Reason.NO_PRODUCER, Reason.UNSUPPORTED_PRODUCER):
            return skip
        return Skip(note.reason, f"{note.detail}; alone: {skip.detail}", skip.producer)

    def annotate(self, decisions: list[Decision]) -> None:
        """A BN that folded alone though it sat in a block: say why the block was not merged."""
        for d in decisions:
            note = self.notes.get(d.bn)
            if note is not None and d.is_folded and not (d.pattern or "").startswith("RepBlock"):
                d.extra.setdefault("not_merged", f"{note.reason.value}: {note.detail}")

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
                cut = t.block()
                if cut is not None:
                    raise cut
                ac, layers, dtype = self.evaluate(t)
                folded = ac.rounded(dtype)
            except Skip as e:
                for label in labels:
                    self.notes.setdefault(label, Skip(e.reason, f"the block summed by {node_label(t.node)} is not "
                                                                f"merged: {e.detail}"))
                stack.extend(_inner_candidates(t))
                continue
            # the layer with the largest weight hosts the merge (no weight of another shape to write); a
            # Gemm before a MatMul, which has no bias of its own
            host = max(layers, key=lambda n: (n.op_type != "MatMul", int(np.prod(self.ix.inits[n.input[1]].dims))
                                              if n.input[1] in self.ix.inits else 0))
            killed = {o for n in nodes for o in n.output if o and o != t.value}
            self._rewrite(t, nodes, host, ac, folded)
            claimed.update(id(n) for n in nodes)
            repoint(self.f, killed, t.base, t.value)
            pattern = f"RepBlock({t.branches} branches)->{host.op_type}"
            into = self.f.scope + node_label(host)
            for label in labels:
                d = Decision.folded(label, into, pattern, "merge")
                out.append(self.f.located(d, t.base, t.value))
        return out

    def _rewrite(self, t: Term, nodes: list[onnx.NodeProto], host: onnx.NodeProto, ac: kernel.AffineConv,
                 folded: kernel.Folded) -> None:
        f, ix = self.f, self.ix
        y, old = t.value, host.output[0]
        for n in nodes:
            if n is host:
                continue
            f.unlink(n)
            for o in n.output:
                if o and o != y:
                    f._move_shape_readers(o, y)
                    f.dead_values.add(o)
                    if ix.producer.get(o) is n:
                        ix.producer.pop(o)
                    ix.consumers.pop(o, None)
        if old != y:
            f._move_shape_readers(old, y)
            host.output[0] = y
            ix.producer.pop(old, None)
            ix.consumers.pop(old, None)
            f.dead_values.add(old)
        ix.producer[y] = host
        write_layer(f, host, ac, folded)


def _layer_terms(t: Term) -> Iterator[Term]:
    if t.kind == "layer":
        yield t
    for _, c in t.children:
        yield from _layer_terms(c)


def _inner_candidates(t: Term) -> Iterator[Term]:
    """The largest candidate terms strictly inside `t`."""
    for _, c in t.children:
        if c.candidate:
            yield c
        else:
            yield from _inner_candidates(c)


def repoint(f: "OnnxFolder", killed: set[str], x: str, y: str) -> None:
    """Earlier folds whose output a later fold swallowed (a BN folded into a Gemm, then the Gemm merged
    with its sibling) are proven over the later fold's region, which holds theirs."""
    if f.scope:
        return
    for d in f.decisions:
        if d.site is not None and d.site[1] in killed:
            d.site = (x, y)
