"""Multi-branch blocks (RepVGG, MobileOne, ACNet, FastViT RepMixer, RepViT, RepCPE, Linear heads) become one
layer; near-misses stay as they are, with the reason; a merge that fails its proof is reverted.

Every block is built by hand with random BN statistics far from the defaults and checked by
fold_verified: bnfold's own verification against the unfolded model, an independent onnxruntime run,
onnx.checker, the input untouched, and a second fold that changes nothing.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfold
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import fold_verified

C, H = 8, 10


def ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def conv(g: G, name: str, x: str, k, pads, cin: int = C, cout: int = C, group: int = 1, bias: bool = False,
         **attrs) -> str:
    k = (k, k) if isinstance(k, int) else tuple(k)
    ins = [x, g.weight(f"{name}_w", (cout, cin // group, *k))]
    if bias:
        ins.append(g.weight(f"{name}_b", (cout,)))
    if pads is not None:
        attrs["pads"] = list(pads)
    return g.node("Conv", ins, [f"{name}_out"], name=name, group=group, **attrs)


def conv_bn(g: G, name: str, x: str, k, pads, **kw) -> str:
    return g.bn(f"{name}_bn", conv(g, name, x, k, pads, **kw), kw.get("cout", C))


def model(g: G, y: str, shape=(2, C, H, H), out_shape=None, relu_in: bool = True) -> onnx.ModelProto:
    out = g.node("Relu", [y], ["y"], name="out_relu")
    return g.model([("x", list(shape))], [(out, list(out_shape or shape))])


def merged(res, n_bn: int, branches: int, layer: str = "Conv") -> None:
    """Every BN of the block folded into one layer, proven locally."""
    rep = res.report
    assert not rep.skipped, [d.to_dict() for d in rep.skipped]
    assert len(rep.folded) == n_bn
    assert {d.pattern for d in rep.folded} == {f"RepBlock({branches} branches)->{layer}"}
    assert {d.direction for d in rep.folded} == {"merge"}
    assert all(d.proof and d.proof.get("passed") for d in rep.folded), [d.proof for d in rep.folded]
    c = ops(res.model)
    assert c[layer] == 1 and c["BatchNormalization"] == 0 and c["Add"] == 0 and c["Sub"] == 0 and c["Sum"] == 0


# -- blocks that merge ----------------------------------------------------------------------------

@pytest.mark.parametrize("group", [1, 2, C])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_repvgg_block_with_identity(rng, group, dtype):
    g = G(rng, dtype)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = conv_bn(g, "k3", r, 3, [1] * 4, group=group)
    b = conv_bn(g, "k1", r, 1, [0] * 4, group=group)
    s = g.node("Add", [a, b], ["s1"], name="add1")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s2"], name="add2")
    res = fold_verified(model(g, s), rel=1e-2 if dtype == np.float16 else 1e-4)
    merged(res, 3, 3)
    w = next(t for t in res.model.graph.initializer if t.name == res.model.graph.node[1].input[1])
    assert list(w.dims) == [C, C // group, 3, 3] and w.data_type == helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@pytest.mark.parametrize("stride", [2, 3])
def test_repvgg_downsampling_block_without_identity(rng, stride):
    g = G(rng)
    a = conv_bn(g, "k3", "x", 3, [1] * 4, strides=[stride] * 2, cin=4)
    b = conv_bn(g, "k1", "x", 1, [0] * 4, strides=[stride] * 2, cin=4)
    s = g.node("Add", [b, a], ["s"], name="add")
    n = (H - 1) // stride + 1
    res = fold_verified(model(g, s, shape=(2, 4, H, H), out_shape=(2, C, n, n)))
    merged(res, 2, 2)


def test_dilated_block_and_graph_input_as_x(rng):
    g = G(rng)
    a = conv_bn(g, "k3", "x", 3, [2] * 4, dilations=[2, 2])
    b = conv_bn(g, "k1", "x", 1, [0] * 4)
    s = g.node("Add", [a, g.node("Add", [b, g.bn("bn_id", "x", C)], ["s0"], name="add0")], ["s"], name="add")
    merged(fold_verified(model(g, s)), 3, 3)


def test_mobileone_block_many_branches_and_a_zero_constant(rng):
    """MobileOne adds its scale branch to a Python 0 when there is no identity: Add(x, 0.0)."""
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "scale", r, 1, [0] * 4, group=C), g.init("zero", np.array(0.0))], ["s0"],
               name="add_zero")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s1"], name="add_id")
    for k in range(3):
        s = g.node("Add", [s, conv_bn(g, f"kxk{k}", r, 3, [1] * 4, group=C)], [f"s{k + 2}"], name=f"add_k{k}")
    res = fold_verified(model(g, s))
    merged(res, 5, 5)


def test_acnet_asymmetric_kernels(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = conv_bn(g, "k33", r, 3, [1, 1, 1, 1])
    b = conv_bn(g, "k13", r, (1, 3), [0, 1, 0, 1])
    c = conv_bn(g, "k31", r, (3, 1), [1, 0, 1, 0])
    s = g.node("Sum", [a, b, c], ["s"], name="sum")
    merged(fold_verified(model(g, s)), 3, 3)


def test_fastvit_repmixer_with_sub_and_layer_scale(rng):
    """x + ls * (mixer(x) - norm(x)): mixer = BN(x) + BN(dw1x1(x)) + BN(dw3x3(x)), norm = BN(x)."""
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    mix = g.node("Add", [g.bn("mix_id", r, C), conv_bn(g, "dw1", r, 1, [0] * 4, group=C)], ["m1"], name="m_add1")
    mix = g.node("Add", [mix, conv_bn(g, "dw3", r, 3, [1] * 4, group=C)], ["m2"], name="m_add2")
    d = g.node("Sub", [mix, g.bn("norm", r, C)], ["d"], name="sub")
    ls = g.init("ls", rng.normal(0, 1, (C, 1, 1)))
    s = g.node("Add", [r, g.node("Mul", [d, ls], ["scaled"], name="layer_scale")], ["s"], name="res_add")
    res = fold_verified(model(g, s))
    merged(res, 4, 5)
    assert ops(res.model)["Mul"] == 0


def test_repvit_bn_after_sum_of_conv_bn_conv_and_identity(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "dw3", r, 3, [1] * 4, group=C), conv(g, "dw1", r, 1, [0] * 4, group=C, bias=True)],
               ["s1"], name="add1")
    s = g.bn("bn_final", g.node("Add", [s, r], ["s2"], name="add2"), C)
    merged(fold_verified(model(g, s)), 2, 3)


def test_bn_free_block_is_merged_and_reported_under_its_sum(rng):
    """FastViT's RepCPE: x + dwconv(x) with a bias, no BatchNorm at all."""
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv(g, "pe", r, 7, [3] * 4, group=C, bias=True), r], ["s"], name="cpe_add")
    res = fold_verified(model(g, s))
    [d] = res.report.folded
    assert d.bn == "cpe_add" and d.pattern == "RepBlock(2 branches)->Conv" and d.producer == "pe"
    assert ops(res.model)["Add"] == 0 and d.proof["passed"]


