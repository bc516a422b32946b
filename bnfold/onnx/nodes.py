"""Plain helpers over ONNX nodes and attributes, shared by every module of the ONNX package."""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper

ONNX_DOMAINS = ("", "ai.onnx")
# default-domain ops with graph attributes (the checker refuses one on any other default-domain op)
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
# the default-domain ops whose attributes beforeafter counts (bodies' initializers, a Constant's tensor); the
# checker lets any op hold a body in an attribute named "__...", which no runtime runs: not counted
COUNTED_HOLDERS = CONTROL_FLOW | {"Constant"}


def counts_bodies_of(op: str, domain: str) -> bool:
    """Are the initializers of the bodies a node holds counted among a model's parameters (beforeafter, and
    the load check's sum of them: protos.tensor_groups)?"""
    return op in COUNTED_HOLDERS or domain not in ONNX_DOMAINS
# The epsilon attribute is a float32: its default 1e-5 is float32(1e-5), which is what runtimes use (for
# double BatchNorms too); the Python double 1e-5 would be off by 2.5e-14, millions of ulp at var ~ 1e-4.
EPSILON_DEFAULT = float(np.float32(1e-5))


def attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute `name` of `node`, or `default` when it is absent."""
    for a in node.attribute[:]:  # ([:] is one call; iterating a repeated field ends in a caught IndexError)
        if a.name == name:
            return value_of(a)
    return default


def value_of(a: onnx.AttributeProto) -> Any:
    """helper.get_attribute_value, with ints and floats read directly (it costs as much as a BN's checks)."""
    if a.type == onnx.AttributeProto.INT:
        return a.i
    if a.type == onnx.AttributeProto.FLOAT:
        return a.f
    return helper.get_attribute_value(a)


def set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    """Set (replace or add) attribute `name` of `node`."""
    for i, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def node_label(node: onnx.NodeProto) -> str:
    """A node's name, or a stable stand-in built from its op and first output."""
    return node.name or f"{node.op_type}:{node.output[0] if node.output else '?'}"


def graphs_of(a: onnx.AttributeProto) -> list[onnx.GraphProto]:
    """The subgraphs an attribute holds (If/Loop/Scan bodies), if any."""
    if a.type == onnx.AttributeProto.GRAPH:
        return [a.g]
    if a.type == onnx.AttributeProto.GRAPHS:
        return list(a.graphs)
    return []


def subgraph_free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from its enclosing scopes (used but not defined inside it)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer} if hasattr(graph, "sparse_initializer") else set()
    used: set[str] = set()
    for n in graph.node:
        defined.update(o for o in n.output if o)
        used.update(i for i in n.input if i)
        for a in n.attribute:
            for g in graphs_of(a):
                used |= subgraph_free_names(g)
    used.update(o.name for o in graph.output)
    return used - defined


def model_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset of a model (1 when absent, as the spec says)."""
    for o in model.opset_import:
        if o.domain in ONNX_DOMAINS:
            return int(o.version)
    return 1
