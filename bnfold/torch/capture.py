"""Capture a PyTorch model's dataflow as a small op graph that the fold rules can reason about.

Three methods, tried in order: torch.fx symbolic tracing; torch.export (which copes with code fx
cannot trace); and, for models neither can capture (data-dependent control flow), module hooks plus a
TorchFunctionMode that record the real call order and every use of every tensor while running the
example inputs. All three produce the same `Capture`: ops in call order, each naming the module
path or parameter paths it reads, so the rules and the rewrite never depend on how the graph was seen.
"""
from __future__ import annotations

import operator

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from ..core.decisions import Reason, Skip
from . import bnlike as bnlike

LAYER_KINDS = ("conv", "convT", "linear")


@dataclass
class Op:
    """One call: a BN, a foldable layer, or anything else ("other")."""

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
    method: str
    ops: list[Op] = field(default_factory=list)
    graph_outputs: set[int] = field(default_factory=set)
    ranks: dict[int, int] = field(default_factory=dict)
    module_calls: Counter = field(default_factory=Counter)
    param_uses: Counter = field(default_factory=Counter)
    graph_module: Any = None  # the fx GraphModule whose nodes the ops point at, when rewritable
    notes: list[str] = field(default_factory=list)

    def users(self, value: int) -> list[Op]:
        return [op for op in self.ops if value in op.inputs]

    def producer(self, value: int) -> Op | None:
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


def _tuple_bn(target: Any) -> bool:
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


# fx and torch.export -----------------------------------------------------------------------------

class LeafTracer(torch.fx.Tracer):
    """Keeps BN/conv/linear modules (and their faithful subclasses) as single calls."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if type(m) is nn.Identity:
            return False  # traced through (no node): a BN folded earlier leaves one, Conv->BN->BN folds on
        if module_kind(m) is not None:
            return True
        if isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)):
            return False  # a subclass with its own forward: look inside
        return super().is_leaf_module(m, qualname)


def capture_fx(root: nn.Module, example_inputs: tuple | None) -> Capture:
    """Trace `root` with torch.fx (or use its own graph when it is already a GraphModule)."""
    if isinstance(root, torch.fx.GraphModule):
        gm = root
        method = "fx-graph"
    else:
        graph = LeafTracer().trace(root)
        gm = torch.fx.GraphModule(root, graph)
        method = "fx"
    # the GraphModule keeps only plain copies of modules it traced into; `root` has their classes
    cap = graph_capture(gm, method, lookup=root if method == "fx" else None)
    if example_inputs is not None:
        try:
            from torch.fx.passes.shape_prop import ShapeProp
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as e:  # noqa: BLE001 - shapes are a bonus; checks that need them skip instead
            cap.notes.append(f"shape propagation failed: {type(e).__name__}: {e}"[:200])
    _ranks_from_meta(cap, gm)
    if method == "fx":
        cap.graph_module = None  # the traced copy is for analysis; rewrites go to the user's module
    return cap


def capture_export(root: nn.Module, example_inputs: tuple) -> Capture:
    """Capture with torch.export; ops carry the original model's parameter and module paths."""
    ep = torch.export.export(root, tuple(example_inputs), strict=False)
    gm = ep.module()
    cap = graph_capture(gm, "export", module_root=root)
    _ranks_from_meta(cap, gm)
    cap.graph_module = None
    return cap


def _ranks_from_meta(cap: Capture, gm: torch.fx.GraphModule) -> None:
    ids = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n, i in ids.items():
        tm = n.meta.get("tensor_meta")
        val = n.meta.get("val")
        if tm is not None and hasattr(tm, "shape"):
            cap.ranks[i] = len(tm.shape)
        elif isinstance(val, torch.Tensor):
            cap.ranks[i] = val.dim()


