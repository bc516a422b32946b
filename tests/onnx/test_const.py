"""Parameters that are not plain initializers: Constant nodes, Identity chains, ConstantOfShape, Cast,
and any other subgraph computable from constants alone are evaluated in numpy and folded."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.const import ConstEvaluator
from bnfold.onnx.graph import GraphIndex
from tests.conftest import random_bn
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import Reason, decisions, fold_verified, ops

X = ("x", [2, 3, 8, 8])
Y = ("y", [2, 4, 8, 8])


def const_node(g: G, name: str, value: np.ndarray) -> str:
    t = numpy_helper.from_array(np.asarray(value))
    return g.node("Constant", [], [name], name=f"const_{name}", value=t)


def test_bn_params_from_constant_nodes_and_identity_chain(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    st = random_bn(rng, 4)
    names = [const_node(g, f"p_{k}", st[k].astype(np.float32)) for k in ("gamma", "beta", "mean")]
    # exporters deduplicate equal tensors through Identity chains
    v = const_node(g, "v0", st["var"].astype(np.float32))
    v = g.node("Identity", [v], ["v1"], name="id1")
    v = g.node("Identity", [v], ["v2"], name="id2")
    g.node("BatchNormalization", ["c", *names, v], ["y"], name="bn")
    res = fold_verified(g.model([X], [Y]))
    assert decisions(res) == {"bn": "Conv->BN"}
    # the whole constant subgraph became dead and was swept
    assert ops(res.model) == ["Conv"]


def test_conv_weight_from_constant_of_shape_and_cast(rng):
    g = G(rng)
    shape = g.init("wshape", np.array([4, 3, 3, 3]), np.int64)
    g.node("ConstantOfShape", [shape], ["w16"], name="cos", value=numpy_helper.from_array(np.array([0.05], np.float16)))
    g.node("Cast", ["w16"], ["w"], name="cast_w", to=TensorProto.FLOAT)
    # bias = Add(Mul(a, b), c) over constants; mean through Unsqueeze/Squeeze/Reshape/Concat
    a, b = g.init("ba", rng.normal(0, 1, 4)), g.init("bb", rng.normal(0, 1, 4))
    g.node("Mul", [a, b], ["bab"], name="mul_b")
    g.node("Sqrt", [g.init("bc", rng.uniform(0.5, 2, 4))], ["bsq"], name="sqrt_b")
    g.node("Add", ["bab", "bsq"], ["bias"], name="add_b")
    g.node("Conv", ["x", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1])
    st = random_bn(rng, 4)
    m2 = g.init("m_halves", st["mean"].reshape(2, 2))
    g.node("Reshape", [m2, g.init("flat", np.array([-1]), np.int64)], ["mean_flat"], name="reshape_m")
    ins = ["c", g.init("gm", st["gamma"]), g.init("bt", st["beta"]), "mean_flat", g.init("vr", st["var"])]
    g.node("BatchNormalization", ins, ["y"], name="bn")
    res = fold_verified(g.model([X], [Y]))
    assert decisions(res) == {"bn": "Conv->BN"}
    assert ops(res.model) == ["Conv"]
    # only the folded weight and bias remain: every constant-subgraph input was swept
    assert len(res.model.graph.initializer) == 2


def test_shared_constant_subgraph_is_copied_not_edited(rng):
    g = G(rng)
    g.node("Identity", [g.weight("w", (4, 4, 1, 1))], ["w_dup"], name="dedup")
    g.node("Conv", ["x", "w"], ["c1"], name="conv1")
    g.node("Conv", ["c1", "w_dup"], ["c2"], name="conv2")
    g.bn("bn", "c2", 4, out="y")
    m = g.model([("x", [1, 4, 5, 5])], [("y", [1, 4, 5, 5])])
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN"}
    # conv1 still reads the untouched original weight
    conv1 = next(n for n in res.model.graph.node if n.name == "conv1")
    assert conv1.input[1] == "w"
    w = next(t for t in res.model.graph.initializer if t.name == "w")
    orig = next(t for t in m.graph.initializer if t.name == "w")
    assert numpy_helper.to_array(w).tobytes() == numpy_helper.to_array(orig).tobytes()


def test_op_without_hand_written_rule_uses_reference_evaluator(rng):
    g = G(rng)
    g.node("Abs", [g.init("gneg", -rng.uniform(0.5, 2, 4))], ["gamma"], name="abs_gamma")
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    st = random_bn(rng, 4)
    g.node("BatchNormalization", ["c", "gamma", *(g.init(f"s{k}", st[k]) for k in ("beta", "mean", "var"))], ["y"],
           name="bn")
    res = fold_verified(g.model([X], [Y]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_param_depending_on_graph_input_stays(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    st = random_bn(rng, 4)
    g.node("Mul", [g.init("g0", st["gamma"]), "gain"], ["gamma"], name="mul_gain")
    g.node("BatchNormalization", ["c", "gamma", *(g.init(f"s{k}", st[k]) for k in ("beta", "mean", "var"))], ["y"],
           name="bn")
    m = g.model([X, ("gain", [4])], [Y])
    res = fold_verified(m)
    (d,) = res.report.decisions
    assert d.reason is Reason.NON_CONSTANT_PARAM and "gain" in d.detail


def test_random_ops_are_not_constants(rng):
    g = G(rng)
    g.node("RandomUniform", [], ["noise"], name="rnd", shape=[4], low=0.5, high=1.5, seed=1.0)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    st = random_bn(rng, 4)
    g.node("BatchNormalization", ["c", "noise", *(g.init(f"s{k}", st[k]) for k in ("beta", "mean", "var"))], ["y"],
           name="bn")
    m = g.model([X], [Y])
    import bnfold
    res = bnfold.fold(m, verify=False)
    (d,) = res.report.decisions
    assert d.reason is Reason.NON_CONSTANT_PARAM and "RandomUniform" in d.detail


def test_evaluator_memoises_and_is_linear_on_a_long_identity_chain(rng):
    # 20k Identities: evaluated iteratively (no recursion limit) and once each.
    g = G(rng)
    name = g.init("v", rng.normal(size=3))
    for i in range(20000):
        name = g.node("Identity", [name], [f"i{i}"], name=f"id{i}")
    graph = helper.make_graph(g.nodes, "g", [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, [3])], g.inits)
    ix = GraphIndex.build(graph, 8)
    ev = ConstEvaluator(ix, 17)
    out = ev.value(name)
    assert out is not None and np.array_equal(out, numpy_helper.to_array(g.inits[0]))
    assert len(ev.const_nodes) == 20000


def test_constant_roots_name_every_source_a_noise_model_must_nudge(rng):
    from bnfold.onnx.const import constant_roots
    g = G(rng)
    const_node(g, "w_half", rng.normal(size=(4, 3, 3, 3)).astype(np.float16))
    g.node("Cast", ["w_half"], ["w_cast"], name="cast", to=TensorProto.FLOAT)
    g.node("Identity", ["w_cast"], ["w"], name="dedup")
    g.node("ConstantOfShape", [g.init("bshape", np.array([4]), np.int64)], ["b"], name="fill",
           value=numpy_helper.from_array(np.array([0.25], np.float32)))
    g.node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.node("Relu", ["c"], ["r"], name="relu")  # a run-time value read by the BN: not a root
    g.bn("bn", "r", 4, out="y")
    body = helper.make_graph([helper.make_node("Mul", ["y", "outer_gain"], ["z"], name="gain")], "body", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    g.init("outer_gain", rng.normal(size=(4, 1, 1)))
    g.node("If", ["cond"], ["out"], name="iff", then_branch=body, else_branch=body)
    graph = helper.make_graph(g.nodes, "g", [], [], g.inits)
    roots = constant_roots(graph, {"Conv", "BatchNormalization", "Mul"})
    assert roots == {"w_half", "b", "bn_gamma", "bn_beta", "bn_mean", "bn_var", "outer_gain"}
