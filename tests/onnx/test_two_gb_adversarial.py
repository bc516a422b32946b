"""Adversarial tests of the 2 GB save path: every file save_onnx writes loads back (load_onnx, onnx.load with its
external data), or the save raises a one-line BnfoldError and leaves the folder as it was.

Most models here declare their sizes in tensor headers only (over_two_gb reads headers, never data). Three tests
hold real data (up to ~2.2 GB, one at a time) where only an encoding can show the failure."""
from __future__ import annotations

import gc
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.core.errors import BnfoldError
from bnfold.onnx.io import load_onnx, save_onnx
from bnfold.onnx.ondisk import TWO_GB, over_two_gb

GB_FLOATS = (1 << 30) // 4  # float32 elements in 1 GiB
OVER = 2 * GB_FLOATS + 1  # float32 elements: just over 2 GiB
UNDER = GB_FLOATS  # 1 GiB


def _header(name: str, elements: int, dtype: int = TensorProto.FLOAT) -> onnx.TensorProto:
    t = TensorProto(name=name, data_type=dtype)
    t.dims.append(elements)
    return t


def _sparse(elements: int) -> onnx.SparseTensorProto:
    sp = onnx.SparseTensorProto()
    sp.values.CopyFrom(_header("sv", elements))
    sp.indices.CopyFrom(_header("", 1, TensorProto.INT64))  # (header only: the values carry the size)
    sp.dims.append(elements)
    return sp


_VI = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)


def _body(nodes, inits=()) -> onnx.GraphProto:
    return helper.make_graph(nodes, "b", [], [_VI], list(inits))


def _model(nodes, inits=(), functions=()) -> onnx.ModelProto:
    g = helper.make_graph(list(nodes), "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones(4, np.float32), "w"), *inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1),
                                                 helper.make_opsetid("com.example", 1)], functions=list(functions))


def _where(where: str, elements: int) -> onnx.ModelProto:
    """A model holding one big header-only tensor at `where` (a place tensor_groups should walk)."""
    ident = helper.make_node("Identity", ["w"], ["y"])
    if where == "constant_sparse_value":
        return _model([ident, helper.make_node("Constant", [], ["k"], sparse_value=_sparse(elements))])
    if where == "tensors_list":
        return _model([ident, helper.make_node("Custom", ["w"], ["u"], domain="com.example",
                                               tables=[_header("", elements // 2), _header("", elements - elements // 2)])])
    if where == "sparse_tensors_attr":
        a = onnx.AttributeProto(name="tabs", type=onnx.AttributeProto.SPARSE_TENSORS)
        a.sparse_tensors.append(_sparse(elements))
        n = helper.make_node("Custom", ["w"], ["u"], domain="com.example")
        n.attribute.append(a)
        return _model([ident, n])
    if where == "loop_in_if_in_loop":
        inner = _body([helper.make_node("Constant", [], ["o"], value=_header("", elements))])
        loop = helper.make_node("Loop", ["", ""], ["o"], body=inner)
        iff = helper.make_node("If", ["c"], ["o"], then_branch=_body([loop]),
                               else_branch=_body([helper.make_node("Identity", ["w"], ["o"])]))
        outer = helper.make_node("Loop", ["", ""], ["z"], body=_body([iff]))
        return _model([ident, outer], [numpy_helper.from_array(np.array(True), "c")])
    if where == "scan_body_initializer":
        body = _body([helper.make_node("Identity", ["bb"], ["o"])], [_header("bb", elements)])
        return _model([ident, helper.make_node("Scan", ["w"], ["z"], body=body, num_scan_inputs=1)])
    if where == "function_attribute_default":
        f = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                 [helper.make_opsetid("", 17)], attributes=[])
        f.attribute_proto.append(helper.make_attribute("table", _header("", elements)))
        return _model([ident, helper.make_node("F", ["w"], ["f"], domain="local")], functions=[f])
    if where == "function_nested_body":
        inner = _body([helper.make_node("Constant", [], ["o"], value=_header("", elements))])
        f = helper.make_function("local", "F", ["a"], ["b"], [
            helper.make_node("If", ["a"], ["b"], then_branch=inner,
                             else_branch=_body([helper.make_node("Identity", ["a"], ["o"])]))],
            [helper.make_opsetid("", 17)])
        return _model([ident, helper.make_node("F", ["w"], ["f"], domain="local")], functions=[f])
    if where == "body_sparse_initializer":
        body = _body([helper.make_node("Identity", ["sv"], ["o"])])
        body.sparse_initializer.append(_sparse(elements))
        other = _body([helper.make_node("Identity", ["w"], ["o"])])
        return _model([ident, helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=other)],
                      [numpy_helper.from_array(np.array(True), "c")])
    if where == "int4_initializer":  # packed: two elements a byte
        return _model([ident], [_header("q", 2 * (elements * 4) + 2, TensorProto.INT4)])
    raise AssertionError(where)


PLACES = ["constant_sparse_value", "tensors_list", "sparse_tensors_attr", "loop_in_if_in_loop", "scan_body_initializer",
          "function_attribute_default", "function_nested_body", "body_sparse_initializer", "int4_initializer"]


@pytest.mark.parametrize("where", PLACES)
def test_header_counts_in_every_place(where):
    assert over_two_gb(_where(where, OVER))
    assert not over_two_gb(_where(where, UNDER))


# (training_info's graphs count toward the 2 GB too)
def test_training_info_counts_too():
    """training_info's initialization graph holds initializers like any other graph, and the model's encoding
    carries them."""
    m = _model([helper.make_node("Identity", ["w"], ["y"])])
    m.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], [], [_header("t0", OVER)]))
    assert over_two_gb(m)


