"""Values computable from constants alone: Constant nodes, Identity chains, ConstantOfShape, Cast...

Exporters rarely store every weight as a plain initializer: the ONNX model zoo's "light" models make
each weight a ConstantOfShape output, deduplicating exporters route equal tensors through Identity
chains, and fp16 exports Cast their parameters. A BN or layer parameter is constant when every path
back from it ends in an initializer that the caller cannot override (or a Constant node), through
deterministic default-domain ops. Such values are evaluated here, in numpy, once per tensor name:
results (and refusals) are memoised, so asking for every BN's parameters costs time linear in the
number of nodes. Common shape/arith ops are hand-written; anything else falls back to onnx's
reference evaluator for that one node.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .ondisk import tensor_value
from .nodes import ONNX_DOMAINS, attr as _attr, node_label as _label

if TYPE_CHECKING:
    from .graph import GraphIndex

# Random or stateful ops never give one constant value; ops with subgraphs are left to the runtime.
NOT_CONSTANT_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceMap"}
# A computed "constant" this large would be a second copy of a big weight just to look at it.
MAX_ELEMENTS = 1 << 28
# initializers above this many elements are read again when needed instead of memoised
KEEP_ELEMENTS = 1 << 16


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for forms that are not plain values (ref_attr, sparse)."""
    for a in node.attribute:
        if a.ref_attr_name:
            return None
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None



def _axes(node: onnx.NodeProto, ins: list[np.ndarray | None]) -> list[int] | None:
    if len(ins) > 1 and ins[1] is not None:
        return [int(v) for v in np.asarray(ins[1]).reshape(-1)]
    a = _attr(node, "axes")
    return None if a is None else [int(v) for v in a]


