"""BatchNorm after an Add/Sub/Sum/Concat of layers folds into all of them; per-channel Mul/Add/Sub/Div by
constants after a layer (BN in disguise: tf2onnx's Keras BN, FrozenBatchNorm2d exports) folds like a BN.

Each case ends with fold_verified (bnfold's verification, an independent onnxruntime run, the checker,
idempotence); the folds into several layers are proven locally on several captured inputs.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import fold_verified

C, H = 6, 7


def ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def conv(g: G, name: str, x: str, cin: int = 3, cout: int = C, k: int = 3, bias: bool = True, **attrs) -> str:
    ins = [x, g.weight(f"{name}_w", (cout, cin // attrs.get("group", 1), k, k))]
    if bias:
        ins.append(g.weight(f"{name}_b", (cout,)))
    return g.node("Conv", ins, [f"{name}_out"], name=name, pads=[k // 2] * 4, **attrs)


def two_inputs(g: G, outs, shape=(2, 3, H, H)) -> onnx.ModelProto:
    return g.model([("x1", list(shape)), ("x2", list(shape))], outs)


def only(res, pattern: str):
    [d] = res.report.folded
    assert d.pattern == pattern, d.to_dict()
    assert d.proof and d.proof.get("passed"), d.proof
    return d


# -- BN after a sum or a concat of layers ---------------------------------------------------------

@pytest.mark.parametrize("op", ["Add", "Sub"])
def test_bn_after_add_or_sub_of_two_convs_on_different_inputs(rng, op):
    g = G(rng)
    s = g.node(op, [conv(g, "ca", "x1"), conv(g, "cb", "x2", bias=False)], ["s"], name="sum")
    g.bn("bn", s, C, out="y")
    res = fold_verified(two_inputs(g, [("y", [2, C, H, H])]))
    d = only(res, f"{op}(Conv,Conv)->BN")
    assert d.producer == "ca+cb" and d.site == (("x1", "x2"), "y")
    assert ops(res.model) == Counter({"Conv": 2, op: 1})


def test_bn_after_a_tree_of_sums_with_copies_and_a_chain_after_it(rng):
    g = G(rng)
    a = g.node("Identity", [conv(g, "ca", "x1")], ["a"], name="copy_a")
    s = g.node("Sub", [g.node("Sum", [a, conv(g, "cb", "x2")], ["s0"], name="sum"), conv(g, "cc", "x1", k=1)], ["s1"],
               name="sub")
    s = g.node("Identity", [s], ["s2"], name="copy_s")
    b = g.bn("bn", s, C)
    b = g.node("Mul", [b, g.init("m", rng.normal(0, 1, (C, 1, 1)))], ["bm"], name="mul")
    g.node("Add", [b, g.init("t", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="add")
    res = fold_verified(two_inputs(g, [("y", [2, C, H, H])]))
    only(res, "Sub(Conv,Conv,Conv)->BN->Mul->Add")
    assert ops(res.model)["BatchNormalization"] == 0 and ops(res.model)["Mul"] == 0


def test_bn_after_concat_splits_its_parameters_per_segment(rng):
    g = G(rng)
    cat = g.node("Concat", [conv(g, "ca", "x1", cout=2), conv(g, "cb", "x2", cout=5, bias=False),
                            g.node("ConvTranspose", ["x1", g.weight("ct_w", (3, 1, 3, 3))], ["ct"], name="ct",
                                   pads=[1] * 4)], ["cat"], name="cat", axis=-3)
    g.bn("bn", cat, 8, out="y")
    res = fold_verified(two_inputs(g, [("y", [2, 8, H, H])]))
    only(res, "Concat(Conv,Conv,ConvTranspose)->BN")


def test_bn_after_add_of_gemm_and_matmul_plus_bias(rng):
    g = G(rng)
    a = g.node("Gemm", ["x1", g.weight("w1", (C, 5)), g.weight("b1", (C,))], ["a"], name="gemm", transB=1, beta=0.5)
    mm = g.node("MatMul", ["x2", g.weight("w2", (5, C))], ["mm"], name="mm")
    b = g.node("Add", [mm, g.weight("b2", (C,))], ["b"], name="mm_bias")
    g.bn("bn", g.node("Add", [a, b], ["s"], name="sum"), C, out="y")
    res = fold_verified(two_inputs(g, [("y", [4, C])], shape=(4, 5)))
    only(res, "Add(Gemm,MatMul)->BN")


def test_concat_on_a_spatial_axis_is_axis_mismatch(rng):
    g = G(rng)
    cat = g.node("Concat", [conv(g, "ca", "x1"), conv(g, "cb", "x2")], ["cat"], name="cat", axis=2)
    g.bn("bn", cat, C, out="y")
    [d] = bnfold.fold(two_inputs(g, [("y", [2, C, 2 * H, H])])).report.skipped
    assert d.reason is Reason.AXIS_MISMATCH and "axis 2" in d.detail


def test_sum_of_layers_of_different_ranks_is_axis_mismatch(rng):
    """(2, 4) broadcasts onto the last two axes of (2, 4, 2, 4): the Gemm's features are not channels."""
    g = G(rng)
    c = g.node("Conv", ["x1", g.weight("w", (4, 3, 1, 1))], ["c"], name="conv")
    m = g.node("Gemm", ["x2", g.weight("w2", (4, 4))], ["m"], name="gemm")
    g.bn("bn", g.node("Add", [c, m], ["s"], name="sum"), 4, out="y")
    model = g.model([("x1", [2, 3, 2, 4]), ("x2", [2, 4])], [("y", [2, 4, 2, 4])])
    [d] = fold_verified(model).report.skipped
    assert d.reason is Reason.AXIS_MISMATCH and "rank" in d.detail


