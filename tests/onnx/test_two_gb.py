"""Is a model too big for one protobuf (2 GB)? Every tensor counts, wherever it is held: a Constant node's value,
an attribute of another op, an initializer of a body or a function weighs as much as a main-graph initializer.
A model whose tensors stay under 2 GB but whose encoding does not is still too big (protobuf refuses to encode it,
and the answer is yes, not an error). Most models here declare their sizes in tensor headers only (the check reads
headers, never data); one is really over 2 GB in memory."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.ondisk import TWO_GB, over_two_gb

GB_FLOATS = (1 << 30) // 4  # float32 elements in 1 GiB


def _header(name: str, elements: int) -> onnx.TensorProto:
    """A float32 tensor that declares `elements` values and holds none (only its header is read)."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT)
    t.dims.append(elements)
    return t


def _model(where: str, elements: int) -> onnx.ModelProto:
    vi = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    small = numpy_helper.from_array(np.ones(4, np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["y"])]
    inits = [small]
    functions = []
    if where == "initializer":
        inits.append(_header("big", elements))
    elif where == "constant":
        nodes.append(helper.make_node("Constant", [], ["k"], value=_header("", elements)))
    elif where == "custom_attribute":
        nodes.append(helper.make_node("Custom", ["w"], ["u"], domain="com.example", table=_header("", elements)))
    elif where == "body_initializer":
        body = helper.make_graph([helper.make_node("Identity", ["bb"], ["o"])], "b", [], [vi], [_header("bb", elements)])
        other = helper.make_graph([helper.make_node("Identity", ["w"], ["o"])], "e", [], [vi])
        nodes.append(helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=other))
        inits.append(numpy_helper.from_array(np.array(True), "c"))
    elif where == "function_constant":
        functions.append(helper.make_function("local", "F", ["a"], ["b"], [
            helper.make_node("Constant", [], ["k"], value=_header("", elements)),
            helper.make_node("Add", ["a", "k"], ["b"])], [helper.make_opsetid("", 17)]))
        nodes.append(helper.make_node("F", ["w"], ["f"], domain="local"))
    g = helper.make_graph(nodes, "g", [], [vi], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1),
                                                 helper.make_opsetid("com.example", 1)], functions=functions)


@pytest.mark.parametrize("where", ["initializer", "constant", "custom_attribute", "body_initializer",
                                   "function_constant"])
def test_every_tensor_counts_wherever_it_is_held(where):
    assert over_two_gb(_model(where, 2 * GB_FLOATS + 1))
    assert not over_two_gb(_model(where, GB_FLOATS))


def test_tensors_under_two_gb_in_a_model_over_it():
    """1.9 GiB of initializer and 300 MB of doc string: the tensors alone stay under the limit, the encoding does
    not (protobuf refuses to encode it: the check says yes instead of raising)."""
    raw = int(1.9 * (1 << 30))
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    g = m.graph  # (filled in place: each helper would copy the 2 GB again)
    t = g.initializer.add()
    t.name, t.data_type, t.raw_data = "w", TensorProto.UINT8, bytes(raw)
    t.dims.append(raw)
    g.node.add(op_type="Identity", input=["w"], output=["y"])
    g.output.add(name="y")
    g.doc_string = "x" * (300 << 20)
    assert raw < TWO_GB
    assert over_two_gb(m)


def test_a_model_over_two_gb_outside_its_initializers_is_refused_cleanly(tmp_path):
    """A Constant node holding 2.1 GB: external data takes initializers only, so the model cannot be written. It
    used to be written as one 2.2 GB protobuf that nothing (onnx, onnxruntime, bnfold) can read; now the save says
    why, and leaves nothing behind."""
    from bnfold.core.errors import BnfoldError
    from bnfold.onnx.io import save_onnx
    n = int(2.1 * (1 << 30))
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    node = m.graph.node.add(op_type="Constant", output=["k"])
    a = node.attribute.add(name="value", type=onnx.AttributeProto.TENSOR)
    a.t.data_type, a.t.raw_data = TensorProto.UINT8, bytes(n)
    a.t.dims.append(n)
    m.graph.output.add(name="k")
    out = tmp_path / "big.onnx"
    with pytest.raises(BnfoldError, match="outside its initializers"):
        save_onnx(m, str(out))
    assert list(tmp_path.iterdir()) == []


def test_one_file_asked_for_a_model_over_two_gb_is_refused_cleanly(tmp_path):
    """external_data=False asks for one file: a 2.1 GB initializer cannot be one, and the framed writer knows it
    before it writes a byte (it used to write a 2.1 GB protobuf no reader takes)."""
    from bnfold.core.errors import BnfoldError
    from bnfold.onnx.io import save_onnx
    n = int(2.1 * (1 << 30))
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    t = m.graph.initializer.add()
    t.name, t.data_type, t.raw_data = "w", TensorProto.UINT8, bytes(n)
    t.dims.append(n)
    m.graph.node.add(op_type="Identity", input=["w"], output=["y"])
    m.graph.output.add(name="y")
    with pytest.raises(BnfoldError, match="as one file"):
        save_onnx(m, str(tmp_path / "big.onnx"), external_data=False)
    assert list(tmp_path.iterdir()) == []


def test_string_tensors_weigh_what_they_hold():
    """No header sizes a string tensor: its encoded bytes count (they used to weigh nothing)."""
    from bnfold.onnx.protos import total_nbytes
    t = TensorProto(name="s", data_type=TensorProto.STRING, dims=[3], string_data=[b"x" * 1000] * 3)
    f = numpy_helper.from_array(np.ones(10, np.float32), "f")
    assert 3000 <= total_nbytes([t]) < 3100
    assert total_nbytes([t, f]) == total_nbytes([t]) + 40
