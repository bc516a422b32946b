"""BatchNorm-like modules that are not torch.nn BatchNorms ("frozen" BN, as in torchvision and detectron2).

Such a module holds weight, bias, running_mean and running_var (buffers or parameters) and an `eps`,
and its forward is the inference map y = s*x + t with s = weight/sqrt(running_var+eps),
t = bias - s*running_mean. It is recognised by structure (a class name containing "BatchNorm", four
1-D tensors of one length, a float eps), not by a list of classes, and then its forward is *run* on a
probe input and compared with that map, because a name and four buffers do not say what forward
computes (timm's FrozenBatchNormAct2d adds an activation). Only a module that passes is folded; every
other BatchNorm-named module still gets a Decision, skipped with the reason it was not understood.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.decisions import Reason, Skip

ROLES = ("weight", "bias", "running_mean", "running_var")
PROBE_RANKS = (4, 3, 2, 5)  # tried in turn when the capture does not know the input's rank
PROBE_ULPS = 64  # a forward that rounds differently than the kernel stays far below this


def bn_named(cls_name: str) -> bool:
    """Does a class name say BatchNorm (case-insensitive)?"""
    return "batchnorm" in cls_name.lower()


def problem(m: nn.Module, cls_name: str | None = None, eps: Any = None) -> Skip | None:
    """None when `m` has the frozen-BN structure; else why not, as a Skip to report. `eps` stands in
    for an eps attribute that `m` lacks (a traced TorchScript module keeps it only in its code)."""
    cls = cls_name or type(m).__name__
    tensors = {k: getattr(m, k, None) for k in ROLES}
    missing = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if "running_mean" in missing or "running_var" in missing:
        return Skip(Reason.NO_RUNNING_STATS, f"{cls} has no running_mean/running_var tensors, so "
                                             "bnfold cannot tell what it computes at inference")
    if missing:
        return Skip(Reason.UNSUPPORTED_BN_MODE, f"{cls} has no {', '.join(missing)} tensor")
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        return Skip(Reason.UNSUPPORTED_BN_MODE, f"{cls}'s tensors are not 1-D of one length: "
                    + ", ".join(f"{k}{list(s)}" for k, s in shapes.items()))
    if not all(v.is_floating_point() for v in tensors.values()):
        return Skip(Reason.UNSUPPORTED_BN_MODE, f"{cls} holds non-float statistics")
    eps = getattr(m, "eps", None) if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (float, int)):
        return Skip(Reason.UNSUPPORTED_BN_MODE, f"{cls} has no numeric eps attribute")
    return None


def is_frozen(m: nn.Module) -> bool:
    """A BatchNorm-named module, not a torch.nn BatchNorm, with the frozen-BN structure."""
    return not isinstance(m, _BatchNorm) and bn_named(type(m).__name__) and problem(m) is None


def needs_decision(m: nn.Module) -> bool:
    """Is `m` a BatchNorm of its own (not a container such as a ConvBatchNormReLU block)?"""
    if isinstance(m, _BatchNorm):
        return True
    if not bn_named(type(m).__name__):
        return False
    return not any(c is not m and (isinstance(c, _BatchNorm) or bn_named(type(c).__name__)) for c in m.modules())


def module_params(path: str, m: nn.Module) -> tuple[dict[str, str | None], dict[str, Any]]:
    """(params, attrs) of a frozen BN's Op: its inference map does not depend on training mode; the
    probe in `check` finds out whether that is true of this module."""
    pre = f"{path}." if path else ""
    params: dict[str, str | None] = {k: pre + k for k in ROLES}
    attrs = {"eps": float(m.eps), "training": False, "uses_batch_stats": False, "channels": int(m.weight.numel()),
             "frozen": type(m).__name__}
    return params, attrs


# The probe ---------------------------------------------------------------------------------------

def _mismatch(fn: Callable[[torch.Tensor], Any], vals: dict[str, np.ndarray], s: np.ndarray, t: np.ndarray,
              rank: int, like: torch.Tensor) -> str | None:
    """None when fn(x) == s*x + t (per channel, axis 1) on a random x of `rank`, within rounding."""
    c = s.shape[0]
    shape = (2, c) + (3,) * (rank - 2)
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype=like.dtype, device=like.device)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception as e:  # noqa: BLE001 - a forward that refuses this rank is probed at others
        return f"forward failed on a {rank}-D input: {type(e).__name__}"
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != shape:
        return f"forward on a {list(shape)} input returned {getattr(y, 'shape', type(y).__name__)}"
    view = (1, c) + (1,) * (rank - 2)
    x64 = x.detach().cpu().double().numpy()
    want = s.reshape(view) * x64 + t.reshape(view)
    got = y.detach().cpu().double().numpy()
    # the forward's own rounding: a few ulps of each term it adds (s*x, beta, s*mean)
    mag = np.abs(s.reshape(view) * x64) + (np.abs(vals["bias"]) + np.abs(s * vals["running_mean"])).reshape(view)
    ulp = float(torch.finfo(like.dtype).eps) if like.is_floating_point() else 0.0
    err = np.abs(got - want)
    if not np.isfinite(got).all() or (err > PROBE_ULPS * ulp * mag + 1e-300).any():
        return (f"forward is not weight*(x-running_mean)/sqrt(running_var+eps)+bias (max deviation "
                f"{float(np.nanmax(err)):.3g} on a {rank}-D input)")
    return None


def check(module: nn.Module, like: torch.Tensor, vals: dict[str, np.ndarray], s: np.ndarray, t: np.ndarray,
          rank: int | None, name: str, cls: str) -> None:
    """Raise Skip unless `module`'s forward (the BN `name` of class `cls`) is the inference map (s, t)
    of its statistics; `like` (its running_var) gives the probe's dtype and device."""
    ranks = (rank,) if rank is not None else PROBE_RANKS
    why = None
    for r in ranks:
        if r < 2:
            raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{name} is applied to a {r}-D input, which has no channel axis")
        why = _mismatch(copy.deepcopy(module), vals, s, t, r, like)
        if why is None:
            return None
    if module.training:
        frozen = copy.deepcopy(module).eval()
        if any(_mismatch(frozen, vals, s, t, r, like) is None for r in ranks):
            raise Skip(Reason.TRAINING_MODE, f"{name} is in train() mode and computes something else there than "
                                             "with its running statistics")
    raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{name} ({cls}): {why}")


