"""Checks for PyTorch: which BN may fold into which layer (rewrite.py makes the edit).

A BN folds *after* the layer that produces its input when that output feeds nothing else (directly,
or through layout ops that keep the layer's channel axis as the BN's, layout.py); otherwise *before*
the single layer it feeds, when that layer reads no zero padding. Uses are value reads: metadata
reads do not count (reads.py). In an editable graph (GraphModule, torch.export program) a layer
shared by several call sites is cloned for the one that gets the BN; in a user's module it cannot be,
and the BN is skipped with SHARED_PRODUCER.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..core import kernel
from ..core.decisions import Reason, Skip
from . import bnlike as bnlike
from . import layout as layout
from .ops import LAYER_KINDS, Capture, Op

PATTERNS = {"conv": "Conv", "convT": "ConvTranspose", "linear": "Linear"}


@dataclass
class Plan:
    """A fold to attempt (layer set) or a skip (skip set), for the BN called `name`."""

    name: str
    bn: Op
    layer: Op | None = None
    direction: str | None = None
    skip: Skip | None = None

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.name, self.layer.name if self.layer else None, self.direction)


def bn_name(op: Op) -> str:
    """A stable name for a BN call: its module path, or the owner of its running statistics when they
    are called running_mean (a BN-like module), else the statistics' own path (a module may hold several)."""
    if op.module is not None:
        return op.module
    rm = op.params.get("running_mean")
    if rm:
        owner, _, attr = rm.rpartition(".")
        return owner if owner and attr == "running_mean" else rm
    return op.name


# Tensors by path ---------------------------------------------------------------------------------

def get_tensor(root: nn.Module, path: str) -> torch.Tensor:
    obj: Any = root
    for part in path.split("."):  # plain getattr: ScriptModules have no get_submodule
        obj = getattr(obj, part)
    return obj


