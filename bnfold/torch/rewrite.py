"""The edits that fold a BN into a PyTorch model (rules.py decides which).

Math (kernel.py): after a layer W' = W * s[out], b' = s*b + t; before one W' = W * s[in], b' = b + W.t.
The layer gets new parameters (fresh Parameters: the old tensor may be shared) and the BN goes: a
torch.nn BN module becomes nn.Identity; a node of an editable graph (GraphModule, torch.export
program) is erased; and a module whose own forward calls `F.batch_norm` and then does more (timm's
BatchNormAct2d: drop + activation; a user's BN+act block) is replaced, locally, by an fx-traced copy
of just that module in which the call is gone. Every submodule of that copy is the very same module
object, so it computes what the module did minus the normalisation; the model's root class and every
other module stay as they are. Code fx cannot trace alone (a branch on the input's values), a call in
the root model's own forward, or a module with hooks is not rewritten: that BN is skipped, saying why,
since a folded BN must not run.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from ..core import kernel, layouts
from ..core.decisions import Reason, Skip
from . import bnlike as bnlike
from .capture import shadow
from .ops import Op, arg, functional_kind
from .rules import PATTERNS, Plan, from_numpy, get_tensor, scale_shift, set_tensor, to_numpy


class OwnCode(torch.fx.Tracer):
    """Traces one module's own forward: every submodule stays one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _cloned(obj: Any) -> Any:
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, obj)


def record_inputs(root: nn.Module, paths: set[str], example_inputs: tuple) -> dict[str, tuple[tuple, dict]]:
    """The arguments each module at `paths` gets on its first call when `root` runs `example_inputs`
    (copied: a later in-place op must not change them). A shadow copy of `root` runs, so nothing the
    run stores on a module stays in `root`; a run that fails gives no samples."""
    run = shadow(root)
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for path in paths:
        m = bnlike.submodule(run, path) if path else None
        if m is not None:
            def hook(mod: nn.Module, args: tuple, kwargs: dict, path: str = path) -> None:
                seen.setdefault(path, _cloned((args, kwargs)))
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run(*example_inputs)
    except Exception:  # noqa: BLE001 - no samples: the end-to-end verification still judges the result
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def same_function(a: nn.Module, b: nn.Module, sample: tuple[tuple, dict]) -> bool:
    """Do modules `a` and `b` return the same tensors, bit for bit, on `sample` (args, kwargs)?"""
    try:
        with torch.no_grad():
            ya = tree_flatten(a(*_cloned(sample[0]), **_cloned(sample[1])))[0]
            yb = tree_flatten(b(*_cloned(sample[0]), **_cloned(sample[1])))[0]
    except Exception:  # noqa: BLE001 - a copy that cannot even run is not the same function
        return False
    return len(ya) == len(yb) and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
        for x, y in zip(ya, yb))


def _bn_call_reading(graph: Any, rel: str) -> list[Any]:
    """The batch_norm calls of `graph` whose running_mean is the attribute `rel`."""
    out = []
    for n in graph.nodes:
        fk = functional_kind(n.target) if n.op == "call_function" else None
        if fk is None or fk[0] != "bn":
            continue
        rm = arg(n.args, n.kwargs, fk[1], "running_mean")
        if isinstance(rm, torch.fx.Node) and rm.op == "get_attr" and rm.target == rel:
            out.append((n, fk))
    return out


