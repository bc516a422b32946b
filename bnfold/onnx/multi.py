"""ONNX pass: BatchNorm after several layers at once, and BatchNorm in disguise after one layer.

After a sum: BN(a1 +- a2 +- ...) = (s*a1 + t) +- s*a2 +- ... : every layer a_i takes the scale, the first
one the shift too (with its sign), and the sum stays (kernel.fold_after per layer). After a Concat on the
channel axis: each layer takes its own segment of (s, t). Exact like any fold after a layer; each layer's
output must be read by the sum or Concat alone.

In disguise: per-channel Mul/Add/Sub/Div by constants right after a layer (tf2onnx writes Keras BN that
way, torchvision's FrozenBatchNorm2d exports so) are y = s*x + t too (kernel.compose_affine) and fold
into the layer the same way, reported as their own pattern (e.g. "Conv->Mul+Add") under the first op's
name; a chain that cannot fold is left as it is, silently (it is not a BatchNorm).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..core import kernel
from ..core.decisions import Decision, Reason, Skip
from .branches import constant, weight_rank
from .layout import LAYOUT_OPS, skip_passthrough
from .match import Match
from .regions import repoint
from .nodes import ONNX_DOMAINS, node_label
from .standalone import BnView, per_channel

if TYPE_CHECKING:
    from .folder import OnnxFolder

SUM_OPS = ("Add", "Sub", "Sum")
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
LAYERS = ("Conv", "ConvTranspose", "Gemm", "Add")  # Add: MatMul + bias (folder._match_layer decides)
MAX_CHAIN = 8
MAX_LEAVES = 64


def _const(f: "OnnxFolder", name: str) -> np.ndarray | None:
    return constant(f, name)


def _layer(f: "OnnxFolder", value: str) -> tuple[Match, list[onnx.NodeProto]]:
    """The layer computing `value` (through Identity/Dropout), matched as for a BN after it; Skip if none.
    Returns the match (its tail moved to the last copy) and every node whose output changes value."""
    ix = f.ix
    x, hops = skip_passthrough(f, value)
    prod = ix.producer.get(x)
    if prod is None:
        raise Skip(Reason.NO_PRODUCER, f"{x!r} has no layer before it")
    if prod.domain in ONNX_DOMAINS and prod.op_type in LAYOUT_OPS:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{x!r} comes from {prod.op_type} {node_label(prod)!r}",
                   producer=node_label(prod))
    m = f._match_layer(prod)
    f._single_use(value, ix.producer[value])  # the value itself changes too: no graph output, one reader
    f._single_use(x, m.tail)
    for hop in hops:
        f._single_use(hop.input[0], ix.producer[hop.input[0]])
    if hops:
        m.changed.append(m.tail)
        m.changed.extend(hops[:0:-1])
        m.tail = hops[0]
    return m, [*m.changed, m.tail]


def _out_rank(f: "OnnxFolder", m: Match) -> int | None:
    if m.layer.op_type in ("Conv", "ConvTranspose"):
        return weight_rank(f, m.weight_name)
    return 2  # Gemm, and MatMul(+Add) once _match_layer has proven a rank-2 input


def _weights(f: "OnnxFolder", m: Match) -> tuple[np.ndarray, np.ndarray | None, np.dtype]:
    """The layer's weight, bias and weight dtype (float64 values where an earlier fold left them)."""
    return f.layer_params(m.layer, m.weight_name, m.bias_name, node_label(m.layer))


def _write(f: "OnnxFolder", m: Match, folded: kernel.Folded, changed: list[onnx.NodeProto]) -> None:
    """New weights for one layer; every value from it up to (not including) the sum gets a fresh name."""
    from .nodes import set_attr
    layer = m.layer
    f._replace_input(layer, 1, f._write_const(m.weight_name, folded.weight, layer))
    for node in changed:
        f.rename_value(node.output[0])
    if m.bias_slot is not None:
        node, slot = m.bias_slot
        f._replace_input(node, slot, f._write_const(m.bias_name or f"{node_label(layer)}_bias", folded.bias, node))
        if layer.op_type == "Gemm":
            set_attr(layer, "beta", 1.0)
    else:
        f.insert_add(layer, folded.bias, layer.output[0])
    f.remember_exact(layer, folded)  # nothing kept: an earlier fold's float64 values are stale now


# -- BN after Add / Sub / Sum / Concat of layers ------------------------------------------------------

