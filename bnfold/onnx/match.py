"""What a BatchNorm folds into: the producing layer, its weight and bias, and how to read them."""
from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from ..core import layouts


@dataclass
class Match:
    """What a BN folds into: the producing layer, the weight/bias inputs and how to read them."""

    pattern: str
    layer: onnx.NodeProto           # node whose weight/bias change
    tail: onnx.NodeProto            # node whose output feeds the BN (layer, or the Add after MatMul)
    layout: layouts.Layout
    weight_name: str
    bias_name: str | None           # existing bias tensor, if any
    bias_slot: tuple[onnx.NodeProto, int] | None  # where a bias lives / goes; None -> insert an Add
    bias_scale: float = 1.0         # Gemm beta
    changed: list[onnx.NodeProto] = field(default_factory=list)  # nodes before `tail` whose output value changes
