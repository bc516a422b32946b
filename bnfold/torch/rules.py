"""Check and rewrite for PyTorch: which BN may fold into which layer, and the edit that does it.

Math (kernel.py): after a layer W' = W * s[out], b' = s*b + t; before one W' = W * s[in],
b' = b + W.t. A BN folds *after* the layer that produces its input when that output feeds nothing
else; otherwise *before* the single layer it feeds, when that layer reads no zero padding. The rewrite
sets new parameters on the layer (a fresh Parameter: the old tensor may be shared) and removes the BN:
nn.Identity in place of a BN module, the node erased from a GraphModule, or, for an `F.batch_norm`
call written in user code, statistics that make that call an exact identity. In an editable graph
(GraphModule, torch.export program) a layer shared by several call sites is cloned for the one that
gets the BN; in a user's module it cannot be, and the BN is skipped with SHARED_PRODUCER.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import kernel, layouts
from ..core.decisions import Reason, Skip
from . import bnlike as bnlike
from . import layout as layout
from .ops import LAYER_KINDS, Capture, Op
from .rewrite import without_call

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
    """A stable name for a BN call: its module path, or the owner of its running statistics."""
    if op.module is not None:
        return op.module
    rm = op.params.get("running_mean")
    if rm:
        return rm.rpartition(".")[0] or rm
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
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{layer.name} is a functional call without a bias argument, so "
                                                "there is nowhere to put the BatchNorm's shift", producer=layer.name)


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


# Rewrite -----------------------------------------------------------------------------------------

def layer_layout(layer: Op) -> layouts.Layout:
    g = int(layer.attrs.get("groups", 1))
    if layer.kind == "conv":
        return layouts.conv(g)
    if layer.kind == "convT":
        return layouts.conv_transpose(g)
    return layouts.linear()


def identity_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    """A running_var that makes batch_norm with mean 0, weight 1, bias 0 an exact identity, found by
    running it (the kernel's own arithmetic decides); Skip(UNSUPPORTED_BN_MODE) if none exists."""
    c = var.numel()
    probe = torch.randn(3, c, generator=torch.Generator().manual_seed(0)).to(var.dtype)
    zeros = torch.zeros(c, dtype=var.dtype)
    ones = torch.ones(c, dtype=var.dtype)
    base = torch.tensor(1.0 - eps, dtype=var.dtype)
    cands = [base]
    for direction in (2.0, 0.0):
        x = base
        for _ in range(4):
            x = torch.nextafter(x, torch.tensor(direction, dtype=var.dtype))
            cands.append(x)
    for v in cands:
        vv = v.expand(c).clone()
        if torch.equal(F.batch_norm(probe, zeros, vv, ones, zeros, False, 0.0, eps), probe):
            return vv.to(var.device)
    raise Skip(Reason.UNSUPPORTED_BN_MODE, f"this batch_norm call cannot be made an exact identity (eps={eps:g}, {var.dtype})")


def _removal(root: nn.Module, bn: Op, surgery: bool) -> Callable[[], None]:
    if surgery and bn.node is not None:
        node = bn.node

        def erase() -> None:
            src = bn.attrs.get("region_input")  # a frozen BN traced into: its output stands for the call
            node.replace_all_uses_with(src if src is not None else node.args[0] if node.args else node.kwargs["input"])
            node.graph.erase_node(node)
        return erase
    if bn.module is not None:
        parent_path, _, attr = bn.module.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        if not bn.module:
            raise Skip(Reason.UNSUPPORTED_BN_MODE, "the model itself is the BatchNorm")
        return lambda: setattr(parent, attr, nn.Identity())
    return without_call(root, bn)


def _add_bias(root: nn.Module, layer: Op, bias: torch.Tensor, surgery: bool) -> None:
    if layer.module is not None:
        mod = root.get_submodule(layer.module)
        mod.bias = nn.Parameter(bias, requires_grad=mod.weight.requires_grad)
        return
    assert surgery and layer.node is not None
    name = layer.params["weight"].replace(".", "_") + "_bnfold_bias"
    root.register_parameter(name, nn.Parameter(bias, requires_grad=False))
    node = layer.node
    with node.graph.inserting_before(node):
        getter = node.graph.get_attr(name)
    if "bias" in node.kwargs:
        node.update_kwarg("bias", getter)
    elif len(node.args) > 2:
        node.update_arg(2, getter)
    else:
        node.args = tuple(node.args) + (getter,)


def _clone_layer(root: nn.Module, layer: Op, bn: str) -> None:
    """Point this call site (an fx node) at a private copy of a shared layer or its parameters."""
    import copy
    node = layer.node
    tag = "_bnfold_" + bn.replace(".", "_")
    if node.op == "call_module":
        new = node.target.replace(".", "_") + tag
        root.add_submodule(new, copy.deepcopy(root.get_submodule(node.target)))
        node.target = new
        layer.module = new
        layer.params = {k: (f"{new}.{k}" if v else None) for k, v in layer.params.items()}
        layer.name = new
        return
    for role, path in list(layer.params.items()):
        if not path:
            continue
        new = path.replace(".", "_") + tag
        root.register_parameter(new, nn.Parameter(get_tensor(root, path).detach().clone(), requires_grad=False))
        with node.graph.inserting_before(node):
            getter = node.graph.get_attr(new)
        old = next(a for a in node.all_input_nodes if a.op == "get_attr" and a.target == path)
        node.replace_input_with(old, getter)
        layer.params[role] = new
    layer.name = layer.params["weight"] or layer.name


def apply(root: nn.Module, plan: Plan, surgery: bool) -> dict[str, Any]:
    """Fold `plan` into `root` (all values computed first, so a Skip leaves `root` untouched)."""
    bn, layer = plan.bn, plan.layer
    assert layer is not None
    s, t = scale_shift(root, bn)
    w = get_tensor(root, layer.params["weight"])
    b = get_tensor(root, layer.params["bias"]) if layer.params.get("bias") else None
    fold = kernel.fold_after if plan.direction == "after" else kernel.fold_before
    res = fold(to_numpy(w), to_numpy(b) if b is not None else None, s, t, layer_layout(layer))
    new_w = from_numpy(res.weight, w)
    new_b = from_numpy(res.bias, b if b is not None else w)
    remove, note = _removal(root, bn, surgery), None
    if bn.module is None and not surgery:
        note = f"{bn.attrs['owner']} calls batch_norm in its own forward: replaced by a traced copy without the call"
    if layer.attrs.get("clone"):
        _clone_layer(root, layer, plan.name)
        note = f"{layer.name} is shared, so this call site got its own copy"
    set_tensor(root, layer.params["weight"], new_w)
    if b is not None:
        set_tensor(root, layer.params["bias"], new_b)
    else:
        _add_bias(root, layer, new_b, surgery)
    remove()
    return {"note": note} if note else {}


def pattern(plan: Plan) -> str:
    assert plan.layer is not None
    kind = PATTERNS[plan.layer.kind]
    return f"{kind}->BN" if plan.direction == "after" else f"BN->{kind}"
