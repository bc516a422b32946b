"""The noise model of an ONNX original: the same model with every weight nudged by about one ulp."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..verify import compare
from .ondisk import on_disk, tensor_value
from .protos import copy_borrowing, fill_borrowed

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}

WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "Add", "Sub", "Mul",
              "InstanceNormalization", "LayerNormalization", "PRelu"}


def perturbed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """A copy of `model` whose weights move by about one ulp: every float constant that some weight op
    reads, directly or through constant-only ops (Identity, Cast, Reshape...), in the main graph,
    in If/Loop/Scan bodies and in model-local functions; Constant and ConstantOfShape values too."""
    m, later = perturbed_lazily(model, seed)
    if later:
        raise ValueError("perturbed() needs every weight in memory; use perturbed_lazily() and nudge on save")
    return m


def nudged_initializers(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray] | None:
    """The new values perturbed() gives the main graph's initializers, by name, without building the
    model: the noise model is then `model` with these weights (protos.WithOutputs(model, ..., weights)),
    which onnxruntime takes as arrays. The same nudges as perturbed() (the same generator, drawn in the
    same order). None when the noise model changes more than main-graph initializers held as plain
    float arrays (a weight made by a Constant node, one inside a subgraph or a function, one on disk
    or of a type without a numpy array): perturbed() builds that one."""
    from .const import constant_root_readers

    g = model.graph
    A = onnx.AttributeProto
    if model.functions or any(a.type in (A.GRAPH, A.GRAPHS) for n in g.node for a in n.attribute):
        return None
    readers = constant_root_readers(g, WEIGHT_OPS)
    if any(n.op_type in ("Constant", "ConstantOfShape") and n.output and n.output[0] in readers for n in g.node):
        return None
    rng = np.random.default_rng(seed + 7919)
    compute = _compute_eps(model, readers)
    out: dict[str, np.ndarray] = {}
    for t in g.initializer:  # as perturbed_lazily's visit: the initializers first, in order
        if t.name not in readers:
            continue
        if on_disk(t) or t.data_type not in _ARRAYS:
            return None
        a = tensor_value(t)
        reader = readers.get(t.name)
        least = 1 if reader is not None and reader.op_type in LAYER_OPS else 2
        if a.size < least or a.dtype.kind != "f":
            continue
        out[t.name] = compare.perturb(a, rng, compute.get(t.name))
    return out


_ARRAYS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def nudge_by_name(seed: int) -> Callable[[str, np.ndarray], np.ndarray]:
    """perturb() with a generator seeded by the tensor's name: the same nudge every time it is made."""
    import zlib

    return lambda name, a: compare.perturb(a, np.random.default_rng([seed, 7919, zlib.crc32(name.encode())]))


def perturbed_lazily(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, set[str]]:
    """perturbed(), except that weights still on disk (ondisk.on_disk) are not read: their names
    come back, to be nudged one at a time as they are written (ondisk.for_session).

    Each weight moves by one ulp of the dtype its reader computes in: a float16 BatchNorm parameter of
    a float32 BatchNorm (opset 15) is an exact value in a float32 computation, so it moves by a float32
    ulp (which leaves it as it is), not by the far larger float16 one. A ConstantOfShape weight (one
    fill value standing for a whole tensor) becomes a Constant with every element nudged on its own:
    moving the one fill value would move every element the same way, and coherent nudges miss the
    rounding noise of sums that cancel.
    """
    from .const import constant_root_readers

    rng = np.random.default_rng(seed + 7919)
    m, borrowed = copy_borrowing(model)  # every big weight is replaced: not copied first
    later: set[str] = set()
    readers = constant_root_readers(m.graph, WEIGHT_OPS)
    compute = _compute_eps(m, readers)
    shapes = {t.name: t for t in m.graph.initializer}

    def nudge(t: onnx.TensorProto, name: str, least: int = 2, top: bool = False) -> None:
        if on_disk(t):
            if t.data_type in FLOAT_TYPES:
                later.add(t.name)
            return
        src = borrowed.get(t.name) if top else None  # a main-graph initializer may be a stub
        a = tensor_value(src if src is not None else t)
        if a.size < least or not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            return  # scalars (exponents, clip bounds) are not weights; nudging them can change semantics
        new = numpy_helper.from_array(compare.perturb(a, rng, compute.get(name)), t.name)
        if src is not None:
            borrowed.pop(t.name)
            t.raw_data = new.raw_data  # a stub: its header stays, the data is the nudged one
        else:
            t.CopyFrom(new)

    def min_size(name: str) -> int:
        # a one-channel BatchNorm or layer still has weights; scalars of other ops (exponents, bounds) are not
        reader = readers.get(name)
        return 1 if reader is not None and reader.op_type in LAYER_OPS else 2

    def visit(nodes, inits, roots, top: bool = False) -> None:
        for t in inits:
            if t.name in roots:
                nudge(t, t.name, min_size(t.name), top=top)
        for n in nodes:
            if n.op_type in ("Constant", "ConstantOfShape") and n.output and n.output[0] in roots:
                if n.op_type == "ConstantOfShape" and _materialise(n, shapes):
                    pass  # now a Constant holding the whole tensor: nudged element by element below
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        nudge(a.t, n.output[0], 1 if n.op_type == "ConstantOfShape" else min_size(n.output[0]))
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    visit(sub.node, sub.initializer, roots)

    visit(m.graph.node, m.graph.initializer, readers, top=True)
    for f in m.functions:
        visit(f.node, [], constant_root_readers(onnx.GraphProto(node=f.node), WEIGHT_OPS))
    fill_borrowed(m, borrowed)
    return m, later


LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}
MATERIALISE_MAX = 1 << 24  # elements: a ConstantOfShape weight larger than this keeps its one-value nudge


def _materialise(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Turn a ConstantOfShape whose shape is an initializer into the equivalent Constant (in place)."""
    shape_t = inits.get(node.input[0]) if node.input else None
    if shape_t is None:
        return False
    dims = [int(d) for d in numpy_helper.to_array(shape_t).reshape(-1)]
    if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) > MATERIALISE_MAX:
        return False
    fill = next((numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"),
                np.zeros(1, np.float32))
    full = np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype)
    del node.input[:]
    del node.attribute[:]
    node.op_type = "Constant"
    node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(full)))
    return True


def _compute_eps(model: onnx.ModelProto, readers: dict[str, onnx.NodeProto]) -> dict[str, float]:
    """Weight name -> unit roundoff of the dtype its reader computes in, where that differs from the
    weight's own dtype (models mixing float types only; one weight-free shape inference)."""
    own = {t.name: t.data_type for t in model.graph.initializer if t.data_type in FLOAT_TYPES}
    for n in model.graph.node:  # weights made by Constant / ConstantOfShape nodes (stored float16 and Cast up...)
        if n.op_type in ("Constant", "ConstantOfShape") and n.output:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type in FLOAT_TYPES:
                    own[n.output[0]] = a.t.data_type
    kinds = set(own.values()) | {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)
                                 if v.type.tensor_type.elem_type in FLOAT_TYPES}
    if len(kinds) < 2:
        return {}
    from .shapes import value_types
    types = value_types(model)
    out: dict[str, float] = {}
    for name, reader in readers.items():
        data = reader.input[0] if reader.input else ""
        t = types.get(data, (None, 0))[1]
        if t in FLOAT_TYPES and name in own and t != own[name]:
            out[name] = compare.unit_roundoff(onnx.helper.tensor_dtype_to_np_dtype(t))
    return out
