"""What bnfold sees in a PyTorch model: ops (a BN, a foldable layer, a layout op or anything else),
and which modules and functions are which.

A module counts as a layer or a BN only when its call is the plain torch.nn computation (a subclass
that overrides forward is traced into instead); functions are recognised in their torch.nn.functional,
torch and ATen forms, with their argument positions, so every capture describes a call the same way.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from . import bnlike as bnlike

LAYER_KINDS = ("conv", "convT", "linear")


@dataclass
class Op:
    """One call: a BN, a foldable layer, a layout op (layout.py), or anything else ("other")."""

    name: str
    kind: str
    inputs: list[int]
    outputs: list[int]
    module: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    node: Any = None


@dataclass
class Capture:
    """A model's ops in call order, how they were seen (`method`), and who reads what."""

    method: str
    ops: list[Op] = field(default_factory=list)
    graph_outputs: set[int] = field(default_factory=set)
    ranks: dict[int, int] = field(default_factory=dict)
    module_calls: Counter = field(default_factory=Counter)
    param_uses: Counter = field(default_factory=Counter)
    graph_module: Any = None  # the fx GraphModule whose nodes the ops point at, when rewritable
    notes: list[str] = field(default_factory=list)

    def users(self, value: int) -> list[Op]:
        """The ops that read `value`'s values."""
        return [op for op in self.ops if value in op.inputs]

    def producer(self, value: int) -> Op | None:
        """The op that made `value`, if any (None for a model input or a constant)."""
        for op in self.ops:
            if value in op.outputs:
                return op
        return None


# What a module is --------------------------------------------------------------------------------

def _torch_base(cls: type, base: type) -> type:
    for c in cls.__mro__:
        if c.__module__.startswith("torch.nn.") and issubclass(c, base):
            return c
    return base


def module_kind(m: nn.Module) -> str | None:
    """'bn', 'conv', 'convT' or 'linear' for a module whose call is the plain layer, else None.

    Subclasses count as long as they keep the layer's forward: one that overrides it may compute
    something else (weight standardisation, quantisation), so it is traced into instead.
    """
    if isinstance(m, _BatchNorm):
        kind, base = "bn", _BatchNorm
        methods = ("forward",)
    elif isinstance(m, _ConvTransposeNd):
        kind, base, methods = "convT", _ConvTransposeNd, ("forward",)
    elif isinstance(m, _ConvNd):
        kind, base, methods = "conv", _ConvNd, ("forward", "_conv_forward")
    elif isinstance(m, nn.Linear):
        kind, base, methods = "linear", nn.Linear, ("forward",)
    elif bnlike.is_frozen(m):
        return "bn"  # its forward is probed against the BN map before anything folds (torch_bnlike)
    else:
        return None
    tb = _torch_base(type(m), base)
    for meth in methods:
        if getattr(type(m), meth, None) is not getattr(tb, meth, None):
            return None
    return kind


def module_op(path: str, m: nn.Module, kind: str, inputs: list[int], outputs: list[int], node: Any = None) -> Op:
    """An Op for a call of module `m` (found at `path`)."""
    pre = f"{path}." if path else ""
    if kind == "bn" and not isinstance(m, _BatchNorm):
        params, attrs = bnlike.module_params(path, m)
    elif kind == "bn":
        params = {"weight": pre + "weight" if m.weight is not None else None,
                  "bias": pre + "bias" if m.bias is not None else None,
                  "running_mean": pre + "running_mean" if m.running_mean is not None else None,
                  "running_var": pre + "running_var" if m.running_var is not None else None}
        attrs = {"eps": float(m.eps), "training": bool(m.training),
                 "uses_batch_stats": m.training or m.running_mean is None, "channels": m.num_features}
    else:
        params = {"weight": pre + "weight", "bias": pre + "bias" if m.bias is not None else None}
        attrs = {}
        if kind in ("conv", "convT"):
            attrs = {"groups": m.groups, "padding": m.padding, "padding_mode": m.padding_mode,
                     "kernel": tuple(m.kernel_size)}
    return Op(path or type(m).__name__, kind, inputs, outputs, module=path, params=params, attrs=attrs, node=node)


# Functional forms (torch.nn.functional and ATen) ---------------------------------------------------

def _aten(name: str) -> list[Any]:
    ns = torch.ops.aten
    out = []
    for overload in name.split("|"):
        op, _, ov = overload.partition(".")
        try:
            out.append(getattr(getattr(ns, op), ov or "default"))
        except AttributeError:
            pass
    return out


