"""Static shapes and element types of every value, all scopes, from one weight-free shape inference.

Checks such as "is the BatchNorm's channel axis the MatMul's feature axis" need ranks and dims.
onnx's shape inference serialises the model it is given, so it runs on a copy whose large
initializers are replaced by typed graph inputs: the cost follows the number of nodes, not the
size of the weights. It runs once, before any rewrite, and only for models that need it.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

import onnx

from .graph import GraphIndex, subgraphs
from .protos import structure_only

Dims = list  # list[int | None]: None marks a dynamic dimension
SMALL_INIT = 4096  # elements; shape-carrying initializers (Reshape targets, axes) are far smaller


def _graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for sub in subgraphs(n):
            yield from _graphs(sub)


def _dims(vi: onnx.ValueInfoProto) -> tuple[Dims | None, int] | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return None, tt.elem_type
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim], tt.elem_type


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = structure_only(model, keep_up_to=SMALL_INIT)
    if m.ir_version < 4:
        m.ir_version = 4  # initializers need not be inputs from IR 4 on; inference does not care otherwise
    return m


def value_types(model: onnx.ModelProto) -> dict[str, tuple[Dims | None, int]]:
    """name -> (dims or None, elem_type) for every value with a known tensor type, in every scope."""
    table: dict[str, tuple[Dims | None, int]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(_light_copy(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown shapes make checks refuse, not guess
        inferred = model
    for g in _graphs(inferred.graph):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            d = _dims(vi)
            if d is not None and (vi.name not in table or table[vi.name][0] is None):
                table[vi.name] = d
    for g in _graphs(model.graph):
        for t in g.initializer:
            table[t.name] = (list(t.dims), t.data_type)
    return table


def needs_shapes(model: onnx.ModelProto, main: GraphIndex | None = None) -> bool:
    """True when some BatchNorm's neighbourhood cannot be judged from weight ranks alone.

    `main`: the main graph, already indexed (its BatchNorms and CastLike are known without a walk)."""
    if main is not None:
        if main.has_castlike:
            return True
        producer, consumers, outputs = main.producer, main.consumers, main.graph_outputs
        for n in main.batchnorms:  # (_conv_alone, inlined: a long graph holds 100k BNs)
            ins = n.input[:]
            if ins:
                src = producer.get(ins[0])
                if (src is None or src.op_type not in _CONVS
                        or len(consumers.get(ins[0], ())) + (ins[0] in outputs) != 1):
                    return True
        graphs = [sub for n in main.with_bodies for body in subgraphs(n) for sub in _graphs(body)]
    else:
        graphs = list(_graphs(model.graph))
    for g in graphs:
        prod = {o: n for n in g.node for o in n.output}
        readers: dict[str, int] = {o.name: 1 for o in g.output}
        for n in g.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        for n in g.node:
            if n.op_type == "CastLike":
                return True  # a constant made by CastLike needs the element type of what it copies
            if n.op_type == "BatchNormalization" and not _conv_alone(n, prod, lambda v, r=readers: r.get(v, 0)):
                return True
    return any(n.op_type == "BatchNormalization" for f in model.functions for n in f.node)


def _conv_alone(bn: onnx.NodeProto, producer: Mapping[str, onnx.NodeProto], uses: Callable[[str], int]) -> bool:
    """Is the BN fed by a Conv that feeds nothing else? (It then folds forward without shapes.)"""
    ins = bn.input[:]
    if not ins:
        return True
    src = producer.get(ins[0])
    return src is not None and src.op_type in _CONVS and uses(ins[0]) == 1


_CONVS = ("Conv", "ConvTranspose")
