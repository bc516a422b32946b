"""Capture by running the model, for code that neither torch.fx nor torch.export can capture.

Forward hooks on every BN/conv/linear module record each call with its input and output tensors; a
TorchFunctionMode records every other torch call made outside those modules (the user's own code:
additions, views, `.sum() > 0` in an `if`, ...). A tensor's uses are therefore all the calls that
read it, so "the conv output feeds only this BN" is observed rather than assumed. What is observed
is one path through the code: `capture_runs` records several inputs and the rules fold only what is
safe on every one of them (documented in the report).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import layout as layout
from .capture import shadow
from .ops import Capture, Op, functional_kind, functional_op, module_kind, module_op
from .reads import call_name, metadata_only, value_positions


class _Recorder(TorchFunctionMode):
    def __init__(self, cap: Capture, param_paths: dict[int, str]) -> None:
        super().__init__()
        self.cap = cap
        self.param_paths = param_paths
        self.values: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps recorded tensors alive so their id() is never reused
        self.depth = 0
        self.next_id = 0
        self.owners: list[str] = []  # paths of the modules whose forward is running, innermost last

    def new_values(self, obj: Any) -> list[int]:
        out = []
        for t in tree_flatten(obj)[0]:
            if isinstance(t, torch.Tensor):
                vid = self.next_id
                self.next_id += 1
                self.values[id(t)] = vid
                self.cap.ranks[vid] = t.dim()
                self.keep.append(t)
                out.append(vid)
        return out

    def read(self, obj: Any) -> tuple[list[int], list[str]]:
        vals, params = [], []
        for t in tree_flatten(obj)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if id(t) in self.param_paths:
                params.append(self.param_paths[id(t)])
            elif id(t) in self.values:
                vals.append(self.values[id(t)])
        return vals, params

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = call_name(func)
        if self.depth or metadata_only(name, args):
            return out
        read = ([args[i] for i in value_positions(name, args)], kwargs)
        vals, params = self.read(read)
        if not vals and not params:
            return out
        fk = functional_kind(func)
        moves = self.layout(func, name, args, kwargs, out) if fk is None else None
        first = self.read(args[0])[0] if moves is not None else []  # before `out` (maybe args[0] itself) gets an id
        outs = self.new_values(out)
        for p in params:
            self.cap.param_uses[p] += 1
        if moves is not None:
            self.cap.ops.append(Op(name, "layout", first, outs, attrs=moves))
        elif fk is None:
            self.cap.ops.append(Op(name or str(func), "other", vals, outs))
        else:
            first = args[0] if args else kwargs.get("input")
            ordered = self.read(first)[0] + [v for v in vals if v not in self.read(first)[0]]
            op = functional_op(name, fk, args, kwargs,
                               lambda a: self.param_paths.get(id(a)) if isinstance(a, torch.Tensor) else None,
                               lambda a: a is None, ordered, outs)
            if "non_constant" in op.attrs:
                op.kind = "other"
            op.attrs["owner"] = self.owners[-1] if self.owners else ""
            self.cap.ops.append(op)
        return out

    def layout(self, func: Any, name: str, args: tuple, kwargs: dict, out: Any) -> dict[str, Any] | None:
        """Layout attrs of a torch call on one recorded tensor that returns one tensor, else None."""
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(out, torch.Tensor):
            return None
        if id(args[0]) not in self.values:
            return None
        if any(isinstance(a, torch.Tensor) for a in tree_flatten((args[1:], kwargs))[0]):
            return None
        return layout.describe(name, args[1:], kwargs, tuple(args[0].shape), tuple(out.shape))


def capture_hooks(root: nn.Module, example_inputs: tuple) -> Capture:
    """Run `root` once on `example_inputs` and record its ops (see the module docstring)."""
    # a copy sharing the real tensors runs: what forward stores on a module (a cache computed from
    # weights the fold will change) must not stay in the result, nor the hooks if the run fails
    root = shadow(root)
    cap = Capture("module-hooks")
    param_paths: dict[int, str] = {}
    for name, t in list(root.named_parameters(remove_duplicate=False)) + list(root.named_buffers(remove_duplicate=False)):
        param_paths.setdefault(id(t), name)
    rec = _Recorder(cap, param_paths)
    handles = []
    pending: dict[int, list[list[int]]] = {}

    def pre(path: str, m: nn.Module) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if rec.depth == 0:
                pending.setdefault(id(mod), []).append(rec.read(args[0] if args else kwargs)[0]
                                                       + rec.read((args[1:], kwargs))[0])
            rec.depth += 1
        return hook

    def post(path: str, m: nn.Module, kind: str) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            rec.depth -= 1
            if rec.depth == 0:
                inputs = pending[id(mod)].pop()
                op = module_op(path, mod, kind, inputs, rec.new_values(output))
                cap.ops.append(op)
                cap.module_calls[path] += 1
                for p in op.params.values():
                    if p:
                        cap.param_uses[p] += 1
        return hook

    def enter(path: str) -> Any:
        return lambda mod, args: rec.owners.append(path)

    def leave(mod: nn.Module, args: tuple, output: Any) -> None:
        rec.owners.pop()

    for path, m in root.named_modules():
        if path and module_kind(m) is None:
            handles.append(m.register_forward_pre_hook(enter(path)))
            handles.append(m.register_forward_hook(leave, always_call=True))
    for path, m in root.named_modules(remove_duplicate=False):
        kind = module_kind(m)
        if kind is None:
            continue
        handles.append(m.register_forward_pre_hook(pre(path, m), with_kwargs=True))
        handles.append(m.register_forward_hook(post(path, m, kind), with_kwargs=True))
    try:
        rec.new_values(example_inputs)
        with torch.no_grad(), rec:
            result = root(*example_inputs)
        cap.graph_outputs.update(rec.read(result)[0])
    finally:
        for h in handles:
            h.remove()
    return cap


def variants(example_inputs: tuple, seed: int) -> list[tuple]:
    """The example inputs plus two others (negated, and fresh random data of the same shapes), so that
    data-dependent branches are more likely to show a path where a fold would be wrong."""
    g = torch.Generator().manual_seed(seed + 7919)

    def neg(t: Any) -> Any:
        return -t if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def fresh(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            return (r * 2.0 + 0.5).to(dtype=t.dtype, device=t.device)
        return t

    return [tuple(example_inputs), tuple(neg(t) for t in example_inputs), tuple(fresh(t) for t in example_inputs)]


def capture_runs(root: nn.Module, example_inputs: tuple, seed: int) -> list[Capture]:
    """One hooks capture per input variant."""
    return [capture_hooks(root, v) for v in variants(example_inputs, seed)]
