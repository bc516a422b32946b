"""Windows of a fold's region: the part of the captured data a local proof needs to replay.

A fold changes weights and biases, the same at every sample and position, so a proof can replay one
batch item, and for a region around one convolution a few output positions away from the border,
instead of a whole 224x224 activation (onnx.reference's float64 convolution is slow).
"""
from __future__ import annotations

import numpy as np
import onnx

from .nodes import attr

# Output positions kept per spatial axis when a convolution's region is replayed on a window (shrink)
WINDOW = 4
SAMPLEWISE = {"Conv", "ConvTranspose", "BatchNormalization", "Identity", "Dropout", "Cast"}
ARITHMETIC = {"Add", "Mul", "Sub", "Div"}


def shrink(orig: tuple[list[onnx.NodeProto], list[onnx.TensorProto]],
            fold: tuple[list[onnx.NodeProto], list[onnx.TensorProto]], xin: str, x: np.ndarray,
            witness: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...], dict[int, list[int]]]:
    """The part of the captured data that shows every error a fold can make, the index that cuts the
    witnesses (onnxruntime's outputs of the region) alike, and the pads to replay it.

    A fold changes weights and biases, the same at every sample and position. When both regions treat
    batch items apart (no op mixes them), one item is replayed. When both hold one Conv and otherwise
    only ops that act position by position (BatchNorm, Identity, per-channel arithmetic), a window of
    WINDOW output positions per spatial axis away from the border is replayed: every weight of the conv
    reaches every one of those outputs, through real data, never through padding, so the conv's pads
    (with the same attributes in both regions) are set to 0 alike. The witness is cut the same way.
    """
    facts = [_position_wise(nodes, inits, xin, x.ndim) for nodes, inits in (orig, fold)]
    items = slice(None)
    if facts[0] is None or facts[1] is None:
        return x, (items,), {}
    (batch_o, space_o, convs_o), (batch_f, space_f, convs_f) = facts
    if batch_o and batch_f and x.ndim >= 2 and x.shape[0] > 1 and witness.shape[0] == x.shape[0]:
        x, items = x[:1], slice(0, 1)
    if not (space_o and space_f and len(convs_o) == 1 and len(convs_f) == 1 and x.ndim >= 3):
        return x, (items,), {}
    co, cf = convs_o[0], convs_f[0]
    if co.op_type != "Conv" or cf.op_type != "Conv" or _attributes(co) != _attributes(cf):
        return x, (items,), {}
    if any(xin in n.input and n is not conv for nodes, conv in ((orig[0], co), (fold[0], cf)) for n in nodes):
        return x, (items,), {}  # x also reaches y around the conv (an identity branch): no window of it
    weight = {t.name: t for t in orig[1]}.get(co.input[1] if len(co.input) > 1 else "")
    nd = x.ndim - 2
    auto = attr(co, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if weight is None or len(weight.dims) != nd + 2 or auto not in ("NOTSET", "VALID"):
        return x, (items,), {}
    kernel = list(weight.dims[2:])
    strides = list(attr(co, "strides") or [1] * nd)
    dilations = list(attr(co, "dilations") or [1] * nd)
    pads = [0] * (2 * nd) if auto == "VALID" else list(attr(co, "pads") or [0] * (2 * nd))
    if not (len(strides) == len(dilations) == nd and len(pads) == 2 * nd):
        return x, (items,), {}
    cut_in, cut_out, new_pads = [slice(None)] * 2, [slice(None)] * 2, list(pads)
    for i in range(nd):
        size, s, d, k, before, after = x.shape[2 + i], strides[i], dilations[i], kernel[i], pads[i], pads[nd + i]
        if (size + before + after - d * (k - 1) - 1) // s + 1 != witness.shape[2 + i]:
            return x, (items,), {}  # not the conv output this reasoning is about
        lo, hi = -(-before // s), (size - 1 - d * (k - 1) + before) // s  # outputs reading no padding
        n = min(WINDOW, hi - lo + 1)
        if n <= 0 or (n == witness.shape[2 + i] and not before and not after):
            cut_in.append(slice(None))  # no interior output, or nothing to cut: the axis stays whole
            cut_out.append(slice(None))
            continue
        first = lo + (hi - lo + 1 - n) // 2
        start = first * s - before
        cut_in.append(slice(start, start + (n - 1) * s + d * (k - 1) + 1))
        cut_out.append(slice(first, first + n))
        new_pads[i] = new_pads[nd + i] = 0
    if all(c == slice(None) for c in cut_in):
        return x, (items,), {}
    return x[tuple(cut_in)], (items, *cut_out[1:]), {id(co): new_pads, id(cf): new_pads}


def _position_wise(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], xin: str,
                   rank: int) -> tuple[bool, bool, list[onnx.NodeProto]] | None:
    """(items stay apart, positions stay apart except through convs, the convs) for a region computed from
    `xin` of rank `rank`; None when it holds an op this cannot tell about."""
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in inits}
    data, batch, space, convs = {xin}, True, True, []
    for n in nodes:
        ins = [i for i in n.input if i]
        if not any(i in data for i in ins):
            if n.op_type == "Constant" and n.output:
                value = next((a.t for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                             None)
                if value is None:
                    return None
                shapes[n.output[0]] = tuple(value.dims)
                continue
            return None
        if n.op_type in SAMPLEWISE:
            if ins[0] not in data or any(i in data for i in ins[1:]):
                return None
            if n.op_type in ("Conv", "ConvTranspose"):
                convs.append(n)
        elif n.op_type in ARITHMETIC and len(ins) == 2:
            for other in (i for i in ins if i not in data):
                shape = shapes.get(other)
                if shape is None or len(shape) > rank:
                    return None
                full = (1,) * (rank - len(shape)) + shape
                batch = batch and full[0] == 1
                space = space and all(d == 1 for d in full[2:])
        else:
            return None
        data.update(o for o in n.output if o)
    return batch, space, convs


def _attributes(node: onnx.NodeProto) -> list[bytes]:
    return sorted(a.SerializeToString() for a in node.attribute)
