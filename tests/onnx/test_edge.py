"""Adversarial ONNX cases no issue names: BN attributes per opset (7..22), unusual Conv/ConvTranspose/Gemm
attributes, IR-version initializer rules, and parameter dtypes. Each fold ends in an onnxruntime run
(or the reference evaluator where onnxruntime has no kernel) against the unfolded model.
Graph-shape cases live in test_edge_onnx_graphs.py."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import decisions, fold_verified, ops, Reason


def mk(g: G, inputs, outputs, **kw) -> onnx.ModelProto:
    """G.model with every output and intermediate typed by onnx's own shape inference."""
    return onnx.shape_inference.infer_shapes(g.model(inputs, outputs, **kw), strict_mode=True)


def _shape_clean(model: onnx.ModelProto) -> None:
    """The result stays a model onnx can fully type-check, value_info included."""
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 14, 15, 18, 21, 22])
def test_conv_bn_every_opset(rng, opset):
    g = G(rng)
    attrs = {"training_mode": 0} if opset >= 14 else {}
    g.node("Conv", ["x", g.weight("w", (6, 3, 3, 3)), g.weight("b", (6,))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 6, out="y", **attrs)
    m = mk(g, [("x", [1, 3, 8, 8])], [("y", [1, 6, 8, 8])], opset=opset, ir=7 if opset < 21 else 10)
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN"} and "BatchNormalization" not in ops(res.model)
    _shape_clean(res.model)


def test_opset7_spatial_one_explicit_folds(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y", spatial=1)
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])], opset=7))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_epsilon_absent_means_1e5(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 1, 1))], ["c"])
    st = {"gamma": rng.uniform(0.5, 2, 4), "beta": rng.normal(0, 1, 4), "mean": rng.normal(0.5, 1, 4),
          "var": np.array([1e-6, 2e-6, 0.0, 1e-5])}  # var ~ eps: a wrong default epsilon shows up hugely
    ins = ["c"] + [g.init(f"p_{k}", st[k]) for k in ("gamma", "beta", "mean", "var")]
    g.node("BatchNormalization", ins, ["y"], name="bn")
    res = fold_verified(mk(g, [("x", [1, 2, 5, 5])], [("y", [1, 4, 5, 5])]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_tiny_eps_zero_var(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (3, 2, 3, 3))], ["c"])
    st = {"gamma": np.array([1.5, -0.7, 1.1]), "beta": np.array([0.3, -1.0, 0.2]),
          "mean": np.array([0.5, -0.2, 1.0]), "var": np.array([0.0, 0.8, 0.0])}
    g.bn("bn", "c", 3, eps=1e-3, out="y", stats=st)
    fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y", [1, 3, 4, 4])]), rel=1e-3)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_auto_pad_strides_dilations(rng, auto_pad):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (5, 3, 3, 3))], ["c"], auto_pad=auto_pad, strides=[2, 1],
           dilations=[1, 2] if auto_pad == "VALID" else [1, 1])  # ORT: no dilation with SAME_*
    g.bn("bn", "c", 5, out="y")
    m = mk(g, [("x", [2, 3, 9, 10])], [("y", None)])
    assert decisions(fold_verified(m)) == {"bn": "Conv->BN"}


@pytest.mark.parametrize("spatial", [[7], [4, 5, 6]])
def test_conv_1d_and_3d(rng, spatial):
    g = G(rng)
    k = [3] * len(spatial)
    g.node("Conv", ["x", g.weight("w", [4, 2, *k]), g.weight("b", (4,))], ["c"], pads=[1] * 2 * len(spatial))
    g.bn("bn", "c", 4, out="y")
    m = mk(g, [("x", [1, 2, *spatial])], [("y", [1, 4, *spatial])])
    assert decisions(fold_verified(m)) == {"bn": "Conv->BN"}


def test_depthwise_with_depth_multiplier_3(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (12, 1, 3, 3))], ["c"], group=4, pads=[1, 1, 1, 1])
    g.bn("bn", "c", 12, out="y")
    assert decisions(fold_verified(mk(g, [("x", [1, 4, 6, 6])], [("y", [1, 12, 6, 6])]))) == {"bn": "Conv->BN"}


@pytest.mark.parametrize("group", [1, 2, 3])
def test_conv_transpose_output_shape_groups_pads(rng, group):
    g = G(rng)
    cin, per_group_out = 6, 2
    g.node("ConvTranspose", ["x", g.weight("w", (cin, per_group_out, 3, 3)), g.weight("b", (per_group_out * group,))],
           ["c"], group=group, strides=[2, 2], output_shape=[11, 12])
    g.bn("bn", "c", per_group_out * group, out="y")
    m = mk(g, [("x", [1, cin, 5, 5])], [("y", None)])
    assert decisions(fold_verified(m)) == {"bn": "ConvTranspose->BN"}


def test_conv_transpose_pads_output_padding_dilation(rng):
    g = G(rng)
    g.node("ConvTranspose", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], strides=[2, 2], pads=[1, 0, 0, 1],
           output_padding=[1, 1], dilations=[2, 1])
    g.bn("bn", "c", 3, out="y")
    assert decisions(fold_verified(mk(g, [("x", [1, 4, 5, 5])], [("y", None)]))) == {"bn": "ConvTranspose->BN"}


