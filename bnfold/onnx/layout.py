"""Looking through layout ops: MatMul(+Add) -> Reshape/Transpose/... -> BatchNormalization.

A MatMul's features live on the last axis of its output. Layout ops move that axis; the BN scales
axis 1 of what it sees. The fold is exact only when the MatMul's feature axis provably *is* the BN's
channel axis after every layout op: a Transpose moves it to perm.index(axis); a reshape keeps
feature f at position f of some output axis b exactly when that axis has the same size and the same
number of elements after it (static dims needed for both). An equal channel count on another axis
does not count: that is AXIS_MISMATCH, where onnxruntime's own fusion is fooled.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..core import layouts
from ..core.decisions import Reason, Skip

from .match import Match
from .nodes import ONNX_DOMAINS, attr as _attr, node_label as _label

if TYPE_CHECKING:
    from .folder import OnnxFolder

LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
MAX_DEPTH = 6
SHAPE_READERS = ("Shape", "Size")  # they see a value's shape only, which a fold never changes
MAX_PASSTHROUGH = 64


def shape_reader(node: onnx.NodeProto) -> bool:
    """True for a node that reads only the shape of its input (Shape, Size)."""
    return node.domain in ONNX_DOMAINS and node.op_type in SHAPE_READERS


def passthrough(f: "OnnxFolder", node: onnx.NodeProto) -> bool:
    """True for a node whose first output is its input, unchanged: Identity, or Dropout in inference
    (no training flag that could be true, mask output unused)."""
    op = node.op_type  # first: on a long graph nearly every node asked about is some other op
    if op != "Identity" and op != "Dropout":
        return False
    if node.domain not in ONNX_DOMAINS or not node.input or not node.input[0] or not node.output:
        return False
    if op == "Identity":
        return True
    if len(node.output) > 1 and node.output[1] and f.ix.uses(node.output[1]):
        return False  # the mask is random in training and all-true otherwise: not ours to decide
    if f.opset < 7:
        return bool(_attr(node, "is_test", 0))
    if len(node.input) > 2 and node.input[2]:
        try:
            flag = np.asarray(f.ix.const(node.input[2], "Dropout training_mode"))
        except Skip:
            return False  # a runtime flag may switch dropout on
        return flag.size == 1 and not bool(flag.reshape(-1)[0])
    return True


def skip_passthrough(f: "OnnxFolder", value: str) -> tuple[str, list[onnx.NodeProto]]:
    """Walk back from `value` over pass-through nodes: (the value they copy, the nodes, nearest first)."""
    hops: list[onnx.NodeProto] = []
    node = f.ix.producer.get(value)
    while node is not None and len(hops) < MAX_PASSTHROUGH and passthrough(f, node):
        hops.append(node)
        value = node.input[0]
        node = f.ix.producer.get(value)
    return value, hops



def matmul_bias_dims(f: "OnnxFolder", add: onnx.NodeProto, bias: np.ndarray, mm_dims: list) -> list:
    """Dims of MatMul + bias, i.e. of what the layers after the Add see: the MatMul's own dims, once
    proven that the bias neither raises the rank nor broadcasts the product along any axis (else the
    features would not be where the MatMul puts them). Skip(AXIS_MISMATCH) otherwise."""
    label = _label(add)
    rank, b = len(mm_dims), tuple(bias.shape)
    if len(b) > rank:
        raise Skip(Reason.AXIS_MISMATCH, f"{label}'s bias of shape {b} raises the rank-{rank} MatMul output to rank "
                   f"{len(b)}: the features are no longer on the axis the BatchNorm normalises", producer=label)
    padded = (1,) * (rank - len(b)) + b
    for k, (d, m) in enumerate(zip(padded, mm_dims)):
        if d != 1 and d != m:
            raise Skip(Reason.AXIS_MISMATCH, f"{label}'s bias of shape {b} broadcasts the MatMul output "
                       f"{mm_dims} along axis {k}", producer=label)
    seen = f.dims(add.output[0])
    if seen is not None and len(seen) != rank:
        raise Skip(Reason.AXIS_MISMATCH, f"{label}'s output has rank {len(seen)}, its MatMul's {rank}", producer=label)
    return mm_dims



def _static_tail(dims: list, start: int) -> int | None:
    tail = dims[start:]
    return None if any(d is None for d in tail) else int(np.prod(tail, dtype=np.int64))


def _moved_axis(f: "OnnxFolder", node: onnx.NodeProto, axis: int) -> int:
    """Where the feature axis `axis` of node's input lands in its output; Skip(AXIS_MISMATCH) when unproven."""
    label = _label(node)
    if passthrough(f, node):
        return axis
    in_dims = f.dims(node.input[0])
    if node.op_type == "Transpose":
        perm = None
        for a in node.attribute:
            if a.name == "perm":
                perm = list(a.ints)
        if perm is None:
            if in_dims is None:
                raise Skip(Reason.AXIS_MISMATCH, f"{label} reverses axes of unknown rank", producer=label)
            perm = list(range(len(in_dims)))[::-1]
        return perm.index(axis)
    out_dims = f.dims(node.output[0])
    if in_dims is None or out_dims is None or in_dims[axis] is None:
        raise Skip(Reason.AXIS_MISMATCH, f"cannot prove where {label} puts the features: shapes unknown",
                   producer=label)
    feat, after = in_dims[axis], _static_tail(in_dims, axis + 1)
    if after is not None:
        for b, d in enumerate(out_dims):
            if d == feat and _static_tail(out_dims, b + 1) == after:
                return b
    raise Skip(Reason.AXIS_MISMATCH, f"{label} reshapes {in_dims} to {out_dims}: the {feat} features do not stay "
               "one axis", producer=label)