# Graph regions (torch.export and fx graphs trace *into* a frozen BN) -------------------------------

def entry_class(entry: Any) -> tuple[str, Any]:
    """(class name, class or qualified name) of an nn_module_stack entry (fx stores types, export strings)."""
    cls = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else entry
    name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return name, cls


def torch_bn_class(cls: Any, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, _BatchNorm)
    if isinstance(cls, type):
        return issubclass(cls, _BatchNorm)
    return str(cls).startswith("torch.nn.modules.batchnorm.")


def bn_stack_entry(node: Any, root: nn.Module | None) -> tuple[str, str, str] | None:
    """(stack key, module path, class name) of the innermost BatchNorm-named, non-torch.nn BN module
    whose forward produced `node`, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, entry in reversed(list(stack.items())):
        name, cls = entry_class(entry)
        if not bn_named(name):
            continue
        path = entry[0] if isinstance(entry, tuple) else key
        mod = submodule(root, path)
        return None if torch_bn_class(cls, mod) else (key, path, name)
    return None


def submodule(root: nn.Module | None, path: str) -> nn.Module | None:
    """root.get_submodule(path), or None when there is no such module."""
    if root is None:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


class Region:
    """The nodes one call of a frozen BN's forward became in a traced graph."""

    def __init__(self, key: str, path: str, cls: str) -> None:
        self.key, self.path, self.cls = key, path, cls
        self.nodes: list[Any] = []
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.params: dict[str, str | None] = {}
        self.why = ""

    def seal(self, is_bn_call: Callable[[Any], bool]) -> None:
        """Find the region's data inputs, outputs and parameters; set `why` when it is not one BN call."""
        inside = set(self.nodes)
        reads: list[str] = []
        for n in self.nodes:
            for a in n.all_input_nodes:
                if a in inside:
                    continue
                if a.op == "get_attr":
                    reads.append(a.target)
                elif a not in self.inputs:
                    self.inputs.append(a)
            if any(u not in inside for u in n.users):
                self.outputs.append(n)
        pre = f"{self.path}." if self.path else ""
        self.params = {k: (pre + k if pre + k in reads else None) for k in ROLES}
        foreign = [r for r in reads if r not in self.params.values()]
        if any(is_bn_call(n) for n in self.nodes):
            self.why = "calls batch_norm"  # the functional rule handles it
        elif len(self.inputs) != 1 or len(self.outputs) != 1:
            self.why = (f"its traced forward has {len(self.inputs)} data inputs and {len(self.outputs)} outputs, "
                        "not one of each")
        elif foreign:
            self.why = f"its traced forward also reads {', '.join(foreign[:3])}"
        elif None in self.params.values():
            missing = [k for k, v in self.params.items() if v is None]
            self.why = f"its traced forward does not read {', '.join(missing)}"


def regions(gm: Any, root: nn.Module | None) -> list[Region]:
    """Every call of a BatchNorm-named, non-torch.nn module that `gm` traced into, in graph order."""
    found: dict[str, Region] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        hit = bn_stack_entry(n, root)
        if hit is not None:
            found.setdefault(hit[0], Region(*hit)).nodes.append(n)
    return list(found.values())


_VIEWS = {"reshape", "view", "unsqueeze", "expand", "flatten", "to", "type_as", "contiguous", "_to_copy",
          "reshape.default", "view.default", "unsqueeze.default", "expand.default", "_to_copy.default"}
_ADDS = {"add", "add.Tensor", "add.Scalar", "add_", "iadd", "__add__", "__radd__"}


def _fname(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def region_eps(region: Region, rv_node: Any) -> float | None:
    """The eps a traced frozen BN adds to running_var (through reshapes), when there is exactly one."""
    seen = {rv_node}
    found = []
    for n in region.nodes:
        args = list(n.args) + list(n.kwargs.values())
        name = _fname(n.target)
        if name in _VIEWS and args and args[0] in seen:
            seen.add(n)
        elif name in _ADDS and len(n.args) >= 2:
            a, b = n.args[0], n.args[1]
            if a in seen and isinstance(b, (int, float)) and not isinstance(b, bool):
                found.append(float(b))
            elif b in seen and isinstance(a, (int, float)) and not isinstance(a, bool):
                found.append(float(a))
    return found[0] if len(found) == 1 else None


def region_module(gm: Any, region: Region) -> nn.Module:
    """The region as a GraphModule of one input (sharing `gm`'s tensors), for the probe."""
    g = torch.fx.Graph()
    env: dict[Any, Any] = {region.inputs[0]: g.placeholder("x")}
    inside = set(region.nodes)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and any(u in inside for u in n.users):
            env[n] = g.node_copy(n)
        elif n in inside:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[region.outputs[0]])
    return torch.fx.GraphModule(gm, g).eval()
