"""Capture a PyTorch model's dataflow as a small op graph that the fold rules can reason about.

Three methods, tried in order: torch.fx symbolic tracing; torch.export (which copes with code fx
cannot trace); and, for models neither can capture (data-dependent control flow), module hooks plus a
TorchFunctionMode that record the real call order and every use of every tensor while running the
example inputs. All three produce the same `Capture`: ops in call order, each naming the module
path or parameter paths it reads, so the rules and the rewrite never depend on how the graph was seen.
Uses are value reads: metadata reads (`x.shape`, `x.dim()`, ...; reads.py) see nothing a fold changes.

fx and torch.export run the model's forward on proxies or fake tensors, and model code may store what
it computes on the module (timm LeViT's attention-bias cache): they trace a `shadow` copy of the module
tree that shares the real parameters, so nothing traced ever stays in the model bnfold returns.
"""
from __future__ import annotations

import copy
import itertools
import operator
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..core.decisions import Reason, Skip
from . import bnlike as bnlike
from . import layout as layout
from .ops import (LAYER_KINDS, Capture, Op, arg, functional_kind, functional_op, module_kind, module_op,
                  tuple_bn)
from .quiet import quiet
from .reads import call_name, node_value_inputs

__all__ = ["LAYER_KINDS", "Capture", "Op", "LeafTracer", "capture_fx", "capture_export", "graph_capture",
           "functional_kind", "functional_op", "module_kind", "module_op", "shadow"]


def shadow(root: nn.Module) -> nn.Module:
    """A copy of `root`'s module tree that shares its parameters and buffers (see the module docstring)."""
    memo = {id(t): t for t in itertools.chain(root.parameters(), root.buffers())}
    return copy.deepcopy(root, memo)


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
        traced = shadow(root)
        gm = torch.fx.GraphModule(traced, LeafTracer().trace(traced))
        method = "fx"
    notes = []
    if example_inputs is not None:  # before the ops are read: layout ops need their shapes
        try:
            from torch.fx.passes.shape_prop import ShapeProp
            ShapeProp(gm).propagate(*example_inputs)
        except Exception as e:  # noqa: BLE001 - shapes are a bonus; checks that need them skip instead
            notes.append(f"shape propagation failed: {type(e).__name__}: {e}"[:200])
    # the GraphModule keeps only plain copies of modules it traced into; `root` has their classes
    cap = graph_capture(gm, method, lookup=root if method == "fx" else None)
    cap.notes.extend(notes)
    _ranks_from_meta(cap, gm)
    if method == "fx":
        cap.graph_module = None  # the traced copy is for analysis; rewrites go to the user's module
    return cap