def match_through_layout(f: "OnnxFolder", bn: onnx.NodeProto) -> Match:
    """Match MatMul[+Add] -> layout ops -> BN, or raise Skip saying why not."""
    ix = f.ix
    chain: list[onnx.NodeProto] = []  # layout nodes, BN side first
    value = bn.input[0]
    node = ix.producer.get(value)
    while node is not None and len(chain) < MAX_DEPTH + MAX_PASSTHROUGH and (
            (node.op_type in LAYOUT_OPS and node.domain in ONNX_DOMAINS) or passthrough(f, node)):
        chain.append(node)
        value = node.input[0]
        node = ix.producer.get(value)
    first = _label(chain[-1])
    if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in ("MatMul", "Add"):
        what = f"{node.op_type} {_label(node)!r}" if node is not None else f"{value!r}"
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the input comes from {first} after {what}", producer=first)
    add, mm, bias_slot, bias = None, node, None, None
    if node.op_type == "Add":
        add = node
        for k in (0, 1):
            cand = ix.producer.get(node.input[k])
            if cand is not None and cand.op_type == "MatMul" and cand.domain in ONNX_DOMAINS:
                mm, bias, bias_slot = cand, node.input[1 - k], (node, 1 - k)
                break
        if mm is add:
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the input comes from {first} after an Add that is not "
                       "MatMul + bias", producer=first)
        ix.const(bias, f"{_label(add)} bias")
    label = _label(mm)
    w = ix.const(mm.input[1], f"{label} right operand")
    if w.ndim != 2:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label} right operand has rank {w.ndim}, not 2", producer=label)
    # every value between the MatMul and the BN must be read by the next op only
    for n in [mm] + ([add] if add is not None else []) + chain[:0:-1]:
        f._single_use(n.output[0], n)
    start = f.dims(mm.output[0])
    if start is None:
        raise Skip(Reason.AXIS_MISMATCH, f"the rank of {label}'s output is unknown", producer=label)
    if add is not None:  # the layout ops see the Add's output: count the axis there
        start = matmul_bias_dims(f, add, np.asarray(ix.const(bias, f"{_label(add)} bias")), start)
    axis = len(start) - 1
    for n in reversed(chain):
        axis = _moved_axis(f, n, axis)
    if axis != 1:
        raise Skip(Reason.AXIS_MISMATCH, f"{label}'s features end up on axis {axis} after "
                   f"{'->'.join(n.op_type for n in reversed(chain))}; the BatchNorm normalises axis 1",
                   producer=label)
    moves = [n for n in reversed(chain) if not passthrough(f, n)]
    pattern = f"MatMul{'+Add' if add else ''}->" + "".join(f"{n.op_type}->" for n in moves) + "BN"
    changed = [mm] + ([add] if add is not None else []) + chain[:0:-1]
    return Match(pattern, mm, chain[0], layouts.matmul(), mm.input[1], bias, bias_slot, changed=changed)