def set_tensor(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Replace the tensor at `path` with a new object: the old one may be shared with other modules."""
    owner_path, _, attr = path.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    old = getattr(owner, attr, None)
    if isinstance(old, nn.Parameter) or attr in owner._parameters:
        grad = old.requires_grad if old is not None else True
        setattr(owner, attr, nn.Parameter(value, requires_grad=grad))
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float tensor as numpy in its own precision (bf16 via ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """numpy back to a tensor with `like`'s dtype and device."""
    if a.dtype.name == "bfloat16":
        t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    if tuple(t.shape) == tuple(like.shape):
        out = torch.empty_like(like)  # keeps the memory format (channels_last weights stay channels_last)
        out.copy_(t)
        return out
    return t.to(device=like.device, dtype=like.dtype)


def scale_shift(root: nn.Module, bn: Op) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of an inference BN in float64; raises Skip(NON_FINITE_PARAM) on bad statistics."""
    vals = {k: (to_numpy(get_tensor(root, p)) if p else None) for k, p in bn.params.items()}
    present = [v for v in vals.values() if v is not None]
    channels = present[0].size if present else bn.attrs.get("channels")
    return kernel.bn_scale_shift(vals["weight"], vals["bias"], vals["running_mean"], vals["running_var"],
                                 bn.attrs["eps"], channels)


# Checks ------------------------------------------------------------------------------------------

def check_bn(cap: Capture, bn: Op) -> None:
    """What rules the BN out whichever layer it would fold into."""
    if "unsupported" in bn.attrs:
        raise bn.attrs["unsupported"]
    if "non_constant" in bn.attrs:
        raise Skip(Reason.NON_CONSTANT_PARAM, f"BatchNorm {', '.join(bn.attrs['non_constant'])} is computed, not a stored tensor")
    if bn.attrs.get("training"):
        raise Skip(Reason.TRAINING_MODE)
    if bn.params.get("running_mean") is None or bn.params.get("running_var") is None:
        raise Skip(Reason.NO_RUNNING_STATS, "track_running_stats=False (or no running stats passed): the "
                                            "BatchNorm uses batch statistics even in eval()")
    if bn.module is not None and cap.module_calls[bn.module] > 1:
        raise Skip(Reason.SHARED_PRODUCER, f"the BatchNorm module {bn.module} is called at "
                                           f"{cap.module_calls[bn.module]} places; removing it would change all of them")
    for role, p in bn.params.items():
        if p and cap.param_uses[p] > 1:
            raise Skip(Reason.SHARED_PRODUCER, f"the BatchNorm's {role} {p} is also read elsewhere in the model")


def check_frozen(root: nn.Module, cap: Capture, bn: Op) -> None:
    """A BatchNorm-like module (not torch.nn's) folds only if running its forward shows the BN map."""
    vals = {k: to_numpy(get_tensor(root, p)).astype(np.float64) for k, p in bn.params.items() if p}
    s, t = scale_shift(root, bn)
    target = bn.attrs.get("probe")
    if target is None:
        target = get_tensor(root, bn.module) if bn.module else root  # a getattr walk: ScriptModules too
    rank = cap.ranks.get(bn.inputs[0]) if bn.inputs else None
    bnlike.check(target, get_tensor(root, bn.params["running_var"]), vals, s, t, rank, bn_name(bn),
                 bn.attrs["frozen"])


def module_problem(root: nn.Module | None, op: Op) -> str | None:
    """Why the module behind `op` is not what its stored tensors say: forward hooks (folding would
    bypass or repeat them) or a parametrized tensor other than weight_norm's (the stored tensor is not
    the one the layer computes with, so writing it does not write the weight)."""
    if root is None or op.module is None:
        return None
    try:
        m = get_tensor(root, op.module) if op.module else root
    except AttributeError:
        return None
    if getattr(m, "_forward_hooks", None) or getattr(m, "_forward_pre_hooks", None):
        return f"{op.module or 'the model'} has forward hooks that may change what it computes"
    from torch.nn.utils import parametrize
    if isinstance(m, nn.Module) and parametrize.is_parametrized(m):
        kinds = {name: [type(p).__name__ for p in plist] for name, plist in m.parametrizations.items()}
        if set(kinds) - {"weight"} or any(k != "_WeightNorm" for ks in kinds.values() for k in ks):
            what = ", ".join(f"{n} ({', '.join(ks)})" for n, ks in kinds.items())
            return f"{op.module} is parametrized: {what}; its stored tensors are not the ones it computes with"
    return None


def _check_layer(cap: Capture, layer: Op, can_add_bias: bool, root: nn.Module | None = None) -> None:
    bad = module_problem(root, layer)
    if bad is not None:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, bad, producer=layer.name)
    if "non_constant" in layer.attrs:
        raise Skip(Reason.NON_CONSTANT_PARAM, f"{layer.name}'s {', '.join(layer.attrs['non_constant'])} is computed",
                   producer=layer.name)
    shared = (layer.module is not None and cap.module_calls[layer.module] > 1) or any(
        p and cap.param_uses[p] > 1 for p in layer.params.values())
    if shared and can_add_bias and layer.node is not None:
        layer.attrs["clone"] = True  # an editable graph: this call site gets its own copy of the layer
        return
    if layer.module is not None and cap.module_calls[layer.module] > 1:
        raise Skip(Reason.SHARED_PRODUCER, f"{layer.module} is called at {cap.module_calls[layer.module]} places; "
                                           "folding would change the other calls too", producer=layer.name)
    for role, p in layer.params.items():
        if p and cap.param_uses[p] > 1:
            raise Skip(Reason.SHARED_PRODUCER, f"{layer.name}'s {role} {p} is also used elsewhere", producer=layer.name)
    if layer.params.get("bias") is None and layer.module is None and not can_add_bias:
        home = bias_home(root, layer)
        if home is None:
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{layer.name} is a functional call without a bias argument, so "
                                                    "there is nowhere to put the BatchNorm's shift", producer=layer.name)
        layer.attrs["bias_home"] = home