def test_div_and_reversed_sub_by_constants_inside_a_block(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = g.node("Div", [conv_bn(g, "k3", r, 3, [1] * 4), g.init("c", rng.uniform(0.5, 2, (C, 1, 1)))], ["a"],
               name="div")
    b = g.node("Sub", [g.init("c2", rng.normal(0, 1, (1, C, 1, 1))), conv(g, "k1", r, 1, [0] * 4)], ["b"], name="rsub")
    s = g.node("Sub", [a, g.node("Add", [b, g.bn("bn_id", r, C)], ["bb"], name="add")], ["s"], name="sub")
    merged(fold_verified(model(g, s)), 2, 3)


@pytest.mark.parametrize("nd", [1, 3])
def test_one_and_three_dimensional_blocks(rng, nd):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = conv_bn(g, "k3", r, (3,) * nd, [1] * 2 * nd)
    b = conv_bn(g, "k1", r, (1,) * nd, [0] * 2 * nd)
    s = g.node("Add", [g.node("Add", [a, b], ["s1"], name="add1"), g.bn("bn_id", r, C)], ["s"], name="add2")
    shape = (2, C) + (6,) * nd
    merged(fold_verified(model(g, s, shape=shape)), 3, 3)


def test_same_upper_valid_and_explicit_pads_mix(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = conv_bn(g, "k5", r, 5, None, auto_pad="SAME_UPPER")
    a = g.node("Add", [a, conv_bn(g, "k1", r, 1, None, auto_pad="VALID")], ["s1"], name="add1")
    s = g.node("Add", [a, conv_bn(g, "k3", r, 3, [1] * 4)], ["s"], name="add2")
    res = fold_verified(model(g, s))
    merged(res, 3, 3)
    host = next(n for n in res.model.graph.node if n.op_type == "Conv")
    assert not any(a.name == "auto_pad" for a in host.attribute)


def test_linear_branches_merge_into_one_gemm(rng):
    """RepViT's classifier in eval: (head(x) + head_dist(x)) / 2, two Linears (and a BN1d branch here)."""
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = g.node("Gemm", [r, g.weight("w1", (6, 16)), g.weight("b1", (6,))], ["a"], name="head", transB=1, alpha=0.7)
    b = g.node("Gemm", [r, g.weight("w2", (16, 6)), g.weight("b2", (1, 6))], ["b"], name="head_dist", beta=1.5)
    mm = g.node("MatMul", [r, g.weight("w3", (16, 6))], ["c"], name="mm")
    s = g.node("Add", [g.node("Add", [a, b], ["s1"], name="add1"), mm], ["s2"], name="add2")
    s = g.node("Div", [s, g.init("two", np.array(2.0))], ["s"], name="div")
    res = fold_verified(model(g, s, shape=(3, 16), out_shape=(3, 6)))
    [d] = res.report.folded
    assert d.pattern == "RepBlock(3 branches)->Gemm" and d.proof["passed"]
    assert ops(res.model)["Gemm"] == 1 and ops(res.model)["MatMul"] == 0 and ops(res.model)["Div"] == 0


def test_matmul_branches_keep_a_bias_add(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = g.node("MatMul", [r, g.weight("w1", (16, 16))], ["a"], name="mm1")
    s = g.node("Add", [g.node("Add", [a, g.bn("bn_id", r, 16)], ["s1"], name="add1"), g.weight("bias", (16,))],
               ["s"], name="add_bias")
    res = fold_verified(model(g, s, shape=(3, 16)))
    merged_ops = ops(res.model)
    assert merged_ops["MatMul"] == 1 and merged_ops["BatchNormalization"] == 0 and merged_ops["Add"] == 1
    assert res.report.folded[0].pattern == "RepBlock(2 branches)->MatMul"


def test_repeated_blocks_each_merge_alone(rng):
    g = G(rng)
    x = g.node("Relu", ["x"], ["r0"], name="relu0")
    for i in range(3):
        s = g.node("Add", [conv_bn(g, f"b{i}_k3", x, 3, [1] * 4), conv_bn(g, f"b{i}_k1", x, 1, [0] * 4)], [f"s{i}"],
                   name=f"add{i}")
        s = g.node("Add", [s, g.bn(f"b{i}_id", x, C)], [f"t{i}"], name=f"addid{i}")
        x = g.node("Relu", [s], [f"r{i + 1}"], name=f"relu{i + 1}")
    res = fold_verified(model(g, x))
    assert ops(res.model)["Conv"] == 3 and ops(res.model)["BatchNormalization"] == 0 and len(res.report.folded) == 9


def test_block_inside_an_if_branch(rng):
    g = G(rng)
    s = g.node("Add", [conv_bn(g, "k3", "x", 3, [1] * 4), conv_bn(g, "k1", "x", 1, [0] * 4)], ["s"], name="add")
    s = g.node("Add", [s, g.bn("bn_id", "x", C)], ["body_out"], name="add2")
    body = helper.make_graph(g.nodes, "then", [], [helper.make_tensor_value_info("body_out", onnx.TensorProto.FLOAT,
                                                                                 [2, C, H, H])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [2, C, H, H])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="if", then_branch=body, else_branch=other)], "m",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, C, H, H]),
         helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, C, H, H])], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    assert len(res.report.folded) == 3 and {d.pattern for d in res.report.folded} == {"RepBlock(3 branches)->Conv"}
    then = next(a.g for a in res.model.graph.node[0].attribute if a.name == "then_branch")
    assert Counter(n.op_type for n in then.node) == Counter({"Conv": 1})


