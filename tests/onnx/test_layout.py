"""Looking through layout ops: MatMul(+Add) -> Reshape/Transpose/Unsqueeze -> BN folds only when the
MatMul's feature axis provably becomes the BN's channel axis; an equal size on the wrong axis is
AXIS_MISMATCH (onnxruntime's own MatMul+BN fusion scales the weight's axis 1 regardless)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops


def i64(g: G, name: str, v) -> str:
    return g.init(name, np.array(v), np.int64)


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_reshape_bn(rng, with_add):
    # (N, F) -> (N, F, 1, 1): ONNX exports of Linear -> BatchNorm2d look like this
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (6, 5))], ["mm"], name="mm")
    src = "mm"
    if with_add:
        src = g.node("Add", ["mm", g.weight("b", (5,))], ["mm_b"], name="add")
    g.node("Reshape", [src, i64(g, "shape", [0, 5, 1, 1])], ["r"], name="reshape")
    g.bn("bn", "r", 5, out="y")
    res = fold_verified(g.model([("x", [3, 6])], [("y", [3, 5, 1, 1])]))
    assert decisions(res) == {"bn": f"MatMul{'+Add' if with_add else ''}->Reshape->BN"}
    assert "BatchNormalization" not in ops(res.model)


def test_matmul_transpose_bn(rng):
    # (N, T, F) -> Transpose(0, 2, 1) -> (N, F, T): BatchNorm1d over features of a sequence model
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (4, 6))], ["mm"], name="mm")
    g.node("Add", [g.weight("b", (6,)), "mm"], ["mm_b"], name="add")
    g.node("Transpose", ["mm_b"], ["t"], name="tr", perm=[0, 2, 1])
    g.bn("bn", "t", 6, out="y")
    res = fold_verified(g.model([("x", [2, 7, 4])], [("y", [2, 6, 7])]))
    assert decisions(res) == {"bn": "MatMul+Add->Transpose->BN"}


def test_matmul_reshape_transpose_bn(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (4, 6))], ["mm"], name="mm")
    g.node("Reshape", ["mm", i64(g, "shape", [2, 3, 5, 6])], ["r"], name="reshape")
    g.node("Transpose", ["r"], ["t"], name="tr", perm=[0, 3, 1, 2])
    g.bn("bn", "t", 6, out="y")
    res = fold_verified(g.model([("x", [30, 4])], [("y", [2, 6, 3, 5])]))
    assert decisions(res) == {"bn": "MatMul->Reshape->Transpose->BN"}


def test_equal_channel_count_on_wrong_axis_is_mismatch(rng):
    # MatMul output (2, 6, 6): without the transpose, axis 1 is the *row* axis, also of size 6
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (4, 6))], ["mm"], name="mm")
    g.node("Transpose", ["mm"], ["t"], name="tr", perm=[0, 1, 2])
    g.bn("bn", "t", 6, out="y")
    res = fold_verified(g.model([("x", [2, 6, 4])], [("y", [2, 6, 6])]))
    (d,) = res.report.decisions
    assert d.reason is Reason.AXIS_MISMATCH and "axis 2" in d.detail


def test_reshape_that_splits_features_is_mismatch(rng):
    # (N, 8) -> (N, 2, 4): BN over 2 "channels", each mixing 4 features
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (3, 8))], ["mm"], name="mm")
    g.node("Reshape", ["mm", i64(g, "shape", [0, 2, 4])], ["r"], name="reshape")
    g.bn("bn", "r", 2, out="y")
    res = fold_verified(g.model([("x", [2, 3])], [("y", [2, 2, 4])]))
    assert decisions(res) == {"bn": Reason.AXIS_MISMATCH}


def test_intermediate_graph_output_is_kept(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (6, 5))], ["mm"], name="mm")
    g.node("Unsqueeze", ["mm", i64(g, "axes", [2])], ["u"], name="unsq")
    g.bn("bn", "u", 5, out="y")
    res = fold_verified(g.model([("x", [3, 6])], [("y", [3, 5, 1]), ("mm", [3, 5])]))
    assert decisions(res) == {"bn": Reason.INTERMEDIATE_IS_OUTPUT}


def test_layout_fanout_is_kept(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (6, 5))], ["mm"], name="mm")
    g.node("Unsqueeze", ["mm", i64(g, "axes", [2])], ["u"], name="unsq")
    g.node("Relu", ["u"], ["side"], name="relu")
    g.bn("bn", "u", 5, out="y")
    res = fold_verified(g.model([("x", [3, 6])], [("y", [3, 5, 1]), ("side", [3, 5, 1])]))
    assert decisions(res) == {"bn": Reason.PRODUCER_FANOUT}