def _sum_leaves(f: "OnnxFolder", top: onnx.NodeProto) -> tuple[list[tuple[float, str]], list[onnx.NodeProto]]:
    """The signed operands of a tree of Add/Sub/Sum of non-constant values, in order, and the tree's inner
    nodes (each read by the tree alone)."""
    leaves: list[tuple[float, str]] = []
    inner: list[onnx.NodeProto] = []

    def walk(sign: float, node: onnx.NodeProto, depth: int) -> None:
        ins = list(node.input)
        if not all(ins):
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{node_label(node)} has an empty input", producer=node_label(node))
        signs = [sign, -sign] if node.op_type == "Sub" else [sign] * len(ins)
        for sg, v in zip(signs, ins):
            p = f.ix.producer.get(v)
            if (depth < MAX_LEAVES and p is not None and p.domain in ONNX_DOMAINS and p.op_type in SUM_OPS
                    and p.output[0] == v and all(p.input) and not any(_const(f, i) is not None for i in p.input)):
                f._single_use(v, p)
                inner.append(p)
                walk(sg, p, depth + 1)
            else:
                leaves.append((sg, v))
            if len(leaves) > MAX_LEAVES:
                raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{node_label(top)} sums more than {MAX_LEAVES} values")

    walk(1.0, top, 0)
    return leaves, inner


def fold_multi(f: "OnnxFolder", bn: onnx.NodeProto, label: str, view: BnView, otherwise: Skip) -> Decision:
    """Fold the BN (with its absorbed chain) into every layer of the Add/Sub/Sum/Concat before it.

    Raises `otherwise` when no such op feeds the BN (or it adds a constant: a bias, the single-layer
    fold's business), and a Skip of its own when one does but some operand cannot take the BN."""
    ix = f.ix
    s, t = view.scale, view.shift
    value, hops = skip_passthrough(f, bn.input[0])
    top = ix.producer.get(value)
    if top is None or top.domain not in ONNX_DOMAINS or top.op_type not in (*SUM_OPS, "Concat") or \
            not top.input or (top.op_type != "Concat" and any(_const(f, i) is not None for i in top.input if i)):
        raise otherwise
    tail = ix.producer[bn.input[0]]
    f._single_use(bn.input[0], tail)
    for hop in hops:
        f._single_use(hop.input[0], ix.producer[hop.input[0]])
    if top.op_type == "Concat":
        if not all(top.input) or len(set(top.input)) != len(top.input):
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{node_label(top)} concatenates one value twice or an empty one",
                       producer=node_label(top))
        leaves, inner = [(1.0, v) for v in top.input], []
    else:
        leaves, inner = _sum_leaves(f, top)
    matches = []
    for _, v in leaves:
        try:
            matches.append(_layer(f, v))
        except Skip as e:
            raise Skip(e.reason, f"{node_label(top)} reads {v!r}, which cannot take the BatchNorm: {e.detail}",
                       e.producer) from None
    ranks = {_out_rank(f, m) for m, _ in matches} | ({f._rank(bn.input[0])} - {None})
    if len(ranks) != 1 or None in ranks:
        raise Skip(Reason.AXIS_MISMATCH, f"the layers combined by {node_label(top)} have outputs of rank "
                                         f"{sorted(map(str, ranks))}: their channels need not meet on axis 1",
                   producer=node_label(top))
    rank = ranks.pop()
    folds = []
    if top.op_type == "Concat":
        from .nodes import attr
        axis = int(attr(top, "axis", 1))
        if axis % rank != 1:
            raise Skip(Reason.AXIS_MISMATCH, f"{node_label(top)} concatenates axis {axis}, not the channels",
                       producer=node_label(top))
        start = 0
        for m, _ in matches:
            w, b, wdt = _weights(f, m)
            n = m.layout.out_channels(w.shape)
            seg = slice(start, start + n)
            start += n
            if start > s.size:
                break
            folds.append(kernel.fold_after(w, b, s[seg], t[seg], m.layout, m.bias_scale, wdt, wdt))
        if start != s.size:
            raise Skip(Reason.AXIS_MISMATCH, f"{node_label(top)} concatenates {start} channels for a BatchNorm of "
                                             f"{s.size}", producer=node_label(top))
    else:
        first_sign = leaves[0][0]
        for k, ((sign, _), (m, _)) in enumerate(zip(leaves, matches)):
            w, b, wdt = _weights(f, m)
            shift = t * first_sign if k == 0 else np.zeros_like(t)
            try:
                folds.append(kernel.fold_after(w, b, s, shift, m.layout, m.bias_scale, wdt, wdt))
            except Skip as e:
                e.producer = e.producer or node_label(m.layer)
                raise
    for (m, changed), folded in zip(matches, folds):
        _write(f, m, folded, changed)
    for node in inner:
        f.rename_value(node.output[0])
    for hop in hops[1:]:
        f.rename_value(hop.output[0])
    if top is not tail:
        f.rename_value(top.output[0])
    old = bn.input[0]
    f._move_shape_readers(old, view.out)
    tail.output[0] = view.out
    ix.producer[view.out] = tail
    f.drop_bn(bn, view, old_out=old)
    layers = [m for m, _ in matches]
    pattern = f"{top.op_type}({','.join(m.layer.op_type for m in layers)})->BN{view.suffix}"
    into = "+".join(f.scope + node_label(m.layer) for m in layers)
    xs = tuple(dict.fromkeys(m.layer.input[0] for m in layers))
    return f.located(Decision.folded(label, into, pattern, "after"), xs if len(xs) > 1 else xs[0], view.out)


