"""The noise model of an ONNX original: the same model with every weight nudged by about one ulp."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from ..verify import compare
from .ondisk import on_disk

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


def nudge_by_name(seed: int) -> Callable[[str, np.ndarray], np.ndarray]:
    """perturb() with a generator seeded by the tensor's name: the same nudge every time it is made."""
    import zlib

    return lambda name, a: compare.perturb(a, np.random.default_rng([seed, 7919, zlib.crc32(name.encode())]))


def perturbed_lazily(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, set[str]]:
    """perturbed(), except that weights still on disk (onnx_io.on_disk) are not read: their names
    come back, to be nudged one at a time as they are written (onnx_io.for_session)."""
    from .const import constant_roots

    rng = np.random.default_rng(seed + 7919)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    later: set[str] = set()

    def nudge(t: onnx.TensorProto, min_size: int = 2) -> None:
        if on_disk(t):
            if t.data_type in FLOAT_TYPES:
                later.add(t.name)
            return
        a = numpy_helper.to_array(t)
        if a.size < min_size or not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            return  # scalars (exponents, clip bounds) are not weights; nudging them can change semantics
        t.CopyFrom(numpy_helper.from_array(compare.perturb(a, rng), t.name))

    def visit(nodes, inits, roots: set[str]) -> None:
        for t in inits:
            if t.name in roots:
                nudge(t)
        for n in nodes:
            if n.op_type in ("Constant", "ConstantOfShape") and n.output and n.output[0] in roots:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        # a ConstantOfShape fill is one value standing for a whole weight
                        nudge(a.t, min_size=1 if n.op_type == "ConstantOfShape" else 2)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                            list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    visit(sub.node, sub.initializer, roots)

    visit(m.graph.node, m.graph.initializer, constant_roots(m.graph, WEIGHT_OPS))
    for f in m.functions:
        visit(f.node, [], constant_roots(onnx.GraphProto(node=f.node), WEIGHT_OPS))
    return m, later
