"""Every layer output of a Keras graph model, by layer name, from one run: the intermediates a comparison
looks at and the data the per-fold proofs replay.

A functional (or built Sequential) model is run node by node through its recorded graph, as
Functional.call does (inference mode for every layer that takes `training`), recursing into nested
graph models, and each node's output is kept under its layer path: `conv1`, `block/conv1` inside
nested model `block`, `conv1#1` for the second call of a shared layer, `split:1` for a node's second
output. The run must reproduce the model's own outputs (`Capture.outputs`); the verifier checks it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .backend import DEVICE_NAMES, no_grad, to_numpy
from .graph import GraphView
from .plan import functional_of, is_graph_model

BN_CLASS = "BatchNormalization"


@dataclass
class Capture:
    """One run's layer outputs, and the model's structure around them."""

    values: dict[str, np.ndarray] = field(default_factory=dict)   # key -> output, in call order
    classes: dict[str, str] = field(default_factory=dict)         # key -> class name of the layer
    paths: dict[str, str] = field(default_factory=dict)           # key -> layer path (no call suffixes)
    next_bn: dict[str, str] = field(default_factory=dict)         # key -> key of the BN that alone reads it
    at_output: set[str] = field(default_factory=set)              # keys whose value is also a graph output
    tensors: dict[int, np.ndarray] = field(default_factory=dict)  # id(KerasTensor) -> value (first call)
    outputs: list[np.ndarray] = field(default_factory=list)       # the model's flattened outputs

    def carried(self, key: str) -> list[str]:
        """Keys of the chain of BatchNorms that alone read `key`'s output, one after the other."""
        chain: list[str] = []
        while key in self.next_bn and key not in self.at_output:
            key = self.next_bn[key]
            chain.append(key)
        return chain


def _keys(view: GraphView, prefix: str) -> dict[int, str]:
    """id(node) -> its key: the layer's name, `#k` for the k-th further call of the same layer."""
    calls: Counter = Counter()
    out = {}
    for node in view.nodes:
        k = calls[id(node.operation)]
        calls[id(node.operation)] += 1
        out[id(node)] = f"{prefix}{node.operation.name}" + (f"#{k}" if k else "")
    return out


def _call(op: Any, args: tuple, kwargs: dict) -> Any:
    if "training" in getattr(op, "_call_context_args", ()):
        kwargs = {**kwargs, "training": False}
    return op(*args, **kwargs)


def _standardized(fn: Any, args: tuple) -> list[Any]:
    """The flat inputs of graph `fn` for a call with positional `args` (as Functional.call makes them)."""
    import keras

    x = args[0] if len(args) == 1 else list(args)
    std = getattr(fn, "_standardize_inputs", None)
    if std is not None:
        return list(std(x))
    return [keras.ops.convert_to_tensor(t) for t in keras.tree.flatten(x)]


def _walk(fn: Any, inputs: list[Any], prefix: str, path: str, cap: Capture) -> Any:
    import keras

    view = GraphView(fn)
    keys = _keys(view, prefix)
    values: dict[int, Any] = {}
    for x, y in zip(fn.inputs, inputs):
        values[id(x)] = y
        cap.tensors.setdefault(id(x), to_numpy(y))
    for node in view.nodes:
        op = node.operation
        key = keys[id(node)]
        if any(id(t) not in values for t in node.input_tensors):
            continue  # not computable from the inputs (as Functional.call skips it)
        args, kwargs = node.arguments.fill_in(values)
        if is_graph_model(op):
            inner = functional_of(op)
            out = _walk(inner, _standardized(inner, args), key + "/", f"{path}{op.name}/", cap)
        else:
            out = _call(op, args, kwargs)
        readers = {}
        for i, (t, y) in enumerate(zip(node.outputs, keras.tree.flatten(out))):
            values[id(t)] = y
            k = key if i == 0 else f"{key}:{i}"
            arr = to_numpy(y)
            cap.values[k] = arr
            cap.classes[k] = type(op).__name__
            cap.paths[k] = f"{path}{op.name}" + (f":{i}" if i else "")
            cap.tensors.setdefault(id(t), arr)
            readers[k] = view.consumers.get(id(t), [])
            if id(t) in view.output_ids:
                cap.at_output.add(k)
        for k, rs in readers.items():
            if len(rs) == 1 and type(rs[0].operation).__name__ == BN_CLASS:
                cap.next_bn[k] = keys[id(rs[0])]
    missing = [t for t in fn.outputs if id(t) not in values]
    if missing:
        raise ValueError(f"output {missing[0].name} of {fn.name} is not connected to its inputs")
    return keras.tree.pack_sequence_as(fn._outputs_struct, [values[id(t)] for t in fn.outputs])


def capture(model_or_graph: Any, feeds: Sequence[np.ndarray], device: str = "cpu") -> Capture:
    """Run a functional / Sequential model (or a traced graph) on one batch, keeping every layer output."""
    import keras

    from .backend import pack_inputs

    fn = functional_of(model_or_graph)
    cap = Capture()
    with keras.device(DEVICE_NAMES[device]), no_grad():
        inputs = _standardized(fn, (pack_inputs(fn, list(feeds)),))
        out = _walk(fn, inputs, "", "", cap)
    cap.outputs = [to_numpy(o) for o in keras.tree.flatten(out)]
    return cap


def concat(caps: list[Capture]) -> Capture:
    """Several batches' captures as one: every value flattened and concatenated (structure from the first)."""
    if len(caps) == 1:
        return caps[0]
    first = caps[0]
    keys = [k for k in first.values if all(k in c.values for c in caps)]
    values = {k: np.concatenate([np.asarray(c.values[k]).reshape(-1) for c in caps]) for k in keys}
    outputs = [np.concatenate([np.asarray(c.outputs[i]).reshape(-1) for c in caps]) for i in range(len(first.outputs))]
    return Capture(values, first.classes, first.paths, first.next_bn, first.at_output, first.tensors, outputs)


def can_capture(model: Any) -> bool:
    """Whether `model` has a recorded layer graph to run node by node."""
    try:
        return is_graph_model(model) and functional_of(model) is not None
    except Exception:  # an unbuilt Sequential
        return False
