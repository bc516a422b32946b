"""Dtypes: BN opset 15 with parameters in another float type than its input, fp16 and fp64 layers, and
bf16 models; every fold computed in float64 and rounded once to the layer's own dtype.

onnxruntime's CPU provider has no bf16 kernels, so bf16 models are checked two ways: on CPU by
running both models with every bf16 tensor widened to fp32 (the folded weights keep their bf16
values, so this measures exactly the rounding the fold introduced), and on CUDA (marked) directly.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx.feeds import make_feeds
from tests.conftest import random_bn
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import decisions, fold_verified, ort_session


def conv_bn_mixed(rng, x_dtype, param_dtype) -> onnx.ModelProto:
    g = G(rng, x_dtype)
    g.node("Conv", ["x", g.weight("w", (6, 3, 3, 3)), g.weight("b", (6,))], ["c"], name="conv", pads=[1] * 4)
    st = random_bn(rng, 6)
    ins = ["c"] + [g.init(f"bn_{k}", st[k], param_dtype) for k in ("gamma", "beta", "mean", "var")]
    g.node("BatchNormalization", ins, ["y"], name="bn", epsilon=1e-3)
    return g.model([("x", [1, 3, 6, 6])], [("y", [1, 6, 6, 6])], opset=15)


@pytest.mark.parametrize("x_dtype, param_dtype", [(np.float16, np.float32), (np.float32, np.float16),
                                                  (np.float16, np.float16)])
def test_bn15_params_in_another_float_type(rng, x_dtype, param_dtype):
    m = conv_bn_mixed(rng, x_dtype, param_dtype)
    res = fold_verified(m, rel=5e-3 if x_dtype == np.float16 else 1e-4)
    assert decisions(res) == {"bn": "Conv->BN"}
    want = helper.np_dtype_to_tensor_dtype(np.dtype(x_dtype))
    assert {t.data_type for t in res.model.graph.initializer} == {want}  # the layer keeps its own dtype


def test_fp16_fold_is_rounded_once_from_float64(rng):
    m = conv_bn_mixed(rng, np.float16, np.float32)
    res = bnfold.fold(m, verify=False)
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    s = init["bn_gamma"].astype(np.float64) / np.sqrt(init["bn_var"].astype(np.float64) + np.float64(np.float32(1e-3)))
    w64 = init["w"].astype(np.float64) * s[:, None, None, None]
    assert np.array_equal(next(v for k, v in out.items() if v.ndim == 4), w64.astype(np.float16))


@pytest.mark.parametrize("standalone_input", ["graph_input", "after_relu"])
def test_standalone_constants_take_the_input_dtype_not_the_param_dtype(rng, standalone_input):
    g = G(rng, np.float16)
    x = "x"
    if standalone_input == "after_relu":
        x = g.node("Relu", ["x"], ["r"], name="relu")
    st = random_bn(rng, 4)
    g.node("BatchNormalization", [x] + [g.init(f"p_{k}", st[k], np.float32) for k in ("gamma", "beta", "mean", "var")],
           ["y"], name="bn")
    res = fold_verified(g.model([("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])], opset=15), standalone="affine", rel=5e-3)
    assert decisions(res) == {"bn": "BN as Mul+Add"}
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.FLOAT16}


def test_float64_gemm_bn(rng):
    g = G(rng, np.float64)
    g.node("Gemm", ["x", g.weight("w", (5, 4)), g.weight("c", (4,))], ["h"], name="fc")
    g.bn("bn", "h", 4, out="y")
    res = fold_verified(g.model([("x", [3, 5])], [("y", [3, 4])]), rel=1e-12)
    assert decisions(res) == {"bn": "Gemm->BN"}
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.DOUBLE}


def bf16_mlp(rng) -> onnx.ModelProto:
    import ml_dtypes
    g = G(rng, ml_dtypes.bfloat16)
    g.node("Gemm", ["x", g.weight("w1", (8, 6)), g.weight("b1", (6,))], ["h1"], name="fc1")
    g.bn("bn1", "h1", 6)
    g.node("Relu", ["bn1_out"], ["r1"], name="relu1")
    g.node("MatMul", ["r1", g.weight("w2", (6, 5))], ["h2"], name="fc2")
    g.bn("bn2", "h2", 5, out="y")
    return g.model([("x", [4, 8])], [("y", [4, 5])], opset=17)


def widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same function with every bf16 tensor stored (exactly) as fp32, for CPU onnxruntime."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.BFLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for vi in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def test_bf16_model_folds_in_bf16(rng):
    m = bf16_mlp(rng)
    res = bnfold.fold(m, verify=False)  # CPU onnxruntime cannot run bf16; checked below on widened copies
    assert decisions(res) == {"bn1": "Gemm->BN", "bn2": "MatMul->BN"}
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.BFLOAT16}
    onnx.checker.check_model(res.model, full_check=True)
    ref_m, out_m = widened(m), widened(res.model)
    feeds = {k: v.astype(np.float32) for k, v in make_feeds(ref_m, seed=4)[0].items()}
    feeds = {k: v.astype("bfloat16").astype(np.float32) for k, v in feeds.items()}  # bf16-representable inputs
    ref = ort_session(ref_m).run(None, feeds)[0].astype(np.float64)
    out = ort_session(out_m).run(None, feeds)[0].astype(np.float64)
    # the fold rounds each new weight once to bf16 (relative 2^-8); two layers of 8 and 6 terms
    assert np.abs(out - ref).max() <= 2.0 ** -8 * 8 * np.abs(ref).max()
    # and it is not a no-op: the BNs really are gone and the weights really changed
    assert "BatchNormalization" not in [n.op_type for n in res.model.graph.node]


def _cuda_ok() -> bool:
    from bnfold.onnx.runtime import availability
    return availability("CUDAExecutionProvider")[0]


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ok(), reason="needs onnxruntime-gpu and a CUDA device")
def test_bf16_model_verifies_on_cuda(rng):
    res = bnfold.fold(bf16_mlp(rng), providers=["cuda"])
    assert res.report.verification.passed is True, res.report.verification.to_dict()
