"""Multi-branch blocks of an nn.Module merged into one convolution (structural re-parameterisation).

A block is a submodule whose forward sums branches that each read the block's input `x` through ops
that are affine in it: Conv modules reading `x`, BatchNorm (modules, or `F.batch_norm` in inference
mode with stored statistics: timm's BatchNormAct2d), inference Dropout, Identity, products and sums
with Python numbers, and `x` itself (an identity branch, with or without its own BN). The sum's
intermediates must be read by nothing else (shape reads aside). RepVGG, MobileOne and friends are
written this way. The math is the kernel's (core.kernel.AffineConv: kernels zero-padded into one
centred window, x as a Dirac kernel, scales and shifts in float64, rounded once); this pass only
finds the region and rewires.

The rewrite is local, as for a BN call written in a module's forward (rewrite.without_call): the
block is replaced, in its parent, by an fx-traced copy of its own forward in which the region is one
call of a new Conv (`bnfold_merged`); every other submodule is the very same object, and the model's
root class stays. Each absorbed BatchNorm is reported folded with the pattern `RepBlock(N branches)->Conv`
(direction `merge`, producer the block); the verification replays the original region in float64
against the merged conv (proofs.prove_merge).
"""
from __future__ import annotations

import copy
import math
import numbers
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core import kernel, layouts
from ..core.decisions import Decision, Reason, Skip
from .capture import LeafTracer, shadow
from .ops import arg, functional_kind, module_kind
from .reads import node_value_inputs
from .rules import from_numpy, to_numpy

MERGED = "bnfold_merged"  # the new conv's name inside the rewritten block
CONVS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # by the weight's rank
SUMS = {operator.add: 1.0, operator.iadd: 1.0, torch.add: 1.0, operator.sub: -1.0, operator.isub: -1.0,
        torch.sub: -1.0}
METHOD_SUMS = {"add": 1.0, "add_": 1.0, "sub": -1.0, "sub_": -1.0}
MULS = {operator.mul, operator.imul, torch.mul}
METHOD_MULS = {"mul", "mul_"}


@dataclass
class Region:
    """A sum of affine branches of the block input `x` (an fx placeholder) ending at `out`."""

    x: Any
    out: Any
    nodes: list[Any] = field(default_factory=list)  # every node of the region but x, in graph order
    convs: list[Any] = field(default_factory=list)
    bns: list[Any] = field(default_factory=list)
    branches: int = 0


class _BlockTracer(LeafTracer):
    """LeafTracer that also keeps blocks already chosen (inside the traced module) as single calls."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def trace(mod: nn.Module, leaves: set[str] = frozenset()) -> torch.fx.GraphModule | None:  # type: ignore[assignment]
    """`mod`'s forward as an fx graph over the real module (traced on a shadow copy), or None."""
    try:
        graph = _BlockTracer(set(leaves)).trace(shadow(mod))
        return torch.fx.GraphModule(mod, graph)
    except Exception:  # noqa: BLE001 - code fx cannot trace has no block to merge
        return None


def _sum_sign(n: Any) -> float | None:
    if n.op == "call_function" and n.target in SUMS and len(n.args) == 2 and not n.kwargs:
        return SUMS[n.target]
    if n.op == "call_method" and n.target in METHOD_SUMS and len(n.args) == 2 and not n.kwargs:
        return METHOD_SUMS[n.target]
    return None


def _is_mul(n: Any) -> bool:
    return ((n.op == "call_function" and n.target in MULS) or (n.op == "call_method" and n.target in METHOD_MULS)) \
        and len(n.args) == 2 and not n.kwargs


def _number(a: Any) -> bool:
    return isinstance(a, numbers.Real) and not isinstance(a, bool) and math.isfinite(float(a))


def _module(gm: torch.fx.GraphModule, n: Any) -> nn.Module | None:
    return gm.get_submodule(n.target) if n.op == "call_module" else None


def _conv(gm: torch.fx.GraphModule, n: Any) -> nn.Module | None:
    m = _module(gm, n)
    if m is None or module_kind(m) != "conv" or len(n.args) != 1 or n.kwargs:
        return None
    return m  # a padding_mode other than zeros is refused, with its reason, by merged_conv


