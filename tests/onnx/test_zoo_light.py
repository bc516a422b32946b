"""Real architectures whose parameters are not plain initializers, as in the ONNX model zoo's "light"
models (every weight a ConstantOfShape output) and in deduplicating / fp16-storing exporters
(Constant -> Identity chains, Cast). Every BN that follows a conv must fold, verified numerically."""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.onnx_fold_check import fold_verified
from tests.helpers.zoo_torch import build, example_input

LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def export(name: str) -> onnx.ModelProto:
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build(name, seed=7), (example_input(name),), buf, dynamo=False, opset_version=17,
                          do_constant_folding=False, input_names=["input"], output_names=["output"])
    return onnx.load_from_string(buf.getvalue())


def bns_after_a_conv(model: onnx.ModelProto) -> set[str]:
    producer = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outs = {o.name for o in model.graph.output}
    return {n.name for n in model.graph.node if n.op_type == "BatchNormalization"
            and getattr(producer.get(n.input[0]), "op_type", None) == "Conv"
            and uses.get(n.input[0]) == 1 and n.input[0] not in outs}


def lighten(model: onnx.ModelProto, form: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Move every float initializer out of the initializer list, into nodes that compute it; also
    return the plain twin: the same function with those values as ordinary initializers.

    constant_of_shape: layer weights become ConstantOfShape(Constant shape) with one random fill value
    each (the zoo's light form); BN statistics stay random, as Constant -> Identity.
    constant_identity_cast: every tensor keeps its values, stored fp16 -> Cast, or Constant -> Identity.
    """
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    m, twin = onnx.ModelProto(), onnx.ModelProto()
    m.CopyFrom(model)
    twin.CopyFrom(model)
    made: list[onnx.NodeProto] = []
    keep: list[onnx.TensorProto] = []
    for k, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype != np.float32:
            keep.append(t)
            continue
        name = t.name
        if form == "constant_of_shape" and readers.get(name, set()) & LAYER_OPS:
            shape = helper.make_node("Constant", [], [f"{name}__shape"], value=numpy_helper.from_array(
                np.array(a.shape, np.int64)))
            value = np.float32(rng.normal(0, 0.2))
            fill = numpy_helper.from_array(np.array([value], np.float32))
            made += [shape, helper.make_node("ConstantOfShape", [f"{name}__shape"], [name], value=fill)]
            twin.graph.initializer[k].CopyFrom(numpy_helper.from_array(np.full(a.shape, value, np.float32), name))
        elif form == "constant_identity_cast" and k % 2:
            made += [helper.make_node("Constant", [], [f"{name}__h"], value=numpy_helper.from_array(a.astype(np.float16))),
                     helper.make_node("Cast", [f"{name}__h"], [name], to=TensorProto.FLOAT)]
            twin.graph.initializer[k].CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), name))
        else:
            made += [helper.make_node("Constant", [], [f"{name}__c"], value=numpy_helper.from_array(a)),
                     helper.make_node("Identity", [f"{name}__c"], [name])]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    nodes = made + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    return m, twin


@pytest.mark.parametrize("form", ["constant_of_shape", "constant_identity_cast"])
@pytest.mark.parametrize("name", ["googlenet", "densenet", "resnet_bottleneck", "shufflenet_v2"])
def test_light_zoo_models_fold_every_bn_after_a_conv(name, form):
    exported = export(name)
    want = bns_after_a_conv(exported)
    assert want, "the export has BNs after convs"
    light, twin = lighten(exported, form, np.random.default_rng(11))
    assert not [t for t in light.graph.initializer if t.data_type == TensorProto.FLOAT]
    res = fold_verified(light, reference=twin)
    folded = {d.bn for d in res.report.folded}
    assert want <= folded, sorted(want - folded)
    # the computed constants that only fed folded parameters are gone; no BN after a conv remains
    left = {n.name for n in res.model.graph.node if n.op_type == "BatchNormalization"}
    assert not (left & want)
    if form == "constant_of_shape":
        count = lambda m: sum(n.op_type == "ConstantOfShape" for n in m.graph.node)  # noqa: E731
        assert count(res.model) <= count(light) - len(want)