def bias_home(root: nn.Module | None, layer: Op) -> str | None:
    """For a bias-free functional conv/linear call made by the forward of a Conv/Linear subclass on its
    own weight (timm's Conv2dSame pads, then calls F.conv2d with self.bias): the module path whose
    `bias`, once set, that forward adds to its output. Proven by running a copy with and without a
    random bias; None when it does not add exactly that."""
    owner_path = layer.attrs.get("owner")
    m = bnlike.submodule(root, owner_path) if owner_path else None
    if not isinstance(m, (_ConvNd, nn.Linear)) or m.bias is not None or layer.params.get("weight") != (
            f"{owner_path}.weight"):
        return None
    g = torch.Generator().manual_seed(0)
    w = m.weight
    if isinstance(m, nn.Linear):
        shape, view = (2, m.in_features), (1, -1)
    else:
        span = [d * (k - 1) + 1 for d, k in zip(m.dilation, m.kernel_size)]
        shape, view = (2, m.in_channels, *[s + 4 for s in span]), (1, -1) + (1,) * len(span)
    x = torch.randn(shape, generator=g).to(dtype=w.dtype, device=w.device)
    b = (torch.randn(w.shape[1] * m.groups if isinstance(m, _ConvTransposeNd) else w.shape[0], generator=g) + 0.5)
    probe = copy.deepcopy(m).eval()
    try:
        with torch.no_grad():
            y0 = probe(x)
            probe.bias = nn.Parameter(b.to(dtype=w.dtype, device=w.device))
            y1 = probe(x)
    except Exception:  # noqa: BLE001 - a forward that refuses the probe proves nothing
        return None
    want = b.to(torch.float64).reshape(view)
    err = ((y1.double() - y0.double()) - want).abs()
    ulp = torch.finfo(w.dtype).eps if w.is_floating_point() else 0.0
    # the backend may sum a bias in another order than it adds one after: allow rounding of the whole output
    scale = float(y0.double().abs().max()) + float(want.abs().max())
    ok = y1.shape == y0.shape and bool((err <= 64 * ulp * scale).all())
    return f"{owner_path}.bias" if ok else None


def _others(cap: Capture, value: int, but: Op) -> list[str]:
    return [op.name for op in cap.users(value) if op is not but]


def _check_rank(cap: Capture, root: nn.Module | None, layer: Op, value: int, what: str) -> None:
    """An unbatched conv call ((C, *spatial), no batch axis) has its channels on axis 0, not 1."""
    rank = cap.ranks.get(value)
    if root is None or rank is None or layer.kind == "linear" or not layer.params.get("weight"):
        return
    wdim = get_tensor(root, layer.params["weight"]).dim()
    if rank != wdim:
        raise Skip(Reason.AXIS_MISMATCH, f"{layer.name} is called on {what} of rank {rank} (unbatched: channels on "
                                         "axis 0); the BatchNorm normalises axis 1", producer=layer.name)


def _through_layout(cap: Capture, v: int) -> tuple[int, list[Op]]:
    """Walk back from value `v` over layout ops: (the value they rearrange, the ops, BN side first)."""
    chain: list[Op] = []
    op = cap.producer(v)
    while op is not None and op.kind == "layout" and op.inputs and len(chain) < layout.MAX_CHAIN:
        chain.append(op)
        v = op.inputs[0]
        op = cap.producer(v)
    return v, chain


def check_after(cap: Capture, bn: Op, can_add_bias: bool, root: nn.Module | None = None) -> Op:
    """The layer the BN can fold into, as the producer of its input (directly, or through layout ops
    that provably keep the layer's channel axis as the BN's)."""
    v = bn.inputs[0] if bn.inputs else None
    if v is None:
        raise Skip(Reason.NO_PRODUCER, "the BatchNorm's input is a model input or a constant")
    src, chain = _through_layout(cap, v)
    layer = cap.producer(src)
    if layer is None:
        raise Skip(Reason.NO_PRODUCER, "the BatchNorm's input is a model input or a constant")
    if layer.kind not in LAYER_KINDS:
        via = f" after {'->'.join(op.name for op in reversed(chain))}" if chain else ""
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the BatchNorm's input comes from {layer.name}{via}, not a "
                                                "Conv/ConvTranspose/Linear")
    values = [src] + [op.outputs[0] for op in reversed(chain)]  # layer side first; the last is the BN input
    for value, reader in zip(values, list(reversed(chain)) + [bn]):
        if value in cap.graph_outputs:
            raise Skip(Reason.INTERMEDIATE_IS_OUTPUT, f"{layer.name}'s output is also a model output", producer=layer.name)
        others = _others(cap, value, reader)
        if others:
            raise Skip(Reason.PRODUCER_FANOUT, f"{layer.name}'s output also feeds {', '.join(others[:3])}",
                       producer=layer.name)
    _check_layer(cap, layer, can_add_bias, root)
    _check_rank(cap, root, layer, src, "output")
    rank = cap.ranks.get(src)
    if layer.kind == "linear" and rank is None:
        raise Skip(Reason.AXIS_MISMATCH, f"cannot prove that {layer.name}'s output features are the axis the "
                                         "BatchNorm normalises: its output rank is unknown (no example inputs, "
                                         "or a scripted TorchScript graph, which records no shapes)",
                   producer=layer.name)
    start = rank - 1 if layer.kind == "linear" else 1
    axis = start
    for op in reversed(chain):
        axis = layout.moved_axis(op.name, op.attrs, axis)
    if axis != 1:
        where = f"on axis {start} of its {rank}-D output" + (
            f", axis {axis} after {'->'.join(op.name for op in reversed(chain))}" if chain else "")
        raise Skip(Reason.AXIS_MISMATCH, f"{layer.name} puts its channels {where}; the BatchNorm normalises axis 1",
                   producer=layer.name)
    return layer