def _reshape(node: onnx.NodeProto, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    dims = [int(d) for d in np.asarray(shape).reshape(-1)]
    if not _attr(node, "allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _unsqueeze(x: np.ndarray, axes: list[int]) -> np.ndarray:
    rank = x.ndim + len(axes)
    for a in sorted(a % rank for a in axes):
        x = np.expand_dims(x, a)
    return x


def _cast(node: onnx.NodeProto, x: np.ndarray) -> np.ndarray | None:
    to = int(_attr(node, "to"))
    if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                  onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return None  # float8 saturation, strings...: the reference evaluator knows the rules
    dt = helper.tensor_dtype_to_np_dtype(to)
    if dt.kind in "iu" and x.dtype.kind == "f":
        return None  # out-of-range float->int casts are implementation-defined; let the reference decide
    return np.asarray(x).astype(dt)


def _float_binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable:
    def run(node: onnx.NodeProto, ins: list[np.ndarray | None]) -> np.ndarray | None:
        a, b = ins[0], ins[1]
        if a is None or b is None or a.dtype != b.dtype:
            return None
        if a.dtype.kind not in "f" and a.dtype.name != "bfloat16" and fn is np.divide:
            return None  # integer Div truncates toward zero in ONNX, unlike numpy
        return np.asarray(fn(a, b)).astype(a.dtype)
    return run


def _unary(fn: Callable[[np.ndarray], np.ndarray]) -> Callable:
    def run(node: onnx.NodeProto, ins: list[np.ndarray | None]) -> np.ndarray | None:
        x = ins[0]
        if x is None or (x.dtype.kind != "f"):
            return None
        return np.asarray(fn(x)).astype(x.dtype)
    return run


def _constant_of_shape(node: onnx.NodeProto, ins: list[np.ndarray | None]) -> np.ndarray | None:
    shape = [int(d) for d in np.asarray(ins[0]).reshape(-1)]
    v = _attr(node, "value")
    fill = numpy_helper.to_array(v).reshape(-1)[0] if v is not None else np.float32(0)
    return np.full(shape, fill, dtype=fill.dtype)


HAND: dict[str, Callable[[onnx.NodeProto, list[np.ndarray | None]], np.ndarray | None]] = {
    "Identity": lambda n, i: i[0],
    "Cast": lambda n, i: _cast(n, i[0]),
    "ConstantOfShape": _constant_of_shape,
    "Reshape": lambda n, i: _reshape(n, i[0], i[1]),
    "Unsqueeze": lambda n, i: _unsqueeze(i[0], _axes(n, i) or []),
    "Squeeze": lambda n, i: np.squeeze(i[0], axis=tuple(_axes(n, i))) if _axes(n, i) else np.squeeze(i[0]),
    "Transpose": lambda n, i: np.transpose(i[0], _attr(n, "perm")),
    "Concat": lambda n, i: np.concatenate([x for x in i if x is not None], axis=int(_attr(n, "axis"))),
    "Add": _float_binary(np.add),
    "Sub": _float_binary(np.subtract),
    "Mul": _float_binary(np.multiply),
    "Div": _float_binary(np.divide),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(np.reciprocal),
    "Neg": _unary(np.negative),
}


def _reference(node: onnx.NodeProto, ins: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    feeds = {name: v for name, v in zip(node.input, ins) if name and v is not None}
    ev = ReferenceEvaluator(node, opsets={"": opset})
    return [np.asarray(v) for v in ev.run(None, feeds)]


class ConstEvaluator:
    """Evaluates tensor names of one graph that depend on constants only; memoised both ways."""

    def __init__(self, ix: "GraphIndex", opset: int) -> None:
        self.ix = ix
        self.opset = opset
        self.refused: dict[str, str] = {}   # name -> why it is not constant
        self._transient: list[str] = []     # big initializers read during one value() call
        self.const_nodes: set[int] = set()  # id() of nodes evaluated here (removable once unused)

    def leaf(self, name: str) -> np.ndarray | None:
        """Value of a name that no node here produces, or None after recording why it is not constant."""
        ix = self.ix
        if name in ix.inits:
            if ix.overridable(name):
                self.refused[name] = f"{name!r} is an initializer that is also a graph input (overridable)"
                return None
            t = ix.inits[name]
            if math.prod(t.dims) > KEEP_ELEMENTS:
                self._transient.append(name)
            return tensor_value(ix.borrowed.get(name, t))
        if name in ix.graph_inputs:
            self.refused[name] = f"{name!r} is a graph input"
            return None
        if ix.outer_consts is not None:
            v = ix.outer_consts(name)
            if v is not None:
                return v
        self.refused[name] = f"{name!r} is not known in this scope"
        return None

    def _evaluable(self, node: onnx.NodeProto) -> str | None:
        if node.domain not in ONNX_DOMAINS:
            return f"{node.op_type} is a custom-domain op"
        if node.op_type in NOT_CONSTANT_OPS:
            return f"{node.op_type} is not a constant computation"
        for a in node.attribute:
            if a.ref_attr_name or a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                return f"{node.op_type} has a subgraph or function-attribute reference"
        return None

    def value(self, name: str) -> np.ndarray | None:
        """The constant value of `name`, or None when it is not constant (see `why(name)`)."""
        ix = self.ix
        cache = ix.const_cache
        if name in cache:
            return cache[name]
        if name in self.refused:
            return None
        stack = [name]
        while stack:
            cur = stack[-1]
            if cur in cache or cur in self.refused:
                stack.pop()
                continue
            node = ix.producer.get(cur)
            if node is None:
                v = self.leaf(cur)
                if v is not None:
                    cache[cur] = v
                stack.pop()
                continue
            why = self._evaluable(node)
            if why is not None:
                self._refuse(node, f"{cur!r} is computed at run time by {_label(node)} ({why})")
                stack.pop()
                continue
            deps = _value_inputs(node)
            pending = [i for i in deps if i not in cache and i not in self.refused]
            if pending:
                stack.extend(pending)
                continue
            bad = [i for i in deps if i in self.refused]
            if bad:
                self._refuse(node, self.refused[bad[0]])
            elif node.op_type == "CastLike":
                self._cast_like(node)
            else:
                self._evaluate(node)
            stack.pop()
        value = cache.get(name)
        # a big weight is read where it is used, not kept: the cache would be a second copy of the model
        for big in self._transient:
            cache.pop(big, None)
        self._transient.clear()
        return value

    def why(self, name: str) -> str:
        return self.refused.get(name, f"{name!r} is not a constant")

    def _refuse(self, node: onnx.NodeProto, why: str) -> None:
        for o in node.output:
            if o:
                self.refused[o] = why

    def _cast_like(self, node: onnx.NodeProto) -> None:
        """CastLike reads only the element type of its second input, never its value: an exporter's
        Expand(CastLike(0, x), ...) zero bias is a constant even though x is an activation."""
        like = node.input[1]
        et = self.ix.elem_type(like)
        if not et and like in self.ix.const_cache:
            et = helper.np_dtype_to_tensor_dtype(self.ix.const_cache[like].dtype)
        if not et:
            self._refuse(node, f"the element type of {like!r} (read by {_label(node)}) is unknown")
            return
        cast = helper.make_node("Cast", [node.input[0]], list(node.output), name=node.name, to=int(et))
        cast.attribute.extend(a for a in node.attribute if a.name == "saturate")
        self._evaluate(cast)
        if id(cast) in self.const_nodes:
            self.const_nodes.discard(id(cast))
            self.const_nodes.add(id(node))

    def _evaluate(self, node: onnx.NodeProto) -> None:
        ins = [self.ix.const_cache[i] if i else None for i in node.input]
        try:
            if node.op_type == "Constant":
                v = constant_node_value(node)
                outs = None if v is None else [v]
            else:
                one = HAND[node.op_type](node, ins) if node.op_type in HAND else None
                outs = [one] if one is not None else _reference(node, ins, self.opset)
        except Exception as e:  # noqa: BLE001 - an op we cannot evaluate is simply not a constant to us
            self._refuse(node, f"{_label(node)} could not be evaluated from constants ({type(e).__name__}: {e})"[:300])
            return
        if outs is None:
            self._refuse(node, f"{_label(node)} is not a plain constant")
            return
        if any(np.asarray(o).size > MAX_ELEMENTS for o in outs):
            self._refuse(node, f"{_label(node)} computes a constant too large to evaluate")
            return
        for o, v in zip(node.output, outs):
            if o:
                self.ix.const_cache[o] = np.asarray(v)
        self.const_nodes.add(id(node))


def _value_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs whose *values* a node's result depends on (CastLike's second input gives only a type)."""
    if node.op_type == "CastLike" and node.domain in ONNX_DOMAINS and len(node.input) == 2:
        return [node.input[0]] if node.input[0] else []
    return [i for i in node.input if i]



def constant_roots(graph: onnx.GraphProto, readers: set[str] | frozenset[str]) -> set[str]:
    """Where the constant inputs of `readers` ops come from (see constant_root_readers)."""
    return set(constant_root_readers(graph, readers))


def constant_root_readers(graph: onnx.GraphProto, readers: set[str] | frozenset[str]) -> dict[str, onnx.NodeProto]:
    """Where the constant inputs of `readers` ops come from, in `graph` and every subgraph of it, each with
    the first reader node found for it.

    Returns the names of initializers, Constant outputs and ConstantOfShape outputs from which some
    input of a node whose op_type is in `readers` is computed through constant-only ops (Identity,
    Cast, Reshape...). A verifier nudges exactly these to measure a model's own numeric noise: a
    weight behind Identity/Cast, a ConstantOfShape fill, or an outer initializer read by a body is as
    much a weight as a plain initializer. Each value is visited once (linear in the graph size).
    """
    roots: dict[str, onnx.NodeProto] = {}
    seen: set[str] = set()

    def walk(g: onnx.GraphProto, outer_producers: list[dict[str, onnx.NodeProto]], outer_inits: list[set[str]]) -> None:
        producer = {o: n for n in g.node for o in n.output if o}
        inits = {t.name for t in g.initializer}
        scopes_p, scopes_i = [producer] + outer_producers, [inits] + outer_inits
        for n in g.node:
            for a in n.attribute:
                subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) \
                    if a.type == onnx.AttributeProto.GRAPHS else []
                for sub in subs:
                    walk(sub, scopes_p, scopes_i)
            if n.op_type in readers:
                stack = [i for i in n.input if i]
                while stack:
                    name = stack.pop()
                    if name in seen:
                        continue
                    seen.add(name)
                    if any(name in s for s in scopes_i):
                        roots.setdefault(name, n)
                        continue
                    src = next((p[name] for p in scopes_p if name in p), None)
                    if src is None or src.domain not in ONNX_DOMAINS or src.op_type in NOT_CONSTANT_OPS:
                        continue
                    if src.op_type in ("Constant", "ConstantOfShape"):
                        roots.setdefault(name, n)
                    elif src.op_type in HAND or src.op_type in ("Expand", "Tile", "Gather", "Slice", "Split"):
                        stack.extend(i for i in src.input if i)

    walk(graph, [], [])
    return roots
