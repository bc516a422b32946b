"""Bugs found by the ONNX fuzzer (tests/fuzz/test_fuzz_onnx.py), minimised by hypothesis and by hand.

Each test is standalone (onnx.helper + numpy, no hypothesis) and fails until its bug is fixed. The
docstring names the invariant it breaks and where the responsible code probably is.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

import bnfold
from bnfold import Reason


def _model(nodes, inputs, outputs, inits, opset, ir=8, dtype=TP.FLOAT, inits_as_inputs=False) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs]
    if inits_as_inputs:  # IR < 4: every initializer is also declared as a graph input
        ins += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    outs = [helper.make_tensor_value_info(n, dtype, s) for n, s in outputs]
    g = helper.make_graph(nodes, "regression", ins, outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def _init(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _bn_inits(prefix: str, gamma, beta, mean, var, dtype=np.float32, stat_dtype=None) -> list[onnx.TensorProto]:
    sd = stat_dtype or dtype
    return [_init(f"{prefix}_g", gamma, dtype), _init(f"{prefix}_b", beta, dtype),
            _init(f"{prefix}_m", mean, sd), _init(f"{prefix}_v", var, sd)]


def _bn(prefix: str, x: str, outs: list[str], **attrs) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], outs,
                            name=prefix, **attrs)


# --------------------------------------------------------------------------------------------------
# 1. Opset < 14: a BN with the five training outputs is in training mode even when they are unused
# --------------------------------------------------------------------------------------------------

def test_opset9_bn_with_the_training_outputs_unused_is_not_folded():
    """Invariant 3 (training mode must not fold) -- and the fold fails its own verification.

    BatchNormalization-7/9: "Output case #1: Y, mean, var, saved_mean, saved_var (training mode);
    Output case #2: Y (test mode)". The number of outputs *is* the mode, whether or not anything
    reads them; onnxruntime normalises with batch statistics here. bnfold folds the running
    statistics into the conv anyway (then its verifier rejects the result).
    Suspect: bnfold/passes/onnx_pass.py OnnxFolder._bn_params -- TRAINING_MODE only when
    `self.ix.uses(o)` for an extra output; for opset < 14 the presence of outputs[1:] decides.
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             _bn("bn", "c", ["y", "rmean", "rvar", "smean", "svar"])]
    inits = [_init("w", rng.normal(size=(2, 2, 1, 1)))]
    inits += _bn_inits("bn", [1.5, -0.5], [0.25, 1.0], [0.5, -1.0], [2.0, 0.5])
    m = _model(nodes, [("x", [3, 2, 4, 4])], [("y", [3, 2, 4, 4])], inits, opset=9)
    res = bnfold.fold(m)
    (d,) = res.report.decisions
    assert not d.is_folded and d.reason == Reason.TRAINING_MODE, d.to_dict()
    assert res.report.verification, res.report.verification.to_dict()


# --------------------------------------------------------------------------------------------------
# 2. A BN without an epsilon attribute: the default is the float32 1e-5 of the spec, not a double
# --------------------------------------------------------------------------------------------------

def test_missing_epsilon_is_the_float32_default():
    """Invariant 2 (folded outputs equal the original's within rounding), fp64 models.

    The ONNX attribute `epsilon` is a float (32-bit); its default 1e-5 is float32(1e-5) =
    9.99999974738e-06, which is what onnxruntime uses (also for double BNs). bnfold takes the Python
    double 1e-5 when the attribute is absent, so s = gamma / sqrt(var + eps) is off by 2.5e-14 / (2 var):
    here, with var = 1e-4, the folded fp64 model is 1.2e-9 (relative) away from the original, millions
    of ulp, and bnfold's own verification rejects its fold; with var ~ 1 the error (~1e-13) is silent
    (verification passes, the fuzzer's bound does not). With an explicit epsilon=1e-5 attribute the
    same model folds to within 3e-15 and verifies.
    Suspect: bnfold/passes/onnx_pass.py OnnxFolder._bn_params: `_attr(bn, "epsilon", 1e-5)`.
    """
    w = np.array([[0.75, -0.5], [0.25, 1.25]])
    inits = [_init("w", w, np.float64)]
    inits += _bn_inits("bn", [1.5, -0.5], [0.25, 1.0], [0.5, -1.0], [1e-4, 2e-4], np.float64)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), _bn("bn", "h", ["y"])]
    m = _model(nodes, [("x", [3, 2])], [("y", [3, 2])], inits, opset=15, dtype=TP.DOUBLE)
    res = bnfold.fold(m, verify=False)
    assert [d.is_folded for d in res.report.decisions] == [True]
    x = np.random.default_rng(1).standard_normal((3, 2))
    (ref,), (out,) = _run(m, {"x": x}), _run(res.model, {"x": x})
    # error bound of either computation: a few ulp of M = |s| (|x W| + |mean|) + |beta|
    s = np.abs(np.array([1.5, -0.5]) / np.sqrt(np.array([1e-4, 2e-4]) + float(np.float32(1e-5))))
    bound = 16 * np.finfo(np.float64).eps * (s * (np.abs(x) @ np.abs(w) + np.array([0.5, 1.0])) + np.array([0.25, 1.0]))
    assert np.all(np.abs(out - ref) <= bound), np.abs(out - ref).max()


