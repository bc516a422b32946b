"""One layer of an ONNX region as a kernel.AffineConv, and a merged AffineConv written back into a layer.

Conv reads its input through one layouts.Window per spatial axis (explicit pads, VALID, or SAME_* turned
into the pads it means). Gemm (transA=0) and MatMul of a rank-2 input are convolutions with no spatial
axis: weight (M, K), bias one value per output feature (Gemm's alpha and beta folded in).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..core import kernel
from ..core.decisions import Reason, Skip
from ..core.layouts import Window
from .const import NOT_CONSTANT_OPS
from .nodes import ONNX_DOMAINS, attr, node_label, set_attr

if TYPE_CHECKING:
    from .folder import OnnxFolder

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def constant(f: "OnnxFolder", name: str) -> np.ndarray | None:
    """The value of `name` when it is a constant, else None. Names computed from a graph input or a
    non-constant op are ruled out by the graph's structure first (memoised, linear): asking about every
    operand of every Add or Mul reads no weight."""
    if not could_be_constant(f, name):
        return None
    try:
        return np.asarray(f.ix.const(name, "constant"))
    except Skip:
        return None


def could_be_constant(f: "OnnxFolder", name: str) -> bool:
    """False when `name` is computed from a graph input or a non-constant op (memoised on the folder)."""
    ix, memo = f.ix, f.const_like
    if name in memo:
        return memo[name]
    stack = [name]
    while stack:
        cur = stack[-1]
        if cur in memo:
            stack.pop()
            continue
        p = ix.producer.get(cur)
        if cur in ix.inits or p is None:
            if cur in ix.inits:
                memo[cur] = not ix.overridable(cur)
            else:  # a graph input, or a name of an enclosing scope: constant there or not
                memo[cur] = cur not in ix.graph_inputs and ix.outer_consts is not None and \
                    ix.outer_consts(cur) is not None
            stack.pop()
            continue
        if p.domain not in ONNX_DOMAINS or p.op_type in NOT_CONSTANT_OPS:  # (If/Loop/Scan among them)
            memo[cur] = False
            stack.pop()
            continue
        deps = [p.input[0]] if p.op_type == "CastLike" else [i for i in p.input if i]
        pending = [d for d in deps if d not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[cur] = all(memo[d] for d in deps)
        stack.pop()
    return memo[name]


def weight_rank(f: "OnnxFolder", name: str) -> int | None:
    """The rank of a constant weight (read only when it is not a plain initializer), or None."""
    w = f.ix.inits.get(name)
    if w is not None:
        return len(w.dims)
    v = constant(f, name)
    return None if v is None else v.ndim


def layer_rank(f: "OnnxFolder", node: onnx.NodeProto) -> int | None:
    """The output rank of a layer a region can take as a branch, or None when it is not one."""
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        return None
    if node.op_type == "Conv":
        # a conv's output has its weight's rank; a weight computed at run time is refused when evaluated
        return weight_rank(f, node.input[1]) or f._rank(node.output[0])
    if node.op_type == "Gemm":
        return None if int(attr(node, "transA", 0)) else 2
    if node.op_type == "MatMul":
        # a rank-2 x is proven later, when unknown now (read_layer: a Gemm on the same x proves it too)
        w = f.ix.inits.get(node.input[1])
        ok = f._rank(node.input[0]) in (2, None) and (w is None or len(w.dims) == 2)
        return 2 if ok else None
    return None


def read_layer(f: "OnnxFolder", node: onnx.NodeProto) -> tuple[kernel.AffineConv, np.dtype]:
    """The layer as an AffineConv of its data input, and its weight's dtype. Raises Skip."""
    label = node_label(node)
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    w, b, wdt = f.layer_params(node, node.input[1], bias_name, label)  # float64 where a fold left them
    w = np.asarray(w)
    if wdt.kind != "f" and wdt.name != "bfloat16":
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label} has a {wdt} weight", producer=label)
    if node.op_type == "Conv":
        return kernel.AffineConv.conv(w, b, int(attr(node, "group", 1)), conv_windows(f, node, w)), wdt
    if w.ndim != 2:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{label}'s weight has rank {w.ndim}", producer=label)
    m = w.T if node.op_type == "MatMul" or not int(attr(node, "transB", 0)) else w
    alpha, beta = float(attr(node, "alpha", 1.0)), float(attr(node, "beta", 1.0))
    if b is not None:
        b = np.asarray(b)
        if b.size not in (1, m.shape[0]) or (b.size > 1 and b.shape[-1] != m.shape[0]) or b.ndim > 2:
            raise Skip(Reason.AXIS_MISMATCH, f"{label}'s bias of shape {list(b.shape)} is not one value per output "
                                             "feature", producer=label)
        b = np.broadcast_to(b.astype(np.float64).reshape(-1), (m.shape[0],)) * beta
    return kernel.AffineConv.conv(m.astype(np.float64) * alpha, b, 1, ()), wdt


def write_layer(f: "OnnxFolder", host: onnx.NodeProto, ac: kernel.AffineConv, folded: kernel.Folded) -> None:
    """Make `host` compute the merged map (it must already write the region's output)."""
    label = node_label(host)
    f.exact.pop(id(host), None)  # an earlier fold's float64 values of this layer are stale now
    weight = folded.weight
    if host.op_type == "MatMul" or (host.op_type == "Gemm" and not int(attr(host, "transB", 0))):
        weight = np.ascontiguousarray(weight.T)
    old = f.ix.inits.get(host.input[1])
    # a weight of a new shape goes under a new name: an IR < 4 graph declares each initializer's shape as
    # an input, and value_info may too
    name = host.input[1] if old is not None and list(old.dims) == list(weight.shape) else f"{label}_weight"
    f._replace_input(host, 1, f._write_const(name, weight, host))
    if host.op_type == "MatMul":
        if np.any(folded.bias):
            f.insert_add(host, folded.bias, host.output[0])
        return
    bias = host.input[2] if len(host.input) > 2 and host.input[2] else f"{label}_bias"
    f._replace_input(host, 2, f._write_const(bias, folded.bias, host))
    if host.op_type == "Gemm":
        set_attr(host, "alpha", 1.0)
        set_attr(host, "beta", 1.0)
        return
    for a in [a for a in host.attribute if a.name == "auto_pad"]:
        host.attribute.remove(a)
    w = ac.windows
    set_attr(host, "kernel_shape", [x.kernel for x in w])
    set_attr(host, "strides", [x.stride for x in w])
    set_attr(host, "dilations", [x.dilation for x in w])
    set_attr(host, "pads", [x.pad_begin for x in w] + [x.pad_end for x in w])


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