@pytest.mark.parametrize("case", ["relu", "fanout", "twice"])
def test_an_operand_that_cannot_take_the_bn_keeps_it(rng, case):
    g = G(rng)
    a = conv(g, "ca", "x1")
    if case == "relu":
        b = g.node("Relu", ["x2"], ["b"], name="relu")
        b = g.node("Pad", [b, g.init("p", np.array([0, 3, 0, 0, 0, 0, 0, 0]), np.int64)], ["bp"], name="pad")
        s = g.node("Add", [a, b], ["s"], name="sum")
    elif case == "fanout":
        b = conv(g, "cb", "x2")
        g.node("Relu", [b], ["other"], name="other_reader")
        s = g.node("Add", [a, b], ["s"], name="sum")
    else:
        s = g.node("Add", [a, a], ["s"], name="sum")
    g.bn("bn", s, C, out="y")
    outs = [("y", [2, C, H, H])] + ([("other", [2, C, H, H])] if case == "fanout" else [])
    [d] = fold_verified(two_inputs(g, outs)).report.skipped
    want = {"relu": Reason.UNSUPPORTED_PRODUCER, "fanout": Reason.PRODUCER_FANOUT, "twice": Reason.PRODUCER_FANOUT}
    assert d.reason is want[case], d.to_dict()
    assert "sum reads" in d.detail


def test_a_damaged_fold_into_several_layers_is_reverted(rng, monkeypatch):
    g = G(rng)
    g.bn("bn", g.node("Add", [conv(g, "ca", "x1"), conv(g, "cb", "x2")], ["s"], name="sum"), C, out="y")
    real, calls = kernel.fold_after, []

    def wrong(*a, **k):
        f = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            f.weight = f.weight.copy()
            f.weight[2] *= np.float32(1.0001)
        return f
    monkeypatch.setattr(kernel, "fold_after", wrong)
    res = bnfold.fold(two_inputs(g, [("y", [2, C, H, H])]))
    [d] = res.report.reverted
    assert d.bn == "bn" and res.report.verification.verdict == "passed"


# -- BN in disguise ---------------------------------------------------------------------------------

def test_conv_mul_add_folds_as_its_own_pattern(rng):
    g = G(rng)
    c = conv(g, "c", "x", bias=False)
    m = g.node("Mul", [g.init("s", rng.normal(0, 1, (C, 1, 1))), c], ["m"], name="scale")
    g.node("Add", [m, g.init("t", rng.normal(0, 1, (1, C, 1, 1)))], ["y"], name="shift")
    res = fold_verified(g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])]))
    d = only(res, "Conv->Mul+Add")
    assert d.bn == "scale" and d.producer == "c" and ops(res.model) == Counter({"Conv": 1})


@pytest.mark.parametrize("ops_", [("Sub", "Div"), ("Div", "Mul", "Sub")])
def test_sub_and_div_chains_after_a_conv(rng, ops_):
    g = G(rng)
    v = conv(g, "c", "x")
    for i, op in enumerate(ops_):
        v = g.node(op, [v, g.init(f"k{i}", rng.uniform(0.5, 2, (C, 1, 1)))], [f"v{i}"], name=f"op{i}")
    g.node("Relu", [v], ["y"], name="relu")
    res = fold_verified(g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])]))
    only(res, "Conv->" + "+".join(ops_))


