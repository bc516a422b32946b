"""The graph index of the ONNX pass: producer/consumer maps kept current while rewriting, and the
constant lookup every check goes through (initializers the caller cannot override, Constant nodes and
whole constant subgraphs via onnx_const, and constants of enclosing scopes for subgraph bodies)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from ..core.decisions import Reason, Skip
from ..core.hold import hold
from .ondisk import tensor_value
from .const import ConstEvaluator
from .nodes import CONTROL_FLOW, ONNX_DOMAINS, graphs_of, subgraph_free_names



def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node holds: a look at the op type for the other ops (~100x cheaper on big graphs)."""
    if node.op_type not in CONTROL_FLOW and node.domain in ONNX_DOMAINS:
        return []
    return [g for a in node.attribute for g in graphs_of(a)]

MARK = "_bnfold"  # in every name GraphIndex.unique makes


def could_collide(*groups: Iterable[str]) -> list[str]:
    """The names of `groups` (each a collection of names, read twice) that a name GraphIndex.unique makes could
    equal: those holding MARK. A model bnfold never wrote has none, and one search of all its names joined
    tells so (a set of every name of a long graph cost more than anything the index does with it)."""
    if not any(MARK in "\n".join(g) for g in groups):
        return []
    return [name for g in groups for name in g if MARK in name]


def fresh(taken: set[str], base: str) -> str:
    """`base`, or `base` numbered 2, 3... if `taken` holds it; added to `taken`."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    taken.add(name)
    return name


@dataclass
class GraphIndex:
    """Producer and consumer maps of one graph, kept current while rewriting."""

    graph: onnx.GraphProto
    ir_version: int
    outer_consts: Callable[[str], np.ndarray | None] | None = None
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)  # the names a made one could equal (could_collide), every scope's
    const_cache: dict[str, np.ndarray] = field(default_factory=dict)
    opset: int = 13
    evaluator: ConstEvaluator | None = None
    # name -> (dims, elem_type) from shape inference, shared by all scopes; declared types as fallback
    shapes: dict[str, tuple[list | None, int]] = field(default_factory=dict)
    declared: dict[str, int] = field(default_factory=dict)
    # initializers of a borrowing copy (protos.copy_borrowing) whose data still lives in the original
    borrowed: dict[str, onnx.TensorProto] = field(default_factory=dict)
    # gathered in the one pass over the nodes: every node (holding the wrappers keeps their id()s
    # stable), the BatchNorms and the nodes with bodies in graph order, whether some node is a CastLike
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    batchnorms: list[onnx.NodeProto] = field(default_factory=list)
    with_bodies: list[onnx.NodeProto] = field(default_factory=list)
    has_castlike: bool = False
    # the op types of the graph's nodes as built (a pass adds nodes to the graph only when it sweeps:
    # OnnxFolder.inserted), so a scan for ops the graph does not hold can be skipped
    op_types: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto, ir_version: int,
              outer_consts: Callable[[str], np.ndarray | None] | None = None, opset: int = 13,
              names: set[str] | None = None) -> "GraphIndex":
        ix = cls(graph=graph, ir_version=ir_version, outer_consts=outer_consts, opset=opset)
        if names is not None:
            ix.names = names  # shared across scopes: a name made here must not shadow or repeat another scope's
        ix.inits = {t.name: t for t in hold(graph.initializer[:])}  # (hold: core/hold.py)
        ix.graph_inputs = {i.name for i in graph.input}
        ix.graph_outputs = {o.name for o in graph.output}
        for vi in (*graph.input, *graph.value_info, *graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                ix.declared[vi.name] = vi.type.tensor_type.elem_type
        producer, consumers, op_types = ix.producer, ix.consumers, ix.op_types
        # [:] copies a repeated field in one C call; iterating it ends with a raised and caught IndexError
        ix.nodes = hold(graph.node[:])
        for n in ix.nodes:
            for o in n.output[:]:
                if o:
                    producer[o] = n
            for i in n.input[:]:
                if i:
                    users = consumers.get(i)
                    if users is None:
                        consumers[i] = [n]
                    else:
                        users.append(n)
            op, default = n.op_type, n.domain in ONNX_DOMAINS
            op_types.add(op)
            if op == "BatchNormalization" and default:
                ix.batchnorms.append(n)
            elif op == "CastLike":
                ix.has_castlike = True
            if op in CONTROL_FLOW or not default:
                subs = subgraphs(n)
                if subs:
                    ix.with_bodies.append(n)
                for g in subs:  # a body reads outer values: the node depends on them
                    for name in subgraph_free_names(g):
                        consumers.setdefault(name, []).append(n)
        ix.names.update(could_collide(ix.inits, ix.graph_inputs, ix.graph_outputs, [v.name for v in graph.value_info],
                                      [sp.values.name for sp in graph.sparse_initializer], [n.name for n in ix.nodes],
                                      producer))
        return ix

    def unread(self, name: str, node: onnx.NodeProto) -> None:
        """`node` no longer reads `name` (once). By identity: `in` and list.remove compare protobuf messages
        by content, a walk over every field of every other reader of a value read by many."""
        users = self.consumers.get(name)
        if users:
            for k, u in enumerate(users):
                if u is node:
                    del users[k]
                    return

    def uses(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def unique(self, base: str) -> str:
        """A new name from `base` (holding MARK, as could_collide assumes) that no scope of the model has."""
        return fresh(self.names, f"{base}{MARK}")

    def elem_type(self, name: str) -> int:
        """ONNX element type of a value (initializer, inferred or declared), 0 when unknown."""
        if name in self.inits:
            return self.inits[name].data_type
        info = self.shapes.get(name)
        if info is not None and info[1]:
            return info[1]
        return self.declared.get(name, 0)

    def overridable(self, name: str) -> bool:
        # From IR 4 on, an initializer that is also a graph input can be replaced by the caller.
        return name in self.graph_inputs and self.ir_version >= 4

    def const(self, name: str, role: str) -> np.ndarray:
        """The constant value of tensor `name`, or Skip(NON_CONSTANT_PARAM) naming it."""
        v = self.const_cache.get(name)
        if v is not None:
            return v
        t = self.inits.get(name)
        if t is not None and not (self.ir_version >= 4 and name in self.graph_inputs):  # not overridable
            # the common case, read where used (see ConstEvaluator.leaf)
            return tensor_value(self.borrowed.get(name, t) if self.borrowed else t)
        if self.evaluator is None:
            self.evaluator = ConstEvaluator(self, self.opset)
        value = self.evaluator.value(name)
        if value is None:
            why = self.evaluator.why(name)
            raise Skip(Reason.NON_CONSTANT_PARAM,
                       f"{role} {why}" if why.startswith(repr(name)) else f"{role} {name!r} depends on {why}")
        return value
