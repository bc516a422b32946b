"""Taps on a running PyTorch model: every submodule call's output, by module path, in call order.

Forward hooks copy each submodule call's output (a copy: an in-place ReLU later would overwrite it)
and key it by (module path, call index). On the original, the taps also follow the data between calls
by tensor identity: which BatchNorm-like calls (modules, or `F.batch_norm` written in a forward) read a
call's output as it is, and which calls hand on a BatchNorm's output object unchanged (a container
whose last child is the BN). That is what says where a fold moved a value: the layer a BN was folded
into now carries the BN's output, and a container that ended in a BN folded into the next layer now
carries the BN's input. Modules whose inputs a local proof needs get their first call's arguments
copied as well.
"""
from __future__ import annotations

import operator
import weakref
from collections import Counter
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from .capture import functional_kind, module_kind

Key = tuple[str, int]  # (module path, call index)
INPUT: Key = ("<model input>", 0)  # the producer of the model's own inputs
FUNCTIONAL = " (F.batch_norm)"  # suffix of the key path of a batch_norm called in a forward's own code


def bn_like(m: nn.Module) -> bool:
    """A module whose call is one BatchNorm and nothing else: torch.nn's (a subclass only if it keeps the
    forward: timm's BatchNormAct2d adds an activation), a frozen BN, or a graph module (a submodule of an
    unflattened torch.export program) whose only op is one batch_norm."""
    if module_kind(m) == "bn":
        return True
    graph = getattr(m, "graph", None)
    if isinstance(graph, torch.fx.Graph) and not any(True for _ in m.children()):
        ops = [n for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
        return len(ops) == 1 and (functional_kind(ops[0].target) or ("",))[0] == "bn"
    return False


def _traced_into(m: nn.Module) -> bool:
    """A graph submodule without a batch_norm op: a frozen BN that torch.export traced into plain ops
    (a decision names it a BN; one holding a batch_norm op is seen at that op instead)."""
    graph = getattr(m, "graph", None)
    return isinstance(graph, torch.fx.Graph) and not any(
        n.op == "call_function" and (functional_kind(n.target) or ("",))[0] == "bn" for n in graph.nodes)


def _plain(m: nn.Module) -> tuple:
    """What a module's code may read besides tensors and submodules: its plain attributes (numbers,
    strings, tuples of them), functions set on the instance (a replaced forward) and its hooks."""
    ok = (bool, int, float, str, type(None))
    own = [(k, v) for k, v in vars(m).items() if isinstance(v, ok) or (
        isinstance(v, tuple) and all(isinstance(e, ok) for e in v))]
    own += [(k, id(getattr(v, "__func__", v))) for k, v in vars(m).items() if callable(v) and not isinstance(v, nn.Module)]
    hooks = [(k, tuple(id(h) for h in d.values())) for k in ("_forward_hooks", "_forward_pre_hooks")
             if isinstance(d := getattr(m, k, None), dict)]
    return tuple(sorted(own, key=repr)) + tuple(hooks)


def copy_value(t: torch.Tensor) -> np.ndarray:
    """A numpy copy of a tensor in its own precision (bf16 via ml_dtypes)."""
    from .rules import to_numpy
    # numpy over a tensor's own memory would make its storage non-resizable: convert a clone
    return to_numpy(t.detach().clone() if t.device.type == "cpu" else t)


def _tid(t: torch.Tensor) -> tuple[int, int]:
    return id(t), t._version  # an in-place op makes it another value


def _alive(table: dict[tuple[int, int], tuple[Any, Any]], t: torch.Tensor) -> Any:
    """The entry for tensor `t` itself, not for a freed tensor whose id() `t` now has."""
    hit = table.get(_tid(t))
    return hit[1] if hit is not None and hit[0]() is t else None


class Taps:
    """One forward run's module outputs. `full` (the original and its noise copy) also records the dataflow
    around BatchNorms and the arguments of the modules in `capture`."""

    def __init__(self, root: nn.Module | None, full: bool = False, capture: Iterable[str] = (),
                 bns: Iterable[str] = ()) -> None:
        self.root, self.full, self.want = root, full, set(capture)
        self.known_bns = set(bns)  # module paths that decisions name as BNs (a traced frozen BN's ops)
        self.values: dict[Key, list[np.ndarray]] = {}
        self.order: list[Key] = []
        self.calls: Counter = Counter()
        self.classes: dict[str, str] = {}
        self.next_bn: dict[Key, list[Key]] = {}       # call -> BN-like calls reading its output as it is
        self.bn_output_of: dict[Key, Key] = {}         # call whose output object is a BN-like call's output
        self.bn_input: dict[Key, Key | np.ndarray] = {}  # BN-like call -> the call whose output it reads, or a copy
        self.bn_names: dict[Key, str] = {}             # BN-like call -> the BN's name (as decisions name it)
        self.bn_args: dict[Key, tuple] = {}            # F.batch_norm call -> (weight, bias, mean, var, eps)
        self.captured: dict[str, tuple[tuple, dict]] = {}
        self.of_params: set[Key] = set()  # calls that read only parameters (a weight's parametrization)
        self.sources: dict[Key, set[Key]] = {}          # call -> the calls its tensor inputs were computed from
        self.direct: set[Key] = set()                   # calls whose every tensor input is a call's output as is
        self.window: dict[Key, tuple[int, int]] = {}    # call -> the span of `order` recorded while it ran
        self.own: dict[str, tuple[bool, Any]] = {}      # path -> (holds tensors itself, its plain attributes)
        self._made_by: dict[tuple[int, int], tuple[Any, tuple[frozenset, bool]]] = {}
        self._start: dict[Key, int] = {}
        self._params: set[int] = set()
        # by tensor identity, each entry holding a weak reference: a freed tensor's id() may be reused, and
        # keeping every output alive would hold all of the model's activations at once
        self._producers: dict[tuple[int, int], tuple[Any, list[Key]]] = {}
        self._copies: dict[tuple[int, int], tuple[Any, np.ndarray]] = {}
        self._stack: dict[int, list[Key]] = {}
        self._bn_depth = 0

    # -- recording ---------------------------------------------------------------------------------
    def _pre(self, path: str, bn: bool) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            key = (path, self.calls[path])
            self.calls[path] += 1
            self._stack.setdefault(id(mod), []).append(key)
            self._start[key] = len(self.order)
            if self.full:
                ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
                if all(id(t) in self._params for t in ins):
                    self.of_params.add(key)  # its output is a (folded) weight, not a value of the data path
                lines = [self.lineage(t) for t in ins if id(t) not in self._params]
                self.sources[key] = set().union(*(keys for keys, _ in lines))
                if all(direct for _, direct in lines):
                    self.direct.add(key)
            if self.full and bn:
                self._bn_depth += 1
                self._enter_bn(key, args[0] if args else next(iter(kwargs.values()), None))
            if path in self.want and key[1] == 0:
                self.captured[path] = tree_map(lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a,
                                               (tuple(args), dict(kwargs)))
        return hook

    def _post(self, path: str, bn: bool) -> Any:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            key = self._stack[id(mod)].pop()
            if self.full and bn:
                self._bn_depth -= 1
            self._record(key, output, bn)
        return hook

    def _enter_bn(self, key: Key, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            return
        src = _alive(self._producers, x) or []
        for p in src:
            self.next_bn.setdefault(p, []).append(key)
        self.bn_input[key] = src[-1] if src else copy_value(x)

    def _record(self, key: Key, output: Any, bn: bool) -> None:
        leaves = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        vals = []
        for t in leaves:
            value = _alive(self._copies, t)
            if value is None:
                value = copy_value(t)
                self._copies[_tid(t)] = (weakref.ref(t), value)
            vals.append(value)
        self.values[key] = vals
        self.window[key] = (self._start.pop(key, len(self.order)), len(self.order))
        self.order.append(key)
        if self.full:
            for t in leaves:
                self.mark(t, frozenset([key]), True)
        if self.full and len(leaves) == 1:
            earlier = _alive(self._producers, leaves[0])
            if earlier is None:
                earlier = []
                self._producers[_tid(leaves[0])] = (weakref.ref(leaves[0]), earlier)
            if not bn:
                first_bn = next((k for k in earlier if k in self.bn_input), None)
                if first_bn is not None:
                    self.bn_output_of[key] = first_bn
            earlier.append(key)

    def run(self, model: Any, args: tuple) -> Any:
        """Call `model(*args)` with the taps on (hooks on `self.root`'s submodules); returns its result."""
        handles = []
        if self.root is not None:
            if self.full:
                self._params = {id(t) for t in list(self.root.parameters()) + list(self.root.buffers())}
            for path, m in self.root.named_modules():
                if not path:
                    continue
                bn = bn_like(m) or (path in self.known_bns and _traced_into(m))
                self.classes[path] = type(m).__name__
                self.own[path] = (any(True for _ in m.parameters(recurse=False)) or
                                  any(True for _ in m.buffers(recurse=False)), _plain(m))
                if bn:
                    self.bn_names[(path, 0)] = path
                handles.append(m.register_forward_pre_hook(self._pre(path, bn), with_kwargs=True))
                handles.append(m.register_forward_hook(self._post(path, bn), with_kwargs=True))
        for t in tree_flatten(args)[0]:
            if isinstance(t, torch.Tensor):
                self.mark(t, frozenset([INPUT]), True)
        try:
            with torch.no_grad():
                if self.full and self.root is not None:
                    with _Code(self):
                        return model(*args)
                return model(*args)
        finally:
            for h in handles:
                h.remove()
            self._producers.clear()
            self._copies.clear()
            self._made_by.clear()

    def mark(self, t: torch.Tensor, sources: frozenset, direct: bool) -> None:
        """Remember which calls `t` was computed from."""
        self._made_by[_tid(t)] = (weakref.ref(t), (sources, direct))

    def lineage(self, t: torch.Tensor) -> tuple[frozenset, bool]:
        """(the calls `t` was computed from, whether it is one call's output as is); unknown: (empty, False)."""
        return _alive(self._made_by, t) or (frozenset(), False)

    # -- reading -----------------------------------------------------------------------------------
    def name_of(self, key: Key) -> str:
        """The name a Decision gives the BN of a BN-like call."""
        return self.bn_names.get((key[0], 0), key[0])

    def chain(self, key: Key) -> list[Key]:
        """The BN-like calls that follow `key` one after another, each reading the previous output alone."""
        out, cur = [], key
        while len(self.next_bn.get(cur, [])) == 1 and len(out) < 8:
            cur = self.next_bn[cur][0]
            out.append(cur)
        return out

    def value(self, target: tuple[str, Key]) -> list[np.ndarray] | None:
        """A recorded value: ("out", key) a call's output, ("in", bn) the input a BN-like call read."""
        kind, key = target
        if kind == "out":
            return self.values.get(key)
        src = self.bn_input.get(key)
        if isinstance(src, np.ndarray):
            return [src]
        return self.values.get(src) if src is not None else None


class _Code(TorchFunctionMode):
    """Sees every torch call made while the model runs: a `batch_norm` in a forward's own code (not inside a
    BN module) is a BN-like call of its own, and every other result remembers what it was computed from."""

    def __init__(self, taps: Taps) -> None:
        super().__init__()
        self.taps = taps
        self.paths = {id(t): n for n, t in list(taps.root.named_parameters()) + list(taps.root.named_buffers())}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        fk = functional_kind(func) if self.taps._bn_depth == 0 else None
        if fk is None or fk[0] != "bn":
            out = func(*args, **kwargs)
            # the code between modules: its results are computed from what its inputs were computed from
            sources = frozenset().union(*(self.taps.lineage(t)[0] for t in tree_flatten((args, kwargs))[0]
                                          if isinstance(t, torch.Tensor)))
            if sources:
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        self.taps.mark(t, sources, False)
            return out
        from .capture import arg
        rm = arg(args, kwargs, fk[1], "running_mean")
        name = self.paths.get(id(rm), "") if isinstance(rm, torch.Tensor) else ""
        name = name.rpartition(".")[0] or name or "batch_norm"
        path = name + FUNCTIONAL
        key = (path, self.taps.calls[path])
        self.taps.calls[path] += 1
        self.taps.bn_names[(path, 0)] = name
        self.taps._enter_bn(key, arg(args, kwargs, fk[1], "input"))
        stats = [arg(args, kwargs, fk[1], r) for r in ("weight", "bias", "running_mean", "running_var")]
        self.taps.bn_args[key] = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else None for t in stats) + (
            float(arg(args, kwargs, fk[1], "eps")),)
        out = func(*args, **kwargs)
        self.taps._record(key, out[0] if isinstance(out, tuple) else out, True)
        return out