def test_reversed_sub_flips_the_sign(rng):
    g = G(rng)
    g.node("Sub", [g.init("k", rng.normal(0, 1, (C, 1, 1))), conv(g, "c", "x")], ["y"], name="rsub")
    only(fold_verified(g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])])), "Conv->Sub")


def test_gemm_and_grouped_conv_transpose_chains(rng):
    g = G(rng)
    v = g.node("Gemm", ["v", g.weight("gw", (5, C))], ["gm"], name="gemm")
    v = g.node("Add", [g.node("Mul", [v, g.init("s1", rng.normal(0, 1, (C,)))], ["m1"], name="mul1"),
                       g.init("t1", rng.normal(0, 1, (C,)))], ["y1"], name="add1")
    ct = g.node("ConvTranspose", ["x", g.weight("ctw", (4, 3, 3, 3))], ["ct"], name="ct", group=2, strides=[2, 2])
    g.node("Mul", [ct, g.init("s2", rng.normal(0, 1, (C, 1, 1)))], ["y2"], name="mul2")
    m = g.model([("v", [3, 5]), ("x", [2, 4, H, H])], [("y1", [3, C]), ("y2", [2, C, 2 * H + 1, 2 * H + 1])])
    res = fold_verified(m)
    assert Counter(d.pattern for d in res.report.folded) == Counter({"Gemm->Mul+Add": 1, "ConvTranspose->Mul": 1})
    assert ops(res.model)["Mul"] == 0 and ops(res.model)["Add"] == 0


def test_disguised_bn_before_a_real_bn_both_fold(rng):
    g = G(rng)
    v = g.node("Mul", [conv(g, "c", "x"), g.init("s", rng.normal(0, 1, (C, 1, 1)))], ["m"], name="mul")
    v = g.bn("bn", v, C)
    g.node("Add", [v, g.init("t", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="add")
    res = fold_verified(g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])]))
    assert {d.bn: d.pattern for d in res.report.folded} == {"mul": "Conv->Mul", "bn": "Conv->BN->Add"}
    assert ops(res.model) == Counter({"Conv": 1})


@pytest.mark.parametrize("case", ["spatial", "fanout", "reciprocal", "zero", "product", "matmul", "int"])
def test_ops_that_are_not_a_bn_in_disguise_stay(rng, case):
    g = G(rng)
    c = conv(g, "c", "x")
    if case == "spatial":
        g.node("Mul", [c, g.init("s", rng.normal(0, 1, (C, H, H)))], ["y"], name="mul")
    elif case == "fanout":
        g.node("Mul", [c, g.init("s", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="mul")
        g.node("Relu", [c], ["y2"], name="other")
    elif case == "reciprocal":
        g.node("Div", [g.init("s", rng.uniform(1, 2, (C, 1, 1))), c], ["y"], name="div")
    elif case == "zero":
        g.node("Div", [c, g.init("s", np.array([1.0, 2.0, 0.0, 1.0, 1.0, 1.0]).reshape(C, 1, 1))], ["y"], name="div")
    elif case == "product":
        g.node("Mul", [c, g.node("Sigmoid", [c], ["sg"], name="sig")], ["y"], name="swish")
    elif case == "matmul":
        g.node("Mul", [g.node("MatMul", ["x", g.weight("mw", (H, H))], ["mmo"], name="mm"),
                       g.init("s", rng.normal(0, 1, (H,)))], ["y"], name="mul")
    else:
        p = g.node("Mul", [g.node("Cast", [c], ["ci"], name="cast", to=onnx.TensorProto.INT64),
                           g.init("s", np.arange(C).reshape(C, 1, 1), np.int64)], ["p"], name="mul")
        g.node("Cast", [p], ["y"], name="back", to=onnx.TensorProto.FLOAT)
    outs = [("y", None)] + ([("y2", None)] if case == "fanout" else [])
    m = g.model([("x", [2, 3, H, H])], outs)
    res = bnfold.fold(m)
    assert not res.report.decisions
    assert res.model.SerializeToString() == m.SerializeToString() or ops(res.model) == ops(m)


def test_reverted_disguised_chain_is_reported_and_kept(rng):
    g = G(rng)
    g.node("Mul", [conv(g, "c", "x"), g.init("s", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="mul")
    m = g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])])
    res = bnfold.fold(m, verify=False)
    assert res.report.folded[0].bn == "mul"
    from bnfold.core.options import Options
    from bnfold.onnx.fold import fold_onnx
    again = fold_onnx(m, Options(verify=False, exclude={"mul": "planted"}))
    [d] = again.report.decisions
    assert d.reason is Reason.VERIFICATION_FAILED and ops(again.model)["Mul"] == 1


