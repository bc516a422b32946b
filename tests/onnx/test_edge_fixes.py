"""ONNX pass fixes for a tester's edge cases: MatMul+Add biases that raise the rank, exporters' CastLike zero
biases, IR < 4 initializer inputs, Identity/Dropout between a layer and its BN, Shape readers of a
conv output. Every fold ends in bnfold's verifier and a direct onnxruntime comparison."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function, decisions, fold_verified, Reason
from tests.onnx.test_edge import mk


def _castlike_zero_bias(g: G, weight: str, like: str) -> str:
    """What torch.onnx.export(dynamo=True, optimize=False) emits for a bias-free conv: a zero bias
    Expand(CastLike(0, x), Shape(weight)[0:1]) whose value depends only on x's (static) dtype."""
    g.node("Shape", [weight], [weight + "_n"], start=0, end=1)
    g.nodes.append(helper.make_node("Constant", [], [weight + "_one"], value_ints=[1]))
    g.node("Expand", [weight + "_n", weight + "_one"], [weight + "_n1"])
    g.nodes.append(helper.make_node("Constant", [], [weight + "_zero"],
                                    value=numpy_helper.from_array(np.array(0.0, np.float32), "z")))
    g.node("CastLike", [weight + "_zero", like], [weight + "_zl"])
    return g.node("Expand", [weight + "_zl", weight + "_n1"], [weight + "_bias"])


def _ir3(g: G, inputs, outputs) -> onnx.ModelProto:
    """An IR 3 model: every initializer is also declared as a graph input (and is not overridable)."""
    m = g.model(inputs, outputs, opset=7, ir=3)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


# ---- 1. MatMul + Add: the BN axis is counted on what the BN reads ---------------------------------
@pytest.mark.parametrize("layout", [None, "Transpose", "Reshape"])
@pytest.mark.parametrize("bias_shape", [(1, 1, 6), (1, 6, 1)])
def test_matmul_add_with_rank_raising_bias_is_not_folded_into_features(rng, layout, bias_shape):
    """x(6,3) @ W(3,6) + b(1,1,6) is (1,6,6): BN channel axis 1 indexes the MatMul's rows."""
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (3, 6))], ["mm"])
    g.node("Add", ["mm", g.init("b", rng.normal(0, 1, bias_shape))], ["a"])
    feed = "a"
    if layout == "Transpose":
        feed = g.node("Transpose", ["a"], ["t"], perm=[0, 1, 2])
    elif layout == "Reshape":
        feed = g.node("Reshape", ["a", g.init("sh", np.array([1, 6, 6]), np.int64)], ["t"])
    g.bn("bn", feed, 6, out="y")
    m = mk(g, [("x", [6, 3])], [("y", None)])
    unverified = bnfold.fold(m, verify=False)
    assert_same_function(m, unverified.model)
    res = fold_verified(m)
    assert decisions(res)["bn"] == Reason.AXIS_MISMATCH


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (4, 1), (4, 6), ()])
def test_matmul_add_with_shape_keeping_bias_folds(rng, bias_shape):
    # a bias that leaves the (4, 6) product's shape alone folds exactly, even one varying over rows
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (3, 6))], ["mm"])
    g.node("Add", ["mm", g.init("b", rng.normal(0, 1, bias_shape))], ["a"])
    g.bn("bn", "a", 6, out="y")
    res = fold_verified(mk(g, [("x", [4, 3])], [("y", None)]))
    assert decisions(res) == {"bn": "MatMul+Add->BN"}


# ---- 2. CastLike reads only its second input's type -------------------------------------------
def test_castlike_zero_bias_is_constant(rng):
    g = G(rng)
    w = g.weight("w", (4, 3, 3, 3))
    g.node("Conv", ["x", w, _castlike_zero_bias(g, w, "x")], ["c"])
    g.bn("bn", "c", 4, out="y")
    res = fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None)], opset=18))
    assert decisions(res) == {"bn": "Conv->BN"}
    assert "CastLike" not in {n.op_type for n in res.model.graph.node}, "the dead zero-bias subgraph stays"


def test_castlike_of_an_untyped_activation_is_not_guessed(rng):
    # the CastLike target is an intermediate no shape inference can type (a custom op): refuse, not guess
    g = G(rng)
    w = g.weight("w", (4, 3, 3, 3))
    g.nodes.append(helper.make_node("Opaque", ["x"], ["u"], domain="custom.test"))
    g.node("Conv", ["x", w, _castlike_zero_bias(g, w, "u")], ["c"])
    g.bn("bn", "c", 4, out="y")
    m = g.model([("x", [1, 3, 6, 6])], [("y", None)], opset=18)
    m.opset_import.append(helper.make_opsetid("custom.test", 1))
    res = bnfold.fold(m, verify=False)
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}
    assert "element type" in res.report.decisions[0].detail


