"""needs_shapes asked with the main graph's index (its BNs and their producers looked up, no walk) answers what
its walk over the graph answers, on every shape of graph the fold corpus holds and on graphs built to hit
each of its conditions."""
from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.nodes import model_opset
from bnfold.onnx.shapes import needs_shapes
from tests.helpers.fold_corpus import CORPUS


def _both(model) -> tuple[bool, bool]:
    ix = GraphIndex.build(model.graph, model.ir_version, None, model_opset(model))
    return needs_shapes(model, ix), needs_shapes(model)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_needs_shapes_of_the_index_is_the_walks(name):
    model = CORPUS[name](3)[0]
    indexed, walked = _both(model)
    assert indexed == walked


def _vi(name):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 3, 3])


def _conv_bn(tail, *, conv="Conv", bn_input="c", extra_reader=False, output_c=False, bn_first_empty=False):
    """x -> conv -> c -> BN -> y (weights as graph inputs: needs_shapes reads no tensor), then `tail` more
    Conv->BN pairs, the variation on the last pair."""
    nodes, outs = [], []
    prev = "x"
    for k in range(tail + 1):
        c, y = f"c{k}", f"y{k}"
        last = k == tail
        nodes.append(helper.make_node(conv if last else "Conv", [prev, f"w{k}"], [c]))
        ins = [(bn_input if bn_input != "c" else c) if last else c, f"g{k}", f"b{k}", f"m{k}", f"v{k}"]
        if last and bn_first_empty:
            ins[0] = ""
        nodes.append(helper.make_node("BatchNormalization", ins, [y]))
        if last and extra_reader:
            nodes.append(helper.make_node("Relu", [c], ["r"]))
            outs.append(_vi("r"))
        if last and output_c:
            outs.append(_vi(c))
        prev = y
    inputs = [_vi("x")] + [_vi(f"{p}{k}") for k in range(tail + 1) for p in "wgbmv"]
    return helper.make_model(helper.make_graph(nodes, "g", inputs + [_vi("q")], [_vi(prev)] + outs),
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", [
    {}, {"conv": "ConvTranspose"}, {"conv": "MatMul"}, {"bn_input": "q"}, {"bn_input": "nowhere"},
    {"extra_reader": True}, {"output_c": True}, {"bn_first_empty": True}])
@pytest.mark.parametrize("tail", [0, 3])
def test_needs_shapes_on_each_condition(case, tail):
    indexed, walked = _both(_conv_bn(tail, **case))
    assert indexed == walked
    assert walked == (case not in ({}, {"conv": "ConvTranspose"})), case