def _reads_zero_padding(layer: Op) -> bool:
    if layer.attrs.get("padding_mode", "zeros") != "zeros":
        return False  # reflect/replicate/circular pad with copies of the input, which commute with an affine map
    pad = layer.attrs.get("padding", 0)
    if isinstance(pad, str):
        return pad != "valid" and any(k != 1 for k in layer.attrs.get("kernel", (2,)))
    pads = pad if isinstance(pad, (tuple, list)) else (pad,)
    return any(int(p) != 0 for p in pads)


def check_before(cap: Capture, bn: Op, can_add_bias: bool, root: nn.Module | None = None) -> Op:
    """The layer the BN can fold into, as the single consumer of its output."""
    v = bn.outputs[0]
    if v in cap.graph_outputs:
        raise Skip(Reason.INTERMEDIATE_IS_OUTPUT, "the BatchNorm's output is a model output")
    users = cap.users(v)
    if len(users) != 1:
        raise Skip(Reason.PRODUCER_FANOUT, f"the BatchNorm's output feeds {len(users)} ops")
    layer = users[0]
    if layer.kind not in LAYER_KINDS or layer.inputs[:1] != [v] or v in layer.inputs[1:]:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"the BatchNorm feeds {layer.name}, not a Conv/Linear input")
    _check_layer(cap, layer, can_add_bias, root)
    _check_rank(cap, root, layer, v, "input")
    if layer.kind == "convT":
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD, f"{layer.name} is a ConvTranspose: border outputs see fewer "
                                                        "inputs, so a shifted input is not a constant bias", producer=layer.name)
    if layer.kind == "conv" and _reads_zero_padding(layer):
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD, f"{layer.name} pads with zeros "
                                                        f"(padding={layer.attrs.get('padding')})", producer=layer.name)
    if layer.kind == "linear":
        rank = cap.ranks.get(v)
        if rank != 2:
            what = "unknown without example inputs" if rank is None else f"{rank}-D"
            raise Skip(Reason.AXIS_MISMATCH, f"the BatchNorm's output is {what}; {layer.name} reads features on the "
                                             "last axis, the BatchNorm normalises axis 1", producer=layer.name)
    return layer


def decide(cap: Capture, root: nn.Module, can_add_bias: bool) -> list[Plan]:
    """One Plan per BN call in `cap`."""
    plans = []
    for bn in cap.ops:
        if bn.kind != "bn":
            continue
        name = bn_name(bn)
        try:
            check_bn(cap, bn)
            bad = module_problem(root, bn)
            if bad is not None:
                raise Skip(Reason.UNSUPPORTED_BN_MODE, bad)
            scale_shift(root, bn)
            if "frozen" in bn.attrs:
                check_frozen(root, cap, bn)
        except Skip as e:
            plans.append(Plan(name, bn, skip=e))
            continue
        try:
            plans.append(Plan(name, bn, check_after(cap, bn, can_add_bias, root), "after"))
        except Skip as after:
            try:
                plans.append(Plan(name, bn, check_before(cap, bn, can_add_bias, root), "before"))
            except Skip as before:
                # a layer was found downstream but was unsafe: that is the more useful reason
                chosen = before if before.producer and not after.producer else after
                plans.append(Plan(name, bn, skip=chosen))
    return plans