# -- near-misses: not merged, exact, with a reason -----------------------------------------------

def not_merged(res, n_conv: int) -> dict:
    assert ops(res.model)["Conv"] == n_conv
    return {d.bn: d for d in res.report.decisions}


def test_different_strides_fold_alone_and_say_why_not_merged(rng):
    g = G(rng)
    a = conv_bn(g, "k3s2", "x", 3, [1] * 4, strides=[2, 2])
    b = conv_bn(g, "k5s1", "x", 5, [0] * 4)
    s = g.node("Add", [a, b], ["s"], name="add")  # both 4x4 from 8x8
    res = fold_verified(model(g, s, shape=(2, C, 8, 8), out_shape=(2, C, 4, 4)))
    d = not_merged(res, 2)
    assert {x.pattern for x in d.values()} == {"Conv->BN"}
    assert d["k3s2_bn"].extra["not_merged"].startswith("BRANCH_MISMATCH") and "strides differ" in \
        d["k3s2_bn"].extra["not_merged"]


def test_bn_after_a_refused_block_still_folds_into_both_layers(rng):
    g = G(rng)
    a = conv_bn(g, "k3s2", "x", 3, [1] * 4, strides=[2, 2])
    b = conv_bn(g, "k5s1", "x", 5, [0] * 4)
    s = g.bn("bn_after", g.node("Add", [a, b], ["s"], name="add"), C)
    res = fold_verified(model(g, s, shape=(2, C, 8, 8), out_shape=(2, C, 4, 4)))
    d = not_merged(res, 2)
    assert d["bn_after"].pattern == "Add(Conv,Conv)->BN" and d["bn_after"].proof["passed"]
    assert ops(res.model)["BatchNormalization"] == 0


