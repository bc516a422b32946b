"""Backward fold (BN folded into the layer that reads it) through Identity / inference-only Dropout,
and with Shape/Size readers of the values it changes: the same ops the forward fold looks through."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import bnfold
from onnx import TensorProto, helper

from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops


def _copy(g: G, kind: str, x: str, out: str) -> str:
    """One pass-through op: Identity, Dropout (opset-12+ defaults), or Dropout with explicit ratio/training_mode=False."""
    if kind == "Identity":
        return g.node("Identity", [x], [out])
    if kind == "Dropout":
        return g.node("Dropout", [x], [out, ""])
    ratio = g.init(f"{out}_ratio", np.array(0.4), np.float32)
    flag = g.init(f"{out}_train", np.array(False), np.bool_)
    return g.node("Dropout", [x, ratio, flag], [out, f"{out}_mask_unused"])


CHAINS = [["Identity"], ["Dropout"], ["DropoutFlag"], ["Identity", "Dropout", "Identity"]]


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
def test_bn_copies_conv_folds(rng, chain):
    g = G(rng)
    v = g.bn("bn", "x", 4)
    for k, kind in enumerate(chain):
        v = _copy(g, kind, v, f"c{k}")
    g.node("Conv", [v, g.weight("w", (6, 4, 3, 3)), g.weight("b", (6,))], ["y"], name="conv",
           kernel_shape=[3, 3], pads=[0] * 4)
    res = fold_verified(g.model([("x", [2, 4, 7, 7])], [("y", [2, 6, 5, 5])]))
    (d,) = res.report.decisions
    assert (d.pattern, d.direction, d.producer) == ("BN->Conv", "before", "conv")
    assert ops(res.model) == ["Conv"] and res.model.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
@pytest.mark.parametrize("layer", ["Gemm", "MatMul", "MatMul+Add"])
def test_bn_copies_dense_folds(rng, chain, layer):
    g = G(rng)
    v = g.bn("bn", "x", 5)
    for k, kind in enumerate(chain):
        v = _copy(g, kind, v, f"c{k}")
    if layer == "Gemm":
        g.node("Gemm", [v, g.weight("w", (3, 5)), g.weight("c", (3,))], ["y"], name="fc", transB=1, alpha=0.6, beta=1.7)
        want = ["Gemm"]
    else:
        out = "y" if layer == "MatMul" else "mm"
        g.node("MatMul", [v, g.weight("w", (5, 3))], [out], name="fc")
        if layer == "MatMul+Add":
            g.node("Add", [out, g.weight("c", (3,))], ["y"], name="bias")
        want = ["MatMul", "Add"]
    res = fold_verified(g.model([("x", [4, 5])], [("y", [4, 3])]))
    assert decisions(res) == {"bn": f"BN->{layer.split('+')[0]}"}
    assert ops(res.model) == want


@pytest.mark.parametrize("before, after", [(["Identity"], []), ([], ["Dropout"]), (["Dropout"], ["Identity", "DropoutFlag"])])
def test_bn_copies_flatten_copies_gemm_folds(rng, before, after):
    g = G(rng)
    v = g.bn("bn", "x", 3)
    for k, kind in enumerate(before):
        v = _copy(g, kind, v, f"b{k}")
    v = g.node("Flatten", [v], ["flat"], axis=1)
    for k, kind in enumerate(after):
        v = _copy(g, kind, v, f"a{k}")
    g.node("Gemm", [v, g.weight("w", (2, 12)), g.weight("c", (2,))], ["y"], name="fc", transB=1)
    res = fold_verified(g.model([("x", [2, 3, 2, 2])], [("y", [2, 2])]))
    assert decisions(res) == {"bn": "BN->Flatten->Gemm"}
    assert ops(res.model) == ["Flatten", "Gemm"]
    # the flattened tensor now holds the un-normalised input: it must not keep its old name
    assert res.model.graph.node[0].output[0] != "flat"


def test_shape_readers_of_bn_output_and_copies_do_not_block(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Identity", ["bn_out"], ["c0"])
    g.node("Conv", ["c0", g.weight("w", (4, 4, 1, 1)), g.weight("b", (4,))], ["conv"], name="conv", kernel_shape=[1, 1])
    g.node("Shape", ["bn_out"], ["s_bn"])
    g.node("Shape", ["c0"], ["s_c0"])
    g.node("Size", ["bn_out"], ["n_bn"])
    g.node("Reshape", ["conv", "s_bn"], ["r"])
    g.node("Reshape", ["r", "s_c0"], ["r2"])
    g.node("Reshape", ["r2", g.init("flat", np.array([-1], np.int64), np.int64)], ["r3"])
    g.node("Reshape", ["r3", "s_bn"], ["y"])
    g.node("Cast", ["n_bn"], ["n"], to=TensorProto.FLOAT)
    g.node("Mul", ["y", "n"], ["z"])
    res = fold_verified(g.model([("x", [2, 4, 5, 5])], [("z", [2, 4, 5, 5])]))
    assert decisions(res) == {"bn": "BN->Conv"}
    assert "BatchNormalization" not in ops(res.model) and "Identity" not in ops(res.model)
    readers = {n.op_type: n.input[0] for n in res.model.graph.node if n.op_type in ("Shape", "Size")}
    assert readers == {"Shape": "x", "Size": "x"}


def test_shape_reader_of_reshape_and_after_copy(rng):
    g = G(rng)
    g.bn("bn", "x", 3)
    g.node("Flatten", ["bn_out"], ["flat"], axis=1)
    g.node("Dropout", ["flat"], ["d", ""])
    g.node("Shape", ["d"], ["s"])
    g.node("Gemm", ["d", g.weight("w", (12, 12))], ["fc"], name="fc")
    g.node("Reshape", ["fc", "s"], ["y"])
    res = fold_verified(g.model([("x", [2, 3, 2, 2])], [("y", [2, 12])]))
    assert decisions(res) == {"bn": "BN->Flatten->Gemm"}
    assert "Dropout" not in ops(res.model)


def test_bn_identity_padded_conv_stays(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Identity", ["bn_out"], ["c0"])
    g.node("Conv", ["c0", g.weight("w", (6, 4, 3, 3))], ["y"], name="conv", kernel_shape=[3, 3], pads=[1] * 4)
    res = fold_verified(g.model([("x", [1, 4, 6, 6])], [("y", [1, 6, 6, 6])]))
    (d,) = res.report.decisions
    assert d.reason is Reason.PADDING_BREAKS_BACKWARD_FOLD and d.producer == "conv"
    assert ops(res.model) == ["BatchNormalization", "Identity", "Conv"]


def test_copy_with_second_value_reader_stays(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Identity", ["bn_out"], ["c0"])
    g.node("Conv", ["c0", g.weight("w", (6, 4, 1, 1))], ["y"], name="conv", kernel_shape=[1, 1])
    g.node("Relu", ["c0"], ["z"])
    res = fold_verified(g.model([("x", [1, 4, 5, 5])], [("y", [1, 6, 5, 5]), ("z", [1, 4, 5, 5])]))
    # the backward refusal names no layer, so the report keeps the forward reason (x is a graph input)
    assert decisions(res) == {"bn": Reason.NO_PRODUCER}
    assert ops(res.model) == ["BatchNormalization", "Identity", "Conv", "Relu"]


def test_copy_output_is_graph_output_stays(rng):
    g = G(rng)
    g.bn("bn", "x", 4)
    g.node("Identity", ["bn_out"], ["c0"])
    g.node("Conv", ["c0", g.weight("w", (6, 4, 1, 1))], ["y"], name="conv", kernel_shape=[1, 1])
    res = fold_verified(g.model([("x", [1, 4, 5, 5])], [("y", [1, 6, 5, 5]), ("c0", [1, 4, 5, 5])]))
    assert decisions(res) == {"bn": Reason.NO_PRODUCER}
    assert ops(res.model) == ["BatchNormalization", "Identity", "Conv"]


@pytest.mark.parametrize("case", ["mask_used", "runtime_flag"])
def test_dropout_that_may_drop_is_not_looked_through(rng, case):
    g = G(rng)
    g.bn("bn", "x", 4)
    inputs = [("x", [1, 4, 5, 5])]
    outputs = [("y", [1, 6, 5, 5])]
    if case == "mask_used":
        g.node("Dropout", ["bn_out"], ["c0", "mask"])
        outputs.append(("mask", [1, 4, 5, 5]))
    else:
        g.node("Dropout", ["bn_out", g.init("ratio", np.array(0.5), np.float32), "train"], ["c0"])
        inputs.append(("train", []))
    g.node("Conv", ["c0", g.weight("w", (6, 4, 1, 1))], ["y"], name="conv", kernel_shape=[1, 1])
    m = g.model(inputs, outputs)
    if case == "mask_used":
        m.graph.output[1].type.tensor_type.elem_type = TensorProto.BOOL
    else:
        m.graph.input[1].CopyFrom(helper.make_tensor_value_info("train", TensorProto.BOOL, []))
    onnx.checker.check_model(m, full_check=True)
    if case == "mask_used":
        res = fold_verified(m)
    else:
        # with train=True the original itself is random from run to run: no comparison can prove anything
        res = bnfold.fold(m)
        assert res.report.verification.verdict == "inconclusive", res.report.verification.to_dict()
    assert decisions(res) == {"bn": Reason.NO_PRODUCER}
    assert ops(res.model) == ["BatchNormalization", "Dropout", "Conv"]