@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (1, 5), (3, 5), (3, 1)])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (1, 1), (0, 1)])
def test_gemm_variants(rng, c_shape, trans_a, trans_b):
    g = G(rng)
    a_shape = (4, 3) if trans_a else (3, 4)
    b_shape = (5, 4) if trans_b else (4, 5)
    ins = ["a", g.weight("w", b_shape)]
    if c_shape is not None:
        ins.append(g.init("c0", rng.normal(0, 1, c_shape)))
    g.node("Gemm", ins, ["c"], transA=trans_a, transB=trans_b, alpha=0.7, beta=1.9)
    g.bn("bn", "c", 5, out="y")
    m = mk(g, [("a", list(a_shape))], [("y", [3, 5])], opset=13)
    assert decisions(fold_verified(m)) == {"bn": "Gemm->BN"}


def test_gemm_without_c_at_opset_9(rng):
    g = G(rng)
    g.node("Gemm", ["a", g.weight("w", (4, 5)), g.init("c0", np.zeros((5,)))], ["c"])
    g.bn("bn", "c", 5, out="y")
    assert decisions(fold_verified(mk(g, [("a", [2, 4])], [("y", [2, 5])], opset=9))) == {"bn": "Gemm->BN"}


def test_ir4_initializer_inputs_are_overridable(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    m = mk(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])], opset=9, ir=4)
    m.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 3, 3]))
    res = bnfold.fold(m)
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}
    assert res.model.SerializeToString() == m.SerializeToString()
    assert res.report.verification.passed is True


def test_float64_bn_params_on_float32_conv(rng):
    # opset 15 lets scale/mean be double while X is float; onnxruntime has no such kernel, so the
    # reference evaluator is the judge, and the folded weights must keep the conv's float32.
    from onnx.reference import ReferenceEvaluator
    from tests.conftest import random_bn
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    st = random_bn(rng, 4)
    g.node("BatchNormalization", ["c"] + [g.init(k, st[k], np.float64) for k in ("gamma", "beta", "mean", "var")],
           ["y"], name="bn")
    m = mk(g, [("x", [1, 3, 6, 6])], [("y", None)], opset=15)
    res = bnfold.fold(m, verify=False)
    assert decisions(res) == {"bn": "Conv->BN"}
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.FLOAT}
    _shape_clean(res.model)
    x = rng.normal(size=(1, 3, 6, 6)).astype(np.float32)
    ref = ReferenceEvaluator(m).run(None, {"x": x})[0]
    out = ReferenceEvaluator(res.model).run(None, {"x": x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("x_dtype,p_dtype", [(np.float32, np.float16), (np.float16, np.float32)])
def test_opset15_mixed_param_dtypes(rng, x_dtype, p_dtype):
    from tests.conftest import random_bn
    g = G(rng, x_dtype)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    st = random_bn(rng, 4)
    ins = ["c", g.init("g", st["gamma"], p_dtype), g.init("b", st["beta"], p_dtype),
           g.init("m", st["mean"], x_dtype), g.init("v", st["var"], x_dtype)]
    g.node("BatchNormalization", ins, ["y"], name="bn")
    res = fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None)], opset=15), rel=1e-2)
    assert decisions(res) == {"bn": "Conv->BN"}
    assert {t.data_type for t in res.model.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))}


def test_fp16_model_with_depthwise(rng):
    g = G(rng, np.float16)
    g.node("Conv", ["x", g.weight("w", (8, 3, 3, 3)), g.weight("b", (8,))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 8)
    g.node("Relu", ["bn_out"], ["r"])
    g.node("Conv", ["r", g.weight("w2", (8, 1, 3, 3))], ["c2"], group=8)
    g.bn("bn2", "c2", 8, out="y")
    res = fold_verified(mk(g, [("x", [1, 3, 8, 8])], [("y", None)]), rel=5e-3)
    assert decisions(res) == {"bn": "Conv->BN", "bn2": "Conv->BN"}


def test_dequantized_weight(rng):
    g = G(rng)
    q = g.init("wq", rng.integers(-100, 100, (4, 3, 3, 3)), np.int8)
    g.node("DequantizeLinear", [q, g.init("ws", np.float32(0.01)), g.init("wz", np.int8(0), np.int8)], ["w"])
    g.node("Conv", ["x", "w"], ["c"])
    g.bn("bn", "c", 4, out="y")
    assert decisions(fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None)]))) == {"bn": "Conv->BN"}


def test_conv_transpose_depth_multiplier_3(rng):
    g = G(rng)
    g.node("ConvTranspose", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], group=4)
    g.bn("bn", "c", 12, out="y")
    assert decisions(fold_verified(mk(g, [("x", [1, 4, 5, 5])], [("y", None)]))) == {"bn": "ConvTranspose->BN"}


def test_weight_in_gemm_a_or_matmul_left_is_not_mistaken_for_features(rng):
    # Y = W @ X: BN's channel axis 1 indexes X's columns, not W's rows; the fold must not happen.
    for op in ("Gemm", "MatMul"):
        g = G(rng)
        g.node(op, [g.weight("w", (5, 4)), "x"], ["c"])
        g.bn("bn", "c", 3, out="y")
        res = fold_verified(mk(g, [("x", [4, 3])], [("y", None)]))
        assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}