def _zoo_names() -> list[str]:
    from tests.helpers.zoo_torch import ZOO
    return list(ZOO)


@pytest.mark.parametrize("name", _zoo_names())
def test_dynamo_export_folds_every_conv_bn(name):
    """torch.onnx.export(dynamo=True, optimize=False) of every zoo model: bias-free convs get
    CastLike zero biases; every BN a layer feeds must fold, and the result verifies."""
    from tests.onnx.test_edge_graphs import dynamo_export
    m = dynamo_export(name)
    producer = {o: n for n in m.graph.node for o in n.output}
    layers = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    layer_fed = {n.name for n in m.graph.node
                 if n.op_type == "BatchNormalization" and getattr(producer.get(n.input[0]), "op_type", "") in layers}
    assert layer_fed
    res = fold_verified(m)
    folded = {d.bn for d in res.report.folded}
    assert layer_fed <= folded, [d.to_dict() for d in res.report.skipped if d.bn in layer_fed][:2]


# ---- 3. IR < 4: initializers are graph inputs --------------------------------------------------
def test_ir3_initializer_inputs_are_constant(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    res = fold_verified(_ir3(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])]))
    assert decisions(res) == {"bn": "Conv->BN"}
    names = {i.name for i in res.model.graph.input}
    inits = {t.name for t in res.model.graph.initializer}
    assert names - {"x"} == inits, "every initializer is an input and every input left has an initializer"


def test_ir3_dead_bn_parameters_are_dropped(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3)), g.weight("b", (4,))], ["c"])
    g.bn("bn", "c", 4, out="y")
    res = fold_verified(_ir3(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])]))
    assert not [t.name for t in res.model.graph.initializer if t.name.startswith("bn_")]
    assert not [i.name for i in res.model.graph.input if i.name.startswith("bn_")]


def test_ir3_standalone_affine_constants_are_inputs(rng):
    g = G(rng)
    g.bn("bn", "x", 3, out="y")
    res = fold_verified(_ir3(g, [("x", [1, 3, 4, 4])], [("y", [1, 3, 4, 4])]), standalone="affine")
    assert decisions(res) == {"bn": "BN as Mul+Add"}
    assert {i.name for i in res.model.graph.input} - {"x"} == {t.name for t in res.model.graph.initializer}


def test_ir4_overridable_bn_parameter_input_is_kept(rng):
    # IR >= 4: an initializer declared as an input is a default the caller may replace: it is not ours to fold
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    m = g.model([("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])], ir=4, opset=9)
    m.graph.input.append(helper.make_tensor_value_info("bn_gamma", TensorProto.FLOAT, [4]))
    res = fold_verified(m)
    assert decisions(res) == {"bn": Reason.NON_CONSTANT_PARAM}
    assert "bn_gamma" in {i.name for i in res.model.graph.input}
    assert "bn_gamma" in {t.name for t in res.model.graph.initializer}


# ---- 4. Identity / inference Dropout between the layer and its BN ------------------------------
@pytest.mark.parametrize("between", [["Identity"], ["Dropout"], ["Identity", "Dropout", "Identity"]])
def test_identity_like_ops_between_conv_and_bn(rng, between):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    v = "c"
    for k, op in enumerate(between):
        v = g.node(op, [v], [f"p{k}"])
    g.bn("bn", v, 4, out="y")
    res = fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_dropout_with_constant_false_training_mode_folds_through_reshape(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (3, 6))], ["mm"])
    g.node("Dropout", ["mm", g.init("r", np.array(0.5), np.float32), g.init("tm", np.array(False), np.bool_)],
           ["d"])
    g.node("Reshape", ["d", g.init("sh", np.array([4, 6, 1]), np.int64)], ["r3"])
    g.bn("bn", "r3", 6, out="y")
    res = fold_verified(mk(g, [("x", [4, 3])], [("y", None)]))
    assert decisions(res) == {"bn": "MatMul->Reshape->BN"}


def test_dropout_that_may_train_or_whose_mask_is_read_is_not_walked_through(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.node("Dropout", ["c", "", "train"], ["d1"])  # the caller chooses training mode at run time
    g.bn("bn1", "d1", 4, out="y1")
    g.node("Conv", ["x", g.weight("w2", (4, 3, 3, 3))], ["c2"])
    g.node("Dropout", ["c2"], ["d2", "mask"])
    g.bn("bn2", "d2", 4, out="y2")
    m = g.model([("x", [1, 3, 6, 6])], [("y1", None), ("y2", None)], opset=13)
    m.graph.input.append(helper.make_tensor_value_info("train", TensorProto.BOOL, []))
    m.graph.output.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, None))
    res = bnfold.fold(m, verify=False)
    assert decisions(res) == {"bn1": Reason.UNSUPPORTED_PRODUCER, "bn2": Reason.UNSUPPORTED_PRODUCER}


