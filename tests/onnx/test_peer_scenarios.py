"""The scenarios the BN-fusion test suites of onnxoptimizer (fuse_bn_into_conv), onnxscript
(rewriter fuse_batchnorm), onnxruntime (ConvBNFusion, ConvMulFusion/ConvAddFusion, MatmulBNFusion)
and onnxslim (ConvBatchNormMatcher) check, re-created from what those tests assert (not their code):
each folds where exact and is kept with the right reason where not. Every model here has random BN
statistics far from the defaults and ends in a numeric onnxruntime check (fold_verified)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

import bnfold
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops, ort_session

X4 = ("x", [1, 8, 6, 6])


def conv_bn(rng, op="Conv", bias=True, group=1, dtype=np.float32, **bn_attrs) -> G:
    g = G(rng, dtype)
    cin, cout = 8, 8 * (4 if op == "ConvTranspose" and group == 4 else 1)
    shape = (cout, cin // group, 3, 3) if op == "Conv" else (cin, cout // group, 3, 3)
    ins = ["x", g.weight("W", shape)] + ([g.weight("B", (cout,))] if bias else [])
    g.node(op, ins, ["c"], name="layer", group=group, pads=[1] * 4)
    g.bn("bn", "c", cout, out="y", **bn_attrs)
    return g


# onnxscript: Conv / ConvTranspose x bias x group, Gemm x bias x transB ------------------------------

@pytest.mark.parametrize("op, group", [("Conv", 1), ("Conv", 2), ("ConvTranspose", 1), ("ConvTranspose", 4)])
@pytest.mark.parametrize("bias", [False, True])
def test_onnxscript_conv_and_conv_transpose(rng, op, group, bias):
    g = conv_bn(rng, op, bias, group)
    cout = 32 if (op, group) == ("ConvTranspose", 4) else 8
    res = fold_verified(g.model([X4], [("y", [1, cout, 6, 6])]))
    assert decisions(res) == {"bn": f"{op}->BN"} and ops(res.model) == [op]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_onnxscript_gemm(rng, trans_b, bias):
    g = G(rng)
    ins = ["x", g.weight("W", (6, 5) if trans_b else (5, 6))] + ([g.weight("B", (6,))] if bias else [])
    g.node("Gemm", ins, ["h"], name="gemm", transB=trans_b)
    g.bn("bn", "h", 6, out="y")
    res = fold_verified(g.model([("x", [3, 5])], [("y", [3, 6])]))
    assert decisions(res) == {"bn": "Gemm->BN"} and ops(res.model) == ["Gemm"]


def test_onnxscript_parameters_that_are_graph_inputs_are_kept(rng):
    g = conv_bn(rng)
    m = g.model([X4, ("gamma", [8])], [("y", [1, 8, 6, 6])])
    m.graph.node[-1].input[1] = "gamma"
    res = fold_verified(m)
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}


def test_onnxscript_weight_initializer_that_is_also_a_graph_input_is_kept(rng):
    # IR >= 4: an initializer listed among the inputs is a default the caller may override
    g = conv_bn(rng)
    m = g.model([X4, ("W", [8, 8, 3, 3])], [("y", [1, 8, 6, 6])], ir=7)
    res = fold_verified(m)
    (d,) = res.report.decisions
    assert d.reason is Reason.NON_CONSTANT_PARAM and "overridable" in d.detail


def test_onnxscript_two_folds_from_one_parent_get_distinct_names(rng):
    g = G(rng)
    g.node("MaxPool", ["x"], ["p"], name="pool", kernel_shape=[3, 3], pads=[1] * 4)
    for i, c in ((1, 4), (2, 6)):
        g.node("Conv", ["p", g.weight(f"W{i}", (c, 8, 3, 3))], [f"c{i}"], name=f"conv{i}", pads=[1] * 4)
        g.bn(f"bn{i}", f"c{i}", c, out=f"y{i}")
    res = fold_verified(g.model([X4], [("y1", [1, 4, 6, 6]), ("y2", [1, 6, 6, 6])]))
    assert decisions(res) == {"bn1": "Conv->BN", "bn2": "Conv->BN"}
    biases = [n.input[2] for n in res.model.graph.node if n.op_type == "Conv"]
    assert len(set(biases)) == 2


def test_onnxscript_grouped_conv_transpose_with_indivisible_channels_is_kept(rng):
    # 8 input channels, group=3: not a valid model for any runtime; the fold must refuse, not crash
    g = G(rng)
    g.node("ConvTranspose", ["x", g.weight("W", (8, 4, 3, 3))], ["c"], name="deconv", group=3)
    g.bn("bn", "c", 12, out="y")
    m = g.model([X4], [("y", [1, 12, 8, 8])])
    res = bnfold.fold(m, verify=False)  # onnxruntime rejects the model itself
    assert decisions(res) == {"bn": Reason.AXIS_MISMATCH}
    assert res.model.SerializeToString() == m.SerializeToString()


# onnxoptimizer: fuse_bn_into_conv across BN versions and dtypes; shared weights; conv fan-out ---------

@pytest.mark.parametrize("opset, attrs", [(7, {}), (9, {}), (14, {"training_mode": 0}), (15, {})])
def test_onnxoptimizer_bn_versions(rng, opset, attrs):
    g = conv_bn(rng, **attrs)
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6])], opset=opset, ir=7 if opset < 15 else 8))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_onnxoptimizer_bn_opset6_training_is_kept(rng):
    g = conv_bn(rng, is_test=0)
    res = bnfold.fold(g.model([X4], [("y", [1, 8, 6, 6])], opset=6, ir=3), verify=False)
    assert decisions(res) == {"bn": Reason.TRAINING_MODE}


def test_onnxoptimizer_simple_5x5_conv_with_bias_no_padding(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("W", (3, 2, 5, 5)), g.weight("B", (3,))], ["c"], name="conv")
    g.bn("bn", "c", 3, out="y")
    res = fold_verified(g.model([("x", [1, 2, 9, 9])], [("y", [1, 3, 5, 5])]))
    assert decisions(res) == {"bn": "Conv->BN"} and ops(res.model) == ["Conv"]


def test_onnxoptimizer_fp16(rng):
    res = fold_verified(conv_bn(rng, dtype=np.float16).model([X4], [("y", [1, 8, 6, 6])]), rel=5e-3)
    assert decisions(res) == {"bn": "Conv->BN"}


def test_onnxoptimizer_weight_shared_by_two_convs_is_copied(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("W", (8, 8, 3, 3))], ["c"], name="conv", pads=[1] * 4)
    g.bn("bn", "c", 8, out="y")
    g.node("Conv", ["x", "W"], ["z"], name="other", pads=[1] * 4)
    m = g.model([X4], [("y", [1, 8, 6, 6]), ("z", [1, 8, 6, 6])])
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN"}
    assert next(n for n in res.model.graph.node if n.name == "other").input[1] == "W"


def test_onnxoptimizer_conv_output_with_two_readers_is_kept(rng):
    g = conv_bn(rng, bias=False)
    g.node("Relu", ["c"], ["side"], name="side")
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6]), ("side", [1, 8, 6, 6])]))
    assert decisions(res) == {"bn": Reason.PRODUCER_FANOUT}


# onnxruntime: ConvBNFusion, ConvMul/AddFusion via Unsqueeze, MatmulBNFusion ------------------------

def test_onnxruntime_conv_bn_training_outputs_in_use_are_kept(rng):
    g = conv_bn(rng)
    g.nodes[-1].output.extend(["", "", "saved_mean"])
    res = bnfold.fold(g.model([X4], [("y", [1, 8, 6, 6]), ("saved_mean", [8])], opset=9, ir=7), verify=False)
    assert decisions(res) == {"bn": Reason.TRAINING_MODE}


def test_onnxruntime_conv_output_that_is_a_graph_output_is_kept(rng):
    g = conv_bn(rng)
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6]), ("c", [1, 8, 6, 6])]))
    assert decisions(res) == {"bn": Reason.INTERMEDIATE_IS_OUTPUT}


def test_onnxruntime_conv_bn_mul_add_with_unsqueezed_constants(rng):
    # the Mul/Add constants are (C,) vectors unsqueezed to (C, 1, 1) by Unsqueeze nodes
    g = conv_bn(rng)
    axes = g.init("axes", np.array([1, 2]), np.int64)
    g.node("Unsqueeze", [g.init("mv", rng.uniform(0.5, 2, 8)), axes], ["mul_c"], name="unsq_m")
    g.node("Unsqueeze", [g.init("av", rng.normal(0, 1, 8)), axes], ["add_c"], name="unsq_a")
    g.nodes[-3].output[0] = "bn_y"  # the BN now feeds the Mul
    g.node("Mul", ["bn_y", "mul_c"], ["m"], name="mul")
    g.node("Add", ["m", "add_c"], ["y"], name="add")
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6])]))
    assert decisions(res) == {"bn": "Conv->BN->Mul->Add"} and ops(res.model) == ["Conv"]


@pytest.mark.parametrize("path", [[], ["Reshape"], ["Transpose"], ["Reshape", "Transpose"]])
def test_onnxruntime_matmul_bn_paths(rng, path):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("W", (4, 6))], ["v0"], name="mm")
    v, shape = "v0", [10, 6]
    for i, op in enumerate(path):
        if op == "Reshape":
            g.node("Reshape", [v, g.init("shape", np.array([2, 5, 6]), np.int64)], [f"v{i + 1}"], name="reshape")
            shape = [2, 5, 6]
        else:
            perm = [1, 0] if len(shape) == 2 else [0, 2, 1]
            g.node("Transpose", [v], [f"v{i + 1}"], name="transpose", perm=perm)
            shape = [shape[p] for p in perm]
        v = f"v{i + 1}"
    g.bn("bn", v, shape[1], out="y")
    res = fold_verified(g.model([("x", [10, 4])], [("y", shape)]))
    want = {(): "MatMul->BN", ("Transpose",): Reason.AXIS_MISMATCH, ("Reshape",): Reason.AXIS_MISMATCH,
            ("Reshape", "Transpose"): "MatMul->Reshape->Transpose->BN"}[tuple(path)]
    # (10, 6) -> Transpose -> (6, 10): channels are rows; (2, 5, 6) without a transpose: channels are 5
    # positions. onnxruntime's fusion scales the MatMul's columns in all four; only two are exact.
    assert decisions(res) == {"bn": want}


def test_onnxruntime_matmul_output_that_is_a_graph_output_is_kept(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("W", (4, 6))], ["mm"], name="mm")
    g.bn("bn", "mm", 6, out="y")
    res = fold_verified(g.model([("x", [3, 4])], [("y", [3, 6]), ("mm", [3, 6])]))
    assert decisions(res) == {"bn": Reason.INTERMEDIATE_IS_OUTPUT}


def test_onnxruntime_matmul_with_runtime_weight_is_kept(rng):
    g = G(rng)
    g.node("MatMul", ["x", "w_in"], ["mm"], name="mm")
    g.bn("bn", "mm", 6, out="y")
    res = fold_verified(g.model([("x", [3, 4]), ("w_in", [4, 6])], [("y", [3, 6])]))
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}


# onnxslim: ConvBatchNormMatcher -------------------------------------------------------------------

def test_onnxslim_bn_output_that_is_a_graph_output_keeps_its_name(rng):
    g = conv_bn(rng)
    g.node("Relu", ["y"], ["r"], name="relu")
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6]), ("r", [1, 8, 6, 6])]))
    assert decisions(res) == {"bn": "Conv->BN"}
    assert next(n for n in res.model.graph.node if n.op_type == "Conv").output[0] == "y"


def test_onnxslim_conv_transpose_without_bias_then_relu(rng):
    g = conv_bn(rng, "ConvTranspose", bias=False)
    g.nodes[-1].output[0] = "b"
    g.node("Relu", ["b"], ["y"], name="relu")
    res = fold_verified(g.model([X4], [("y", [1, 8, 6, 6])]))
    assert decisions(res) == {"bn": "ConvTranspose->BN"} and ops(res.model) == ["ConvTranspose", "Relu"]


def test_all_four_done_when_models_in_one_graph(rng):
    """BN -> Conv(pads=0), BN -> Conv(pads=1), MatMul + Add -> BN and Conv -> BN inside an If branch."""
    from onnx import TensorProto, numpy_helper
    g = G(rng)
    g.bn("bn_a", "x", 8)
    g.node("Conv", ["bn_a_out", g.weight("Wa", (8, 8, 1, 1))], ["ya"], name="conv_a")
    g.bn("bn_b", "x", 8)
    g.node("Conv", ["bn_b_out", g.weight("Wb", (8, 8, 3, 3))], ["yb"], name="conv_b", pads=[1] * 4)
    g.node("MatMul", ["v", g.weight("Wc", (5, 4))], ["mm"], name="mm")
    g.node("Add", ["mm", g.weight("Bc", (4,))], ["mm_b"], name="add")
    g.bn("bn_c", "mm_b", 4, out="yc")
    inner = G(rng)
    inner.node("Conv", ["x", "Wd"], ["cd"], name="conv_d", pads=[1] * 4)
    inner.bn("bn_d", "cd", 8, out="yd_then")
    g.inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "Wd"))
    g.inits.extend(inner.inits)
    then_g = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info("yd_then", TensorProto.FLOAT,
                                                                                        [1, 8, 6, 6])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["yd_else"], name="pass")], "else", [],
                               [helper.make_tensor_value_info("yd_else", TensorProto.FLOAT, [1, 8, 6, 6])])
    g.node("If", ["cond"], ["yd"], name="branch", then_branch=then_g, else_branch=else_g)
    m = g.model([X4, ("v", [3, 5])], [("ya", [1, 8, 6, 6]), ("yb", [1, 8, 6, 6]), ("yc", [3, 4]),
                                      ("yd", [1, 8, 6, 6])])
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    res = fold_verified(m)
    assert decisions(res) == {"bn_a": "BN->Conv", "bn_b": Reason.PADDING_BREAKS_BACKWARD_FOLD,
                              "bn_c": "MatMul+Add->BN", "branch/then_branch/bn_d": "Conv->BN"}
    feeds = {"x": np.random.default_rng(3).normal(size=(1, 8, 6, 6)).astype(np.float32),
             "v": np.random.default_rng(4).normal(size=(3, 5)).astype(np.float32), "cond": np.array(True)}
    for r, o in zip(ort_session(m).run(None, feeds), ort_session(res.model).run(None, feeds)):
        np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))