# --------------------------------------------------------------------------------------------------
# 3. MatMul -> Transpose -> BN -> BN: the second BN is refused after the first one folds
# --------------------------------------------------------------------------------------------------

def test_second_bn_behind_a_layout_op_folds_in_the_same_pass():
    """Invariant 3 (a BN foldable by construction is folded) and 4 (a second fold folds nothing new).

    X[2,3,4] @ W[4,5] -> Transpose(0,2,1) -> BN0(5) -> BN1(5). BN0 folds into the MatMul; then BN1 is
    skipped with AXIS_MISMATCH "the rank of mm's output is unknown": the first fold renamed the
    MatMul's output (`rename_value`), and the static shapes from shape inference are keyed by the old
    name. Folding the folded model again folds BN1. Conv -> BN -> BN folds both in one pass.
    Suspect: bnfold/passes/onnx_pass.py OnnxFolder.rename_value / _rewrite (the shapes table is not
    carried over to renamed values) read by onnx_layout.match_through_layout (`f.dims(mm.output[0])`).
    """
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Transpose", ["h"], ["ht"], name="tr", perm=[0, 2, 1]),
             _bn("bn0", "ht", ["y0"]), _bn("bn1", "y0", ["y"])]
    inits = ([_init("w", rng.normal(size=(4, 5)))]
             + _bn_inits("bn0", rng.uniform(0.5, 2, 5), rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, 5))
             + _bn_inits("bn1", rng.uniform(0.5, 2, 5), rng.normal(size=5), rng.normal(size=5), rng.uniform(0.5, 2, 5)))
    m = _model(nodes, [("x", [2, 3, 4])], [("y", [2, 5, 3])], inits, opset=15)
    res = bnfold.fold(m)
    assert {d.bn: d.is_folded for d in res.report.decisions} == {"bn0": True, "bn1": True}, \
        [d.to_dict() for d in res.report.decisions]
    assert res.report.verification
    assert not bnfold.fold(res.model, verify=False).report.folded


# --------------------------------------------------------------------------------------------------
# 4. The verifier rejects a correct fold when the output is a small difference of larger terms
# --------------------------------------------------------------------------------------------------

def test_correct_fold_with_zero_variance_passes_verification():
    """Invariant 2 (bnfold's verdict agrees with an independent check): a false alarm.

    Gemm x[1,3] @ W[3,1] + C -> BN with var = 0 (eps 1e-5, so s = 234). Exact float64 value 1.8305294;
    the original (onnxruntime, fp32) gives 1.8305321 (23 ulp off: the BN multiplies the rounding of
    x - mean by 234), the folded model 1.8305359 (55 ulp) -- both well inside the rounding-error bound
    of either computation. bnfold says FAILED: its noise estimate is exactly 0 (the one-channel BN
    parameters and C have one element and are never nudged; the three nudged weights round back to
    themselves) and its floor, 4 ulp of max|output|, ignores that the BN amplifies its input's
    rounding. Seen in fp32 and fp16 whenever a channel has var ~ 0 or the output cancels.
    Suspect: bnfold/verify/onnx_verify.py perturbed() (tensors of < 2 elements skipped; a relative
    nudge of < 1 ulp that rounds back) and bnfold/verify/compare.py judge() (floor from the output's
    magnitude, not the magnitudes of the terms it was computed from).
    """
    inits = [_init("w", [[-0.2034326046705246], [0.028039906173944473], [0.7064399123191833]]),
             _init("c", [-0.2750086784362793])] + _bn_inits("bn", [0.7404167652130127], [0.07812298834323883],
                                                             [0.14064517617225647], [0.0])
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm"), _bn("bn", "h", ["y"])]
    m = _model(nodes, [("x", [1, 3])], [("y", [1, 1])], inits, opset=14)
    res = bnfold.fold(m)
    assert [d.is_folded for d in res.report.decisions] == [True]
    # independent: the fold is as exact as fp32 allows (float64 reference of the same function)
    x = np.array([[0.12573022, -0.13210486, 0.64042264]], np.float32)
    h = x.astype(np.float64) @ numpy_helper.to_array(inits[0]).astype(np.float64) - 0.2750086784362793
    exact = (h - 0.14064517617225647) * 0.7404167652130127 / np.sqrt(float(np.float32(1e-5))) + 0.07812298834323883
    (out,) = _run(res.model, {"x": x})
    u = np.finfo(np.float32).eps / 2
    s = 0.7404167652130127 / np.sqrt(1e-5)
    magnitude = (np.abs(x) @ np.abs(numpy_helper.to_array(inits[0])) + 0.42)[0, 0]  # |x||W| + |C| + |mean|
    assert abs(out[0, 0] - exact[0, 0]) <= 16 * u * s * magnitude
    assert res.report.verification, res.report.verification.to_dict()["providers"]["CPUExecutionProvider"]