def _tiny_float_model():
    w = numpy_helper.from_array(np.random.default_rng(0).random(2048).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Add", ["w", "w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2048])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


# (a save with external data writes each sparse initializer once)
def test_sparse_initializer_survives_external_save(tmp_path):
    m = _tiny_float_model()
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp"),
                                   numpy_helper.from_array(np.array([0, 3], np.int64), ""), [5])
    m.graph.sparse_initializer.append(sp)
    m.graph.node.append(helper.make_node("Identity", ["sp"], ["z"]))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [5]))
    onnx.checker.check_model(m)
    out = tmp_path / "m.onnx"
    save_onnx(m, str(out), external_data=True)
    back = load_onnx(str(out))
    assert [s.values.name for s in back.graph.sparse_initializer] == ["sp"]


# (and keeps training_info, as the inline save does)
def test_training_info_survives_external_save(tmp_path):
    m = _tiny_float_model()
    ti = m.training_info.add()
    ti.initialization.CopyFrom(helper.make_graph([], "init", [], [], [numpy_helper.from_array(np.ones(3, np.float32),
                                                                                             "t0")]))
    out = tmp_path / "m.onnx"
    save_onnx(m, str(out), external_data=True)
    assert len(onnx.load(str(out)).training_info) == 1


def test_training_info_survives_inline_save(tmp_path):
    m = _tiny_float_model()
    m.training_info.add().initialization.CopyFrom(helper.make_graph([], "init", [], [], []))
    out = tmp_path / "m.onnx"
    save_onnx(m, str(out))
    assert len(load_onnx(str(out)).training_info) == 1


def _leaves_clean_or_loads(tmp_path, build):
    """The invariant: save raises BnfoldError with nothing left, or writes a file a protobuf can hold. `build()`
    makes the model here, so that no frame a failure keeps (pytest holds the traceback) holds its gigabytes."""
    out = tmp_path / "m.onnx"
    m = build()
    crash = None
    try:
        save_onnx(m, str(out))
    except BnfoldError:
        del m
        assert list(tmp_path.iterdir()) == []
        return
    except Exception as e:  # noqa: BLE001 - anything else is the failure this test looks for
        crash = f"{type(e).__name__}: {e}"
    del m
    gc.collect()
    size = out.stat().st_size if out.exists() else 0
    if out.exists():
        os.remove(out)  # (2 GB of disk)
    assert crash is None, f"save_onnx crashed with {crash}; left {sorted(p.name for p in tmp_path.iterdir())}"
    # a file over 2**31-1 bytes without a data file is one protobuf nothing can parse ('wire format corrupt');
    # its size says so without reading it back (which would hold another 2 GB)
    assert size <= TWO_GB or (tmp_path / "m.onnx.data").exists(), f"wrote one {size}-byte protobuf"


def _strings_only() -> onnx.ModelProto:
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    t = m.graph.initializer.add(name="s", data_type=TensorProto.STRING)
    t.dims.append(3)
    for _ in range(3):
        t.string_data.append(bytes(750 << 20))  # (zero pages: only the proto's copy costs memory)
    m.graph.node.add(op_type="Identity", input=["s"], output=["y"])
    m.graph.output.add(name="y")
    return m


def _bytes_plus_strings() -> onnx.ModelProto:
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    n = int(1.5 * (1 << 30))
    t = m.graph.initializer.add(name="w", data_type=TensorProto.UINT8)
    t.dims.append(n)
    t.raw_data = bytes(n)
    s = m.graph.initializer.add(name="s", data_type=TensorProto.STRING)
    s.dims.append(1)
    s.string_data.append(bytes(700 << 20))
    m.graph.node.add(op_type="Identity", input=["w"], output=["y"])
    m.graph.node.add(op_type="Identity", input=["s"], output=["z"])
    m.graph.output.add(name="y")
    m.graph.output.add(name="z")
    return m


# (strings weigh nothing in the header count: the writers catch the encoding that is over 2 GB)
def test_big_string_tensor_is_refused_cleanly(tmp_path):
    _leaves_clean_or_loads(tmp_path, _strings_only)


def test_initializer_plus_string_tensor_over_two_gb_gets_external_data(tmp_path):
    _leaves_clean_or_loads(tmp_path, _bytes_plus_strings)