def test_different_groups_keep_the_identity_bn_with_branch_mismatch(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "dw", r, 3, [1] * 4, group=C), conv_bn(g, "dense", r, 1, [0] * 4)], ["s1"],
               name="add1")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s"], name="add2")
    d = not_merged(fold_verified(model(g, s)), 2)
    assert d["bn_id"].reason is Reason.BRANCH_MISMATCH and "groups" in d["bn_id"].detail
    assert "alone: the input comes from Relu" in d["bn_id"].detail
    assert d["dw_bn"].is_folded and d["dense_bn"].is_folded


def test_kernel_off_the_dilation_grid_is_not_merged(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "k3d2", r, 3, [1, 1, 3, 3], dilations=[2, 2]), g.bn("bn_id", r, C)], ["s"],
               name="add")
    d = not_merged(fold_verified(model(g, s)), 1)
    assert d["bn_id"].reason is Reason.BRANCH_MISMATCH and "grid" in d["bn_id"].detail


def test_padding_that_changes_the_output_grid_is_not_merged(rng):
    """3x3 stride 2 pad 1 and 2x2 stride 2 pad 0 give 4x4 from 8x8, but read different grids for other sizes."""
    g = G(rng)
    s = g.node("Add", [conv_bn(g, "k3", "x", 3, [1] * 4, strides=[2, 2]), conv_bn(g, "k2", "x", 2, [0] * 4,
                                                                                   strides=[2, 2])], ["s"], name="add")
    res = fold_verified(model(g, s, shape=(2, C, 8, 8), out_shape=(2, C, 4, 4)))
    d = not_merged(res, 2)
    assert "outputs differ in length" in d["k3_bn"].extra["not_merged"]


