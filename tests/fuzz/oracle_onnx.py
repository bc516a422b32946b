"""The independent numeric oracle: run models with onnxruntime (every optimisation off) and bound how far
two evaluations of the *same real function* may differ in floating point -- without asking bnfold.

Tolerance (per output element). Every model here is a composition of dot products (Conv,
ConvTranspose, Gemm, MatMul), per-channel affine maps (BatchNormalization, Mul/Add by constants),
additions and ReLUs. Rounding-error analysis of such a composition (Higham, "Accuracy and Stability
of Numerical Algorithms", ch. 3) gives, for each computed value y,

    |fl(y) - y| <= (sum over nodes of (n_node + c)) * u * M,      u = eps(dtype) / 2,

where n_node is the node's dot-product length, c a small constant for the bias add, the affine
arithmetic and the once-rounded folded weights, and M is the same computation carried out on
absolute values: |W| for every weight, |x| for the input, a BN as |s| x + |s||mean| + |beta|
(s = gamma / sqrt(var + eps)). A correct fold computes the same real function from weights whose
absolute-value computation is bounded by the original's M (|s W| = |s||W|, |s b + t| <= |s||b| +
|s||mean| + |beta|), so the folded and the original model differ by at most

    tol = K * eps(dtype) * M + K * tiny(dtype),      K = sum over nodes of (n_node + 6).

M comes from a "magnitude model": the original graph with every float tensor widened to float32,
every constant replaced by its absolute value, Gemm alpha/beta by theirs, ReLU by Identity and every
BatchNormalization by Mul(|s|) + Add(|s||mean| + |beta|). A BN in training mode (batch statistics)
is bounded by |gamma| sqrt(count) + |beta| (|x_i - mean_b| <= sqrt(count * var_b)); its extra
outputs get magnitude 0 (bnfold must keep the node, and its input is computed by the very same ops
in both models, so they must agree exactly).

This is a worst-case bound: a wrong fold (a channel scaled by the wrong factor, a shift applied
twice, a padded border) moves outputs by O(M), far above it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def session(model: onnx.ModelProto | bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_many(model, [feeds])[0]


def run_many(model: onnx.ModelProto | bytes, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    s = session(model)
    names = [o.name for o in s.get_outputs()]
    return [dict(zip(names, s.run(None, f))) for f in feeds]


def feeds_for(case, seed: int = 12345) -> dict[str, np.ndarray]:
    """Our own inputs (not bnfold's): standard normal, the case's concrete batch."""
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(case.input_dtypes[name])
            for name, shape in case.input_shapes.items()}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def error_factor(model: onnx.ModelProto) -> float:
    """K = sum over compute nodes of (dot-product length + 6): see the module docstring."""
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    k = 0.0
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose"):
            w = inits.get(n.input[1])
            g = int(_attr(n, "group", 1))
            if w is None:
                k += 1e3
            elif n.op_type == "Conv":
                k += w[1] * math.prod(w[2:]) + 6
            else:
                k += (w[0] // g) * math.prod(w[2:]) + 6
        elif n.op_type in ("Gemm", "MatMul"):
            w = inits.get(n.input[1])
            if w is None:
                k += 1e3
            elif n.op_type == "Gemm":
                k += (w[1] if _attr(n, "transB", 0) else w[0]) + 6
            else:
                k += w[0] + 6
        elif n.op_type == "BatchNormalization":
            k += 6
        elif n.op_type in ("Add", "Mul", "Sub"):
            k += 2
    return k


def _abs_f32(t: onnx.TensorProto, name: str | None = None) -> onnx.TensorProto:
    a = numpy_helper.to_array(t)
    if t.data_type in FLOAT_TYPES:
        a = np.abs(a.astype(np.float32))
    return numpy_helper.from_array(a, name if name is not None else t.name)


def _widen(vi: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    v = onnx.ValueInfoProto()
    v.CopyFrom(vi)
    if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in FLOAT_TYPES:
        v.type.tensor_type.elem_type = TensorProto.FLOAT
    return v


def magnitude_model(model: onnx.ModelProto, bn_meta: dict[str, dict]) -> onnx.ModelProto:
    """The original graph on absolute values, in float32 (see the module docstring)."""
    g = model.graph
    inits = [_abs_f32(t) for t in g.initializer]
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if n.op_type == "Constant":
            t = _abs_f32(_attr(n, "value"), "")
            nodes.append(helper.make_node("Constant", [], list(n.output), name=n.name, value=t))
        elif n.op_type == "Relu":
            nodes.append(helper.make_node("Identity", list(n.input), list(n.output), name=n.name))
        elif n.op_type == "Gemm":
            m = onnx.NodeProto()
            m.CopyFrom(n)
            for a in m.attribute:
                if a.name in ("alpha", "beta"):
                    a.f = abs(a.f)
            nodes.append(m)
        elif n.op_type == "BatchNormalization":
            meta = bn_meta[n.name]
            C, rank = meta["channels"], meta["rank"]
            shape = [C] + [1] * (rank - 2)
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.abs(meta["gamma"] / np.sqrt(meta["var"] + meta["eps"]))
            s = np.where(np.isfinite(s), s, 1e30)
            shift = s * np.abs(meta["mean"]) + np.abs(meta["beta"])
            if meta["training"]:
                s = np.zeros(C)
                shift = np.abs(meta["gamma"]) * math.sqrt(meta["count"]) + np.abs(meta["beta"])
            a_name, c_name = n.name + "_mag_s", n.name + "_mag_t"
            inits.append(numpy_helper.from_array(np.minimum(s, 1e30).astype(np.float32).reshape(shape), a_name))
            inits.append(numpy_helper.from_array(np.minimum(shift, 1e30).astype(np.float32).reshape(shape), c_name))
            mid = n.name + "_mag_mid"
            nodes.append(helper.make_node("Mul", [n.input[0], a_name], [mid], name=n.name + "_mag_mul"))
            nodes.append(helper.make_node("Add", [mid, c_name], [n.output[0]], name=n.name + "_mag_add"))
            for o in n.output[1:]:
                if o:
                    z = n.name + "_mag_" + o
                    nodes.append(helper.make_node("Constant", [], [o], name=z,
                                                  value=numpy_helper.from_array(np.zeros(C, np.float32), "")))
        else:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            nodes.append(m)
    inputs = [_widen(v) for v in g.input]
    outputs = [_widen(v) for v in g.output]
    mg = helper.make_graph(nodes, "magnitude", inputs, outputs, inits)
    opset = max(7, next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))
    mm = helper.make_model(mg, opset_imports=[helper.make_opsetid("", opset)])
    mm.ir_version = model.ir_version
    return mm


def magnitudes(case, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """M for every graph output *and* every intermediate tensor of the original graph (by name)."""
    mm = magnitude_model(case.model, case.bn_meta)
    declared = {o.name for o in mm.graph.output}
    for n in case.model.graph.node:
        for o in n.output:
            if o and o not in declared and n.op_type not in ("Shape", "Constant"):
                mm.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                declared.add(o)
    return run_many(mm, [{k: np.abs(v.astype(np.float32)) for k, v in f.items()} for f in feeds])


def near_fp16_top(mags: dict[str, np.ndarray]) -> bool:
    """True when some value of the original graph may reach the top of the fp16 range (see below)."""
    return any(not np.all(np.asarray(v) <= FP16_COMPARABLE) for v in mags.values() if np.asarray(v).dtype.kind == "f")


# fp16: onnxruntime's CPU provider computes parts of an fp16 graph in fp32 (inserted Casts), differently
# for the original and the folded graph (and again differently when intermediate tensors are made graph
# outputs, as bnfold's verifier does), so a value near the top of the fp16 range overflows in one and not
# the other. When the magnitude bound M of any tensor of the original exceeds this, the example's numbers
# are not compared (and the verdicts not matched): both models may legitimately differ. Below it, no
# partial sum of the original or of a correct fold (bounded by the same M) can overflow.
FP16_COMPARABLE = float(np.finfo(np.float16).max) / 8


def compare(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], mags: dict[str, np.ndarray],
            k: float, dtype: Any) -> tuple[bool, dict[str, Any]]:
    """Elementwise |cand - ref| <= K eps M + K tiny; non-finite reference values must be matched exactly.
    Returns (passed, the worst output's numbers); worst["incomparable"] counts fp16 elements left out."""
    fi = np.finfo(np.dtype(dtype))
    worst: dict[str, Any] = {}
    passed = True
    incomparable = 0
    for name, r in ref.items():
        c = cand.get(name)
        if c is None or np.shape(c) != np.shape(r) or np.asarray(c).dtype != np.asarray(r).dtype:
            got = None if c is None else (np.shape(c), np.asarray(c).dtype)
            return False, {"output": name, "why": f"missing or shape/dtype changed: {got} vs "
                                                  f"{(np.shape(r), np.asarray(r).dtype)}"}
        r64, c64 = np.asarray(r, np.float64), np.asarray(c, np.float64)
        if np.asarray(r).dtype.kind in "iub":
            if not np.array_equal(r64, c64):
                return False, {"output": name, "why": "integer output differs"}
            continue
        m = np.asarray(mags[name], np.float64) if name in mags else np.full(r64.shape, np.inf)
        tol = k * float(fi.eps) * m + k * float(fi.smallest_subnormal)
        finite = np.isfinite(r64)
        if np.dtype(dtype) == np.float16:
            skip = ~(m <= FP16_COMPARABLE) | (finite & ~(np.abs(r64) <= FP16_COMPARABLE))
            incomparable += int(skip.sum())
            finite &= ~skip
            r64 = np.where(skip, 0.0, r64)
            c64 = np.where(skip, 0.0, c64)
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(finite, np.abs(c64 - r64), 0.0)
            bad_nonfinite = ~finite & ~((r64 == c64) | (np.isnan(r64) & np.isnan(c64)))
            bad = (finite & ~(d <= tol)) | bad_nonfinite   # d NaN (cand NaN) counts as bad
        ratio = float(np.max(np.where(finite & (tol > 0), d / np.where(tol > 0, tol, 1), 0.0))) if r64.size else 0.0
        if bad.any():
            passed = False
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            info = {"output": name, "index": idx, "ref": float(r64[idx]), "cand": float(c64[idx]),
                    "tol": float(tol[idx]), "magnitude": float(m[idx]), "ratio": ratio, "K": k}
            if not worst or worst.get("ratio", 0) <= ratio:
                worst = info
        elif not worst or (worst.get("ratio", 0) < ratio and passed):
            worst = {"output": name, "ratio": ratio, "K": k}
    if incomparable:
        worst["incomparable"] = incomparable
    return passed, worst