def _functional_table() -> dict[Any, tuple[str, str]]:
    t: dict[Any, tuple[str, str]] = {F.batch_norm: ("bn", "F"), F.linear: ("linear", "lin")}
    t[torch.batch_norm] = ("bn", "aten")
    for f in _aten("batch_norm"):
        t[f] = ("bn", "aten")
    for f in (F.conv1d, F.conv2d, F.conv3d, *_aten("conv1d|conv2d|conv3d|conv1d.padding|conv2d.padding|conv3d.padding")):
        t[f] = ("conv", "conv")
    for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
              *_aten("conv_transpose1d|conv_transpose2d.input|conv_transpose3d.input")):
        t[f] = ("convT", "convT")
    for f in _aten("linear"):
        t[f] = ("linear", "lin")
    for f in _aten("convolution"):
        t[f] = ("conv?", "convolution")
    # decomposed programs (run_decompositions, ExecuTorch): tuple-returning BN ops, output = result[0]
    for f in _aten("native_batch_norm"):
        t[f] = ("bn", "aten")
    for f in _aten("_native_batch_norm_legit_no_training"):
        t[f] = ("bn", "legit")
    return t


def tuple_bn(target: Any) -> bool:
    return getattr(target, "__name__", "").startswith(("native_batch_norm", "_native_batch_norm_legit_no_training"))


_TABLE: dict[Any, tuple[str, str]] | None = None

# argument positions: name -> (index, default)
_SIGS: dict[str, dict[str, tuple[int, Any]]] = {
    "F": {"input": (0, None), "running_mean": (1, None), "running_var": (2, None), "weight": (3, None),
          "bias": (4, None), "training": (5, False), "eps": (7, 1e-5)},
    "aten": {"input": (0, None), "weight": (1, None), "bias": (2, None), "running_mean": (3, None),
             "running_var": (4, None), "training": (5, False), "eps": (7, 1e-5)},
    "legit": {"input": (0, None), "weight": (1, None), "bias": (2, None), "running_mean": (3, None),
              "running_var": (4, None), "training": (99, False), "eps": (6, 1e-5)},
    "conv": {"input": (0, None), "weight": (1, None), "bias": (2, None), "padding": (4, 0), "groups": (6, 1)},
    "convT": {"input": (0, None), "weight": (1, None), "bias": (2, None), "padding": (4, 0), "groups": (6, 1)},
    "lin": {"input": (0, None), "weight": (1, None), "bias": (2, None)},
    "convolution": {"input": (0, None), "weight": (1, None), "bias": (2, None), "padding": (4, 0),
                    "transposed": (6, False), "groups": (8, 1)},
}


def functional_kind(target: Any) -> tuple[str, str] | None:
    """(kind, signature) for a function bnfold understands, else None."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _functional_table()
    try:
        return _TABLE.get(target)
    except TypeError:
        return None


def arg(args: tuple, kwargs: dict, sig: str, name: str) -> Any:
    idx, default = _SIGS[sig][name]
    if name in kwargs:
        return kwargs[name]
    return args[idx] if idx < len(args) else default


def functional_op(name: str, fk: tuple[str, str], args: tuple, kwargs: dict, path_of: Any, is_none: Any,
                  inputs: list[int], outputs: list[int], node: Any = None) -> Op:
    """An Op for a functional call; `path_of(arg)` names a parameter/buffer argument or returns None."""
    kind, sig = fk
    if sig == "convolution":
        kind = "convT" if arg(args, kwargs, sig, "transposed") else "conv"
    params: dict[str, str | None] = {}
    attrs: dict[str, Any] = {}
    roles = ("weight", "bias", "running_mean", "running_var") if kind == "bn" else ("weight", "bias")
    for role in roles:
        a = arg(args, kwargs, sig, role)
        if is_none(a):
            params[role] = None
        else:
            p = path_of(a)
            params[role] = p
            if p is None:
                attrs.setdefault("non_constant", []).append(role)
    if kind == "bn":
        training = arg(args, kwargs, sig, "training")
        attrs.update({"eps": float(arg(args, kwargs, sig, "eps")), "training": bool(training),
                      "uses_batch_stats": bool(training) or params["running_mean"] is None})
    elif kind in ("conv", "convT"):
        pad = arg(args, kwargs, sig, "padding")
        attrs.update({"groups": int(arg(args, kwargs, sig, "groups")), "padding": pad, "padding_mode": "zeros"})
    if kind != "bn" and params.get("weight"):
        name = params["weight"].rpartition(".")[0] or params["weight"]  # the layer's owner reads better than a node name
    return Op(name, kind, inputs, outputs, params=params, attrs=attrs, node=node)