def graph_capture(gm: torch.fx.GraphModule, method: str, module_root: nn.Module | None = None,
                  lookup: nn.Module | None = None) -> Capture:
    """Ops from an fx graph. With `module_root` (torch.export), ATen ops that are exactly one leaf
    module's computation are attributed to that module so the user's module can be rewritten.
    `lookup` (default `module_root`) is where the modules named in node metadata are found."""
    cap = Capture(method, graph_module=gm)
    ids = {n: i for i, n in enumerate(gm.graph.nodes)}
    getattrs = {n: n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            cap.param_uses[n.target] += len(n.users)
        elif n.op == "output":
            cap.graph_outputs.update(ids[a] for a in _flat_nodes(n.args))
    claimed = _frozen_regions(gm, lookup if lookup is not None else module_root, cap, ids)
    through: set[Any] = set()
    for n in gm.graph.nodes:
        if n in claimed:
            if isinstance(claimed[n], Op):
                cap.ops.append(claimed[n])  # at the region's output: ops stay in call order
            continue
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        data_in = [ids[a] for a in _flat_nodes((n.args, n.kwargs)) if a.op != "get_attr"]
        out = [ids[n]]
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            kind = module_kind(m)
            if kind is None:
                cap.ops.append(Op(n.target, "other", data_in, out, module=n.target, node=n))
                cap.module_calls[n.target] += 1
                continue
            first = n.args[0] if n.args else None
            inputs = [ids[first]] + [i for i in data_in if i != ids.get(first)] if first in ids else data_in
            op = module_op(n.target, m, kind, inputs, out, node=n)
            cap.ops.append(op)
            cap.module_calls[n.target] += 1
            for p in op.params.values():
                if p:
                    cap.param_uses[p] += 1
            continue
        if n in through:
            continue  # the result[0] of a tuple-returning BN op: the op itself stands for it
        fk = functional_kind(n.target) if n.op == "call_function" else None
        if fk is not None and fk[0] == "bn" and _tuple_bn(n.target):
            first_out = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem
                         and u.args[1] == 0]
            others_used = any(u.users for u in n.users if u not in first_out)
            if len(first_out) != 1 or others_used:
                cap.ops.append(Op(n.name, "other", data_in, out, node=n))  # saved statistics read: not plain
                continue
            out = [ids[first_out[0]]]
            through.add(first_out[0])
        if fk is None:
            cap.ops.append(Op(n.name, "other", data_in, out, node=n))
            continue
        node = n
        if out != [ids[n]]:  # a tuple-returning BN: removing it means rerouting its result[0]
            node = next(u for u in through if ids[u] == out[0])
        op = functional_op(n.name, fk, n.args, n.kwargs, lambda a: getattrs.get(a) if isinstance(a, torch.fx.Node) else None,
                           lambda a: a is None, data_in, out, node=node)
        if node is not n:
            op.attrs["region_input"] = arg(n.args, n.kwargs, fk[1], "input")
        first = arg(n.args, n.kwargs, fk[1], "input")
        if isinstance(first, torch.fx.Node) and first in ids:
            op.inputs = [ids[first]] + [i for i in op.inputs if i != ids[first]]
        if module_root is not None:
            _attribute_to_module(op, n, module_root, cap)
        cap.ops.append(op)
    return cap


def _frozen_regions(gm: torch.fx.GraphModule, module_root: nn.Module | None, cap: Capture,
                    ids: dict[Any, int]) -> dict[Any, Op | None]:
    """Ops for the frozen BNs the trace went into (torch.export always does; fx does for a module it
    could not keep as a leaf). Returns the nodes now covered by a BN op, mapping each region's output
    node to its op."""
    claimed: dict[Any, Op | None] = {}
    owner = module_root if module_root is not None else gm
    for r in bnlike.regions(gm, module_root):
        r.seal(lambda n: n.op == "call_function" and (functional_kind(n.target) or ("",))[0] == "bn")
        if r.why == "calls batch_norm":
            continue  # the functional batch_norm inside is matched (and attributed to the module) as usual
        m = bnlike.submodule(owner, r.path)
        real = m if m is not None and type(m).__name__ == r.cls else None
        bad = bnlike.problem(real) if real is not None else None
        if bad is None and r.why:
            bad = Skip(Reason.UNSUPPORTED_BN_MODE, f"{r.path} ({r.cls}): {r.why}")
        if bad is not None:
            cap.ops.append(Op(r.path, "bn", [], [], attrs={"unsupported": bad}))
            continue
        inputs, outputs = [ids[r.inputs[0]]], [ids[r.outputs[0]]]
        if real is not None:
            op = module_op(r.path, real, "bn", inputs, outputs, node=r.outputs[0])
            cap.module_calls[r.path] += 1
        else:
            rv = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == r.params["running_var"])
            eps = bnlike.region_eps(r, rv)
            if eps is None:
                why = f"{r.path} ({r.cls}): cannot tell which constant its traced forward adds to running_var"
                cap.ops.append(Op(r.path, "bn", [], [], attrs={"unsupported": Skip(
                    Reason.UNSUPPORTED_BN_MODE, why)}))
                continue
            op = Op(r.path, "bn", inputs, outputs, params=dict(r.params), node=r.outputs[0],
                    attrs={"eps": eps, "training": False, "frozen": r.cls, "probe": bnlike.region_module(gm, r)})
        op.attrs["region_input"] = r.inputs[0]
        claimed.update(dict.fromkeys(r.nodes))
        claimed[r.outputs[0]] = op
    return claimed


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


def _attribute_to_module(op: Op, node: Any, root: nn.Module, cap: Capture) -> None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return
    path = list(stack.values())[-1][0]
    try:
        m = root.get_submodule(path)
    except AttributeError:
        return
    kind = module_kind(m)
    if kind != op.kind:
        return
    full = module_op(path, m, kind, op.inputs, op.outputs, node=op.node)
    if full.params != op.params:
        return  # the call reads other tensors than the module's own: keep it functional
    op.module, op.name, op.params, op.attrs = path, full.name, full.params, full.attrs
    cap.module_calls[path] += 1


def _flat_nodes(x: Any) -> Iterable[Any]:
    out: list[Any] = []
    torch.fx.node.map_arg(x, lambda n: out.append(n) or n)
    return out
