"""BN before the layer (direction "before"): BN -> Conv(no padding) / Gemm / MatMul, and
BN -> Flatten/Reshape -> Gemm when each channel becomes one contiguous block of features."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops


def bn_conv(rng, pad: int | None = 0, group=1, bias=True, cin=4, cout=6, k=3, **conv_attrs):
    g = G(rng)
    g.bn("bn", "x", cin)
    ins = ["bn_out", g.weight("w", (cout, cin // group, k, k))]
    if bias:
        ins.append(g.weight("b", (cout,)))
    attrs = dict(kernel_shape=[k, k], group=group, **conv_attrs)
    if pad is not None:
        attrs["pads"] = [pad] * 4
    g.node("Conv", ins, ["y"], name="conv", **attrs)
    return g


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_bn_then_conv_without_padding_folds(rng, group, bias):
    g = bn_conv(rng, pad=0, group=group, bias=bias, cout=8)
    res = fold_verified(g.model([("x", [2, 4, 7, 7])], [("y", [2, 8, 5, 5])]))
    (d,) = res.report.decisions
    assert (d.pattern, d.direction, d.producer) == ("BN->Conv", "before", "conv")
    assert ops(res.model) == ["Conv"]


def test_bn_then_conv_valid_strided_dilated_folds(rng):
    g = bn_conv(rng, pad=None, auto_pad="VALID", strides=[2, 2], dilations=[2, 1])
    res = fold_verified(g.model([("x", [1, 4, 11, 9])], [("y", [1, 6, 4, 4])]))
    assert decisions(res) == {"bn": "BN->Conv"}


def test_bn_then_1x1_conv_with_same_padding_folds(rng):
    g = bn_conv(rng, pad=None, k=1, auto_pad="SAME_UPPER", strides=[2, 2])
    res = fold_verified(g.model([("x", [1, 4, 7, 7])], [("y", [1, 6, 4, 4])]))
    assert decisions(res) == {"bn": "BN->Conv"}


@pytest.mark.parametrize("attrs, out", [({"pads": [1] * 4}, [6, 6]), ({"auto_pad": "SAME_UPPER"}, [6, 6]),
                                        ({"pads": [0, 1, 0, 0]}, [4, 5])])
def test_bn_then_padded_conv_stays_exact(rng, attrs, out):
    g = bn_conv(rng, pad=None, **attrs)
    res = fold_verified(g.model([("x", [1, 4, 6, 6])], [("y", [1, 6, *out])]))
    (d,) = res.report.decisions
    assert d.reason is Reason.PADDING_BREAKS_BACKWARD_FOLD and d.producer == "conv"
    assert ops(res.model) == ["BatchNormalization", "Conv"]


def test_bn_then_conv_transpose_is_not_folded_backward(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("ConvTranspose", ["bn_out", g.weight("w", (4, 3, 2, 2))], ["y"], name="deconv", strides=[2, 2])
    res = fold_verified(g.model([("x", [1, 4, 5, 5])], [("y", [1, 3, 10, 10])]))
    assert decisions(res) == {"bn": Reason.PADDING_BREAKS_BACKWARD_FOLD}


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_bn_then_gemm_folds(rng, trans_b, bias):
    g = G(rng)
    g.bn("bn", "x", 5)
    ins = ["bn_out", g.weight("w", (3, 5) if trans_b else (5, 3))]
    if bias:
        ins.append(g.weight("c", (3,)))
    g.node("Gemm", ins, ["y"], name="fc", transB=trans_b, alpha=0.7, beta=1.9)
    res = fold_verified(g.model([("x", [4, 5])], [("y", [4, 3])]))
    assert decisions(res) == {"bn": "BN->Gemm"}
    assert ops(res.model) == ["Gemm"]


def test_bn_then_gemm_with_transposed_input_keeps(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Gemm", ["bn_out", g.weight("w", (4, 3))], ["y"], name="fc", transA=1)
    res = fold_verified(g.model([("x", [4, 4])], [("y", [4, 3])]))
    assert decisions(res) == {"bn": Reason.AXIS_MISMATCH}


@pytest.mark.parametrize("with_add", [False, True])
def test_bn_then_matmul_folds(rng, with_add):
    g = G(rng)
    g.bn("bn", "x", 5)
    g.node("MatMul", ["bn_out", g.weight("w", (5, 3))], ["mm" if with_add else "y"], name="mm")
    if with_add:
        g.node("Add", [g.weight("b", (3,)), "mm"], ["y"], name="add")
    res = fold_verified(g.model([("x", [2, 5])], [("y", [2, 3])]))
    assert decisions(res) == {"bn": "BN->MatMul"}
    assert ops(res.model) == ["MatMul", "Add"]


def test_bn_then_matmul_on_rank3_input_is_axis_mismatch(rng):
    # BN normalises axis 1 (length 5); MatMul contracts the last axis, also of length 5.
    g = G(rng)
    g.bn("bn", "x", 5)
    g.node("MatMul", ["bn_out", g.weight("w", (5, 3))], ["y"], name="mm")
    res = fold_verified(g.model([("x", [2, 5, 5])], [("y", [2, 5, 3])]))
    assert decisions(res) == {"bn": Reason.AXIS_MISMATCH}


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape0", "ReshapeNeg", "ReshapeExplicit"])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_flatten_gemm_folds_with_channel_blocks(rng, flatten, trans_b):
    g = G(rng)
    g.bn("bn", "x", 3)
    if flatten == "Flatten":
        g.node("Flatten", ["bn_out"], ["flat"], name="flatten", axis=1)
    else:
        shape = {"Reshape0": [0, -1], "ReshapeNeg": [-1, 48], "ReshapeExplicit": [2, 48]}[flatten]
        g.node("Reshape", ["bn_out", g.init("shape", np.array(shape), np.int64)], ["flat"], name="reshape")
    g.node("Gemm", ["flat", g.weight("w", (7, 48) if trans_b else (48, 7)), g.weight("c", (7,))], ["y"], name="fc",
           transB=trans_b)
    res = fold_verified(g.model([("x", [2, 3, 4, 4])], [("y", [2, 7])]))
    (d,) = res.report.decisions
    assert d.direction == "before" and d.pattern.startswith("BN->") and d.pattern.endswith("->Gemm")


def test_bn_reshape_that_mixes_channels_is_axis_mismatch(rng):
    # (2, 3, 4, 4) -> (6, 16): rows are (sample, channel) pairs, not samples
    g = G(rng)
    g.bn("bn", "x", 3)
    g.node("Reshape", ["bn_out", g.init("shape", np.array([6, 16]), np.int64)], ["flat"], name="reshape")
    g.node("Gemm", ["flat", g.weight("w", (16, 5))], ["y"], name="fc")
    res = fold_verified(g.model([("x", [2, 3, 4, 4])], [("y", [6, 5])]))
    assert decisions(res) == {"bn": Reason.AXIS_MISMATCH}


def test_forward_fold_is_preferred(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w0", (4, 3, 1, 1))], ["c0"], name="conv0")
    g.bn("bn", "c0", 4)
    g.node("Conv", ["bn_out", g.weight("w1", (5, 4, 1, 1))], ["y"], name="conv1")
    res = fold_verified(g.model([("x", [1, 3, 5, 5])], [("y", [1, 5, 5, 5])]))
    (d,) = res.report.decisions
    assert (d.pattern, d.direction, d.producer) == ("Conv->BN", "after", "conv0")


def test_backward_when_forward_is_blocked_by_fanout(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w0", (4, 3, 3, 3))], ["c0"], name="conv0", pads=[1] * 4)
    g.bn("bn", "c0", 4)
    g.node("Conv", ["bn_out", g.weight("w1", (5, 4, 1, 1))], ["y"], name="conv1")
    g.node("Relu", ["c0"], ["side"], name="side")
    res = fold_verified(g.model([("x", [1, 3, 5, 5])], [("y", [1, 5, 5, 5]), ("side", [1, 4, 5, 5])]))
    (d,) = res.report.decisions
    assert (d.pattern, d.direction, d.producer) == ("BN->Conv", "before", "conv1")


def test_bn_feeding_two_layers_is_kept(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Conv", ["bn_out", g.weight("w1", (5, 4, 1, 1))], ["y1"], name="conv1")
    g.node("Conv", ["bn_out", g.weight("w2", (5, 4, 1, 1))], ["y2"], name="conv2")
    res = fold_verified(g.model([("x", [1, 4, 3, 3])], [("y1", [1, 5, 3, 3]), ("y2", [1, 5, 3, 3])]))
    assert decisions(res) == {"bn": Reason.NO_PRODUCER}


def test_bn_mul_add_chain_then_conv_folds_backward(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Mul", ["bn_out", g.init("m", rng.uniform(0.5, 2, (4, 1, 1)))], ["scaled"], name="mul")
    g.node("Add", [g.init("a", rng.normal(0, 1, (1, 4, 1, 1))), "scaled"], ["shifted"], name="add")
    g.node("Conv", ["shifted", g.weight("w", (6, 4, 2, 2))], ["y"], name="conv")
    res = fold_verified(g.model([("x", [1, 4, 5, 5])], [("y", [1, 6, 4, 4])]))
    assert decisions(res) == {"bn": "BN->Mul->Add->Conv"}
    assert ops(res.model) == ["Conv"]
