"""BNs inside If/Loop/Scan bodies (parameters from outer-scope initializers) and inside model-local
functions fold; names stay unique across scopes; outer tensors still read elsewhere stay untouched."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import random_bn
from tests.helpers.onnx_fold_check import decisions, fold_verified, ort_session

F = TensorProto.FLOAT


def bn_inits(rng, prefix: str, c: int) -> tuple[list[str], list[onnx.TensorProto]]:
    st = random_bn(rng, c)
    ts = [numpy_helper.from_array(st[k].astype(np.float32), f"{prefix}_{k}") for k in ("gamma", "beta", "mean", "var")]
    return [t.name for t in ts], ts


def conv_bn_body(rng, name: str, x: str, w: str, c: int, outer_inits: list, out: str) -> onnx.GraphProto:
    """A branch graph: Conv(x, outer w) -> BN(outer params) -> out; reads only outer-scope values."""
    names, ts = bn_inits(rng, f"{name}_bn", c)
    outer_inits.extend(ts)
    nodes = [helper.make_node("Conv", [x, w], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", [f"{name}_c", *names], [out], name=f"{name}_bn")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, [1, c, 5, 5])])


def both_branches(original: onnx.ModelProto, folded: onnx.ModelProto, x_shape: list[int]) -> None:
    """Random feeds exercise one branch of an If; run both, against the unfolded model."""
    x = np.random.default_rng(5).normal(size=x_shape).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        for r, o in zip(ort_session(original).run(None, feeds), ort_session(folded).run(None, feeds)):
            np.testing.assert_allclose(o, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


def if_model(rng) -> onnx.ModelProto:
    inits: list = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
    then_g = conv_bn_body(rng, "then", "x", "w", 4, inits, "then_out")
    else_g = conv_bn_body(rng, "else", "x", "w", 4, inits, "else_out")
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
             # the main graph also reads w: the bodies must not edit it in place
             helper.make_node("Conv", ["x", "w"], ["z"], name="main_conv", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", F, [1, 3, 5, 5]),
                                              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 5, 5]),
                           helper.make_tensor_value_info("z", F, [1, 4, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_conv_bn_inside_if_branches_folds(rng):
    m = if_model(rng)
    res = fold_verified(m)
    assert decisions(res) == {"branch/then_branch/then_bn": "Conv->BN", "branch/else_branch/else_bn": "Conv->BN"}
    both_branches(m, res.model, [1, 3, 5, 5])
    # every name defined once across all scopes; the BN parameters nobody reads any more are gone
    defined = Counter()
    graphs = [res.model.graph] + [a.g for n in res.model.graph.node for a in n.attribute if a.type == a.GRAPH]
    for g in graphs:
        defined.update(t.name for t in g.initializer)
        defined.update(o for n in g.node for o in n.output)
    assert not [k for k, v in defined.items() if v > 1]
    assert not any(t.name.startswith(("then_bn", "else_bn")) for t in res.model.graph.initializer)
    w = next(t for t in res.model.graph.initializer if t.name == "w")
    assert numpy_helper.to_array(w).tobytes() == numpy_helper.to_array(m.graph.initializer[0]).tobytes()


def test_conv_bn_inside_loop_body_folds(rng):
    inits: list = [numpy_helper.from_array(rng.normal(0, 0.3, (3, 3, 3, 3)).astype(np.float32), "w"),
                   # several trips compound the rounding of the folded weights; the verifier's noise model
                   # nudges the outer weight the body reads, so its tolerance compounds the same way
                   numpy_helper.from_array(np.array(3, np.int64), "trips")]
    names, ts = bn_inits(rng, "loop_bn", 3)
    inits.extend(ts)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Conv", ["state", "w"], ["c"], name="loop_conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", *names], ["bn_y"], name="loop_bn"),
         helper.make_node("Tanh", ["bn_y"], ["state_out"], name="squash")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state", F, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("state_out", F, [1, 3, 4, 4])])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)
    g = helper.make_graph([loop], "loop_model", [helper.make_tensor_value_info("x", F, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", F, [1, 3, 4, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    assert decisions(res) == {"loop/body/loop_bn": "Conv->BN"}
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node[0].attribute[0].g.node)


def test_gemm_bn_inside_scan_body_folds(rng):
    inits: list = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 6)).astype(np.float32), "w")]
    names, ts = bn_inits(rng, "scan_bn", 6)
    inits.extend(ts)
    body = helper.make_graph(
        [helper.make_node("Gemm", ["x_t", "w"], ["h"], name="scan_gemm"),
         helper.make_node("BatchNormalization", ["h", *names], ["y_t"], name="scan_bn")],
        "scan_body", [helper.make_tensor_value_info("x_t", F, [2, 4])], [helper.make_tensor_value_info("y_t", F, [2, 6])])
    scan = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=1)
    g = helper.make_graph([scan], "scan_model", [helper.make_tensor_value_info("x", F, [5, 2, 4])],
                          [helper.make_tensor_value_info("y", F, [5, 2, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    assert decisions(res) == {"scan/body/scan_bn": "Gemm->BN"}
    assert [t.name for t in res.model.graph.initializer] == []  # w and the BN parameters moved into the body


def test_nested_if_inside_if(rng):
    inits: list = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")]
    inner_then = conv_bn_body(rng, "inner_then", "x", "w", 4, inits, "it_out")
    inner_else = conv_bn_body(rng, "inner_else", "x", "w", 4, inits, "ie_out")
    inner = helper.make_node("If", ["cond"], ["inner_y"], name="inner", then_branch=inner_then, else_branch=inner_else)
    outer_then = helper.make_graph([inner], "outer_then", [], [helper.make_tensor_value_info("inner_y", F, [1, 4, 5, 5])])
    outer_else = conv_bn_body(rng, "outer_else", "x", "w", 4, inits, "oe_out")
    node = helper.make_node("If", ["cond"], ["y"], name="outer", then_branch=outer_then, else_branch=outer_else)
    g = helper.make_graph([node], "nested", [helper.make_tensor_value_info("x", F, [1, 3, 5, 5]),
                                             helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 5, 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    assert set(decisions(res).values()) == {"Conv->BN"} and len(res.report.decisions) == 3
    assert "outer/then_branch/inner/then_branch/inner_then_bn" in decisions(res)
    assert [t.name for t in res.model.graph.initializer] == []  # every outer tensor now lives in a body
    both_branches(m, res.model, [1, 3, 5, 5])


def test_bn_inside_model_local_function_folds(rng):
    st = random_bn(rng, 4)
    const = lambda name, v: helper.make_node("Constant", [], [name], name=f"k_{name}",  # noqa: E731
                                            value=numpy_helper.from_array(np.asarray(v, np.float32)))
    fn_nodes = [const("w", rng.normal(0, 0.3, (4, 3, 3, 3))), const("b", rng.normal(0, 1, 4)),
                *(const(k, st[k]) for k in ("gamma", "beta", "mean", "var")),
                helper.make_node("Conv", ["inp", "w", "b"], ["c"], name="f_conv", pads=[1, 1, 1, 1]),
                helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["out"], name="f_bn",
                                 epsilon=1e-3)]
    fn = helper.make_function("local", "ConvBN", ["inp"], ["out"], fn_nodes, [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("ConvBN", ["x"], ["h"], name="call1", domain="local"),
                           helper.make_node("Relu", ["h"], ["y"], name="relu")], "fn_model",
                          [helper.make_tensor_value_info("x", F, [1, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 5, 5])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[fn])
    m.ir_version = 8
    res = fold_verified(m)
    assert decisions(res) == {"local.ConvBN/f_bn": "Conv->BN"}
    assert [n.op_type for n in res.model.functions[0].node].count("BatchNormalization") == 0
    assert [n.op_type for n in res.model.functions[0].node].count("Constant") == 2  # folded weight and bias


def test_bn_params_from_a_body_constant_subgraph(rng):
    # Loop-invariant parameters computed inside the body from outer constants (exporters emit this)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 1, 1)).astype(np.float32), "w")
    st = random_bn(rng, 4)
    outer = [w] + [numpy_helper.from_array(st[k].astype(np.float32), f"o_{k}") for k in ("gamma", "beta", "mean")]
    outer.append(numpy_helper.from_array(np.log(st["var"]).astype(np.float32), "log_var"))
    body = helper.make_graph(
        [helper.make_node("Exp", ["log_var"], ["var"], name="exp_var"),
         helper.make_node("Conv", ["x", "w"], ["c"], name="b_conv"),
         helper.make_node("BatchNormalization", ["c", "o_gamma", "o_beta", "o_mean", "var"], ["b_out"], name="b_bn")],
        "then", [], [helper.make_tensor_value_info("b_out", F, [1, 4, 5, 5])])
    other = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["e_out"], name="e_conv")], "else", [],
                              [helper.make_tensor_value_info("e_out", F, [1, 4, 5, 5])])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], name="iff", then_branch=body, else_branch=other)],
                          "m", [helper.make_tensor_value_info("x", F, [1, 3, 5, 5]),
                                helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", F, [1, 4, 5, 5])], outer)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    res = fold_verified(m)
    assert decisions(res) == {"iff/then_branch/b_bn": "Conv->BN"}
    both_branches(m, res.model, [1, 3, 5, 5])