def capture_export(root: nn.Module, example_inputs: tuple) -> Capture:
    """Capture with torch.export; ops carry the original model's parameter and module paths."""
    with quiet():  # a failing torch.export prints the whole traced graph (hundreds of KB) on stderr
        ep = torch.export.export(shadow(root), tuple(example_inputs), strict=False)
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
            cap.param_uses[n.target] += sum(1 for u in n.users if n in node_value_inputs(u))
        elif n.op == "output":
            cap.graph_outputs.update(ids[a] for a in _flat_nodes(n.args))
    claimed = _frozen_regions(gm, lookup if lookup is not None else module_root, cap, ids)
    absorbed = _layer_regions(gm, module_root) if module_root is not None else {}
    through: set[Any] = set()
    for n in gm.graph.nodes:
        if n in claimed:
            if isinstance(claimed[n], Op):
                cap.ops.append(claimed[n])  # at the region's output: ops stay in call order
            continue
        if n.op in ("placeholder", "get_attr", "output") or absorbed.get(n, n) is None:
            continue
        data_in = [ids[a] for a in node_value_inputs(n) if a.op != "get_attr" and absorbed.get(a, a) is not None]
        if absorbed.get(n) is not None:
            data_in = [ids[absorbed[n]]] + data_in
        out = [ids[n]]
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            kind = module_kind(m)
            if kind is None:
                torch_own = type(m).__module__.startswith("torch.nn.")  # a user's "Flatten" may do anything
                moves = _layout(n, type(m).__name__, m.training) if torch_own else None
                if moves is not None:
                    cap.ops.append(Op(n.target, "layout", [ids[n.args[0]]], out, module=n.target, node=n, attrs=moves))
                else:
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
        if fk is not None and fk[0] == "bn" and tuple_bn(n.target):
            first_out = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem
                         and u.args[1] == 0]
            others_used = any(u.users for u in n.users if u not in first_out)
            if len(first_out) != 1 or others_used:
                cap.ops.append(Op(n.name, "other", data_in, out, node=n))  # saved statistics read: not plain
                continue
            out = [ids[first_out[0]]]
            through.add(first_out[0])
        if fk is None:
            moves = _layout(n, call_name(n.target)) if _torch_call(n) else None
            if moves is not None:
                cap.ops.append(Op(n.name, "layout", [ids[n.args[0]]], out, node=n, attrs=moves))
            else:
                cap.ops.append(Op(n.name, "other", data_in, out, node=n))
            continue
        node = n
        if out != [ids[n]]:  # a tuple-returning BN: removing it means rerouting its result[0]
            node = next(u for u in through if ids[u] == out[0])
        op = functional_op(n.name, fk, n.args, n.kwargs, lambda a: getattrs.get(a) if isinstance(a, torch.fx.Node) else None,
                           lambda a: a is None, data_in, out, node=node)
        if node is not n:
            op.attrs["region_input"] = arg(n.args, n.kwargs, fk[1], "input")
        first = absorbed.get(n) or arg(n.args, n.kwargs, fk[1], "input")
        if isinstance(first, torch.fx.Node) and first in ids:
            op.inputs = [ids[first]] + [i for i in op.inputs if i != ids[first]]
        op.attrs["owner"] = owner_path(n)
        if "non_constant" in op.attrs and op.kind != "bn" and op.attrs["owner"]:
            op.name = f"{op.attrs['owner']} ({n.name})"  # a computed weight (CondConv): name the module
        if module_root is not None:
            _attribute_to_module(op, n, module_root, cap)
        cap.ops.append(op)
    return cap


def _layer_regions(gm: torch.fx.GraphModule, root: nn.Module) -> dict[Any, Any]:
    """torch.export spells one call of a conv module that pads by copies (padding_mode reflect, ...) as
    pad + convolution, both made by the module's own forward. Maps each such helper node to None and
    the layer's node to the module call's input, so the call is one op, as fx and the hooks see it."""
    calls: dict[str, list[Any]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.meta.get("nn_module_stack"):
            path = owner_path(n)
            if module_kind(bnlike.submodule(root, path) or nn.Identity()) in LAYER_KINDS:
                calls.setdefault(path, []).append(n)
    out: dict[Any, Any] = {}
    for nodes in calls.values():
        layers = [n for n in nodes if (functional_kind(n.target) or ("",))[0] in LAYER_KINDS + ("conv?",)]
        if len(nodes) < 2 or len(layers) != 1:
            continue  # a plain call, or a module called twice: nothing to merge
        inside = set(nodes)
        helpers = [n for n in nodes if n is not layers[0]]
        outer = {a for n in nodes for a in node_value_inputs(n) if a not in inside and a.op != "get_attr"}
        if len(outer) == 1 and all(u in inside for h in helpers for u in h.users):
            out.update(dict.fromkeys(helpers))
            out[layers[0]] = outer.pop()
    return out


def owner_path(node: Any) -> str:
    """The path of the innermost module whose forward code made the call `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    entry = list(stack.values())[-1]
    return entry[0] if isinstance(entry, tuple) else str(entry)


def _torch_call(n: Any) -> bool:
    """A tensor method or a torch/ATen function: a user function that happens to be called "flatten" is not."""
    if n.op == "call_method":
        return True
    mod = getattr(n.target, "__module__", None) or ""
    return n.op == "call_function" and (mod.startswith("torch") or hasattr(n.target, "overloadpacket"))


def _shape(node: Any) -> Any:
    tm = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _layout(n: Any, name: str, training: bool | None = None) -> dict[str, Any] | None:
    """Layout attrs of node `n` (layout.py), or None when it is not a layout op of a tensor."""
    if not n.args or not isinstance(n.args[0], torch.fx.Node) or n.args[0].op == "get_attr":
        return None
    if any(isinstance(a, torch.fx.Node) for a in _flat_nodes((n.args[1:], n.kwargs))) and name not in layout.RESHAPES:
        return None  # a permutation computed at run time proves nothing
    return layout.describe(name, n.args[1:], dict(n.kwargs), _shape(n.args[0]), _shape(n), training)


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
