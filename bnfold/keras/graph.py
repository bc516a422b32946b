"""A read-only view of a Keras functional graph: call sites (nodes), who consumes each tensor, and
which layer kinds bnfold can fold into (with their weight layouts and channel axes).

Keras 3 records every call of a layer on symbolic tensors as a Node; a Functional model (and the
Functional inside a built Sequential) keeps the nodes of its own graph in `_nodes_by_depth`. Only
nodes of *this* graph count: a layer may also be called from other models.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from ..core import layouts
from ..core.layouts import Layout


@dataclass(frozen=True)
class Slots:
    """Where the folded weights of a producer live in `layer.get_weights()`."""

    kernel: int                 # index of the weight that the BN scales
    bias: int | None            # index of the bias, None when use_bias=False
    layout: Layout
    channel_axis_first: bool    # data_format == "channels_first"


def keras_classes() -> dict[str, tuple[type, ...]]:
    """Producer classes by role. Exact types only: a subclass may change what call() computes."""
    import keras

    L = keras.layers
    return {
        "conv": (L.Conv1D, L.Conv2D, L.Conv3D),
        "transpose": (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose),
        "depthwise": (L.DepthwiseConv1D, L.DepthwiseConv2D),
        "separable": (L.SeparableConv1D, L.SeparableConv2D),
        "dense": (L.Dense,),
    }


def role_of(layer: Any) -> str | None:
    """'conv', 'transpose', 'depthwise', 'separable', 'dense' or None for anything else."""
    for role, classes in keras_classes().items():
        if type(layer) in classes:
            return role
    return None


def slots_for(layer: Any, weights: list) -> Slots:
    """Weight slots and layout of a supported producer, given its current weights."""
    role = role_of(layer)
    first = getattr(layer, "data_format", "channels_last") == "channels_first"
    if role == "separable":
        # The pointwise kernel is a 1x1 conv whose output channels are the layer's outputs.
        return Slots(1, 2 if len(weights) > 2 else None, layouts.keras_conv(1), first)
    bias = 1 if len(weights) > 1 else None
    if role == "conv":
        return Slots(0, bias, layouts.keras_conv(int(getattr(layer, "groups", 1) or 1)), first)
    if role == "transpose":
        return Slots(0, bias, layouts.keras_conv_transpose(), first)
    if role == "depthwise":
        return Slots(0, bias, layouts.keras_depthwise(int(weights[0].shape[-2])), first)
    if role == "dense":
        return Slots(0, bias, layouts.keras_dense(), False)
    raise ValueError(f"not a foldable producer: {type(layer).__name__}")


def channel_axis(layer: Any, rank: int) -> int:
    """Channel axis (non-negative) of a conv/dense layer's input and output tensors of rank `rank`."""
    if role_of(layer) != "dense" and getattr(layer, "data_format", "channels_last") == "channels_first":
        return 1
    return rank - 1


class GraphView:
    """Nodes of one Functional graph in topological order, with consumers and call counts."""

    def __init__(self, functional: Any) -> None:
        by_depth = functional._nodes_by_depth
        self.nodes = [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]
                      if n.operation is not None and not n.is_input]
        self._node_ids = {id(n) for n in self.nodes}
        self.consumers: dict[int, list[Any]] = defaultdict(list)
        for n in self.nodes:
            seen: set[int] = set()
            for t in n.input_tensors:
                if id(t) not in seen:
                    seen.add(id(t))
                    self.consumers[id(t)].append(n)
        self.output_ids = {id(t) for t in functional.outputs}
        self.calls = Counter(id(n.operation) for n in self.nodes)
        self.graphs: dict[int, set[int]] = {}  # id(layer) -> graphs calling it (keras_plan.graphs_per_layer)

    def producer_node(self, tensor: Any) -> Any | None:
        """The node of this graph that computed `tensor`, or None for a model input."""
        hist = getattr(tensor, "_keras_history", None)
        if hist is None:
            return None
        op, node_index = hist[0], hist[1]
        node = op._inbound_nodes[node_index]
        if id(node) not in self._node_ids:
            return None
        return node

    def uses(self, tensor: Any) -> list[str]:
        """Names of everything that reads `tensor` (consumer layers and 'model output')."""
        names = [n.operation.name for n in self.consumers.get(id(tensor), [])]
        if id(tensor) in self.output_ids:
            names.append("model output")
        return names


def main_input(node: Any) -> Any | None:
    """The single tensor a BN / conv / dense node was called on (None when called on several)."""
    args = node.arguments.args
    if len(args) < 1:
        return None
    x = args[0]
    return x if hasattr(x, "_keras_history") else None


def all_batchnorms(model: Any) -> list[tuple[str, Any]]:
    """(path, layer) of every BatchNormalization inside `model`, nested models included."""
    import keras

    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(m: Any, prefix: str) -> None:
        for layer in getattr(m, "layers", []):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.layers.BatchNormalization):
                found.append((prefix + layer.name, layer))
            elif isinstance(layer, keras.Model) or getattr(layer, "layers", None):
                walk(layer, f"{prefix}{layer.name}/")
            else:
                for sub in layer._flatten_layers(include_self=False):
                    if isinstance(sub, keras.layers.BatchNormalization) and id(sub) not in seen:
                        seen.add(id(sub))
                        found.append((f"{prefix}{layer.name}/{sub.name}", sub))

    walk(model, "")
    return found