# -- BN in disguise: per-channel Mul/Add/Sub/Div by constants after a layer --------------------------

def _affine_step(f: "OnnxFolder", node: onnx.NodeProto, data: str | None,
                 channels: int, rank: int) -> tuple[str, np.ndarray, np.ndarray] | None:
    """(data input, scale, shift) when `node` is data*s + t per channel with constants, else None."""
    if node.domain not in ONNX_DOMAINS or node.op_type not in AFFINE_OPS or len(node.input) != 2 or \
            len([o for o in node.output if o]) != 1 or node.input[0] == node.input[1]:
        return None
    a, b = node.input
    if data is None:
        ca, cb = _const(f, a), _const(f, b)
        if (ca is None) == (cb is None):
            return None
        data, c, first = (a, cb, True) if cb is not None else (b, ca, False)
    elif data in (a, b):
        first = data == a
        c = _const(f, b if first else a)
        if c is None:
            return None
    else:
        return None
    vec = per_channel(c, channels, rank)
    if vec is None:
        return None
    v = vec.astype(np.float64)
    one, zero = np.ones(channels), np.zeros(channels)
    op = node.op_type
    if op == "Mul":
        return data, v, zero
    if op == "Add":
        return data, one, v
    if op == "Sub":
        return (data, one, -v) if first else (data, -one, v)
    if not first or not np.isfinite(v).all() or (v == 0).any():
        return None
    return data, 1.0 / v, zero


def fold_disguised(f: "OnnxFolder") -> list[Decision]:
    """Fold every chain of per-channel Mul/Add/Sub/Div by constants that follows a layer."""
    out: list[Decision] = []
    if f.ix.op_types.isdisjoint(AFFINE_OPS):
        return out  # (a look at each of 100k nodes costs ~1 us)
    known = {d.bn for d in f.decisions}  # a chain kept on a second look is reported once
    for node in list(f.ix.graph.node):
        if id(node) in f.dead_nodes or node.domain not in ONNX_DOMAINS or node.op_type not in AFFINE_OPS:
            continue
        try:
            d = _fold_chain(f, node)
        except Skip:
            continue
        if d is not None and d.bn not in known:
            out.append(d)
    return out


def _fold_chain(f: "OnnxFolder", first: onnx.NodeProto) -> Decision | None:
    ix = f.ix
    ins = [i for i in first.input if i and _const(f, i) is None]
    if len(ins) != 1 or len(first.input) != 2:
        return None
    x, _ = skip_passthrough(f, ins[0])
    prod = ix.producer.get(x)
    if prod is None or prod.domain not in ONNX_DOMAINS or prod.op_type not in LAYERS:
        return None
    m, _ = _layer(f, ins[0])
    w, b, wdt = _weights(f, m)
    channels, rank = m.layout.out_channels(w.shape), _out_rank(f, m)
    if rank is None:
        return None
    step = _affine_step(f, first, None, channels, rank)
    if step is None:
        return None
    s, t = step[1], step[2]
    chain, out = [first], first.output[0]
    while len(chain) < MAX_CHAIN:
        users = ix.consumers.get(out, [])
        if out in ix.graph_outputs or len(users) != 1:
            break
        nxt = _affine_step(f, users[0], out, channels, rank)
        if nxt is None:
            break
        s, t = kernel.compose_affine(s, t, mul=nxt[1])
        t = t + nxt[2]
        chain.append(users[0])
        out = users[0].output[0]
    label = f.scope + node_label(first)
    into = f.scope + node_label(m.layer)
    # a BatchNorm this pass folded into the layer last: the chain after it is that BN's own (its view takes
    # Mul/Add; Sub/Div, or a chain it could not place, come here), reported with it
    prior = next((d for d in reversed(f.decisions) if d.is_folded and d.producer == into
                  and d.direction == "after"), None)
    why = f.opts.reverted(label)
    if why is not None and prior is None:
        return Decision.skipped(label, Reason.VERIFICATION_FAILED, f"fold reverted: {why}")
    folded = kernel.fold_after(w, b, s, t, m.layout, bias_scale=m.bias_scale, bias_dtype=wdt, weight_dtype=wdt,
                               keep_exact=f._may_chain(m.layer, out))
    del w, b
    view = BnView(first, out, s, t, chain[1:])
    killed = {n.output[0] for n in (m.tail, *m.changed, *chain[:-1])}
    f._rewrite(first, m, folded, view)
    f.remember_exact(m.layer, folded)
    repoint(f, killed, m.layer.input[0], out)
    if prior is not None:
        prior.pattern = f"{prior.pattern}->" + "->".join(n.op_type for n in chain)  # its site moved: repoint
        return None
    pattern = m.pattern.removesuffix("->BN") + "->" + "+".join(n.op_type for n in chain)
    d = Decision.folded(label, into, pattern, "after")
    return f.located(d, m.layer.input[0], out)