def test_identity_with_a_second_reader_blocks_the_fold(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.node("Identity", ["c"], ["i"])
    g.bn("bn", "i", 4, out="y")
    g.node("Relu", ["c"], ["r"])
    res = fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None), ("r", None)]))
    assert decisions(res) == {"bn": Reason.PRODUCER_FANOUT}


# ---- 5. Shape/Size readers see a shape the fold does not change -------------------------------
def test_shape_reader_of_conv_output_does_not_block_the_fold(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4)
    g.node("Shape", ["c"], ["s"])  # e.g. interpolate(size=skip.shape) in U-Nets exported with dynamic axes
    g.node("Reshape", ["bn_out", "s"], ["y"])
    res = fold_verified(mk(g, [("x", ["N", 3, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_shape_and_size_readers_along_a_matmul_layout_path(rng):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (3, 6))], ["mm"])
    g.node("Add", ["mm", g.weight("b", (6,))], ["a"])
    g.node("Identity", ["a"], ["i"])
    g.node("Reshape", ["i", g.init("sh", np.array([4, 6, 1]), np.int64)], ["r3"])
    g.bn("bn", "r3", 6, out="y")
    g.node("Size", ["mm"], ["n_mm"])
    g.node("Shape", ["i"], ["s_i"])
    g.node("Shape", ["r3"], ["s_r3"])
    m = g.model([("x", [4, 3])], [("y", None)])
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("n_mm", "s_i", "s_r3"))
    res = fold_verified(onnx.shape_inference.infer_shapes(m, strict_mode=True))
    assert decisions(res) == {"bn": "MatMul+Add->Reshape->BN"}


def test_ir3_if_branches_get_constants_not_initializers(rng):
    # an IR 3 body's initializers would have to be its inputs, which an If branch cannot have
    def body(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], [f"c{tag}"]),
             helper.make_node("BatchNormalization", [f"c{tag}"] + [f"bn_{k}" for k in ("gamma", "beta", "mean", "var")],
                              [f"y{tag}"], name=f"bn{tag}")],
            f"b{tag}", [], [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, [1, 4, 4, 4])])
    g = G(rng)
    g.weight("w", (4, 2, 3, 3))
    g.bn("bn", "unused", 4)
    g.nodes.clear()  # keep only the BN's parameters: the branches read them from the outer scope
    g.nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=body("t"), else_branch=body("e")))
    m = _ir3(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 4, 4])])
    m.graph.input.insert(1, helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    res = fold_verified(m)
    assert decisions(res) == {"If:y/then_branch/bnt": "Conv->BN", "If:y/else_branch/bne": "Conv->BN"}
    assert {i.name for i in res.model.graph.input} - {"x", "cond"} == {t.name for t in res.model.graph.initializer}


@pytest.mark.parametrize("layer", ["MatMul", "MatMul+Add", "Gemm", "ConvTranspose"])
@pytest.mark.parametrize("between", ["Identity", "Dropout"])
def test_identity_like_op_after_every_layer_kind(rng, layer, between):
    g = G(rng)
    if layer == "ConvTranspose":
        v = g.node("ConvTranspose", ["x", g.weight("w", (3, 4, 3, 3))], ["l"])
        shape, out_shape = [1, 3, 5, 5], [1, 4, 7, 7]
    elif layer == "Gemm":
        v = g.node("Gemm", ["x", g.weight("w", (4, 3)), g.weight("b", (4,))], ["l"], transB=1)
        shape, out_shape = [2, 3], [2, 4]
    else:
        v = g.node("MatMul", ["x", g.weight("w", (3, 4))], ["l"])
        if layer == "MatMul+Add":
            v = g.node("Add", [v, g.weight("b", (4,))], ["a"])
        shape, out_shape = [2, 3], [2, 4]
    g.node(between, [v], ["p"])
    g.bn("bn", "p", 4)
    g.node("Shape", ["p"], ["s"])
    g.node("Reshape", ["bn_out", "s"], ["y"])
    res = fold_verified(mk(g, [("x", shape)], [("y", out_shape)]))
    assert decisions(res) == {"bn": f"{layer}->BN"}