# -- real exporters ---------------------------------------------------------------------------------

def test_torchvision_frozen_batchnorm_export(rng, tmp_path):
    """FrozenBatchNorm2d exports as x * scale + shift, scale and shift computed from its buffers."""
    import torch
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, C, 3, padding=1, bias=False), FrozenBatchNorm2d(C), torch.nn.ReLU(),
                              torch.nn.Conv2d(C, C, 1), FrozenBatchNorm2d(C))
    for m in net:
        if isinstance(m, FrozenBatchNorm2d):
            st = {k: torch.tensor(v, dtype=torch.float32) for k, v in
                  zip(("weight", "bias", "running_mean", "running_var"),
                      (rng.uniform(0.5, 2, C) * rng.choice([-1, 1], C), rng.normal(0, 1, C), rng.normal(0.5, 1, C),
                       rng.uniform(0.5, 3, C)))}
            for k, v in st.items():
                getattr(m, k).copy_(v)
    path = tmp_path / "frozen.onnx"
    torch.onnx.export(net.eval(), (torch.randn(2, 3, H, H),), str(path), dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["y"])
    model = onnx.load(str(path))
    assert ops(model)["Mul"] >= 2 and ops(model)["BatchNormalization"] == 0
    res = fold_verified(model)
    assert len(res.report.folded) == 2 and all(d.pattern == "Conv->Mul+Add" for d in res.report.folded)
    assert ops(res.model)["Mul"] == 0 and ops(res.model)["Add"] == 0


def test_sum_that_is_a_graph_output_keeps_the_bn(rng):
    g = G(rng)
    s = g.node("Add", [conv(g, "ca", "x1"), conv(g, "cb", "x2")], ["s"], name="sum")
    g.bn("bn", s, C, out="y")
    [d] = fold_verified(two_inputs(g, [("y", [2, C, H, H]), ("s", [2, C, H, H])])).report.skipped
    assert d.reason is Reason.INTERMEDIATE_IS_OUTPUT


def test_disguised_bn_inside_an_if_body_with_outer_constants(rng):
    from onnx import helper
    g = G(rng)
    g.weight("w", (C, 3, 3, 3))
    g.init("s", rng.normal(0, 1, (C, 1, 1)))
    g.init("t", rng.normal(0, 1, (C, 1, 1)))
    body = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4),
         helper.make_node("Mul", ["c", "s"], ["m"], name="mul"), helper.make_node("Add", ["m", "t"], ["o"], name="add")],
        "then", [], [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, [2, C, H, H])])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["o2"], name="conv2", pads=[1] * 4)], "else", [],
                              [helper.make_tensor_value_info("o2", onnx.TensorProto.FLOAT, [2, C, H, H])])
    graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body,
                                                else_branch=other)], "m",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, H, H]),
                               helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, C, H, H])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    [d] = res.report.folded
    assert d.bn == "if/then_branch/mul" and d.pattern == "Conv->Mul+Add"
    then = next(a.g for a in res.model.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Conv"]


def test_sub_after_a_folded_bn_is_reported_with_that_bn(rng):
    """Conv -> BN -> Sub(c): the BN folds first (its own chain takes Mul/Add only), then the Sub joins it."""
    g = G(rng)
    v = g.bn("bn", conv(g, "c", "x"), C)
    g.node("Sub", [v, g.init("k", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="sub")
    res = fold_verified(g.model([("x", [2, 3, H, H])], [("y", [2, C, H, H])]))
    [d] = res.report.decisions
    assert d.bn == "bn" and d.pattern == "Conv->BN->Sub" and d.proof["passed"] and d.site[1] == "y"
    assert ops(res.model) == Counter({"Conv": 1})


@pytest.mark.parametrize("where", ["disguised", "sum"])
def test_a_copy_of_the_layer_output_that_is_a_graph_output_stays(rng, where):
    """Layer -> Identity -> (graph output, and Mul / the sum): the copy's value must not change."""
    g = G(rng)
    a = g.node("Identity", [conv(g, "ca", "x1")], ["a"], name="copy")
    if where == "disguised":
        g.node("Mul", [a, g.init("k", rng.normal(0, 1, (C, 1, 1)))], ["y"], name="mul")
    else:
        g.bn("bn", g.node("Add", [a, conv(g, "cb", "x2")], ["s"], name="sum"), C, out="y")
    res = fold_verified(two_inputs(g, [("y", [2, C, H, H]), ("a", [2, C, H, H])]))
    assert not res.report.folded
    if where == "sum":
        assert res.report.skipped[0].reason is Reason.INTERMEDIATE_IS_OUTPUT
