"""Adversarial ONNX graph shapes: names, fan-out, BN chains, outputs, shared and computed weights,
scopes (local functions, If branches), metadata/value_info, and real exporters (TorchScript at old and
new opsets, dynamo with optimize=False). Each fold ends in an onnxruntime run against the original."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function, decisions, fold_verified, ops, ort_session, Reason
from tests.onnx.test_edge import _shape_clean, mk


def test_empty_node_names(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (4, 2, 3, 3))], ["c1"], pads=[1, 1, 1, 1])
    g.bn("bnA", "c1", 4, out="b1")
    g.node("Conv", ["b1", g.weight("w2", (4, 4, 3, 3))], ["c2"], pads=[1, 1, 1, 1])
    g.bn("bnB", "c2", 4, out="y")
    for n in g.nodes:
        n.name = ""
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 6, 6])]))
    assert len(res.report.folded) == 2 and not res.report.skipped
    assert len({d.bn for d in res.report.decisions}) == 2, "two anonymous BNs need two distinct labels"


def test_duplicate_node_names_fold_by_node_not_by_name(rng):
    # onnxruntime refuses duplicate node names, so fold unverified and rename afterwards to run both.
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (4, 2, 3, 3))], ["c1"], name="dup", pads=[1, 1, 1, 1])
    g.bn("dup", "c1", 4, out="b1")
    g.node("Conv", ["b1", g.weight("w2", (4, 4, 3, 3))], ["c2"], name="dup", pads=[1, 1, 1, 1])
    g.bn("dup", "c2", 4, out="y")
    m = mk(g, [("x", [1, 2, 6, 6])], [("y", [1, 4, 6, 6])])
    res = bnfold.fold(m, verify=False)
    assert len(res.report.folded) == 2 and not res.report.skipped
    assert ops(res.model) == ["Conv", "Conv"]
    for model in (m, res.model):
        for i, n in enumerate(model.graph.node):
            n.name = f"n{i}"
    assert_same_function(m, res.model)


def test_two_bns_on_one_conv_output(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn1", "c", 4, out="y1")
    g.bn("bn2", "c", 4, out="y2")
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y1", None), ("y2", None)]))
    assert decisions(res) == {"bn1": Reason.PRODUCER_FANOUT, "bn2": Reason.PRODUCER_FANOUT}


def test_bn_chain_folds_both(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn1", "c", 4)
    g.bn("bn2", "bn1_out", 4, out="y")
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn1": "Conv->BN", "bn2": "Conv->BN"}
    assert ops(res.model) == ["Conv"]


def test_bn_output_is_graph_output_keeps_its_name(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 2, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="logits")
    g.node("Relu", ["logits"], ["r"])
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("logits", None), ("r", None)]))
    assert res.model.graph.node[0].output[0] == "logits"


def test_shared_weight_is_copied_on_write(rng):
    g = G(rng)
    w = g.weight("w", (4, 4, 3, 3))
    g.node("Conv", ["x", w], ["c1"], pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 4)
    g.node("Conv", ["bn1_out", w], ["c2"], pads=[1, 1, 1, 1])
    g.bn("bn2", "c2", 4)
    g.node("Conv", ["bn2_out", w], ["y"], pads=[1, 1, 1, 1])  # a third reader without BN
    res = fold_verified(mk(g, [("x", [1, 4, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn1": "Conv->BN", "bn2": "Conv->BN"}
    last = res.model.graph.node[-1]
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    np.testing.assert_array_equal(inits[last.input[1]], numpy_helper.to_array(g.inits[0]))


def test_weight_from_constant_node(rng):
    g = G(rng)
    wv = rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32)
    g.nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(wv, "wv")))
    g.node("Conv", ["x", "w"], ["c"])
    g.bn("bn", "c", 4, out="y")
    res = fold_verified(mk(g, [("x", [1, 2, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn": "Conv->BN"} and "Constant" not in ops(res.model)


def test_constant_weight_shared_by_two_convs(rng):
    g = G(rng)
    wv = rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32)
    g.nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(wv, "wv")))
    g.node("Conv", ["x", "w"], ["c1"], pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 4)
    g.node("Conv", ["bn1_out", "w"], ["y"], pads=[1, 1, 1, 1])
    res = fold_verified(mk(g, [("x", [1, 4, 6, 6])], [("y", None)]), reference=None)
    assert decisions(res) == {"bn1": "Conv->BN"}


def test_dynamic_and_symbolic_dims(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y")
    m = mk(g, [("x", ["N", 3, "H", "W"])], [("y", ["N", 4, "H", "W"])])
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN"}
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_metadata_doc_producer_kept(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    m = mk(g, [("x", [1, 3, 5, 5])], [("y", None)])
    m.doc_string, m.producer_version, m.domain, m.model_version = "docs", "9.9", "org.test", 42
    m.graph.doc_string = "graph doc"
    helper.set_model_props(m, {"author": "me", "license": "x"})
    res = fold_verified(m)
    r = res.model
    assert (r.doc_string, r.producer_name, r.producer_version, r.domain, r.model_version) == \
        ("docs", "bnfold-tests", "9.9", "org.test", 42)
    assert r.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in r.metadata_props} == {"author": "me", "license": "x"}


def test_value_info_stays_consistent(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4)
    g.node("Relu", ["bn_out"], ["r"])
    g.node("Gemm", ["r2", g.weight("fw", (64, 5))], ["f"])
    g.nodes.insert(len(g.nodes) - 1, helper.make_node("Flatten", ["r"], ["r2"], name="flat"))
    g.bn("bn2", "f", 5, out="y")
    m = onnx.shape_inference.infer_shapes(mk(g, [("x", [1, 3, 4, 4])], [("y", [1, 5])]))
    assert len(m.graph.value_info) >= 4
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN", "bn2": "Gemm->BN"}
    _shape_clean(res.model)
    produced = {o for n in res.model.graph.node for o in n.output}
    assert {v.name for v in res.model.graph.value_info} <= produced


def test_weight_that_is_also_a_graph_output_keeps_its_value(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    m = mk(g, [("x", [1, 3, 6, 6])], [("y", None)])
    m.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    res = fold_verified(m)
    assert decisions(res) == {"bn": "Conv->BN"}
    w_out = ort_session(res.model).run(["w"], {"x": np.zeros((1, 3, 6, 6), np.float32)})[0]
    np.testing.assert_array_equal(w_out, numpy_helper.to_array(g.inits[0]))


def test_conv_bias_shared_with_bn_beta_and_another_conv(rng):
    from tests.conftest import random_bn
    g = G(rng)
    st = random_bn(rng, 4)
    b = g.init("shared", st["beta"])
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3)), b], ["c"], pads=[1, 1, 1, 1])
    g.node("BatchNormalization", ["c", g.init("g", st["gamma"]), b, g.init("m", st["mean"]), g.init("v", st["var"])],
           ["h"], name="bn")
    g.node("Conv", ["h", g.weight("w2", (4, 4, 3, 3)), b], ["y"], pads=[1, 1, 1, 1])
    res = fold_verified(mk(g, [("x", [1, 3, 6, 6])], [("y", None)]))
    assert decisions(res) == {"bn": "Conv->BN"}


def test_two_bns_sharing_parameters_one_also_an_output(rng):
    from tests.conftest import random_bn
    g = G(rng)
    st = random_bn(rng, 4)
    p = [g.init(k, st[k]) for k in ("gamma", "beta", "mean", "var")]
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c1"], pads=[1, 1, 1, 1])
    g.node("BatchNormalization", ["c1"] + p, ["b1"], name="bn1")
    g.node("Conv", ["b1", g.weight("w2", (4, 4, 3, 3))], ["c2"], pads=[1, 1, 1, 1])
    g.node("BatchNormalization", ["c2"] + p, ["y"], name="bn2")
    m = mk(g, [("x", [1, 3, 6, 6])], [("y", None)])
    m.graph.output.append(helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [4]))
    res = fold_verified(m)
    assert decisions(res) == {"bn1": "Conv->BN", "bn2": "Conv->BN"}


def test_bn_inside_a_local_function_gets_a_decision(rng):
    from tests.conftest import random_bn
    st = random_bn(rng, 4)
    body = [helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="fbn")]
    f = helper.make_function("local", "ConvBN", ["x", "w", "g", "b", "m", "v"], ["y"], body,
                             [helper.make_opsetid("", 17)])
    g = G(rng)
    ins = ["x", g.weight("w", (4, 3, 3, 3))] + [g.init(k, st[k]) for k in ("gamma", "beta", "mean", "var")]
    g.nodes.append(helper.make_node("ConvBN", ins, ["y"], domain="local", name="call"))
    m = g.model([("x", [1, 3, 6, 6])], [("y", [1, 4, 4, 4])])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(f)
    res = bnfold.fold(m)
    assert len(res.report.decisions) == 1 and res.report.verification.passed is True
    assert_same_function(m, res.model)


_DYNAMO_CACHE: dict[str, onnx.ModelProto] = {}


def dynamo_export(name: str) -> onnx.ModelProto:
    """torch.onnx.export(dynamo=True, optimize=False): BN stays BatchNormalization, no training_mode attr."""
    if name not in _DYNAMO_CACHE:
        import contextlib
        import io
        import warnings
        import torch
        from tests.helpers.zoo_torch import build, example_input
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(build(name, seed=3), (example_input(name),), dynamo=True, optimize=False,
                                     input_names=["x"], output_names=["y"])
        _DYNAMO_CACHE[name] = prog.model_proto
    return _DYNAMO_CACHE[name]


@pytest.mark.parametrize("name", ["vgg_bn", "mlp"])
def test_dynamo_export_with_biased_layers_folds_every_bn(name):
    m = dynamo_export(name)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert n_bn > 0
    res = fold_verified(m)
    assert len(res.report.folded) == n_bn and not res.report.skipped
    assert "BatchNormalization" not in ops(res.model)


def _branch(rng, name: str, with_bn: bool) -> onnx.GraphProto:
    from tests.conftest import random_bn
    nodes = [helper.make_node("Conv", ["x", "w"], [f"{name}_c"], pads=[1, 1, 1, 1], name=f"{name}_conv")]
    inits, out = [], f"{name}_c"
    if with_bn:
        st = random_bn(rng, 4)
        keys = ("gamma", "beta", "mean", "var")
        inits = [numpy_helper.from_array(st[k].astype(np.float32), f"{name}_{k}") for k in keys]
        nodes.append(helper.make_node("BatchNormalization", [out] + [f"{name}_{k}" for k in keys], [f"{name}_o"],
                                      name=f"{name}_bn"))
        out = f"{name}_o"
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("main_bn", [True, False])
def test_outer_weight_shared_by_main_graph_and_if_branches(rng, main_bn):
    # "w" is read by the main conv and, from the outer scope, by both branches: a fold in one scope
    # must leave every other reader with the original weight.
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 4, 3, 3))], ["c"], pads=[1, 1, 1, 1], name="main_conv")
    main_out = g.bn("bn", "c", 4) if main_bn else "c"
    g.nodes.append(helper.make_node("If", ["cond"], ["yi"], then_branch=_branch(rng, "then", True),
                                    else_branch=_branch(rng, "else", False), name="if"))
    g.node("Add", [main_out, "yi"], ["y"])
    m = g.model([("x", [1, 4, 5, 5])], [("y", [1, 4, 5, 5])])
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    res = bnfold.fold(m)
    assert len(res.report.folded) == (2 if main_bn else 1) and not res.report.skipped
    assert res.report.verification.passed is True
    for cond in (True, False):  # the verifier's random inputs take one branch; check both
        feeds = {"x": rng.normal(size=(1, 4, 5, 5)).astype(np.float32), "cond": np.array(cond)}
        ref, out = ort_session(m).run(None, feeds)[0], ort_session(res.model).run(None, feeds)[0]
        assert np.abs(ref - out).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("opset", [9, 21])
@pytest.mark.parametrize("name", ["resnext", "decoder"])
def test_torchscript_export_at_old_and_new_opsets(name, opset):
    import contextlib
    import io
    import warnings
    import torch
    from tests.helpers.zoo_torch import build, example_input
    buf = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(build(name, seed=1), (example_input(name),), buf, dynamo=False, opset_version=opset,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL, input_names=["x"],
                          output_names=["y"])
    m = onnx.load_from_string(buf.getvalue())
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    res = fold_verified(m)
    assert n_bn > 0 and len(res.report.folded) == n_bn
