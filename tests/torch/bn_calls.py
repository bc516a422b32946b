"""Count BatchNorm calls as a PyTorch model runs, independently of bnfold.

A TorchFunctionMode sees every torch call the model makes: `F.batch_norm` / `torch.batch_norm` calls
are BatchNorm calls, and so are calls of BatchNorm-named modules that are not torch.nn BatchNorms and
compute the map themselves (torchvision's FrozenBatchNorm2d), seen through forward hooks. Each call is
named by the owner of its running statistics, so the same BN has the same name in a model and in its
folded copy.

A call is *foldable* when its input was produced by a conv/linear call and nothing else reads that
tensor's values (metadata reads such as `.shape` do not count). *Foldable through layout* also
accepts a single-use chain of flatten/reshape/view/permute/transpose between the two (LeViT's
Linear -> flatten -> BatchNorm1d); whether the channel axis survives the chain is bnfold's business
and is not judged here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

LAYERS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear",
          "convolution"}
LAYOUT = {"flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "unflatten",
          "movedim", "t"}
METADATA = {"size", "dim", "numel", "ndimension", "nelement", "element_size", "is_floating_point", "is_complex",
            "is_contiguous", "stride", "storage_offset", "get_device", "data_ptr", "__len__", "shape", "dtype",
            "device", "ndim", "is_cuda", "layout", "requires_grad", "is_leaf", "names", "grad_fn", "is_sparse",
            "is_quantized", "is_meta", "_version", "is_inference", "untyped_storage", "_base", "is_mkldnn",
            "__format__", "__repr__", "__hash__"}
# calls that read only the metadata of one operand (by position)
SHAPE_ONLY = {"reshape_as": 1, "view_as": 1, "expand_as": 1, "type_as": 1, "new_zeros": 0, "new_ones": 0,
              "new_empty": 0, "new_full": 0, "zeros_like": 0, "ones_like": 0, "empty_like": 0, "full_like": 0,
              "rand_like": 0, "randn_like": 0}


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def is_frozen_bn(m: nn.Module) -> bool:
    """A BatchNorm-named module, not a torch.nn BatchNorm, holding running statistics."""
    return (not isinstance(m, _BatchNorm) and "batchnorm" in type(m).__name__.lower()
            and isinstance(getattr(m, "running_mean", None), torch.Tensor))


@dataclass
class Census:
    """The BatchNorm calls of one forward pass."""

    calls: list[str] = field(default_factory=list)  # BN names, in call order (one entry per call)
    foldable: list[str] = field(default_factory=list)  # input straight from a single-use conv/linear output
    through_layout: list[str] = field(default_factory=list)  # ... or via a single-use layout chain

    @property
    def counts(self) -> Counter:
        return Counter(self.calls)


class _Probe(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.paths: dict[int, str] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
                model.named_buffers(remove_duplicate=False)):
            self.paths.setdefault(id(t), name)
        self.made: dict[int, tuple[str, int | None]] = {}  # id -> ("layer", None) | ("layout", source id)
        self.uses: Counter = Counter()
        self.bn_inputs: list[tuple[str, int]] = []
        self.keep: list[Any] = []  # every tensor seen stays alive, so ids are never reused
        self.inside = 0  # > 0 inside a frozen BN module's forward: its own reads are the BN call

    def _owner(self, t: Any, default: str) -> str:
        """The BN's name: the module holding `running_mean`, or the statistics' own path."""
        path = self.paths.get(id(t)) if isinstance(t, torch.Tensor) else None
        if not path:
            return default
        owner, _, attr = path.rpartition(".")
        return owner if owner and attr == "running_mean" else path

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if self.inside or name in METADATA:
            return out
        skip = SHAPE_ONLY.get(name)
        operands = [a for i, a in enumerate(args) if i != skip] + list(kwargs.values())
        tensors = [t for t in tree_flatten(operands)[0] if isinstance(t, torch.Tensor)]
        self.keep.extend(tensors)
        self.keep.append(out)
        for t in tensors:
            if id(t) not in self.paths:
                self.uses[id(t)] += 1
        if func in (F.batch_norm, torch.batch_norm):
            # named by its statistics, else (batch statistics) by the owner of its weight or bias
            pos = ({"running_mean": 1, "weight": 3, "bias": 4} if func is F.batch_norm else
                   {"running_mean": 3, "weight": 1, "bias": 2})
            rm, w, b = (args[i] if len(args) > i else kwargs.get(k) for k, i in pos.items())
            name = self._owner(rm, "") or self._owner(w, "").rpartition(".")[0] or self._owner(b, "").rpartition(
                ".")[0] or f"batch_norm#{len(self.bn_inputs)}"
            self.bn_inputs.append((name, id(args[0])))
        elif name in LAYERS and isinstance(out, torch.Tensor):
            self.made[id(out)] = ("layer", None)
        elif name in LAYOUT and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor) \
                and id(args[0]) in self.made and out is not args[0]:
            self.made[id(out)] = ("layout", id(args[0]))
        return out


def census(model: nn.Module, *inputs: Any) -> Census:
    """Run `model(*inputs)` (no grad) and classify every BatchNorm call it makes."""
    probe = _Probe(model)
    handles = []
    for path, m in model.named_modules():
        if is_frozen_bn(m):
            def pre(mod: nn.Module, args: tuple, path: str = path) -> None:
                if not probe.inside and args and isinstance(args[0], torch.Tensor):
                    probe.uses[id(args[0])] += 1
                    probe.keep.append(args[0])
                    probe.bn_inputs.append((path, id(args[0])))
                probe.inside += 1

            def post(mod: nn.Module, args: tuple, out: Any) -> None:
                probe.inside -= 1
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.no_grad(), probe:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    res = Census()
    for name, src in probe.bn_inputs:
        res.calls.append(name)
        how = probe.made.get(src)
        if how is None or probe.uses[src] != 1:
            continue
        direct = how[0] == "layer"
        while how is not None and how[0] == "layout":
            src = how[1]
            how = probe.made.get(src) if probe.uses[src] == 1 else None
        if how is not None:
            (res.foldable if direct else res.through_layout).append(name)
    return res
