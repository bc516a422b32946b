"""ONNX pass: Conv/ConvTranspose/Gemm/MatMul(+Add) -> BatchNormalization becomes one layer.

Math (kernel.py): W' = W * s[out], b' = s*b + t with s = gamma/sqrt(var+eps), t = beta - s*mean.
Each BN goes through match (who produces its input) -> check (may we?) -> rewrite (new weights, the
layer writes the BN's output name). The graph is indexed once; rewrites keep the index current, so a
chain Conv->BN->BN folds in one pass and the cost grows linearly with the number of nodes. Dead BN
nodes and initializers are swept once at the end (onnx_sweep). Shape/Size readers of a value a fold
changes do not block it: the fold keeps every shape, so they follow the value to its new name.

Per BN, in order of preference: fold into the layer before it (here, also through layout ops and
Identity / inference-only Dropout: onnx_layout), else into the layer after it (onnx_backward), else, with standalone="affine", become
Mul + Add (onnx_standalone). Per-channel Mul/Add-by-constant ops right after the BN join its affine
map first. Parameters may be any constant subgraph (onnx_const); every scope is folded (onnx_scopes).
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import onnx

from ..core import kernel, layouts
from ..core.decisions import FOLDED, Decision, Reason, Skip
from ..core.options import Options
from .edits import GraphEdits
from .graph import GraphIndex
from .match import Match
from .nodes import EPSILON_DEFAULT, ONNX_DOMAINS, attr as _attr, node_label, value_of
from .standalone import BnView, absorb_affine_chain, as_mul_add
from .backward import fold_before
from .batched import Batch, Plan
from .multi import fold_disguised, fold_multi
from .regions import Regions
from .sweep import sweep
from .layout import LAYOUT_OPS, match_through_layout, matmul_bias_dims, shape_reader, skip_passthrough



@functools.lru_cache(maxsize=256)
def _conv_layout(op: str, groups: int) -> layouts.Layout:
    """layouts.conv / conv_transpose, made once per (op, groups): a Layout is frozen, and cheap to share."""
    return layouts.conv(groups) if op == "Conv" else layouts.conv_transpose(groups)


BN_ROLES = ("BatchNorm scale", "BatchNorm bias", "BatchNorm running mean", "BatchNorm running variance")


class OnnxFolder(GraphEdits):
    """Folds every BatchNormalization of one graph; collects one Decision per BN."""

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto, opset: int,
                 outer_consts: Callable[[str], np.ndarray | None] | None = None, scope: str = "",
                 names: set[str] | None = None, opts: Options = Options(),
                 shapes: dict[str, tuple[list | None, int]] | None = None) -> None:
        self.model = model
        self.opset = opset
        self.scope = scope
        self.opts = opts
        self.ix = GraphIndex.build(graph, model.ir_version, outer_consts, opset, names)
        # Node identity (id()) is used for bookkeeping; holding every wrapper keeps ids stable.
        self._nodes = self.ix.nodes
        self.decisions: list[Decision] = []
        self.dead_nodes: set[int] = set()
        # initializers (and values) folds stopped reading, in the order they were released: the sweep looks each
        # up in the index's big tables, faster in this order (their name strings were made in it) than in a set's
        self.maybe_dead_inits: dict[str, None] = {}
        self.inserted: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (after node, new node)
        self.dead_values: set[str] = set()
        self.created: list[str] = []  # initializers this fold added (IR < 4 bodies turn them into Constants)
        self.shapes: dict[str, tuple[list | None, int]] = shapes if shapes is not None else {}
        # id(layer) -> (weight name, bias name, float64 weight, float64 bias, weight dtype) of its last fold
        self.exact: dict[int, tuple[str, str | None, np.ndarray, np.ndarray, np.dtype]] = {}
        self.ix.shapes = self.shapes
        self.const_like: dict[str, bool] = {}  # name -> could be a constant (branches.constant; no weight reads)
        self.written: set[str] = set()  # initializers rewritten in place by this pass (see batched.Batch.take)
        self.batch: Batch | None = None
        self.batched = 0  # BNs folded with the arithmetic Batch did

    # -- driver ---------------------------------------------------------------------------------
    def run(self) -> list[Decision]:
        regions = Regions(self)  # multi-branch blocks first: their BNs fold with the block, not alone
        merged = regions.merge_all() + fold_disguised(self)
        self.decisions += merged
        if merged or self.dead_nodes:  # the graph changed: look again
            bns = [n for n in self.ix.graph.node if n.op_type == "BatchNormalization" and n.domain in ONNX_DOMAINS
                   and id(n) not in self.dead_nodes]
        else:
            bns = self.ix.batchnorms  # gathered by the index's one walk over the nodes
        decided: dict[int, Decision] = {}
        pending = []  # (BN, its label)
        scope, reverted = self.scope, self.opts.reverted
        for node in bns:
            label = scope + node_label(node)
            why = reverted(label)
            if why is not None:
                decided[id(node)] = Decision.skipped(label, Reason.VERIFICATION_FAILED, f"fold reverted: {why}")
            else:
                pending.append((node, label))
        # plain Conv->BN arithmetic of small layers, all at once
        self.batch = Batch(self, [node for node, _ in pending], _conv_layout)
        # A skipped BN may fold once a neighbour has: BN -> BN -> Conv folds the second BN into the conv
        # first, then the first one into the conv too. Retry the skipped ones while folds keep coming.
        while pending:
            again = []
            for node, label in pending:
                try:
                    decided[id(node)] = self._fold_one(node, label)
                except Skip as s:
                    s = regions.explain(label, s)
                    decided[id(node)] = Decision.skipped(label, s.reason, s.detail, s.producer)
                    again.append((node, label))
            if len(again) == len(pending):
                break
            pending = again
        self.decisions.extend(decided[id(n)] for n in bns)
        self.batched = self.batch.taken
        self.batch = None  # what it computed may be stale from here on
        # folds make new chances, once: a BN's own chain takes Mul/Add but not Sub/Div after it, and a BN
        # folded into the conv after it leaves that conv reading the block's x (so folding is idempotent)
        self.decisions += fold_disguised(self)
        regions.again(self.decisions)
        sweep(self)
        return self.decisions

    # -- check ----------------------------------------------------------------------------------
    def _bn_params(self, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, np.dtype]:
        attrs = {a.name: a for a in bn.attribute[:]}  # one pass instead of one per attribute asked for
        value = lambda name, default: default if name not in attrs else value_of(attrs[name])  # noqa: E731
        if self.opset < 7 and value("is_test", 0) == 0:
            raise Skip(Reason.TRAINING_MODE, "is_test=0: the BatchNorm computes batch statistics")
        if value("training_mode", 0) == 1:
            raise Skip(Reason.TRAINING_MODE, "training_mode=1: the BatchNorm uses batch statistics")
        extra = [o for o in bn.output[1:] if o] if len(bn.output) > 1 else []
        if extra and self.opset < 14:
            # before opset 14 the outputs themselves select the mode: with running mean/var (and saved
            # statistics) as outputs the BatchNorm normalises with batch statistics, used or not
            raise Skip(Reason.TRAINING_MODE, f"opset {self.opset}: the BatchNorm declares its training outputs "
                                             f"({', '.join(extra)}), so it normalises with batch statistics")
        used = [o for o in extra if self.ix.uses(o)]
        if used:
            raise Skip(Reason.TRAINING_MODE, f"the BatchNorm's training outputs are used ({', '.join(used)})")
        if self.opset < 9 and value("spatial", 1) == 0:
            raise Skip(Reason.SPATIAL_MODE)
        params = bn.input[1:5]
        if len(params) < 4 or not all(params):
            raise Skip(Reason.NO_RUNNING_STATS, "the BatchNorm has no running mean/variance inputs")
        const = self.ix.const
        gamma, beta, mean, var = (np.asarray(const(n, r)) for n, r in zip(params, BN_ROLES))
        eps = float(value("epsilon", EPSILON_DEFAULT))  # type: ignore[arg-type]
        channels = int(gamma.size)
        if gamma.ndim > 1 or beta.size != channels or mean.size != channels or var.size != channels:
            raise Skip(Reason.AXIS_MISMATCH, "BatchNorm parameters are not per-channel vectors of one length")
        s, t = kernel.bn_scale_shift(gamma, beta, mean, var, eps)
        return s, t, np.asarray(gamma).dtype

    def dims(self, name: str) -> list | None:
        """Static dims of a value (None entries for dynamic ones), or None when even the rank is unknown."""
        if name in self.ix.inits:
            return list(self.ix.inits[name].dims)
        info = self.shapes.get(name)
        if info is not None and info[0] is not None:
            return list(info[0])
        prod = self.ix.producer.get(name)
        if prod is not None and prod.op_type in ("Conv", "ConvTranspose") and len(prod.input) > 1:
            w = prod.input[1]
            if w in self.ix.inits:
                return [None] * len(self.ix.inits[w].dims)  # a conv's output has its weight's rank
        return None

    def _rank(self, name: str) -> int | None:
        d = self.dims(name)
        return None if d is None else len(d)

    def elem_type(self, name: str) -> int:
        """ONNX element type of a value, 0 when unknown."""
        return self.ix.elem_type(name)

    def _single_use(self, value: str, producer: onnx.NodeProto) -> None:
        if value in self.ix.graph_outputs:
            raise Skip(Reason.INTERMEDIATE_IS_OUTPUT, f"{node_label(producer)} output {value!r} is a graph output",
                       producer=node_label(producer))
        users = self.ix.consumers.get(value, [])
        if len(users) > 1:
            users = [u for u in users if not shape_reader(u)]
        if len(users) > 1:
            others = [node_label(u) for u in users][:4]
            raise Skip(Reason.PRODUCER_FANOUT,
                       f"{node_label(producer)} output {value!r} also feeds {', '.join(others)}",
                       producer=node_label(producer))

    def _match(self, bn: onnx.NodeProto) -> Match:
        x, hops = skip_passthrough(self, bn.input[0])
        prod = self.ix.producer.get(x)
        if prod is None:
            what = "a graph input" if x in self.ix.graph_inputs else "a constant" if x in self.ix.inits else "an outer-scope value"
            raise Skip(Reason.NO_PRODUCER, f"the BatchNorm's input {x!r} is {what}")
        if prod.op_type in LAYOUT_OPS and prod.domain in ONNX_DOMAINS:
            return match_through_layout(self, bn)
        m = self._match_layer(prod)
        for hop in hops:  # Identity/Dropout in between: each value on the way has that one reader
            src = self.ix.producer[hop.input[0]]
            self._single_use(hop.input[0], src)
        if hops:
            m.changed.append(m.tail)
            m.changed.extend(hops[:0:-1])
            m.tail = hops[0]
        return m

    def _match_layer(self, prod: onnx.NodeProto) -> Match:
        op = prod.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add") or prod.domain not in ONNX_DOMAINS:
            hint = ""
            if op == "DequantizeLinear":  # ONNX's or com.microsoft's: the layer before is quantized
                hint = ("; the model is quantized: fold the float model with bnfold first, then quantize it "
                        "(folding belongs before quantization)")
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the input comes from {op} {node_label(prod)!r}{hint}",
                       producer=node_label(prod))
        label = node_label(prod)
        if op == "Conv" or op == "ConvTranspose":
            ins = prod.input[:]
            if len(ins) < 2:
                raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label} has no weight input", producer=label)
            g = int(_attr(prod, "group", 1))
            bias = ins[2] if len(ins) > 2 and ins[2] else None
            return Match(f"{op}->BN", prod, prod, _conv_layout(op, g), ins[1], bias, (prod, 2))
        if prod.op_type == "Gemm":
            bias = prod.input[2] if len(prod.input) > 2 and prod.input[2] else None
            beta = float(_attr(prod, "beta", 1.0))
            return Match("Gemm->BN", prod, prod, layouts.gemm(bool(_attr(prod, "transB", 0))), prod.input[1], bias,
                         (prod, 2), bias_scale=beta if bias else 1.0)
        if prod.op_type == "MatMul":
            self._check_matmul(prod)
            return Match("MatMul->BN", prod, prod, layouts.matmul(), prod.input[1], None, None)
        # Add: MatMul + constant bias
        mm, bias = None, None
        for k in (0, 1):
            cand = self.ix.producer.get(prod.input[k])
            if cand is not None and cand.op_type == "MatMul" and cand.domain in ONNX_DOMAINS:
                mm, bias = cand, prod.input[1 - k]
                break
        if mm is None:
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the input comes from Add {label!r}, not MatMul + bias",
                       producer=label)
        w = self._check_matmul(mm)
        matmul_bias_dims(self, prod, np.asarray(self.ix.const(bias, f"{label} bias")),
                         self.dims(mm.output[0]) or [None, w.shape[1]])
        self._single_use(mm.output[0], mm)
        return Match("MatMul+Add->BN", mm, prod, layouts.matmul(), mm.input[1], bias,
                     (prod, list(prod.input).index(bias)), changed=[mm])

    def _check_matmul(self, mm: onnx.NodeProto) -> np.ndarray:
        label = node_label(mm)
        w = self.ix.const(mm.input[1], f"{label} right operand")
        if w.ndim != 2:
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label} right operand has rank {w.ndim}, not 2", producer=label)
        rank = self._rank(mm.input[0])
        if rank != 2:
            raise Skip(Reason.AXIS_MISMATCH,
                       f"{label} input has rank {rank if rank is not None else 'unknown'}: the BatchNorm's channel "
                       "axis 1 is not the MatMul's feature axis", producer=label)
        return w

    # -- rewrite --------------------------------------------------------------------------------
    def _fold_one(self, bn: onnx.NodeProto, label: str) -> Decision:
        taken = self.batch.take(bn) if self.batch is not None else None
        if taken is not None:
            return self._fold_planned(bn, label, *taken)
        s, t, _ = self._bn_params(bn)
        view = absorb_affine_chain(self, bn, s, t)
        try:
            return self._fold_after(bn, label, view)  # preferred: it never depends on padding
        except Skip as e:
            first = e
        if first.reason == Reason.UNSUPPORTED_PRODUCER:
            try:  # after an Add/Sub/Sum/Concat of layers: into all of them (else `first` comes back)
                return fold_multi(self, bn, label, view, first)
            except Skip as e:
                first = e
        try:
            return fold_before(self, bn, label, view)
        except Skip as e:
            # the backward check names a real layer: its reason says more than "no layer before"
            if e.producer and first.reason in (Reason.NO_PRODUCER, Reason.UNSUPPORTED_PRODUCER):
                e.detail = f"{e.detail}; nothing to fold into before it either ({first.detail})"
                first = e
        if self.opts.standalone == "affine":
            return as_mul_add(self, bn, label, view, first)
        raise first

    def _fold_planned(self, bn: onnx.NodeProto, label: str, plan: Plan, x: str, x_bn: str, out: str,
                      beside: list, after: list) -> Decision:
        """_fold_after with the arithmetic already done (batched.Batch): a plain Conv->BN, nothing after the BN;
        `x` is the conv's data input, `x_bn` the BN's, `out` the BN's output; `beside` and `after` read x_bn
        and `out` (Batch.take looked them up). The edits are _rewrite's for this one shape of
        fold, written out: a weight and bias only the conv reads are rewritten in place (tests/onnx/
        test_batched.py holds the result to the ordinary path's, byte for byte); anything else goes through
        the general edits."""
        batch = self.batch
        assert batch is not None
        batch.taken += 1
        ix, conv = self.ix, plan.conv
        into = self.scope + node_label(conv)  # (before the conv writes `out`: an unnamed node's label names it)
        consumers, outputs, inits, producer = ix.consumers, ix.graph_outputs, ix.inits, ix.producer
        keep_exact = self._may_chain(conv, out, readers=after, x=x)
        folded = None
        raw = None if keep_exact else batch.raw(plan)  # (no arrays at all for the commonest fold)
        for slot, name in ((1, plan.weight), (2, plan.bias)):
            users = consumers.get(name) if name else None
            # float32 raw data of the same shape, no borrowed or on-disk data, not written yet (Batch._plan, take)
            in_place = users and len(users) == 1 and users[0] is conv and name not in outputs
            if in_place and raw is not None:
                self.write_raw(inits[name], name, raw[slot - 1])
                continue
            if folded is None:
                folded = batch.folded(plan, keep_exact)
            value = folded.weight if slot == 1 else folded.bias
            if in_place:
                self.write_raw(inits[name], name, value)
            else:
                new = self._write_const(name or f"{node_label(conv)}_bias", value, conv)
                self._replace_input(conv, slot, new)
        old_out = conv.output[0]  # x_bn (Batch.take: the conv writes the BN's input)
        if len(beside) > 1:
            self._move_shape_readers(old_out, out)  # (Batch.take let only Shape/Size readers beside the BN)
        conv.output[0] = out
        producer[out] = conv
        self.unlink(bn, plan.params if x_bn == old_out else None)  # (its input goes with the conv's old output)
        producer.pop(old_out, None)
        consumers.pop(old_out, None)
        self.dead_values.add(old_out)
        self.maybe_dead_inits.pop(old_out, None)  # (no producer, no reader: nothing for the sweep to look at)
        if keep_exact:
            self.remember_exact(conv, folded if folded is not None else batch.folded(plan, True))
        else:
            self.exact.pop(id(conv), None)
        d = Decision(label, FOLDED, into, "Conv->BN", "after")
        if not self.scope:
            d.site = (x, out)
        return d

    def _fold_after(self, bn: onnx.NodeProto, label: str, view: BnView) -> Decision:
        s, t = view.scale, view.shift
        m = self._match(bn)
        layer_label = node_label(m.layer)
        try:
            self._single_use(bn.input[0], m.tail)
            weight, bias, wdt = self.layer_params(m.layer, m.weight_name, m.bias_name, layer_label)
            folded = kernel.fold_after(weight, bias, s, t, m.layout, bias_scale=m.bias_scale, bias_dtype=wdt,
                                       weight_dtype=wdt, keep_exact=self._may_chain(m.layer, view.out))
        except Skip as e:
            e.producer = e.producer or layer_label
            raise
        del weight, bias  # a weight read from disk for this fold need not outlive it (big models)
        self._rewrite(bn, m, folded, view)
        self.remember_exact(m.layer, folded)
        d = Decision.folded(label, self.scope + layer_label, m.pattern + view.suffix, "after")
        return self.located(d, m.layer.input[0], view.out)