def test_correct_fold_before_a_kept_bn_that_cancels_passes_verification():
    """Invariant 2, the same false alarm with a non-zero noise estimate (found by the fuzzer as is).

    Conv (depthwise, 3-D) -> BN0 -> BN1, BN0's output is also a graph output. BN0 folds into the conv;
    BN1 stays (its input is a graph output). Channel 0 of BN1 computes 2.07 * (x - 2.50) - 2.93 with
    x ~ 3.9: its output (~0.66) is a cancellation of terms ~8. The folded conv's output differs from the
    original BN0 output by one rounding (1 ulp of 3.9 = 2.4e-7), which BN1 scales to 4.8e-7 -- exactly
    what fp32 allows, and the graph output y0 itself passes. bnfold fails the intermediate/output
    b0_bn1_out: tolerance 3.1e-7 (4 ulp of max|0.66|), noise estimate 1.5e-8.
    Suspect: as in the test above (bnfold/verify/compare.py judge, onnx_verify.perturbed).
    """
    w = [0.06286511, -0.06605243, 0.32021132, 0.052450057, -0.2678347, 0.18079753, 0.652, 0.47354048,
         -0.35186762, -0.63271075, -0.31163722, 0.02066299]
    inits = [_init("w", np.reshape(w, (3, 1, 2, 2, 1)))]
    inits += _bn_inits("bn0", [-1.3585484, -1.9109142, 1.1761557], [0.741499, 1.3778408, 0.93261397],
                       [2.9447484, 1.5230616, -2.036036], [1.5723655, 3.9826963, 1.7026387])
    inits += _bn_inits("bn1", [2.066404, 0, 0], [-2.926275, -0.14346853, -0.6579036],
                       [2.496394, 3.5388381, -2.7048354], [0, 2.2170498, 0])
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", group=3, pads=[0, 0, 0, 0, 1, 0]),
             _bn("bn0", "c", ["y0"]), _bn("bn1", "y0", ["y1"], epsilon=1.0)]
    m = _model(nodes, [("x", ["N", 3, 2, 2, 1])], [("y0", ["N", 3, 1, 2, 1]), ("y1", ["N", 3, 1, 2, 1])], inits,
               opset=14)
    res = bnfold.fold(m)
    assert {d.bn: d.is_folded for d in res.report.decisions} == {"bn0": True, "bn1": False}
    x = np.random.default_rng(7).standard_normal((4, 3, 2, 2, 1)).astype(np.float32)
    (r0, r1), (f0, f1) = _run(m, {"x": x}), _run(res.model, {"x": x})
    u = np.finfo(np.float32).eps / 2
    assert np.abs(f0 - r0).max() <= 8 * u * 8  # |BN0 output| < 8: a few roundings
    assert np.abs(f1 - r1).max() <= 2.07 * 8 * u * 8  # BN1 scales that by at most 2.07
    assert res.report.verification, res.report.verification.to_dict()["providers"]["CPUExecutionProvider"]


# --------------------------------------------------------------------------------------------------
# 5. IR < 4: an initializer rewritten with a new shape keeps its old graph-input declaration
# --------------------------------------------------------------------------------------------------