def without_call(root: nn.Module, bn: Op, sample: tuple[tuple, dict] | None = None) -> Callable[[], None]:
    """A writer that puts, in place of the module whose forward makes the batch_norm call `bn`, a traced
    copy of it without that call. Everything is prepared here, so a Skip leaves `root` untouched.
    `sample` (the module's arguments in a real run, record_inputs) proves that the traced copy, call
    kept, computes bit for bit what the module does: a forward that behaves differently when traced
    (a branch on isinstance(x, Tensor), on is_fx_tracing()) is not rewritten."""
    owner_path = bn.attrs.get("owner")
    rm = bn.params.get("running_mean") or ""
    if owner_path is None:
        raise Skip(Reason.UNSUPPORTED_BN_MODE, "bnfold cannot tell which module's code makes this batch_norm call, "
                                               "so it cannot remove it")
    if owner_path == "":
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"the batch_norm call is written in {type(root).__name__}.forward, the "
                   "model's own code: removing it would change the model's class (fold torch.fx.symbolic_trace(model) "
                   "to have the call removed)")
    owner = root.get_submodule(owner_path)
    cls = type(owner).__name__
    if getattr(owner, "_forward_hooks", None) or getattr(owner, "_forward_pre_hooks", None):
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{owner_path} ({cls}) calls batch_norm in its forward and has hooks, "
                                               "which a rewritten copy of it would not run")
    if not rm.startswith(owner_path + "."):
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{owner_path} ({cls}) calls batch_norm on statistics held outside it "
                                               f"({rm or 'none'}), so its code cannot be rewritten alone")
    rel = rm[len(owner_path) + 1:]
    try:
        graph = OwnCode().trace(shadow(owner))
    except Exception as e:  # noqa: BLE001 - any trace failure means: this module's code cannot be rewritten
        first = (str(e).splitlines() or [""])[0][:160]
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{owner_path} ({cls}) calls batch_norm in its forward, which torch.fx "
                                               f"cannot trace to remove the call ({type(e).__name__}: {first})") from None
    calls = _bn_call_reading(graph, rel)
    if len(calls) != 1:
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{owner_path} ({cls}): its traced forward has {len(calls)} batch_norm "
                                               f"calls reading {rel}, not one")
    if sample is not None and not same_function(owner, torch.fx.GraphModule(owner, copy.deepcopy(graph)), sample):
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{owner_path} ({cls}) calls batch_norm in its forward, and its "
                                               "fx-traced copy computes something else than it on the inputs it gets")
    node, fk = calls[0]
    source = arg(node.args, node.kwargs, fk[1], "input")
    reads = list(node.all_input_nodes)
    node.replace_all_uses_with(source)
    graph.erase_node(node)
    for r in reads:
        if r.op == "get_attr" and not r.users:
            graph.erase_node(r)
    parent_path, _, attr = owner_path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root

    def write() -> None:
        # built now, not when prepared: the copy takes the owner's tensors as they are after the fold,
        # which may have written new weights into a layer inside the owner
        new = torch.fx.GraphModule(owner, graph)
        new.train(owner.training)
        setattr(parent, attr, new)
    return write


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


def _removal(root: nn.Module, bn: Op, surgery: bool, sample: tuple[tuple, dict] | None) -> Callable[[], None]:
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
    return without_call(root, bn, sample)


def _add_bias(root: nn.Module, layer: Op, bias: torch.Tensor, surgery: bool) -> None:
    home = layer.module if layer.module is not None else layer.attrs.get("bias_home", ".").rpartition(".")[0] or None
    if home is not None:
        mod = root.get_submodule(home)
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


def apply(root: nn.Module, plan: Plan, surgery: bool,
          samples: dict[str, tuple[tuple, dict]] | None = None) -> dict[str, Any]:
    """Fold `plan` into `root` (all values computed first, so a Skip leaves `root` untouched).
    `samples`: record_inputs of the modules whose code a fold rewrites."""
    bn, layer = plan.bn, plan.layer
    assert layer is not None
    s, t = scale_shift(root, bn)
    w = get_tensor(root, layer.params["weight"])
    b = get_tensor(root, layer.params["bias"]) if layer.params.get("bias") else None
    fold = kernel.fold_after if plan.direction == "after" else kernel.fold_before
    res = fold(to_numpy(w), to_numpy(b) if b is not None else None, s, t, layer_layout(layer))
    new_w = from_numpy(res.weight, w)
    new_b = from_numpy(res.bias, b if b is not None else w)
    remove, note = _removal(root, bn, surgery, (samples or {}).get(bn.attrs.get("owner") or "")), None
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
