"""Folding a BatchNorm into the layer that *follows* it (direction "before").

With y = s*x + t per input channel feeding a layer W: W' = W * s[in], b' = b + sum(W * t[in]) per
output channel (kernel.fold_before). Exact for Gemm/MatMul, and for Conv only when no zero padding
is read: padding would see the shifted border as 0 instead of t. BN -> Flatten/Reshape -> Gemm works
when the reshape lays each channel out as one contiguous block of features (layouts.Layout.in_block).
Identity and inference-only Dropout (onnx_layout.passthrough) may sit on either side of that reshape:
they copy the value, so the fold looks through them and then removes them (the layer reads the BN's
input directly). Shape/Size readers do not count as readers: the fold keeps every shape, so they are
pointed at a value of the same shape. The forward fold is tried first; this runs only when it does
not apply.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..core import kernel, layouts
from ..core.decisions import Decision, Reason, Skip
from .layout import MAX_PASSTHROUGH, passthrough, shape_reader
from .nodes import ONNX_DOMAINS, attr as _attr, node_label as _label, set_attr
from .standalone import BnView

if TYPE_CHECKING:
    from .folder import OnnxFolder



def _sole_reader(f: "OnnxFolder", value: str, what: str, producer: str | None = None) -> onnx.NodeProto:
    ix = f.ix
    if value in ix.graph_outputs:
        raise Skip(Reason.INTERMEDIATE_IS_OUTPUT, f"{what} {value!r} is a graph output", producer=producer)
    users = [u for u in ix.consumers.get(value, []) if not shape_reader(u)]
    if len(users) != 1:
        names = ", ".join(_label(u) for u in users[:4]) or "nothing"
        raise Skip(Reason.PRODUCER_FANOUT, f"{what} {value!r} feeds {names}", producer=producer)
    return users[0]


def _through_copies(f: "OnnxFolder", value: str, what: str) -> tuple[onnx.NodeProto, str, list[onnx.NodeProto]]:
    """Follow `value` forward over pass-through nodes, each the sole reader of what it copies:
    (the first other reader, the value it reads, the pass-through nodes in order)."""
    hops: list[onnx.NodeProto] = []
    reader = _sole_reader(f, value, what)
    while (len(hops) < MAX_PASSTHROUGH and passthrough(f, reader) and reader.input[0] == value
           and list(reader.input).count(value) == 1):
        hops.append(reader)
        value = reader.output[0]
        reader = _sole_reader(f, value, f"{_label(reader)} output")
    return reader, value, hops


def _remove_copies(f: "OnnxFolder", hops: list[onnx.NodeProto], same_shape: str) -> None:
    """Drop pass-through nodes nothing reads through any more; their Shape/Size readers move to
    `same_shape` (a value of the shape they copied)."""
    ix = f.ix
    for node in hops:
        out = node.output[0]
        f._move_shape_readers(out, same_shape)
        f.unlink(node)
        for o in node.output:
            if o and ix.producer.get(o) is node:
                ix.producer.pop(o)
                ix.consumers.pop(o, None)
                f.dead_values.add(o)


def _check_padding(conv: onnx.NodeProto, weight_rank: int) -> None:
    label = _label(conv)
    auto = _attr(conv, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto == "VALID":
        return
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        k = _attr(conv, "kernel_shape")
        if k is not None and all(int(v) == 1 for v in k):
            return  # a 1x1 kernel never needs padding, whatever the stride
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD, f"{label} pads automatically ({auto})", producer=label)
    pads = [int(p) for p in (_attr(conv, "pads") or [])]
    if any(pads):
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD, f"{label} has pads={pads}", producer=label)


def _flatten_block(f: "OnnxFolder", node: onnx.NodeProto, x: str, channels: int) -> int:
    """Features per channel after `node` flattens the BN output to (N, C*block); Skip when unproven."""
    label = _label(node)
    dims = f.dims(x)
    if dims is None or len(dims) < 2 or any(d is None for d in dims[2:]):
        raise Skip(Reason.AXIS_MISMATCH, f"cannot prove how {label} lays out the channels: the BatchNorm input's "
                   f"shape {dims if dims is not None else 'is unknown'}", producer=label)
    block = int(np.prod(dims[2:], dtype=np.int64)) if len(dims) > 2 else 1
    if node.op_type == "Flatten":
        axis = int(_attr(node, "axis", 1))
        if axis % len(dims) != 1:
            raise Skip(Reason.AXIS_MISMATCH, f"{label} flattens at axis {axis}, not after the channel axis 1",
                       producer=label)
        return block
    shape = [int(v) for v in np.asarray(f.ix.const(node.input[1], f"{label} shape")).reshape(-1)]
    zero_copies = not _attr(node, "allowzero", 0)
    n = dims[0]
    first_ok = lambda s0: s0 == -1 or (s0 == 0 and zero_copies) or (n is not None and s0 == n)  # noqa: E731
    ok = len(shape) == 2 and (
        (shape[1] == channels * block and first_ok(shape[0]))
        or (shape[1] == -1 and shape[0] != -1 and first_ok(shape[0])))
    if not ok:
        raise Skip(Reason.AXIS_MISMATCH, f"{label} reshapes {dims} to {shape}, not (batch, channels x {block})",
                   producer=label)
    return block


def fold_before(f: "OnnxFolder", bn: onnx.NodeProto, label: str, view: BnView) -> Decision:
    """Fold the BN (with its absorbed chain) into the Conv/Gemm/MatMul reading its output.

    Raises Skip; the Skip names a producer only when a following layer was found (its reason is then
    about that layer, e.g. PADDING_BREAKS_BACKWARD_FOLD)."""
    s, t, out = view.scale, view.shift, view.out
    # pre: copies between the BN and the layer (or the reshape); post: copies after the reshape
    reader, value, pre = _through_copies(f, out, "the BatchNorm's output")
    via: list[onnx.NodeProto] = []
    post: list[onnx.NodeProto] = []
    layer, layer_in = reader, value
    if reader.domain in ONNX_DOMAINS and reader.op_type in ("Flatten", "Reshape") and reader.input[0] == value:
        nxt, nxt_in, copies = _through_copies(f, reader.output[0], f"{_label(reader)} output")
        if nxt.domain in ONNX_DOMAINS and nxt.op_type in ("Gemm", "MatMul"):
            via, layer, layer_in, post = [reader], nxt, nxt_in, copies
    op = layer.op_type
    if layer.domain not in ONNX_DOMAINS or op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the BatchNorm's output feeds {op} {_label(layer)!r}")
    lab = _label(layer)
    if not layer.input or layer.input[0] != layer_in or list(layer.input).count(layer_in) != 1:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the BatchNorm's output is not {lab}'s data input", producer=lab)
    if op == "ConvTranspose":
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD,
                   f"{lab} is transposed: its border outputs see fewer input positions", producer=lab)
    block = _flatten_block(f, via[0], bn.input[0], s.size) if via else 1
    bias_scale, new_beta = 1.0, None
    bias_slot: tuple[onnx.NodeProto, int] | None = (layer, 2)
    bias_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    if op == "MatMul":
        bias_slot, bias_name = _matmul_bias(f, layer)
    try:
        weight, bias, wdt = f.layer_params(layer, layer.input[1], bias_name, lab)
        if op == "Conv":
            _check_padding(layer, weight.ndim)
            layout = layouts.conv(int(_attr(layer, "group", 1)))
        elif op == "Gemm":
            if int(_attr(layer, "transA", 0)):
                raise Skip(Reason.AXIS_MISMATCH, f"{lab} transposes its input (transA=1)")
            alpha, beta = float(_attr(layer, "alpha", 1.0)), float(_attr(layer, "beta", 1.0))
            if alpha == 0.0:
                raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{lab} has alpha=0")
            layout = layouts.gemm(bool(_attr(layer, "transB", 0)))
            # alpha*(x*s + t)W + beta*C == alpha*(x (sW)) + alpha*(beta/alpha*C + tW)
            bias_scale, new_beta = beta / alpha, alpha
        else:  # MatMul: features are the last axis of its input, the BN's are axis 1
            rank = f._rank(layer_in)
            if rank != 2 or weight.ndim != 2:
                raise Skip(Reason.AXIS_MISMATCH,
                           f"{lab} contracts the last axis of a rank-{rank if rank is not None else '?'} input "
                           f"with a rank-{weight.ndim} weight; the BatchNorm's channel axis is 1")
            layout = layouts.matmul()
        if block != 1:
            layout = dataclasses.replace(layout, in_block=block)

        folded = kernel.fold_before(weight, bias, s, t, layout, bias_scale=bias_scale, bias_dtype=wdt,
                                    weight_dtype=wdt, keep_exact=f._may_chain(layer, layer.output[0]))
    except Skip as e:
        e.producer = e.producer or lab
        raise
    # what the fold leaves unchanged in value: the layer's output (after its bias Add, for MatMul + Add)
    site_out = bias_slot[0].output[0] if bias_slot is not None else layer.output[0]
    new_w = f._write_const(layer.input[1], folded.weight, layer)
    f._replace_input(layer, 1, new_w)
    if bias_slot is not None:
        node, slot = bias_slot
        new_b = f._write_const(bias_name or f"{lab}_bias", folded.bias, node)
        f._replace_input(node, slot, new_b)
        if new_beta is not None:
            set_attr(layer, "beta", new_beta)
        if node is not layer:
            f.rename_value(layer.output[0])  # MatMul -> Add(bias): the MatMul alone now computes another value
    else:
        f.insert_add(layer, folded.bias, layer.output[0])
    x = bn.input[0]
    if post:
        f._replace_input(layer, 0, via[0].output[0])
        _remove_copies(f, post, via[0].output[0])
    if via:
        f.rename_value(via[0].output[0])  # the reshape now carries the un-normalised input
    first = via[0] if via else layer
    f._replace_input(first, 0, x)
    _remove_copies(f, pre, x)
    f._move_shape_readers(out, x)
    f.drop_bn(bn, view, old_out=None)
    f.remember_exact(layer, folded)
    pattern = f"BN{view.suffix}->" + "".join(f"{v.op_type}->" for v in via) + op
    return f.located(Decision.folded(label, f.scope + lab, pattern, "before"), x, site_out)


def _matmul_bias(f: "OnnxFolder", mm: onnx.NodeProto) -> tuple[tuple[onnx.NodeProto, int] | None, str | None]:
    """The Add of a constant right after `mm` (its bias) when `mm` alone feeds it, else (None, None)."""
    ix = f.ix
    out = mm.output[0]
    users = ix.consumers.get(out, [])
    if out in ix.graph_outputs or len(users) != 1:
        return None, None
    add = users[0]
    if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None, None
    k = 1 if add.input[0] == out else 0
    try:
        b = ix.const(add.input[k], "bias")
    except Skip:
        return None, None
    n_out = f.dims(out)
    if b.ndim > 2 or (b.ndim and n_out and n_out[-1] is not None and b.shape[-1] not in (1, n_out[-1])):
        return None, None
    return (add, k), add.input[k]
