"""Tiny helpers that build ONNX graphs with random BN statistics for tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import random_bn


class G:
    """Collects nodes and initializers; `bn()` adds a BatchNormalization with random statistics."""

    def __init__(self, rng: np.random.Generator, dtype=np.float32) -> None:
        self.rng, self.dtype = rng, np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray, dtype=None) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value).astype(dtype or self.dtype), name))
        return name

    def weight(self, name: str, shape, scale: float = 0.3) -> str:
        return self.init(name, self.rng.normal(0, scale, shape))

    def node(self, op: str, inputs, outputs, name: str | None = None, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name or outputs[0], **attrs))
        return outputs[0]

    def bn(self, name: str, x: str, c: int, eps: float = 1e-5, out: str | None = None, stats=None, **attrs) -> str:
        st = stats or random_bn(self.rng, c)
        ins = [x] + [self.init(f"{name}_{k}", st[k]) for k in ("gamma", "beta", "mean", "var")]
        return self.node("BatchNormalization", ins, [out or f"{name}_out"], name=name, epsilon=eps, **attrs)

    def model(self, inputs, outputs, opset: int = 17, ir: int = 8) -> onnx.ModelProto:
        et = helper.np_dtype_to_tensor_dtype(self.dtype)
        ins = [helper.make_tensor_value_info(n, et, s) for n, s in inputs]
        outs = [helper.make_tensor_value_info(n, et, s) for n, s in outputs]
        g = helper.make_graph(self.nodes, "test", ins, outs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="bnfold-tests")
        m.ir_version = ir
        return m


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with every onnxruntime optimisation off (so the runtime cannot fold BN itself)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


FLOAT = TensorProto.FLOAT
