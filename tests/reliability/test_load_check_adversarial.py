"""The two load-time checks of load_onnx give one verdict: a model of many initializers has its file's bytes
checked by onnx's checker (validity.passes_checker), a smaller one its structure (protos.structure_only); on
every kind of model below both accept or both refuse it, with the same one-line message naming the file.

(The checker once ran in a forked child beside the size check; adversarial tests found that a parent
ignoring SIGCHLD, an interrupt as the child ended, a killed parent or faulthandler in the child each broke
something, for ~0.3 s on a 32k-pair chain: the check runs in this process again.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold.onnx.io as onnx_io
from bnfold.core.errors import BnfoldError
from tests.conftest import random_bn


T = onnx.TensorProto
BIG = onnx_io.STRUCTURE_CHECK_MAX + 37  # initializers: the real many-initializer path, no threshold patched


# -- models ---------------------------------------------------------------------------------------

def conv_bn(seed: int = 0, extra: int = 0) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu (statistics far from the defaults), plus `extra` unused
    one-value initializers (a model over the threshold without a graph that large)."""
    rng = np.random.default_rng(seed)
    st = random_bn(rng, 6)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 6).astype(np.float32), "b")]
    inits += [numpy_helper.from_array(st[k].astype(np.float32), f"bn_{k}") for k in ("gamma", "beta", "mean", "var")]
    inits += [numpy_helper.from_array(np.array([i], np.float32), f"pad{i}") for i in range(extra)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 6, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    m.ir_version = 8
    return m


def variant(kind: str, extra: int = 0) -> onnx.ModelProto:
    m = conv_bn(extra=extra)
    g = m.graph
    if kind == "unknown_op":
        g.node[2].op_type = "NoSuchOp"
    elif kind == "bad_attr_type":
        del g.node[0].attribute[:]
        g.node[0].attribute.append(helper.make_attribute("pads", 1.5))  # a float where ints belong
    elif kind == "dup_output":
        g.node[2].output[0] = "n"  # Relu writes the tensor BatchNormalization wrote
        g.output[0].name = "n"
    elif kind == "not_topological":
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(reversed(nodes))
    elif kind in ("corrupt", "corrupt_and_unknown_op"):
        g.initializer[0].raw_data = g.initializer[0].raw_data[:-4]  # one float short of its dims
        if kind == "corrupt_and_unknown_op":
            g.node[2].op_type = "NoSuchOp"
    elif kind == "negative_dim":
        g.initializer[1].dims[0] = -6
    elif kind == "ir3_initializer_not_input":  # the byte check refuses it, the structure check accepts it
        m.ir_version = 3
        del m.opset_import[:]
        m.opset_import.append(helper.make_opsetid("", 7))
        g.node[1].attribute.append(helper.make_attribute("momentum", 0.9))
    elif kind == "sparse_initializer":  # the Conv's bias as a sparse initializer: a dense one fewer
        b = numpy_helper.to_array(g.initializer[1])
        del g.initializer[1]
        g.sparse_initializer.append(helper.make_sparse_tensor(
            numpy_helper.from_array(b, "b"), numpy_helper.from_array(np.arange(6, dtype=np.int64), "b_idx"), [6]))
    elif kind == "ir_too_new":
        m.ir_version = 99
    elif kind == "duplicate_function":
        fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        m.functions.extend([fn, fn])
    elif kind == "custom_domain_without_opset":
        g.node[2].domain = "com.example"
    elif kind == "bad_training_info":  # the structure check never looked at it: accepted, as always
        m.training_info.add().algorithm.node.add(op_type="NoSuchOp")
    elif kind == "unknown_data_type":
        g.initializer[1].data_type = 99
    elif kind == "tensor_attribute_on_conv":  # no schema allows it (the size check skips such attributes)
        bad = numpy_helper.from_array(np.ones((2, 3), np.float32), "t")
        bad.raw_data = bad.raw_data[:-4]
        g.node[0].attribute.append(helper.make_attribute("extra", bad))
    elif kind == "corrupt_constant":  # a Constant's value one float short: the size check reads it
        bad = numpy_helper.from_array(np.ones((2, 3), np.float32), "t")
        bad.raw_data = bad.raw_data[:-4]
        g.node.insert(0, helper.make_node("Constant", [], ["unused"], value=bad))
    elif kind == "duplicate_metadata":
        helper.set_model_props(m, {"k": "1"})
        m.metadata_props.add(key="k", value="2")
    else:
        assert kind == "good", kind
    return m


KINDS = ["good", "unknown_op", "bad_attr_type", "dup_output", "not_topological", "corrupt",
         "corrupt_and_unknown_op", "negative_dim", "ir3_initializer_not_input", "duplicate_metadata", "ir_too_new",
         "duplicate_function", "custom_domain_without_opset", "bad_training_info", "tensor_attribute_on_conv",
         "corrupt_constant"]


def outcome(path: Path, threshold: int, monkeypatch) -> tuple[str, object]:
    """("ok", the model's bytes) or ("error", the message): load_onnx with STRUCTURE_CHECK_MAX `threshold`."""
    monkeypatch.setattr(onnx_io, "STRUCTURE_CHECK_MAX", threshold)
    try:
        return "ok", onnx_io.load_onnx(str(path)).SerializeToString()
    except BnfoldError as e:
        return "error", str(e)


# -- verdicts and messages: the check of the bytes against the structure check ----------------------

@pytest.mark.parametrize("kind", KINDS)
def test_the_check_of_the_bytes_gives_the_structure_checks_verdict_and_message(kind, tmp_path, monkeypatch):
    path = tmp_path / f"{kind}.onnx"
    onnx.save(variant(kind), str(path))
    before = outcome(path, 10 ** 9, monkeypatch)  # the structure check, as bnfold always judged
    after = outcome(path, 0, monkeypatch)  # the checker on the file's bytes first
    assert after == before
    if kind in ("good", "ir3_initializer_not_input", "duplicate_metadata", "bad_training_info"):
        assert before[0] == "ok"
    else:
        assert before[0] == "error" and str(path) in before[1] and "\n" not in before[1], before


def test_a_sparse_initializer_gets_the_same_verdict_on_both_paths(tmp_path, monkeypatch):
    path = tmp_path / "sparse.onnx"
    onnx.save(variant("sparse_initializer"), str(path))
    before = outcome(path, 10 ** 9, monkeypatch)
    after = outcome(path, 0, monkeypatch)
    assert before[0] == "ok", before  # a sparse initializer is an initializer like any other
    assert after == before


@pytest.mark.parametrize("threshold", [10 ** 9, 0])
def test_an_unknown_tensor_data_type_is_a_clear_error(threshold, tmp_path, monkeypatch):
    path = tmp_path / "dtype.onnx"
    onnx.save(variant("unknown_data_type"), str(path))
    got = outcome(path, threshold, monkeypatch)
    assert got[0] == "error" and str(path) in got[1]


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> dict[str, Path]:
    """Real models over the threshold (no patched constant): their bytes are checked by themselves."""
    root = tmp_path_factory.mktemp("big")
    out = {}
    for kind in ("good", "unknown_op", "corrupt", "sparse_initializer"):
        m = variant(kind, extra=BIG)
        assert len(m.graph.initializer) > onnx_io.STRUCTURE_CHECK_MAX
        out[kind] = root / f"big_{kind}.onnx"
        onnx.save(m, str(out[kind]))
    return out


@pytest.mark.parametrize("kind", ["good", "unknown_op", "corrupt"])
def test_a_real_many_initializer_model_keeps_its_verdict(kind, big_models, tmp_path, monkeypatch):
    path = big_models[kind]
    after = outcome(path, onnx_io.STRUCTURE_CHECK_MAX, monkeypatch)  # (the unpatched threshold: the bytes' check)
    assert after == outcome(path, 10 ** 9, monkeypatch)
    assert after[0] == ("ok" if kind == "good" else "error")


def test_a_real_many_initializer_model_with_a_sparse_initializer_keeps_its_verdict(big_models, monkeypatch):
    path = big_models["sparse_initializer"]
    assert outcome(path, onnx_io.STRUCTURE_CHECK_MAX, monkeypatch) == outcome(path, 10 ** 9, monkeypatch)
