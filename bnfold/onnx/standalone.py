"""Per-channel affine chains around a BatchNorm, and a BatchNorm with no layer to fold into.

A BN is y = s*x + t per channel. Caffe2-era exports follow it with Mul(const) and Add(const) ops on
the same channels (the old "Scale" layer); those compose into one (s, t) (kernel.compose_affine)
and fold together with the BN. A BN that has no layer to fold into either way becomes, with
`--standalone affine`, one Mul and one Add with precomputed per-channel constants (kernel.affine).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from ..core import kernel
from ..core.decisions import Decision, Skip
from .nodes import ONNX_DOMAINS

if TYPE_CHECKING:
    from .folder import OnnxFolder



@dataclass
class BnView:
    """A BN seen together with the Mul/Add chain it absorbs: y(out) = scale * x + shift per channel."""

    bn: onnx.NodeProto
    out: str
    scale: np.ndarray
    shift: np.ndarray
    chain: list[onnx.NodeProto] = field(default_factory=list)

    @property
    def suffix(self) -> str:
        return "".join([f"->{n.op_type}" for n in self.chain]) if self.chain else ""


def per_channel(c: np.ndarray, channels: int, rank: int | None) -> np.ndarray | None:
    """`c` as a per-channel vector when it broadcasts onto axis 1 of a rank-`rank` tensor, else None."""
    c = np.asarray(c)
    if c.dtype.kind != "f" and c.dtype.name != "bfloat16":
        return None
    if c.size == 1:
        # a scalar must not raise the rank of what it multiplies
        return np.full(channels, c.reshape(-1)[0]) if (c.ndim <= (rank if rank is not None else 1)) else None
    if c.size != channels or rank is None or rank < 2 or c.ndim > rank:
        return None
    padded = (1,) * (rank - c.ndim) + tuple(c.shape)
    if padded[1] != channels or any(d != 1 for i, d in enumerate(padded) if i != 1):
        return None
    return c.reshape(-1)


def absorb_affine_chain(f: "OnnxFolder", bn: onnx.NodeProto, scale: np.ndarray, shift: np.ndarray) -> BnView:
    """Extend the BN's (s, t) over the Mul/Add-by-constant nodes that alone read its output."""
    ix = f.ix
    view = BnView(bn, bn.output[0], scale, shift)
    rank: int | None | str = "unknown"  # looked up once a candidate shows up (most BNs have none)
    for _ in range(8):
        out = view.out
        users = ix.consumers.get(out, [])
        if out in ix.graph_outputs or len(users) != 1:
            break
        n = users[0]
        if (n.domain not in ONNX_DOMAINS or n.op_type not in ("Mul", "Add") or len(n.input) != 2
                or n.input[0] == n.input[1] or len([o for o in n.output if o]) != 1):
            break
        other = n.input[1] if n.input[0] == out else n.input[0]
        try:
            c = ix.const(other, "affine constant")
        except Skip:
            break
        if rank == "unknown":
            rank = f._rank(bn.input[0])
        vec = per_channel(c, scale.size, rank)  # type: ignore[arg-type]
        if vec is None:
            break
        if n.op_type == "Mul":
            view.scale, view.shift = kernel.compose_affine(view.scale, view.shift, mul=vec)
        else:
            view.scale, view.shift = kernel.compose_affine(view.scale, view.shift, add=vec)
        view.chain.append(n)
        view.out = n.output[0]
    return view


def as_mul_add(f: "OnnxFolder", bn: onnx.NodeProto, label: str, view: BnView, first: Skip) -> Decision:
    """Rewrite the BN (and its absorbed chain) as Mul + Add with precomputed constants."""
    ix = f.ix
    x = bn.input[0]
    rank = f._rank(x)
    if rank is None or rank < 2:
        raise Skip(first.reason, f"{first.detail}; not rewritten as Mul+Add: the input's rank is unknown",
                   first.producer)
    et = f.elem_type(x)
    if not et and f.opset < 15:
        et = helper.np_dtype_to_tensor_dtype(f.ix.const(bn.input[1], "BatchNorm scale").dtype)
    if not et:
        raise Skip(first.reason, f"{first.detail}; not rewritten as Mul+Add: the input's dtype is unknown",
                   first.producer)
    dtype = helper.tensor_dtype_to_np_dtype(et)
    s, t = kernel.affine(view.scale, view.shift, dtype)
    shape = (s.size,) + (1,) * (rank - 2)
    base = label.rsplit("/", 1)[-1]
    s_name = f._write_const(f"{base}_scale", s.reshape(shape), None)  # type: ignore[arg-type]
    t_name = f._write_const(f"{base}_shift", t.reshape(shape), None)  # type: ignore[arg-type]
    mid = ix.unique(f"{base}_scaled")
    mul = helper.make_node("Mul", [x, s_name], [mid], name=ix.unique(f"{base}_mul"))
    add = helper.make_node("Add", [mid, t_name], [view.out], name=ix.unique(f"{base}_add"))
    ix.producer[mid] = mul
    ix.producer[view.out] = add
    ix.consumers.setdefault(x, []).append(mul)
    ix.consumers.setdefault(s_name, []).append(mul)
    ix.consumers[mid] = [add]
    ix.consumers.setdefault(t_name, []).append(add)
    f.inserted.append((bn, mul))
    f.inserted.append((bn, add))
    f.drop_bn(bn, view, old_out=None)
    return f.located(Decision.folded(label, f.scope + mul.name, f"BN{view.suffix} as Mul+Add", "standalone"), x,
                     view.out)
