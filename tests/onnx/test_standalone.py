"""--standalone affine (a BN with no layer to fold into becomes Mul + Add) and per-channel Mul/Add chains
around a BN (Caffe2-era BN -> Mul -> Add) collapsing into one affine map."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold.cli import main
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops


def relu_bn(rng, shape, dtype=np.float32) -> onnx.ModelProto:
    g = G(rng, dtype)
    g.node("Relu", ["x"], ["r"], name="relu")
    g.bn("bn", "r", shape[1], out="y")
    return g.model([("x", shape)], [("y", shape)])


@pytest.mark.parametrize("shape", [[2, 5], [2, 5, 7], [1, 5, 4, 4], [1, 5, 2, 3, 3]])
def test_standalone_affine_rewrites_bn_as_mul_add(rng, shape):
    m = relu_bn(rng, shape)
    res = fold_verified(m, standalone="affine")
    (d,) = res.report.decisions
    assert (d.pattern, d.direction) == ("BN as Mul+Add", "standalone")
    assert ops(res.model) == ["Relu", "Mul", "Add"]
    mul = next(n for n in res.model.graph.node if n.op_type == "Mul")
    scale = next(t for t in res.model.graph.initializer if t.name == mul.input[1])
    assert list(scale.dims) == [shape[1]] + [1] * (len(shape) - 2)


def test_standalone_keep_is_the_default(rng):
    m = relu_bn(rng, [1, 5, 4, 4])
    res = fold_verified(m)
    assert decisions(res) == {"bn": Reason.UNSUPPORTED_PRODUCER}
    assert ops(res.model) == ["Relu", "BatchNormalization"]


def test_standalone_bn_on_graph_input_fp16(rng):
    g = G(rng, np.float16)
    g.bn("bn", "x", 4, out="y")
    res = fold_verified(g.model([("x", [2, 4, 3, 3])], [("y", [2, 4, 3, 3])]), standalone="affine", rel=2e-3)
    assert decisions(res) == {"bn": "BN as Mul+Add"}
    assert {t.data_type for t in res.model.graph.initializer} == {onnx.TensorProto.FLOAT16}


def test_standalone_never_overrides_a_bn_parameter_reason(rng):
    g = G(rng)
    g.node("Relu", ["x"], ["r"], name="relu")
    g.bn("bn", "r", 4, out="y")
    g.nodes[-1].input[1] = "gamma_in"  # the scale is fed at run time
    res = fold_verified(g.model([("x", [2, 4, 3, 3]), ("gamma_in", [4])], [("y", [2, 4, 3, 3])]),
                        standalone="affine")
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}


def caffe2_block(rng, conv_fanout: bool = False) -> onnx.ModelProto:
    # Caffe2's SpatialBN + Mul + Add "scale layer", as in the old DenseNet/Inception exports
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1] * 4)
    g.bn("bn", "c", 4)
    g.node("Mul", ["bn_out", g.init("gamma2", rng.uniform(0.5, 2, (4, 1, 1)))], ["m"], name="scale_mul")
    g.node("Add", ["m", g.init("beta2", rng.normal(0, 1, (1, 4, 1, 1)))], ["y"], name="scale_add")
    outs = [("y", [1, 4, 6, 6])]
    if conv_fanout:
        g.node("Relu", ["c"], ["side"], name="side")
        outs.append(("side", [1, 4, 6, 6]))
    return g.model([("x", [1, 3, 6, 6])], outs)


def test_conv_bn_mul_add_chain_folds_into_the_conv(rng):
    res = fold_verified(caffe2_block(rng))
    assert decisions(res) == {"bn": "Conv->BN->Mul->Add"}
    assert ops(res.model) == ["Conv"]


def test_bn_mul_add_chain_collapses_into_one_mul_add(rng):
    res = fold_verified(caffe2_block(rng, conv_fanout=True), standalone="affine")
    assert decisions(res) == {"bn": "BN->Mul->Add as Mul+Add"}
    assert ops(res.model) == ["Conv", "Mul", "Add", "Relu"]


def test_mul_that_is_not_per_channel_stays_outside_the_chain(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1] * 4)
    g.bn("bn", "c", 4)
    # shape (6,) broadcasts over the width axis, not the channels
    g.node("Mul", ["bn_out", g.init("wmul", rng.uniform(0.5, 2, (6,)))], ["y"], name="mul_w")
    res = fold_verified(g.model([("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])]))
    assert decisions(res) == {"bn": "Conv->BN"}
    assert ops(res.model) == ["Conv", "Mul"]


def test_mul_by_runtime_value_stays_outside_the_chain(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1] * 4)
    g.bn("bn", "c", 4)
    g.node("Mul", ["bn_out", "gate"], ["y"], name="gate_mul")
    res = fold_verified(g.model([("x", [1, 3, 6, 6]), ("gate", [1, 4, 1, 1])], [("y", [1, 4, 6, 6])]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_cli_standalone_affine_writes_a_verified_model(rng, tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "m.folded.onnx"
    onnx.save(relu_bn(rng, [1, 5, 4, 4]), src)
    assert main([str(src), "--standalone", "affine", "-q"]) == 0
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["Relu", "Mul", "Add"]
    assert main(["check", str(src), str(out), "-q"]) == 0
