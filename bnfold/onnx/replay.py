"""The float64 replay of a fold's region, for the local proofs (onnx/proofs.py): onnx's reference evaluator
on the region's nodes with every float constant and Cast widened to float64 (or, for a magnitude bound,
replaced by its absolute value), plus the two ops whose reference versions a proof cannot use as they are:
ConvTranspose (groups mixed up when there is a bias) and an inference-only BatchNormalization."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .nodes import ONNX_DOMAINS, attr, set_attr
from .ondisk import tensor_value

FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def float_types(*groups: Iterable[Any]) -> set[int]:
    out: set[int] = set()
    for group in groups:
        for item in group:
            if isinstance(item, onnx.TensorProto):
                if item.data_type in FLOATS:
                    out.add(item.data_type)
            elif item.op_type == "Cast" and attr(item, "to") in FLOATS:
                out.add(int(attr(item, "to")))
            elif item.op_type in ("Constant", "ConstantOfShape"):
                for a in item.attribute:
                    if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOATS:
                        out.add(a.t.data_type)
    return out


def run(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], y: str,
         values: dict[str, np.ndarray], magnitudes: bool = False,
         pads: dict[int, list[int]] | None = None,
         wide: dict[tuple[int, bool], np.ndarray] | None = None) -> np.ndarray:
    """The region in float64 (every float constant and Cast widened; with `magnitudes`, every float
    constant and Gemm alpha/beta replaced by its absolute value), run on `values` for its inputs.
    `pads` overrides the pads of nodes (by id) as windows.shrink decided.

    The float initializers go to the evaluator as float64 inputs, not as tensors in the model: encoding
    a widened weight into a TensorProto, copying it into the graph and decoding it again cost more than
    the replay itself. `wide` keeps each one widened once (by tensor identity) across the runs of a proof."""
    from onnx.reference import ReferenceEvaluator

    new_nodes = [_padded(_widen(n, magnitudes), (pads or {}).get(id(n))) for n in nodes]
    kept = [t for t in inits if t.data_type not in FLOATS]
    weights = {t.name: _widened(t, magnitudes, {} if wide is None else wide) for t in inits if t.data_type in FLOATS}
    feeds = {**weights, **values}
    g = helper.make_graph(new_nodes, "fold_region",
                          [helper.make_tensor_value_info(x, onnx.TensorProto.DOUBLE, None) for x in feeds],
                          [helper.make_tensor_value_info(y, onnx.TensorProto.DOUBLE, None)], kept)
    m = helper.make_model(g, opset_imports=list(model.opset_import))
    m.ir_version = max(model.ir_version, 4)
    out = ReferenceEvaluator(m, new_ops=[_inference_bn(magnitudes), _conv_transpose()]).run(None, feeds)[0]
    return np.asarray(out, np.float64)


def _widened(t: onnx.TensorProto, magnitudes: bool, wide: dict[tuple[int, bool], np.ndarray]) -> np.ndarray:
    key = (id(t), magnitudes)
    if key not in wide:
        if magnitudes:
            wide[key] = np.abs(_widened(t, False, wide))
        else:
            wide[key] = np.asarray(tensor_value(t), np.float64)  # an on-disk weight is read from its file
    return wide[key]


def _padded(node: onnx.NodeProto, pads: list[int] | None) -> onnx.NodeProto:
    if pads is not None:
        set_attr(node, "pads", pads)
    return node


def _conv_transpose() -> type:
    """ConvTranspose, every attribute of the spec, as a scatter of one einsum per kernel offset: the reference
    evaluator's own version mixes up groups when there is a bias."""
    from onnx.reference.op_run import OpRun

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,  # type: ignore[override]
                 output_padding=None, output_shape=None, pads=None, strides=None):
            return (conv_transpose(x, w, b, auto_pad=auto_pad, dilations=dilations, group=group,
                                   output_padding=output_padding, output_shape=output_shape, pads=pads,
                                   strides=strides),)

    return ConvTranspose


def conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, *, auto_pad: Any = None,
                   dilations: Any = None, group: Any = None, output_padding: Any = None, output_shape: Any = None,
                   pads: Any = None, strides: Any = None) -> np.ndarray:
    """ONNX ConvTranspose in numpy (float64 in, float64 out)."""
    k = w.shape[2:]
    nd = len(k)
    g = int(group or 1)
    s = list(strides or [1] * nd)
    d = list(dilations or [1] * nd)
    op = list(output_padding or [0] * nd)
    ins = x.shape[2:]
    full = [s[i] * (ins[i] - 1) + (k[i] - 1) * d[i] + 1 + op[i] for i in range(nd)]
    ap = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
    if output_shape is not None and len(output_shape):
        want = list(output_shape)[-nd:]
    elif ap in ("SAME_UPPER", "SAME_LOWER"):
        want = [ins[i] * s[i] for i in range(nd)]
    else:
        want = None
    if want is not None:
        total = [full[i] - want[i] for i in range(nd)]
        upper = ap == "SAME_UPPER"  # the spec's split; onnxruntime's own SAME sizes differ at strides > 1 (the
        # witness check turns such a disagreement into 'not run')
        begin = [t // 2 if upper else t - t // 2 for t in total]
        end = [t - t // 2 if upper else t // 2 for t in total]
    else:
        p = list(pads or [0] * (2 * nd))
        begin, end = p[:nd], p[nd:]
    n, c = x.shape[:2]
    m = w.shape[1] * g
    cg, mg = c // g, m // g
    y = np.zeros((n, m, *full), np.float64)
    for off in np.ndindex(*k):
        place = (slice(None), slice(None)) + tuple(
            slice(off[i] * d[i], off[i] * d[i] + s[i] * (ins[i] - 1) + 1, s[i]) for i in range(nd))
        for gi in range(g):
            part = np.einsum("nc...,cm->nm...", x[:, gi * cg:(gi + 1) * cg], w[(slice(gi * cg, (gi + 1) * cg), slice(None)) + tuple(off)])
            y[(place[0], slice(gi * mg, (gi + 1) * mg)) + place[2:]] += part
    # negative pads (SAME or output_shape asking for more than the scatter covers) are zeros added
    y = np.pad(y, [(0, 0), (0, 0)] + [(max(0, -begin[i]), max(0, -end[i])) for i in range(nd)])
    crop = (slice(None), slice(None)) + tuple(
        slice(max(0, begin[i]), y.shape[2 + i] - max(0, end[i])) for i in range(nd))
    y = y[crop]
    if b is not None:
        y = y + np.asarray(b, np.float64).reshape((1, m) + (1,) * nd)
    return y


def _inference_bn(magnitudes: bool = False) -> type:
    """BatchNormalization as bnfold folds it (running statistics, every opset): the reference evaluator's own
    versions mix in batch statistics whenever a momentum is present (opset 9) or training_mode is unset.
    With `magnitudes` (every input already made non-negative) it bounds |BN(x)|: s*(|x| + |mean|) + |beta|."""
    from onnx.reference.op_run import OpRun

    sign = 1.0 if magnitudes else -1.0

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, **_: Any):  # type: ignore[override]
            eps = float(np.float32(1e-5)) if epsilon is None else float(epsilon)  # the attribute is a float32
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return ((x + sign * mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape)
                    + bias.reshape(shape),)

    return BatchNormalization


def _widen_tensor(t: onnx.TensorProto, magnitudes: bool) -> onnx.TensorProto:
    if t.data_type not in FLOATS:
        return t
    a = np.asarray(tensor_value(t), np.float64)  # an on-disk weight is read from its file
    return numpy_helper.from_array(np.abs(a) if magnitudes else a, t.name)


def _widen(node: onnx.NodeProto, magnitudes: bool) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    if magnitudes and n.op_type == "Sub" and n.domain in ONNX_DOMAINS:
        n.op_type = "Add"  # |a - b| <= |a| + |b|
    for a in n.attribute:
        if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOATS:
            a.t.CopyFrom(_widen_tensor(a.t, magnitudes))
        elif n.op_type == "Cast" and a.name == "to" and a.i in FLOATS:
            a.i = onnx.TensorProto.DOUBLE
        elif magnitudes and a.type == onnx.AttributeProto.FLOAT:
            a.f = abs(a.f)
        elif a.type == onnx.AttributeProto.FLOAT and n.op_type == "Constant":
            pass
    if n.op_type == "Constant":
        for a in list(n.attribute):
            if a.name in ("value_float", "value_floats"):
                vals = [a.f] if a.name == "value_float" else list(a.floats)
                arr = np.array(vals if a.name == "value_floats" else vals[0], np.float64)
                n.attribute.remove(a)
                n.attribute.append(helper.make_attribute("value", numpy_helper.from_array(
                    np.abs(arr) if magnitudes else arr)))
    return n