def _bn_call(gm: torch.fx.GraphModule, n: Any) -> tuple[Any, dict[str, Any]] | None:
    """(input node, {weight, bias, running_mean, running_var: tensor or None, eps, name}) of an inference
    batch_norm call (module or functional with stored statistics), else None."""
    m = _module(gm, n)
    if m is not None:
        if module_kind(m) != "bn" or not isinstance(m, _BatchNorm) or m.training or m.running_var is None \
                or len(n.args) != 1 or n.kwargs:
            return None
        return n.args[0], {"weight": m.weight, "bias": m.bias, "running_mean": m.running_mean,
                           "running_var": m.running_var, "eps": float(m.eps), "name": n.target}
    fk = functional_kind(n.target) if n.op == "call_function" else None
    if fk is None or fk[0] != "bn":
        return None
    sig = fk[1]
    if arg(n.args, n.kwargs, sig, "training") not in (False, None):
        return None
    vals: dict[str, Any] = {}
    for role in ("weight", "bias", "running_mean", "running_var"):
        a = arg(n.args, n.kwargs, sig, role)
        if a is None and role in ("weight", "bias"):
            vals[role] = None
            continue
        if not (isinstance(a, torch.fx.Node) and a.op == "get_attr"):
            return None
        vals[role] = _attr(gm, a.target)
    eps = arg(n.args, n.kwargs, sig, "eps")
    if not _number(eps):
        return None
    owner, _, attr = arg(n.args, n.kwargs, sig, "running_mean").target.rpartition(".")
    vals["eps"] = float(eps)
    vals["name"] = owner if owner and attr == "running_mean" else arg(n.args, n.kwargs, sig, "running_mean").target
    return arg(n.args, n.kwargs, sig, "input"), vals


def _passthrough(gm: torch.fx.GraphModule, n: Any) -> Any | None:
    """The input of an op that is the identity at inference (Identity, Dropout in eval), else None."""
    m = _module(gm, n)
    if m is not None and len(n.args) == 1 and not n.kwargs and (
            type(m) is nn.Identity or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training)):
        return n.args[0]
    return None


def _attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _value_users(n: Any) -> list[Any]:
    return [u for u in n.users if n in node_value_inputs(u)]


def find(gm: torch.fx.GraphModule) -> list[Region]:
    """The regions of `gm`'s graph that merge: sums of at least two branches, one of them a conv, all
    reading the graph's first input. Sums are tried from the last, so the largest region wins."""
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not places:
        return []
    x = places[0]
    taken: set[Any] = set()
    found = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in reversed(list(gm.graph.nodes)):
        if n in taken or _sum_sign(n) is None:
            continue
        r = Region(x=x, out=n)
        if not _walk(gm, n, r, top=True) or not r.convs or r.branches < 2:
            continue
        if any(m in taken for m in r.nodes):
            continue
        while len(_value_users(r.out)) == 1 and _after(gm, _value_users(r.out)[0], r.out):
            r.out = _value_users(r.out)[0]  # per-channel maps after the sum (a final BN) belong to it
            r.nodes.append(r.out)
            if _bn_call(gm, r.out) is not None:
                r.bns.append(r.out)
        r.nodes.sort(key=order.__getitem__)
        taken.update(r.nodes)
        found.append(r)
    return found


def _after(gm: torch.fx.GraphModule, u: Any, v: Any) -> bool:
    """Is `u` a per-channel affine map of `v` alone (BN, a product or sum with a number, Identity)?"""
    bn = _bn_call(gm, u)
    if bn is not None:
        return bn[0] is v
    if _sum_sign(u) is not None or _is_mul(u):
        a, b = u.args
        return (a is v and _number(b)) or (b is v and _number(a))
    return _passthrough(gm, u) is v


def _walk(gm: torch.fx.GraphModule, n: Any, r: Region, top: bool = False) -> bool:
    """Collect the affine tree under `n` into `r`; False if some op is not affine in r.x."""
    if n is r.x:
        r.branches += 1
        return True
    if not isinstance(n, torch.fx.Node):
        return False
    if not top and len(_value_users(n)) != 1:
        return False  # read elsewhere: the value must stay
    r.nodes.append(n)
    sign = _sum_sign(n)
    if sign is not None:
        a, b = n.args
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            if a is b:
                return False
            return _walk(gm, a, r) and _walk(gm, b, r)
        node = a if isinstance(a, torch.fx.Node) else b
        return isinstance(node, torch.fx.Node) and _number(b if node is a else a) and _walk(gm, node, r)
    if _is_mul(n):
        a, b = n.args
        node, c = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
        return isinstance(node, torch.fx.Node) and _number(c) and _walk(gm, node, r)
    if _conv(gm, n) is not None:
        if n.args[0] is not r.x:
            return False
        r.convs.append(n)
        r.branches += 1
        return True
    bn = _bn_call(gm, n)
    if bn is not None:
        r.bns.append(n)
        return _walk(gm, bn[0], r)
    src = _passthrough(gm, n)
    if src is not None:
        return _walk(gm, src, r)
    return False