def _ir3_matmul_bias_bn(bias_shape: tuple) -> onnx.ModelProto:
    inits = [_init("w", [[0.5, -0.25, 1.0], [0.75, 0.25, -0.5]]), _init("b", np.full(bias_shape, 0.3))] + \
        _bn_inits("bn", [1.5, -0.5, 2.0], [0.25, 1.0, -0.5], [0.5, -1.0, 0.1], [2.0, 0.5, 1.0])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"), _bn("bn", "hb", ["y"])]
    return _model(nodes, [("x", [4, 2])], [("y", [4, 3])], inits, opset=7, ir=3, inits_as_inputs=True)


def test_ir3_scalar_bias_folded_to_a_vector_keeps_a_valid_model():
    """Invariant 1 (no BnfoldError on a valid model) and 3 (the folded model is valid ONNX).

    IR 3 (opset 7): initializers are also graph inputs. MatMul + Add(scalar bias) -> BN: the fold
    writes a [3] bias into the initializer `b` in place, but the graph input `b` is still declared as
    a scalar, so the folded model is invalid and onnxruntime refuses it ("Mismatch between number of
    inferred and declared dimensions"); fold() raises BnfoldError "cannot load the candidate". Same
    with Gemm C of shape [M, 1] (folded to [M, N]).
    Suspect: bnfold/passes/onnx_pass.py OnnxFolder._write_const (`t.CopyFrom(...)` with a new shape
    does not update the matching graph.input declaration for ir_version < 4).
    """
    m = _ir3_matmul_bias_bn(())
    res = bnfold.fold(m)  # raises BnfoldError today
    assert [d.is_folded for d in res.report.decisions] == [True]
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.verification


def test_ir3_gemm_bias_of_shape_m1_folded_to_mn_keeps_a_valid_model():
    """The same as above through Gemm: C of shape [M, 1] becomes [M, N] (s * C + t), in place, while
    the IR-3 graph input `c` still says [M, 1]."""
    inits = [_init("w", [[0.5, -0.25, 1.0], [0.75, 0.25, -0.5]]), _init("c", [[0.3], [-0.2], [0.1], [0.4]])] + \
        _bn_inits("bn", [1.5, -0.5, 2.0], [0.25, 1.0, -0.5], [0.5, -1.0, 0.1], [2.0, 0.5, 1.0])
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], name="gemm"), _bn("bn", "h", ["y"])]
    m = _model(nodes, [("x", [4, 2])], [("y", [4, 3])], inits, opset=7, ir=3, inits_as_inputs=True)
    res = bnfold.fold(m)  # raises BnfoldError today
    assert [d.is_folded for d in res.report.decisions] == [True]
    onnx.checker.check_model(res.model, full_check=True)
    assert res.report.verification


# --------------------------------------------------------------------------------------------------
# 6. BN0 -> BN1 -> layer: BN1 folds into the layer after it, BN0 is left although it could follow
# --------------------------------------------------------------------------------------------------

def test_bn_chain_before_a_layer_folds_in_one_pass():
    """Invariant 3 (a BN foldable by construction is folded) and 4 (folding again is a no-op).

    X -> BN0 -> BN1 -> Conv (no padding). BN0 is visited first: no layer before it, its only reader is
    BN1 -> skipped NO_PRODUCER. BN1 then folds backward into the conv, after which BN0 feeds the conv
    directly -- but it is never looked at again: a second bnfold run folds it. The forward chain
    (Conv -> BN -> BN) does fold completely in one pass.
    Suspect: bnfold/passes/onnx_pass.py OnnxFolder.run (one pass in node order; a backward fold does
    not revisit the BNs feeding the BN it removed) / onnx_backward.fold_before.
    """
    rng = np.random.default_rng(0)
    nodes = [_bn("bn0", "x", ["y0"]), _bn("bn1", "y0", ["y1"]),
             helper.make_node("Conv", ["y1", "w"], ["y"], name="conv")]
    inits = ([_init("w", rng.normal(size=(4, 3, 3, 3)))]
             + _bn_inits("bn0", [1.5, -0.5, 2.0], [0.25, 1.0, -0.5], [0.5, -1.0, 0.1], [2.0, 0.5, 1.0])
             + _bn_inits("bn1", [0.5, 1.5, -1.0], [-0.25, 0.5, 0.75], [0.2, 0.3, -0.4], [1.0, 3.0, 0.25]))
    m = _model(nodes, [("x", [2, 3, 5, 5])], [("y", [2, 4, 3, 3])], inits, opset=15)
    res = bnfold.fold(m)
    assert {d.bn: (d.is_folded, d.direction) for d in res.report.decisions} == \
        {"bn0": (True, "before"), "bn1": (True, "before")}, [d.to_dict() for d in res.report.decisions]
    assert res.report.verification
    assert not bnfold.fold(res.model, verify=False).report.folded