@pytest.mark.parametrize("k, pads", [(2, [1, 1, 0, 0]), (3, [2, 2, 0, 0])])
def test_kernels_off_a_common_centre_are_not_merged(rng, k, pads):
    """A 2x2 padded (1, 0), or a 3x3 padded (2, 0), next to a 3x3 padded 1 and x itself: same output size,
    but not centred on the same tap."""
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "odd", r, k, pads), conv_bn(g, "k3", r, 3, [1] * 4)], ["s1"], name="add1")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s"], name="add2")
    d = not_merged(fold_verified(model(g, s)), 2)
    assert d["bn_id"].reason is Reason.BRANCH_MISMATCH and "not centred" in d["bn_id"].detail
    assert "not centred" in d["odd_bn"].extra["not_merged"]


@pytest.mark.parametrize("elsewhere", ["relu", "output"])
def test_branch_value_read_elsewhere_is_not_merged(rng, elsewhere):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    b = conv_bn(g, "k1", r, 1, [0] * 4)
    s = g.node("Add", [conv_bn(g, "k3", r, 3, [1] * 4), b], ["s1"], name="add1")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s"], name="add2")
    outs = [("y", [2, C, H, H])]
    if elsewhere == "relu":
        g.node("Relu", [b], ["y2"], name="other_reader")
        outs.append(("y2", [2, C, H, H]))
    else:
        outs.append((b, [2, C, H, H]))
    g.node("Relu", [s], ["y"], name="out_relu")
    d = not_merged(fold_verified(g.model([("x", [2, C, H, H])], outs)), 2)
    want = Reason.PRODUCER_FANOUT if elsewhere == "relu" else Reason.INTERMEDIATE_IS_OUTPUT
    assert d["bn_id"].reason is want and "k1_bn_out" in d["bn_id"].detail
    assert d["k3_bn"].is_folded and d["k1_bn"].is_folded and "not_merged" in d["k3_bn"].extra


def test_nonlinear_op_between_keeps_the_branches_apart(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    b = g.node("Relu", [conv_bn(g, "k1", r, 1, [0] * 4)], ["b"], name="mid_relu")
    s = g.node("Add", [conv_bn(g, "k3", r, 3, [1] * 4), b], ["s"], name="add")
    d = not_merged(fold_verified(model(g, s)), 2)
    assert {x.pattern for x in d.values()} == {"Conv->BN"} and not any("not_merged" in x.extra for x in d.values())


def test_non_constant_weight_in_a_branch(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = g.bn("k3_bn", g.node("Conv", [r, "w_in"], ["k3_out"], name="k3", pads=[1] * 4), C)
    s = g.node("Add", [g.node("Add", [a, conv_bn(g, "k1", r, 1, [0] * 4)], ["s1"], name="add1"),
                       g.bn("bn_id", r, C)], ["s"], name="add2")
    g.node("Relu", [s], ["y"], name="out_relu")
    m = g.model([("x", [2, C, H, H]), ("w_in", [C, C, 3, 3])], [("y", [2, C, H, H])])
    d = {x.bn: x for x in bnfold.fold(m).report.decisions}
    assert d["bn_id"].reason is Reason.NON_CONSTANT_PARAM and "k3 weight" in d["bn_id"].detail


# -- a merge that fails its proof is reverted ----------------------------------------------------

def test_a_damaged_merge_is_caught_and_its_bns_kept(rng, monkeypatch):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv_bn(g, "k3", r, 3, [1] * 4), conv_bn(g, "k1", r, 1, [0] * 4)], ["s1"], name="add1")
    s = g.node("Add", [s, g.bn("bn_id", r, C)], ["s"], name="add2")
    m = model(g, s)
    real = kernel.AffineConv.rounded

    def damaged(self, *a, **k):
        f = real(self, *a, **k)
        f.weight = f.weight.copy()
        f.weight[1] *= np.float32(1.0001)
        return f
    monkeypatch.setattr(kernel.AffineConv, "rounded", damaged)
    res = bnfold.fold(m)
    rep = res.report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    assert {d.bn for d in rep.reverted} == {"k3_bn", "k1_bn", "bn_id"}
    assert all("max abs" in d.detail for d in rep.reverted)
    assert ops(res.model)["BatchNormalization"] == 3 and ops(res.model)["Conv"] == 2


