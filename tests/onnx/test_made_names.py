"""Names a fold makes (a weight written anew beside a shared one, a standalone BN's Mul/Add and their constants,
a bias Add after a layer) never equal a name the model already has, whatever holds that name: an initializer, a
graph input or output, a node's output or its name, a value_info entry, a value inside a body. Each model of the
fold corpus is folded once to learn the names its fold makes; then those names are planted in the model in
each role, and the fold of that model must make other ones and still agree with the original."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from tests.helpers.fold_corpus import CORPUS

ROLES = ("initializer", "graph_input", "graph_output", "node_output", "node_name", "value_info", "body_value")


def _values(g: onnx.GraphProto) -> list[str]:
    """Every value name a graph defines, its bodies' too (duplicates kept; an initializer that is also declared
    as an input, as before IR 4, once)."""
    inits = [t.name for t in g.initializer]
    out = inits + [v.name for v in g.input if v.name not in set(inits)]
    for n in g.node:
        out += [o for o in n.output if o]
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out += _values(sub)
    return out


def _node_names(g: onnx.GraphProto) -> list[str]:
    return [n.name for n in g.node if n.name]


def _fold(model: onnx.ModelProto, standalone: str) -> onnx.ModelProto:
    res = bnfold.fold(model, verify=False, standalone=standalone)
    return res.model


def _plant(model: onnx.ModelProto, name: str, role: str) -> onnx.ModelProto:
    """`model` with `name` taken by `role` (a value nothing else reads, or a node's name)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    f = numpy_helper.from_array(np.ones(3, np.float32), name)
    vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, [3])
    def add_init(t: onnx.TensorProto) -> None:
        g.initializer.append(t)
        if m.ir_version < 4:  # (every initializer is a graph input too)
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))

    if role == "initializer":
        add_init(f)
    elif role == "graph_input":
        g.input.append(vi)
    elif role in ("graph_output", "node_output"):
        g.node.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.ones(3, np.float32))))
        if role == "graph_output":
            g.output.append(vi)
    elif role == "node_name":
        g.node.append(helper.make_node("Constant", [], [f"{name}_v"], name=name,
                                       value=numpy_helper.from_array(np.ones(3, np.float32))))
    elif role == "value_info":
        g.node.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.ones(3, np.float32))))
        g.value_info.append(vi)
    else:  # a value inside an If body
        cond = f"{name}_cond"
        add_init(numpy_helper.from_array(np.array(True), cond))
        body = lambda tag: helper.make_graph(  # noqa: E731
            [helper.make_node("Constant", [], [name if tag == "then" else f"{name}_else"],
                              value=numpy_helper.from_array(np.ones(3, np.float32)))], tag, [],
            [helper.make_tensor_value_info(name if tag == "then" else f"{name}_else", TensorProto.FLOAT, [3])])
        g.node.append(helper.make_node("If", [cond], [f"{name}_if"], then_branch=body("then"), else_branch=body("else")))
    return m


def _runs_alike(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # (the planted values nobody reads draw a warning each)
    try:
        sa = ort.InferenceSession(a.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.Fail):
        return  # (float64 convs, repeated node names: the original itself does not run here)
    sb = ort.InferenceSession(b.SerializeToString(), so, providers=["CPUExecutionProvider"])
    inits = {t.name for t in a.graph.initializer}
    feeds = {**{i.name: np.ones(3, np.float32) for i in a.graph.input if i.name not in inits}, **feeds}
    outs = [o.name for o in a.graph.output]
    for x, y in zip(sa.run(outs, feeds), sb.run(outs, feeds)):
        tol = 1e-2 if x.dtype == np.float16 else 1e-4
        np.testing.assert_allclose(y.astype(np.float64), x.astype(np.float64), rtol=tol, atol=tol)


CASES = [(name, standalone) for name in sorted(CORPUS) for standalone in ("keep", "affine")]


def _check(name: str, standalone: str) -> bool:
    """Plant the names the fold of CORPUS[name] makes in each role, fold again, check; False: it makes none."""
    model, feeds = CORPUS[name](7)
    before_values, before_nodes = set(_values(model.graph)), set(_node_names(model.graph))
    folded = _fold(model, standalone)
    made = (set(_values(folded.graph)) - before_values) | (set(_node_names(folded.graph)) - before_nodes)
    if not made:
        return False
    for role in ROLES:
        planted = model
        for new in sorted(made):
            planted = _plant(planted, new, role)
        taken_values, taken_nodes = set(_values(planted.graph)), set(_node_names(planted.graph))
        out = _fold(planted, standalone)
        values = _values(out.graph)
        where = (name, standalone, role)
        assert len(values) == len(set(values)), (where, sorted(v for v in set(values) if values.count(v) > 1))
        made_now = (set(values) - taken_values) | (set(_node_names(out.graph)) - taken_nodes)
        assert made_now and not made_now & (taken_values | taken_nodes), (where, made_now)
        onnx.checker.check_model(out, full_check=True)
        _runs_alike(planted, out, feeds)
    return True


@pytest.mark.parametrize("standalone", ["keep", "affine"])
def test_made_names_avoid_every_name_the_model_has(standalone):
    making = [name for name in sorted(CORPUS) if _check(name, standalone)]
    assert len(making) >= 20, making  # (new biases, weights beside shared ones, affine BNs, bodies...)
