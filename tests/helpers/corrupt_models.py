"""Models holding one corrupt or odd tensor in a place the load checks must still look at (or must accept):
tensor attributes of Constant/ConstantOfShape, sparse initializers and sparse_value, bodies of If/Loop/Scan,
model-local functions, other-domain nodes, external data in attributes and bodies. Each builder writes its
model (and any data file) into a folder and returns the model's path. Needs only onnx and numpy."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tests.conftest import random_bn

T = onnx.TensorProto
C = 6


def short(shape=(2, 3)) -> onnx.TensorProto:
    """A float tensor whose raw data is one float short of its dims."""
    t = numpy_helper.from_array(np.ones(shape, np.float32), "")
    t.raw_data = t.raw_data[:-4]
    return t


def short_values() -> onnx.TensorProto:
    """A float tensor in float_data, one value short of its dims."""
    t = helper.make_tensor("", T.FLOAT, [2, 3], [1.0] * 6)
    del t.float_data[-1]
    return t


def external(location: str, shape=(2, 3), length: int | None = None, offset: int = 0) -> onnx.TensorProto:
    t = onnx.TensorProto(data_type=T.FLOAT, dims=list(shape))
    t.data_location = T.EXTERNAL
    t.external_data.add(key="location", value=location)
    if offset:
        t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))
    return t


def base() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    st = random_bn(rng, C)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (C, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(st[k].astype(np.float32), f"bn_{k}") for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["n"],
                              name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, C, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    m.ir_version = 8
    return m


def _const(value: onnx.TensorProto, out: str = "unused", attr: str = "value") -> onnx.NodeProto:
    return helper.make_node("Constant", [], [out], name=f"const_{out}", **{attr: value})


def _if_with(nodes, inits=()) -> onnx.NodeProto:
    """An If (its condition a constant) whose branches output y after `nodes` (which must not write y2)."""
    then_g = helper.make_graph(list(nodes) + [helper.make_node("Identity", ["y"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", T.FLOAT, [1, C, 8, 8])], list(inits))
    else_g = helper.make_graph([helper.make_node("Identity", ["y"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", T.FLOAT, [1, C, 8, 8])])
    return helper.make_node("If", ["cond"], ["y2"], name="if", then_branch=then_g, else_branch=else_g)


def _with_if(m: onnx.ModelProto, nodes, inits=()) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node.append(_if_with(nodes, inits))
    m.graph.output[0].name = "y2"


def _layer_norm(m: onnx.ModelProto, t: onnx.TensorProto) -> None:
    """A LayerNormalization after the model's Relu carrying `t` as an attribute no schema names: the one
    default-domain op (opset 17 on) whose schema lets the checker pass attributes it does not know."""
    g = m.graph
    g.initializer.append(numpy_helper.from_array(np.ones(C, np.float32), "ln_scale"))
    n = helper.make_node("LayerNormalization", ["y", "ln_scale"], ["z"], name="ln", axis=1)
    n.attribute.append(helper.make_attribute("extra", t))
    g.node.append(n)
    g.output[0].name = "z"
    g.output[0].type.tensor_type.shape.dim[1].dim_value = C


def variant(kind: str) -> onnx.ModelProto:
    m = base()
    g = m.graph
    if kind == "good":
        pass
    elif kind == "constant_short":
        g.node.insert(0, _const(short()))
    elif kind == "constant_short_values":
        g.node.insert(0, _const(short_values()))
    elif kind == "constant_ai_onnx_domain_short":
        n = _const(short())
        n.domain = "ai.onnx"
        g.node.insert(0, n)
    elif kind == "constant_of_shape_short":
        v = numpy_helper.from_array(np.ones(1, np.float32), "")
        v.raw_data = b""
        v.float_data.append(1.0)
        v.ClearField("float_data")  # one value declared, none held
        g.initializer.append(numpy_helper.from_array(np.array([2, 2], np.int64), "shp"))
        g.node.insert(0, helper.make_node("ConstantOfShape", ["shp"], ["unused"], value=v))
    elif kind == "constant_unknown_dtype":
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.data_type = 99
        g.node.insert(0, _const(t))
    elif kind == "constant_two_fields":  # float values, and int64 values besides
        t = helper.make_tensor("", T.FLOAT, [2, 3], [1.0] * 6)
        t.int64_data.extend([1, 2])
        g.node.insert(0, _const(t))
    elif kind == "constant_huge_dims":
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.dims[0] = 10 ** 12
        g.node.insert(0, _const(t))
    elif kind == "if_body_constant_unknown_dtype":
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.data_type = 99
        _with_if(m, [_const(t)])
    elif kind == "layer_norm_attribute_short":
        _layer_norm(m, short())
    elif kind == "layer_norm_attribute_short_values":
        _layer_norm(m, short_values())
    elif kind == "layer_norm_attribute_unknown_dtype":
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.data_type = 99
        _layer_norm(m, t)
    elif kind == "function_layer_norm_attribute_unknown_dtype":  # the same, inside a model-local function
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.data_type = 99
        ln = helper.make_node("LayerNormalization", ["a", "s"], ["b"], axis=1)
        ln.attribute.append(helper.make_attribute("extra", t))
        scale = _const(numpy_helper.from_array(np.ones(C, np.float32), ""), out="s")
        m.functions.append(helper.make_function("local", "F", ["a"], ["b"], [scale, ln],
                                                [helper.make_opsetid("", 17)]))
        m.opset_import.append(helper.make_opsetid("local", 1))
        g.node[2].op_type, g.node[2].domain = "F", "local"
    elif kind == "function_attribute_default_short":  # a function's default attribute value, one float short
        fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        fn.attribute_proto.append(helper.make_attribute("t", short()))
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        g.node[2].op_type, g.node[2].domain = "F", "local"
    elif kind == "constant_negative_dim":
        t = numpy_helper.from_array(np.ones((2, 3), np.float32), "")
        t.dims[0] = -2
        g.node.insert(0, _const(t))
    elif kind == "constant_sparse_values_short":
        sp = helper.make_sparse_tensor(short((3,)), numpy_helper.from_array(np.arange(3, dtype=np.int64), ""), [9])
        g.node.insert(0, _const(sp, attr="sparse_value"))
    elif kind == "constant_sparse_indices_short":
        idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), "")
        idx.raw_data = idx.raw_data[:-8]
        sp = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(3, np.float32), ""), idx, [9])
        g.node.insert(0, _const(sp, attr="sparse_value"))
    elif kind == "sparse_initializer_short":
        sp = helper.make_sparse_tensor(short((3,)), numpy_helper.from_array(np.arange(3, dtype=np.int64), ""), [9])
        sp.values.name = "sp"
        g.sparse_initializer.append(sp)
    elif kind == "if_body_constant_short":
        _with_if(m, [_const(short())])
    elif kind == "if_body_initializer_short":
        t = short()
        t.name = "body_init"
        _with_if(m, [], [t])
    elif kind == "if_body_nested_if_constant_short":
        inner = _if_with([_const(short(), out="deep")])
        inner.output[0] = "inner_y"
        _with_if(m, [inner])
    elif kind == "if_body_relu_tensor_attribute":  # no schema allows it: the checker refuses it
        relu = helper.make_node("Relu", ["y"], ["r2"], name="r2")
        relu.attribute.append(helper.make_attribute("extra", short()))
        _with_if(m, [relu])
    elif kind == "loop_body_constant_short":
        body = helper.make_graph(
            [_const(short(), out="lc"), helper.make_node("Identity", ["cin"], ["cout"]),
             helper.make_node("Identity", ["v"], ["vout"])], "body",
            [helper.make_tensor_value_info("i", T.INT64, []), helper.make_tensor_value_info("cin", T.BOOL, []),
             helper.make_tensor_value_info("v", T.FLOAT, [1, C, 8, 8])],
            [helper.make_tensor_value_info("cout", T.BOOL, []),
             helper.make_tensor_value_info("vout", T.FLOAT, [1, C, 8, 8])])
        g.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "trip"),
                              numpy_helper.from_array(np.array(True), "cond")])
        g.node.append(helper.make_node("Loop", ["trip", "cond", "y"], ["y2"], name="loop", body=body))
        g.output[0].name = "y2"
    elif kind == "scan_body_constant_short":
        body = helper.make_graph(
            [_const(short(), out="sc"), helper.make_node("Identity", ["s"], ["s_out"]),
             helper.make_node("Identity", ["e"], ["e_out"])], "body",
            [helper.make_tensor_value_info("s", T.FLOAT, [C, 8, 8]),
             helper.make_tensor_value_info("e", T.FLOAT, [C, 8, 8])],
            [helper.make_tensor_value_info("s_out", T.FLOAT, [C, 8, 8]),
             helper.make_tensor_value_info("e_out", T.FLOAT, [C, 8, 8])])
        g.initializer.append(numpy_helper.from_array(np.zeros((C, 8, 8), np.float32), "s0"))
        g.node.append(helper.make_node("Scan", ["s0", "y"], ["s_fin", "y2"], name="scan", body=body,
                                       num_scan_inputs=1))
        g.output[0].name = "y2"
    elif kind == "function_constant_short":
        fn = helper.make_function("local", "F", ["a"], ["b"],
                                  [_const(short(), out="k"), helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        g.node[2].op_type, g.node[2].domain = "F", "local"
    elif kind == "function_node_custom_attribute_short":  # a call to a local function, with a tensor attribute
        fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)], attributes=["t"])
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        g.node[2].op_type, g.node[2].domain = "F", "local"
        g.node[2].attribute.append(helper.make_attribute("t", short()))
    elif kind == "custom_domain_attribute_short":
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        g.node.insert(0, helper.make_node("Custom", [], ["unused"], domain="com.example", t=short()))
    elif kind == "custom_domain_tensors_attribute_short":
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        n = helper.make_node("Custom", [], ["unused"], domain="com.example")
        n.attribute.append(helper.make_attribute("ts", [numpy_helper.from_array(np.ones(2, np.float32), ""),
                                                       short()]))
        g.node.insert(0, n)
    elif kind in ("custom_domain_sparse_tensors_values_short", "custom_domain_sparse_tensors_indices_short"):
        # a list of sparse tensors (AttributeProto.SPARSE_TENSORS) on an op the checker knows nothing of
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        good = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(3, np.float32), ""),
                                         numpy_helper.from_array(np.arange(3, dtype=np.int64), ""), [9])
        idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), "")
        idx.raw_data = idx.raw_data[:-8]
        bad = (helper.make_sparse_tensor(short((3,)), numpy_helper.from_array(np.arange(3, dtype=np.int64), ""), [9])
               if kind.endswith("values_short") else
               helper.make_sparse_tensor(numpy_helper.from_array(np.ones(3, np.float32), ""), idx, [9]))
        n = helper.make_node("Custom", [], ["unused"], domain="com.example")
        n.attribute.append(onnx.AttributeProto(name="sts", type=onnx.AttributeProto.SPARSE_TENSORS,
                                               sparse_tensors=[good, bad]))
        g.node.insert(0, n)
    elif kind == "custom_domain_graph_attribute_short":
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        sub = helper.make_graph([_const(short(), out="s")], "sub", [],
                                [helper.make_tensor_value_info("s", T.FLOAT, [2, 3])])
        g.node.insert(0, helper.make_node("Custom", [], ["unused"], domain="com.example", body=sub))
    elif kind == "ml_label_encoder_short":
        m.opset_import.append(helper.make_opsetid("ai.onnx.ml", 4))
        keys = numpy_helper.from_array(np.arange(3, dtype=np.int64), "")
        keys.raw_data = keys.raw_data[:-8]
        g.initializer.append(numpy_helper.from_array(np.arange(3, dtype=np.int64), "li"))
        g.node.insert(0, helper.make_node("LabelEncoder", ["li"], ["lo"], domain="ai.onnx.ml", keys_tensor=keys,
                                          values_tensor=numpy_helper.from_array(np.arange(3, dtype=np.int64), "")))
    elif kind == "conv_tensor_attribute_short":  # no schema allows it: the checker refuses it
        g.node[0].attribute.append(helper.make_attribute("extra", short()))
    elif kind == "conv_ai_onnx_domain_tensor_attribute_short":
        g.node[0].domain = "ai.onnx"
        g.node[0].attribute.append(helper.make_attribute("extra", short()))
    elif kind == "conv_graph_attribute":  # no schema allows it: the checker refuses it
        sub = helper.make_graph([_const(short(), out="s")], "sub", [],
                                [helper.make_tensor_value_info("s", T.FLOAT, [2, 3])])
        g.node[0].attribute.append(helper.make_attribute("body", sub))
    else:
        raise AssertionError(kind)
    return m


KINDS = ["good", "constant_short", "constant_unknown_dtype", "constant_two_fields", "constant_huge_dims",
         "if_body_constant_unknown_dtype", "layer_norm_attribute_short", "layer_norm_attribute_short_values",
         "constant_short_values", "constant_ai_onnx_domain_short",
         "constant_of_shape_short", "constant_negative_dim", "constant_sparse_values_short",
         "constant_sparse_indices_short", "sparse_initializer_short", "if_body_constant_short",
         "if_body_initializer_short", "if_body_nested_if_constant_short", "if_body_relu_tensor_attribute",
         "loop_body_constant_short", "scan_body_constant_short", "function_constant_short",
         "function_node_custom_attribute_short", "custom_domain_attribute_short",
         "custom_domain_tensors_attribute_short", "custom_domain_sparse_tensors_values_short",
         "custom_domain_sparse_tensors_indices_short", "custom_domain_graph_attribute_short", "ml_label_encoder_short",
         "conv_tensor_attribute_short", "conv_ai_onnx_domain_tensor_attribute_short", "conv_graph_attribute"]


# -- external data in odd places ------------------------------------------------------------------

def external_variant(kind: str, folder: Path) -> Path:
    """A model with an external tensor somewhere other than the main graph's initializers; the data file
    `data.bin` (24 bytes) next to it unless the kind says otherwise."""
    (folder / "data.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    m = base()
    g = m.graph
    if kind == "constant_external_ok":
        g.node.insert(0, _const(external("data.bin")))
    elif kind == "constant_external_missing":
        g.node.insert(0, _const(external("nothere.bin")))
    elif kind == "constant_external_outside":
        g.node.insert(0, _const(external("../outside.bin")))
    elif kind == "constant_external_absolute":
        g.node.insert(0, _const(external("/etc/hostname")))
    elif kind == "constant_external_too_short":
        g.node.insert(0, _const(external("data.bin", shape=(4, 3))))
    elif kind == "constant_external_offset_past_end":
        g.node.insert(0, _const(external("data.bin", offset=4096, length=24)))
    elif kind == "if_body_constant_external_outside":
        _with_if(m, [_const(external("../outside.bin"))])
    elif kind == "if_body_initializer_external_outside":
        t = external("../outside.bin")
        t.name = "bi"
        _with_if(m, [], [t])
    elif kind == "function_constant_external_outside":
        fn = helper.make_function("local", "F", ["a"], ["b"],
                                  [_const(external("../outside.bin"), out="k"), helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        g.node[2].op_type, g.node[2].domain = "F", "local"
    elif kind == "relu_attribute_external_outside":  # no schema allows it: refused, and nothing read
        g.node[2].attribute.append(helper.make_attribute("extra", external("../outside.bin")))
    elif kind == "custom_attribute_external_outside":
        m.opset_import.append(helper.make_opsetid("com.example", 1))
        g.node.insert(0, helper.make_node("Custom", [], ["unused"], domain="com.example",
                                          t=external("../outside.bin")))
    elif kind == "sparse_initializer_external_outside":
        vals = external("../outside.bin", shape=(3,))
        sp = helper.make_sparse_tensor(vals, numpy_helper.from_array(np.arange(3, dtype=np.int64), ""), [9])
        sp.values.name = "sp"
        g.sparse_initializer.append(sp)
    else:
        raise AssertionError(kind)
    path = folder / f"{kind}.onnx"
    path.write_bytes(m.SerializeToString())
    return path


EXTERNAL_KINDS = ["constant_external_ok", "constant_external_missing", "constant_external_outside",
                  "constant_external_absolute", "constant_external_too_short", "constant_external_offset_past_end",
                  "if_body_constant_external_outside", "if_body_initializer_external_outside",
                  "function_constant_external_outside", "relu_attribute_external_outside",
                  "custom_attribute_external_outside", "sparse_initializer_external_outside"]