def test_a_damaged_bn_free_merge_is_reverted_under_its_sum(rng, monkeypatch):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    s = g.node("Add", [conv(g, "pe", r, 3, [1] * 4, group=C, bias=True), r], ["s"], name="cpe_add")
    real = kernel.AffineConv.rounded

    def damaged(self, *a, **k):
        f = real(self, *a, **k)
        f.bias = f.bias + np.float32(1e-3) * np.abs(f.bias).max()
        return f
    monkeypatch.setattr(kernel.AffineConv, "rounded", damaged)
    res = bnfold.fold(model(g, s))
    [d] = res.report.decisions
    assert d.bn == "cpe_add" and d.reason is Reason.VERIFICATION_FAILED
    assert res.report.verification.verdict == "passed" and ops(res.model)["Add"] == 1


# -- where a block sits ---------------------------------------------------------------------------

def test_shape_readers_of_a_branch_follow_the_block_output(rng):
    g = G(rng)
    r = g.node("Relu", ["x"], ["r"], name="in_relu")
    a = conv_bn(g, "k3", r, 3, [1] * 4)
    shape = g.node("Shape", [a], ["shape"], name="shape")
    s = g.node("Add", [a, g.bn("bn_id", r, C)], ["s"], name="add")
    g.node("Reshape", [s, shape], ["y"], name="reshape")
    res = fold_verified(g.model([("x", [2, C, H, H])], [("y", [2, C, H, H])]))
    merged(res, 2, 2)
    assert next(n for n in res.model.graph.node if n.op_type == "Shape").input[0] == "s"


def test_block_output_is_a_graph_output(rng):
    g = G(rng)
    s = g.node("Add", [conv_bn(g, "k3", "x", 3, [1] * 4), conv_bn(g, "k1", "x", 1, [0] * 4)], ["y"], name="add")
    res = fold_verified(g.model([("x", [2, C, H, H])], [(s, [2, C, H, H])]))
    assert [n.op_type for n in res.model.graph.node] == ["Conv"] and res.model.graph.node[0].output[0] == "y"


def test_block_inside_a_model_local_function(rng):
    g = G(rng)
    g.node("Add", [conv_bn(g, "k3", "fx", 3, [1] * 4), g.bn("bn_id", "fx", C)], ["fy"], name="add")
    consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}_c", value=t) for t in g.inits]
    fn = helper.make_function("local", "Block", ["fx"], ["fy"], consts + g.nodes,
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Block", ["x"], ["y"], domain="local", name="call")], "m",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, C, H, H])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, C, H, H])])
    m = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 17),
                                                                helper.make_opsetid("local", 1)])
    m.ir_version = 8
    res = fold_verified(m)
    assert {d.pattern for d in res.report.folded} == {"RepBlock(2 branches)->Conv"} and len(res.report.folded) == 2
    assert Counter(n.op_type for n in res.model.functions[0].node)["Conv"] == 1
    assert "BatchNormalization" not in {n.op_type for n in res.model.functions[0].node}


def test_ir3_model_declares_the_merged_weight_of_a_new_shape(rng):
    """1x3 and 3x1 branches merge into a 3x3 kernel: a new initializer, declared as an input before IR 4."""
    g = G(rng)
    s = g.node("Add", [conv_bn(g, "k13", "x", (1, 3), [0, 1, 0, 1]), conv_bn(g, "k31", "x", (3, 1), [1, 0, 1, 0])],
               ["s"], name="add")
    g.node("Relu", [s], ["y"], name="out_relu")
    m = g.model([("x", [2, C, H, H])], [("y", [2, C, H, H])], opset=8, ir=3)
    et = onnx.TensorProto.FLOAT
    m.graph.input.extend(helper.make_tensor_value_info(t.name, et, list(t.dims)) for t in m.graph.initializer)
    res = fold_verified(m)
    merged(res, 2, 2)
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in res.model.graph.input}
    inits = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert set(inits) <= set(declared) and all(declared[k] == v for k, v in inits.items())