# The math (the kernel's), and the rewrite ------------------------------------------------------------

def _windows(m: nn.Module) -> tuple[layouts.Window, ...]:
    nd = m.weight.dim() - 2
    ks, st, dl = m.kernel_size, m.stride, m.dilation
    pads: list[tuple[int, int]] = []
    for i in range(nd):
        if m.padding == "valid":
            pads.append((0, 0))
        elif m.padding == "same":
            total = dl[i] * (ks[i] - 1)
            pads.append((total // 2, total - total // 2))
        else:
            pads.append((int(m.padding[i]), int(m.padding[i])))
    return tuple(layouts.Window(kernel=int(ks[i]), stride=int(st[i]), dilation=int(dl[i]), pad_begin=p[0], pad_end=p[1])
                 for i, p in enumerate(pads))


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else to_numpy(t)


def affine_map(gm: torch.fx.GraphModule, r: Region) -> kernel.AffineConv:
    """The region as one kernel.AffineConv (Skip(BRANCH_MISMATCH) when its branches cannot be one conv)."""
    convs = [_conv(gm, c) for c in r.convs]
    channels = convs[0].out_channels

    def expr(n: Any) -> kernel.AffineConv:
        if n is r.x:
            return kernel.AffineConv.identity(channels)
        sign = _sum_sign(n)
        if sign is not None:
            a, b = n.args
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                return expr(a).plus(expr(b), sign)
            if isinstance(a, torch.fx.Node):  # a +- c
                e = expr(a)
                return e.then(np.ones(e.out_channels), np.full(e.out_channels, sign * float(b)))
            e = expr(b)  # c +- b
            return e.then(np.full(e.out_channels, sign), np.full(e.out_channels, float(a)))
        if _is_mul(n):
            a, b = n.args
            node, c = (a, b) if isinstance(a, torch.fx.Node) else (b, a)
            e = expr(node)
            return e.then(np.full(e.out_channels, float(c)), np.zeros(e.out_channels))
        conv = _conv(gm, n)
        if conv is not None:
            return kernel.AffineConv.conv(_np(conv.weight.detach()), _np(None if conv.bias is None else conv.bias.detach()),
                                          conv.groups, _windows(conv))
        bn = _bn_call(gm, n)
        if bn is not None:
            src, p = bn
            e = expr(src)
            s, t = kernel.bn_scale_shift(*(None if p[k] is None else _np(p[k].detach())
                                           for k in ("weight", "bias", "running_mean", "running_var")),
                                         p["eps"], e.out_channels)
            return e.then(s, t)
        return expr(_passthrough(gm, n))

    return expr(r.out)


def merged_conv(gm: torch.fx.GraphModule, r: Region) -> nn.Module:
    """A new Conv module computing the region (values rounded once to the convs' dtype)."""
    convs = [_conv(gm, c) for c in r.convs]
    odd = [f"{c}: padding_mode={m.padding_mode!r}" for c, m in zip(r.convs, convs) if m.padding_mode != "zeros"]
    if odd:  # the merged kernel's zero taps would read the padding a reflect/replicate/circular branch makes
        raise Skip(Reason.BRANCH_MISMATCH, "a branch pads with other than zeros (" + ", ".join(odd) + ")")
    like = convs[0].weight
    if any(c.weight.dtype != like.dtype or c.weight.device != like.device or type(c) is not type(convs[0])
           for c in convs):
        raise Skip(Reason.BRANCH_MISMATCH, "the branches' convolutions differ in kind, dtype or device")
    amap = affine_map(gm, r)
    if any(w.pad_begin != w.pad_end for w in amap.windows):
        raise Skip(Reason.BRANCH_MISMATCH, "the merged kernel would need asymmetric padding, which a torch Conv "
                                           "module does not take")
    folded = amap.rounded(to_numpy(like.detach()).dtype)
    w = amap.windows
    conv = CONVS[like.dim()](amap.in_channels, amap.out_channels, tuple(x.kernel for x in w), stride=tuple(x.stride for x in w),
               padding=tuple(x.pad_begin for x in w), dilation=tuple(x.dilation for x in w), groups=amap.groups,
               bias=True, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(from_numpy(folded.weight, conv.weight))
        conv.bias.copy_(from_numpy(folded.bias, conv.bias))
    conv.weight.requires_grad_(like.requires_grad)
    conv.bias.requires_grad_(like.requires_grad)
    return conv


def rewritten(gm: torch.fx.GraphModule, r: Region, conv: nn.Module, owner: nn.Module) -> torch.fx.GraphModule:
    """A copy of the block's traced forward with the region replaced by one call of `conv`."""
    graph = copy.deepcopy(gm.graph)
    env = {a: b for a, b in zip(gm.graph.nodes, graph.nodes)}
    nodes = [env[n] for n in r.nodes]
    with graph.inserting_before(nodes[0]):
        call = graph.call_module(MERGED, (env[r.x],))
    out = env[r.out]
    out.replace_all_uses_with(call)
    for n in nodes:  # shape reads of a branch read the merged value, of the same shape
        for u in list(n.users):
            if u not in nodes:
                u.replace_input_with(n, call)
    reads = {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"}
    for n in reversed(nodes):
        graph.erase_node(n)
    for a in reads:
        if not a.users:
            graph.erase_node(a)
    holder = nn.Module()  # the owner's modules by their paths, and the new conv
    for name, child in owner.named_children():
        holder.add_module(name, child)
    for name, p in owner.named_parameters(recurse=False):
        holder.register_parameter(name, p)
    for name, b in owner.named_buffers(recurse=False):
        holder.register_buffer(name, b)
    holder.add_module(MERGED, conv)
    new = torch.fx.GraphModule(holder, graph)
    new.training = owner.training  # not train(): each submodule keeps the mode it has (a BN left in train())
    return new


def merge_blocks(work: nn.Module, samples_for: Any = None, exclude: Any = None,
                 near_misses: dict[str, Skip] | None = None) -> list[Decision]:
    """Merge every block of `work` (an nn.Module, changed in place). `samples_for(paths)` gives each
    block's arguments in a real run (rewrite.record_inputs), to check that its traced copy computes what
    it does. A block absorbing a BN in `exclude` (its fold failed its proof) is left alone. Returns one
    folded Decision per absorbed BatchNorm; a block whose branches cannot be one conv records why in
    `near_misses`, for each of its BNs (those that then fold nowhere keep that reason)."""
    from .rewrite import same_function
    if isinstance(work, torch.fx.GraphModule):
        return []
    chosen: dict[str, tuple[torch.fx.GraphModule, Region]] = {}
    for path, mod in reversed(list(work.named_modules())):
        if not path or module_kind(mod) is not None or isinstance(mod, _BatchNorm) \
                or getattr(mod, "_forward_hooks", None) or getattr(mod, "_forward_pre_hooks", None):
            continue
        if not any(module_kind(m) == "conv" for m in mod.modules()):
            continue
        inner = {p[len(path) + 1:] for p in chosen if p.startswith(path + ".")}
        gm = trace(mod, inner)
        if gm is None:
            continue
        regions = find(gm)
        if len(regions) == 1:
            chosen[path] = (gm, regions[0])
    if not chosen:
        return []
    samples = samples_for(set(chosen)) if samples_for is not None else {}
    decisions = []
    for path, (gm, r) in chosen.items():
        owner = work.get_submodule(path)
        if path in samples and not same_function(owner, gm, samples[path]):
            continue  # its traced copy is not the module: leave it to the per-BN folds
        names = [f"{path}.{_bn_call(gm, n)[1]['name']}" for n in r.bns]
        if any(n in (exclude or {}) for n in names):
            continue  # a merge that failed its proof: the BNs fold alone (and say so)
        try:
            conv = merged_conv(gm, r)
        except Skip as e:  # the BNs fold alone where they can
            if near_misses is not None:
                for name in names:
                    near_misses.setdefault(name, Skip(e.reason, f"block {path} ({type(owner).__name__}) not merged: "
                                                                f"{e.detail}", path))
            continue
        new = rewritten(gm, r, conv, owner)
        parent_path, _, attr = path.rpartition(".")
        setattr(work.get_submodule(parent_path) if parent_path else work, attr, new)
        pattern = f"RepBlock({r.branches} branches)->Conv"
        for name in names:
            decisions.append(Decision.folded(name, path, pattern, "merge",
                                             note=f"{path} ({type(owner).__name__}): {r.branches} branches merged "
                                                  f"into {path}.{MERGED}"))
    return decisions


def region_module(owner: nn.Module) -> torch.fx.GraphModule | None:
    """The original block's region alone (x -> the sum), its own modules: what a merge replaced."""
    gm = trace(owner)
    regions = find(gm) if gm is not None else []
    if len(regions) != 1:
        return None
    r = regions[0]
    graph = torch.fx.Graph()
    env: dict[Any, Any] = {r.x: graph.placeholder("x")}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and any(n in m.all_input_nodes for m in r.nodes):
            env[n] = graph.node_copy(n, env.__getitem__)
    for n in r.nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(env[r.out])
    return torch.fx.GraphModule(gm, graph)