# --------------------------------------------------------------------------------------------------
# 7. The optimised-onnxruntime noise fallback crashes on BN-15 with mixed parameter types
# --------------------------------------------------------------------------------------------------

def _mixed_bn15(w00: float) -> onnx.ModelProto:
    inits = [_init("w", [[w00, -0.25], [1.0, 0.75]])] + \
        _bn_inits("bn", [1.5, -0.5], [0.25, 1.0], [0.5, -1.0], [2.0, 0.5], np.float32, stat_dtype=np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), _bn("bn", "h", ["y"])]
    return _model(nodes, [("x", [3, 2])], [("y", [3, 2])], inits, opset=15)


def test_failed_comparison_with_a_mixed_type_bn15_original_is_a_verdict_not_an_error():
    """Invariant 1 (no BnfoldError on a valid model): the model is valid, the candidate just differs.

    Original: MatMul -> BN-15 with fp32 data/scale/bias and fp16 mean/var (allowed since opset 15).
    When a comparison fails, the verifier runs the original once more under onnxruntime's basic
    optimisations as an extra noise source; onnxruntime's own BN fusion cannot handle the mixed types
    ("Initializer::div ... Expecting the same data type") and bnfold turns that into BnfoldError
    "onnxruntime cannot load the original (onnxruntime-optimised)" -- exit 2, "bad input" -- instead of
    reporting the failed comparison (exit 1). bnfold.fold raises the same when its first judgement of
    a fold fails (seen with the false alarm of test 4 on such a model).
    Suspect: bnfold/verify/onnx_verify.py _verify_models: the `optimize=True` fallback run is not
    guarded; a noise source that cannot run should be skipped (and noted), not fail the check.
    """
    ver = bnfold.check(_mixed_bn15(0.5), _mixed_bn15(0.6))  # a wrong candidate: must be a failed verdict
    assert ver.passed is False


def test_two_bns_before_a_matmul_plus_add_are_rounded_once():
    """Invariant 3 (a foldable BN is folded) and the local proofs: BN0 -> BN1 -> MatMul + Add. BN1 folds into
    the MatMul first, then BN0 into the same MatMul; the second fold started from the first one's float32
    weights and bias, so the chain was rounded twice, and where its shifts cancel that exceeds the proof's
    bound for one rounding: BN0's correct fold was reverted as VERIFICATION_FAILED. A MatMul + Add now keeps
    its float64 values between folds (edits.bias_name_of), as Conv and Gemm did."""
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], name="gemm"),
             helper.make_node("Relu", ["g"], ["r"], name="relu"),
             _bn("bn0", "r", ["y0"], epsilon=1e-5), _bn("bn1", "y0", ["y1"], epsilon=1e-5),
             helper.make_node("MatMul", ["y1", "pw"], ["mm"], name="post"),
             helper.make_node("Add", ["mm", "pb"], ["y"], name="post_add")]
    inits = [_init("w", [[-0.8019314408302307, -1.3243589401245117]]),
             _init("c", [-0.12418080866336823, 0.21022261679172516]),
             *_bn_inits("bn0", [0.8935307860374451, 0.3901417553424835], [0.15735018253326416, -0.8035040497779846],
                        [0.8423925638198853, 2.25600004196167], [2.931511402130127, 2.1973187923431396]),
             *_bn_inits("bn1", [-2.0206620693206787, 1.6926597356796265], [0.6331197619438171, 1.2519464492797852],
                        [-0.32045289874076843, -0.1999102383852005], [0.37824705243110657, 2.3424806594848633]),
             _init("pw", [[0.8033062219619751], [0.07757414132356644]]), _init("pb", [-0.2763236463069916])]
    model = _model(nodes, [("x", [1, 1])], [("y", [1, 1])], inits, opset=14)
    res = bnfold.fold(model)
    assert {d.bn for d in res.report.folded} == {"bn0", "bn1"}, [d.to_dict() for d in res.report.skipped]
    assert res.report.verification.verdict == "passed"
    assert res.report.verification.proofs["failed"] == 0
