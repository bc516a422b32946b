"""Looking through layout ops between a layer and its BatchNorm: Linear -> flatten(0, 1) -> BatchNorm1d.

A layer's channels live on one axis of its output (a Linear's on the last, a conv's on axis 1).
flatten/reshape/view/squeeze/unsqueeze/permute/transpose move that axis; the BN scales axis 1 of what
it sees. The fold is exact only when the layer's channel axis provably *is* the BN's channel axis after
every op, as in the ONNX pass (onnx/layout.py): a permutation moves axis a to perm.index(a); a reshape
keeps channel k at position k of output axis b exactly when b has the same size and the same number of
elements after it (static shapes needed). contiguous/clone/alias and inference-mode dropout leave the
values where they are. An equal channel count on another axis does not count.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..core.decisions import Reason, Skip

RESHAPES = frozenset({"flatten", "reshape", "view", "squeeze", "unsqueeze", "unflatten", "_unsafe_view",
                      "Flatten", "Unflatten"})
PERMUTES = frozenset({"permute", "transpose", "t", "swapaxes", "swapdims"})
SAME = frozenset({"contiguous", "clone", "alias", "detach", "Identity"})
DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout", "Dropout", "Dropout1d", "Dropout2d",
                      "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"})
MAX_CHAIN = 16


def _ints(x: Any) -> list[int] | None:
    if isinstance(x, (list, tuple)) and all(type(i) is int for i in x):
        return list(x)
    return None


def _static(shape: Any) -> tuple[int, ...] | None:
    """A shape of plain ints, or None (unknown, or symbolic in a dynamic export: nothing provable)."""
    if shape is None or any(type(d) is not int for d in shape):
        return None
    return tuple(shape)


def describe(name: str, args: Sequence[Any], kwargs: dict, in_shape: Any, out_shape: Any,
             training: bool | None = None) -> dict[str, Any] | None:
    """Layout attrs for a call named `name` (`args`: its arguments after the tensor), or None when it is
    not a layout op. `training` is a module's flag; for a function, dropout is on unless told off."""
    ins, outs = _static(in_shape), _static(out_shape)
    if name in SAME:
        return {"move": "same"}
    if name in DROPOUTS:
        on = training if training is not None else kwargs.get("training", kwargs.get(
            "train", args[1] if len(args) > 1 else True))
        return {"move": "same"} if on is False else None
    if name in RESHAPES:
        return {"move": "reshape", "in_shape": ins, "out_shape": outs}
    if name not in PERMUTES or ins is None:
        return None
    rank = len(ins)
    if name == "t":
        return {"move": "perm", "perm": list(range(rank))[::-1]} if rank <= 2 else None
    if name == "permute":
        dims = _ints(args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else
                     list(args) if args else kwargs.get("dims"))
        if dims is None or len(dims) != rank or sorted(d % rank for d in dims) != list(range(rank)):
            return None
        return {"move": "perm", "perm": [d % rank for d in dims]}
    pair = _ints(list(args[:2]) if len(args) >= 2 else [kwargs.get("dim0"), kwargs.get("dim1")])
    if pair is None or rank == 0:
        return None
    perm = list(range(rank))
    a, b = pair[0] % rank, pair[1] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return {"move": "perm", "perm": perm}


def moved_axis(label: str, attrs: dict[str, Any], axis: int) -> int:
    """Where axis `axis` of a layout op's input lands in its output; Skip(AXIS_MISMATCH) when unproven."""
    move = attrs["move"]
    if move == "same":
        return axis
    if move == "perm":
        return list(attrs["perm"]).index(axis)
    ins, outs = attrs.get("in_shape"), attrs.get("out_shape")
    if ins is None or outs is None or not 0 <= axis < len(ins):
        raise Skip(Reason.AXIS_MISMATCH, f"cannot prove where {label} puts the channels: shapes unknown or dynamic",
                   producer=label)
    feat, after = ins[axis], math.prod(ins[axis + 1:])
    for b, d in enumerate(outs):
        if d == feat and math.prod(outs[b + 1:]) == after:
            return b
    raise Skip(Reason.AXIS_MISMATCH, f"{label} reshapes {list(ins)} to {list(outs)}: the {feat} channels do not stay "
               "one axis", producer=label)
