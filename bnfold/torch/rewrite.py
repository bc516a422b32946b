"""Remove a batch_norm call from the code of the module that makes it.

A BN module of torch.nn is replaced by nn.Identity when it folds. A module whose own forward calls
`F.batch_norm` and then does more (timm's BatchNormAct2d: drop + activation; a user's BN+act block)
cannot be: its other work must stay. It is replaced, locally, by an fx-traced copy of just that module
in which the call is gone: every submodule stays one call of the very same module object, so the copy
computes what the module did minus the normalisation. The model's root class and every other module
are left as they are. Code fx cannot trace alone (a branch on the input's values), a call in the root
model's own forward, or a module with hooks is not rewritten: that BN is skipped, saying why, since a
folded BN must not run.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..core.decisions import Reason, Skip
from .capture import shadow
from .ops import Op, arg, functional_kind


class OwnCode(torch.fx.Tracer):
    """Traces one module's own forward: every submodule stays one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


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


def without_call(root: nn.Module, bn: Op) -> Callable[[], None]:
    """A writer that puts, in place of the module whose forward makes the batch_norm call `bn`, a traced
    copy of it without that call. Everything is prepared here, so a Skip leaves `root` untouched."""
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
