"""Per-fold local proofs for PyTorch: each fold's layer, original against folded, replayed in float64.

A fold into layer L replaces the region "L, then the BNs folded after it" (or "the BN folded before it,
then L") by L with new weights W', b'. The region's input x is captured from the original's run on the
first verification batch that calls L (a forward pre-hook on L; for a backward fold, the BN's input), and both
regions run on it in float64, so the only difference left is the rounding of W' and b' to the model's
float type:

    ref = BN affine maps (each from its own running_mean/var, weight, bias, eps) around the original L
    new = the folded L (W', b' as stored)          M = the folded L on |x| with |W'|, |b'|
    passed iff |new - ref| <= (2u + 2**-36) M elementwise

u is the unit roundoff of the lowest float precision involved (torch.finfo(dtype).eps); 2**-36 M covers
float64's own rounding. The replay is witnessed: ref must match the BN output the original computed in
the same run within max(1e-3, 8 u) (M + |ref|), else the proof is "not run" (the replay would not be evidence),
never a false accusation. Once witnessed, the same replay also runs on a seeded random input of the same
shape: a fold is exact for every input, and data whose channel a ReLU kills would not show a wrong
weight there. The arithmetic is written here, not taken from core.kernel, so that a kernel bug cannot
prove itself right.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.decisions import Decision
from .capture import arg, functional_kind, module_kind
from .taps import Taps

SLACK = 2.0
F64_TERM = 2.0 ** -36
FAITHFUL = 1e-3
WITNESS_ULPS = 8.0
HOW_MERGE = ("float64 replay of the block's branches (its own modules) against the merged conv on the block's input; "
             "bound 2 u M")
HOW = "float64 replay of the layer and its BatchNorm(s) on the input captured from the original run; bound 2 u M"


class Prover:
    """The proofs of one verification. Each region is proven on the first batch that calls its layer
    (a branch the example inputs do not take may be taken by a variant)."""

    def __init__(self, decisions: list[Decision]) -> None:
        self.regions: dict[str, list[Decision]] = {}
        for d in decisions:
            if d.is_folded:
                self.regions.setdefault(d.producer or "", []).append(d)
        self.done: dict[str, dict[str, Any]] = {}

    @property
    def wanted(self) -> set[str]:
        """The layers whose first call's arguments are still to be captured."""
        return {layer for layer in self.regions if layer not in self.done}

    def step(self, original: nn.Module, candidate: nn.Module, taps: Taps, cand_taps: Taps) -> None:
        """Prove every region whose layer this batch's taps captured."""
        for layer in self.wanted:
            if layer not in taps.captured and _module(original, layer) is not None:
                continue  # not called on this batch: maybe on the next
            try:
                self.done[layer] = _prove_region(layer, self.regions[layer], original, candidate, taps, cand_taps)
            except Exception as e:  # noqa: BLE001 - a replay that cannot run proves nothing; it accuses nobody
                self.done[layer] = {"not_run": f"the float64 replay could not run ({type(e).__name__}: "
                                               f"{(str(e).splitlines() or [''])[0][:160]})"}

    def finish(self, why_none: str = "") -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Set `proof` on every folded decision; returns (counts, blame for the folds whose proof failed)."""
        counts = {"proven": 0, "failed": 0, "not_run": 0}
        blame: list[dict[str, Any]] = []
        for layer, ds in self.regions.items():
            proof = self.done.get(layer) or {"not_run": why_none or f"{layer!r} was not called on the verification "
                                                                   "inputs"}
            for d in ds:
                d.proof = dict(proof)
                if "not_run" in proof:
                    counts["not_run"] += 1
                elif proof["passed"]:
                    counts["proven"] += 1
                else:
                    counts["failed"] += 1
                    blame.append({"bn": d.bn, "why": f"its local proof failed: max abs {proof['max_abs']:.3g} > "
                                                      f"bound {proof['bound']:.3g} at {layer!r}",
                                  "max_abs": proof["max_abs"], "bound": proof["bound"], "layer": layer})
        return counts, blame


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _prove_region(layer: str, ds: list[Decision], original: nn.Module, candidate: nn.Module,
                  taps: Taps, cand_taps: Taps) -> dict[str, Any]:
    lo, lc = _module(original, layer), _module(candidate, layer)
    if lo is None or lc is None:
        return {"not_run": f"{layer!r} is not a module of both models (a functional call or a copied layer)"}
    if type(lo) is not type(lc) and not any(d.direction == "merge" for d in ds):
        return {"not_run": f"{layer!r} is a {type(lo).__name__} in the original and a {type(lc).__name__} folded"}
    if layer not in taps.captured or layer not in cand_taps.captured:
        return {"not_run": f"{layer!r} is not called by the folded model where the original calls it"}
    if any(d.direction == "merge" for d in ds):
        return _prove_merge(layer, lo, lc, taps)
    after = [d for d in ds if d.direction == "after"]
    before = [d for d in ds if d.direction != "after"]
    if len(before) > 1:
        return {"not_run": f"{len(before)} BatchNorms were folded before {layer!r}; one is replayed"}
    chain = taps.chain((layer, 0))
    names = [taps.name_of(k) for k in chain[:len(after)]]
    if sorted(names) != sorted(d.bn for d in after):
        return {"not_run": f"the BatchNorms folded into {layer!r} do not read its output one after another in the "
                           "original run"}
    bn_keys = chain[:len(after)]
    pre_key = None
    if before:
        pre_key = next((k for k in taps.bn_input if taps.name_of(k) == before[0].bn and k[1] == 0), None)
        if pre_key is None:
            return {"not_run": f"{before[0].bn!r} was not called on the verification inputs"}
    bns = {k: taps.bn_args.get(k) or _bn_params(original, taps.name_of(k)) for k in
           bn_keys + ([pre_key] if pre_key else [])}
    bad = next((v for v in bns.values() if isinstance(v, str)), None)
    lo_, lc_ = _layer(lo, *taps.captured[layer]), _layer(lc, *cand_taps.captured[layer])
    bad = bad or next((v for v in (lo_, lc_) if isinstance(v, str)), None)
    if bad:
        return {"not_run": bad}
    assert isinstance(lo_, Layer) and isinstance(lc_, Layer)
    x = lo_.x
    if pre_key is not None:
        x = torch.from_numpy(np.asarray(taps.value(("in", pre_key))[0], np.float64))
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return {"not_run": f"{layer!r}'s input is not a floating tensor"}
    x64 = x.detach().cpu().double()
    dtypes = {x.dtype} | {t.dtype for t in lo_.tensors + lc_.tensors if t is not None}
    dtypes |= {t.dtype for p in bns.values() if isinstance(p, tuple) for t in p[:4] if isinstance(t, torch.Tensor)}
    dtypes |= {t.dtype for k in bns for t in _tensors(original, taps.name_of(k))}
    u = max(torch.finfo(dt).eps for dt in dtypes if dt.is_floating_point)
    wide = lambda ts, f=lambda t: t: [None if t is None else f(t.detach().cpu().double()) for t in ts]  # noqa: E731

    def replay(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            ref = lo_.fn(_apply_bn(x, bns[pre_key]) if pre_key is not None else x, *wide(lo_.tensors))
            for k in bn_keys:
                ref = _apply_bn(ref, bns[k])
            new = lc_.fn(x, *wide(lc_.tensors))
            mag = lc_.fn(x.abs(), *wide(lc_.tensors, torch.abs))
        return ref.numpy(), new.numpy(), mag.numpy()

    witness = taps.value(("out", bn_keys[-1] if bn_keys else (layer, 0)))
    return _judge_here_and_random(replay, x64, witness[0] if witness else None, u, HOW)


def _judge_here_and_random(replay: Any, x64: torch.Tensor, witness: np.ndarray | None, u: float,
                           how: str) -> dict[str, Any]:
    """_judge on the captured input, then, if it passed, on a random input of its shape: the fold's algebra
    holds for every input, and a random one also sees the channels the data leaves dead (a ReLU before a
    depthwise conv), where a wrong weight would not show. `replay(x)` gives (reference, folded, magnitude)."""
    with np.errstate(invalid="ignore", over="ignore"):
        proof = _judge(*replay(x64), witness, u)
        if proof.get("passed"):
            g = torch.Generator().manual_seed(0)
            probe = torch.randn(x64.shape, generator=g, dtype=torch.float64) * float(x64.abs().mean() + 1e-3)
            other = _judge(*replay(probe), None, u, witnessed=False)
            if not other.get("passed") and "not_run" not in other:
                return {**other, "how": how + "; failed on a random input of the same shape"}
            proof["ratio"] = max(proof["ratio"], other.get("ratio", 0.0))
    if "how" in proof:
        proof["how"] = how
    return proof


def _prove_merge(layer: str, lo: nn.Module, lc: nn.Module, taps: Taps) -> dict[str, Any]:
    """A merged block: the original's region (its own modules, x -> the sum of branches) replayed in float64
    against the merged conv on the block's input captured from the original run; the witness is the
    region run by the original's modules in their own precision on that input."""
    from .blocks import MERGED, region_module
    region = region_module(lo)
    merged = getattr(lc, MERGED, None)
    if region is None or module_kind(merged) != "conv":
        return {"not_run": f"{layer!r}: the original's branches or the merged conv cannot be found again"}
    args, kwargs = taps.captured[layer]
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return {"not_run": f"{layer!r}'s input is not a floating tensor"}
    region64 = copy.deepcopy(region).cpu().double()
    w, b = merged.weight.detach().cpu().double(), merged.bias.detach().cpu().double()
    dtypes = {x.dtype, merged.weight.dtype} | {t.dtype for t in list(region.parameters()) + list(region.buffers())
                                               if t.is_floating_point()}
    u = max(torch.finfo(dt).eps for dt in dtypes)
    conv64 = copy.deepcopy(merged).cpu().double()

    def replay(x64: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.no_grad():
            ref = region64(x64)
            new = conv64._conv_forward(x64, w, b)
            mag = conv64._conv_forward(x64.abs(), w.abs(), b.abs())
        return ref.numpy(), new.numpy(), mag.numpy()

    with torch.no_grad():
        witness = region(x).detach().cpu().double().numpy()
    return _judge_here_and_random(replay, x.detach().cpu().double(), witness, u, HOW_MERGE)


def _judge(ref: np.ndarray, new: np.ndarray, mag: np.ndarray, witness: np.ndarray | None, u: float,
           witnessed: bool = True) -> dict[str, Any]:
    if witnessed and (witness is None or np.shape(witness) != ref.shape):
        return {"not_run": "the original's own value of the region's output was not captured"}
    w = np.asarray(witness if witness is not None else ref, np.float64)
    fine = np.isfinite(w) & np.isfinite(ref)
    # the original ran in its own precision: a bfloat16 layer's output alone is off by 2**-8 of itself
    faithful = max(FAITHFUL, WITNESS_ULPS * u)
    scale = np.where(fine, mag, 0.0) + np.abs(np.where(fine, ref, 0.0))
    if np.any(np.abs(np.where(fine, ref - w, 0.0)) > faithful * scale):
        return {"not_run": "the float64 replay of the original region disagrees with the original's own run of it"}
    if ref.shape != new.shape or mag.shape != new.shape:
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": f"shapes differ: {list(ref.shape)} vs {list(new.shape)}"}
    if not np.array_equal(np.isfinite(ref), np.isfinite(new)):
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": "non-finite values differ"}
    if not ref.size:
        return {"not_run": "the layer's output is empty on the captured input"}
    both = np.isfinite(ref) & np.isfinite(new)
    bound = (SLACK * u + F64_TERM) * mag
    diff = np.where(both, np.abs(new - ref), 0.0)
    ratio = diff / np.maximum(bound, np.finfo(np.float64).tiny)
    k = int(np.argmax(ratio))
    worst = float(ratio.reshape(-1)[k])
    return {"passed": worst <= 1.0, "max_abs": float(diff.max()), "bound": float(bound.reshape(-1)[k]),
            "ratio": worst, "how": HOW}


# The layer, replayed -----------------------------------------------------------------------------

@dataclass
class Layer:
    """A layer call as data: its input as captured, its weight and bias as it computes with them, and
    `fn(x, weight, bias)`, the same call with those three replaced (other arguments as they were)."""

    x: Any
    tensors: list[torch.Tensor | None]
    fn: Callable[..., torch.Tensor]


def _layer(mod: nn.Module, args: tuple, kwargs: dict) -> Layer | str:
    """The call of `mod` captured with (args, kwargs) as a Layer, or why it cannot be replayed."""
    kind = module_kind(mod)
    if kind in ("conv", "convT", "linear"):
        # as the module computes with them: a weight-normed weight is computed from its parametrization
        tensors = [mod.weight.detach(), None if mod.bias is None else mod.bias.detach()]
        x = args[0] if args else kwargs.get("input")
        if kind == "linear":
            return Layer(x, tensors, F.linear)
        if kind == "conv":
            return Layer(x, tensors, mod._conv_forward)
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        nd = mod.weight.dim() - 2
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        return Layer(x, tensors, lambda x, w, b: fn(x, w, b, mod.stride, mod.padding, mod._output_padding(
            x, size, mod.stride, mod.padding, mod.kernel_size, nd, mod.dilation), mod.groups, mod.dilation))
    graph = getattr(mod, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or any(True for _ in mod.children()):
        return f"{type(mod).__name__} is not a Conv/ConvTranspose/Linear the replay knows"
    return _graph_layer(mod, graph, args, kwargs)


def _graph_layer(mod: nn.Module, graph: torch.fx.Graph, args: tuple, kwargs: dict) -> Layer | str:
    """A graph submodule (of an unflattened torch.export program) that is one conv/linear op: that op,
    with each argument as the call supplied it (a placeholder), or as the module holds it (get_attr)."""
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    layers = [n for n in calls if (functional_kind(n.target) or ("",))[0] in ("conv", "convT", "conv?", "linear")]
    if len(calls) != 1 or len(layers) != 1:
        ops = sorted({_op_name(n.target) for n in calls})
        return f"the layer's graph is not one conv/linear op ({', '.join(ops) or 'none'})"
    node = layers[0]
    places = [n for n in graph.nodes if n.op == "placeholder"]
    given = list(args) + [kwargs[n.target] for n in places[len(args):] if n.target in kwargs]

    def value(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            if a.op == "placeholder":
                return given[places.index(a)]
            if a.op == "get_attr":
                return _attr(mod, a.target)
            raise ValueError(f"{a.name} is computed inside the layer")
        return a

    try:
        vals = [value(a) for a in node.args]
        kw = {k: value(a) for k, a in node.kwargs.items()}
    except (ValueError, IndexError) as e:
        return f"the layer's op cannot be replayed: {e}"
    vals += [None] * (3 - len(vals))
    tensors = [t.detach() if isinstance(t, torch.Tensor) else None for t in vals[1:3]]
    rest = vals[3:]
    return Layer(vals[0], tensors, lambda x, w, b: node.target(x, w, b, *rest, **kw))


def _op_name(target: Any) -> str:
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.split(".")[0]


# The BatchNorm's affine map ----------------------------------------------------------------------

BnParams = tuple[Any, Any, torch.Tensor, torch.Tensor, float]


def _bn_params(root: nn.Module, name: str) -> BnParams | Callable[[torch.Tensor], torch.Tensor] | str:
    """(weight, bias, running_mean, running_var, eps) of the BN module at `name` in the original, or why not."""
    m = _module(root, name)
    if m is None:
        return f"{name!r} is not a module of the original"
    if hasattr(m, "running_var") and isinstance(getattr(m, "running_var"), torch.Tensor) and hasattr(m, "eps"):
        return (getattr(m, "weight", None), getattr(m, "bias", None), m.running_mean, m.running_var, float(m.eps))
    node = next((n for n in getattr(m, "graph", torch.fx.Graph()).nodes
                 if n.op == "call_function" and (functional_kind(n.target) or ("",))[0] == "bn"), None)
    if node is None:
        return _in_float64(m)  # a traced frozen BN: its own ops, witnessed like the rest
    sig = functional_kind(node.target)[1]
    vals = []
    for role in ("weight", "bias", "running_mean", "running_var"):
        a = arg(node.args, node.kwargs, sig, role)
        vals.append(_attr(m, a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None)
    if vals[2] is None or vals[3] is None:
        return f"{name!r}'s running statistics are not stored tensors of its graph"
    return (vals[0], vals[1], vals[2], vals[3], float(arg(node.args, node.kwargs, sig, "eps")))


def _in_float64(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | str:
    """The BN module's own forward on a float64 copy (a traced frozen BN keeps its eps in its code)."""
    graph = getattr(m, "graph", None)
    if not isinstance(graph, torch.fx.Graph) or any(True for _ in m.children()):
        return f"{type(m).__name__} holds no eps the replay can read"
    m64 = copy.deepcopy(m).cpu().double()
    return lambda x: m64(x)


def _attr(m: nn.Module, target: str) -> Any:
    obj: Any = m
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensors(root: nn.Module, name: str) -> list[torch.Tensor]:
    m = _module(root, name)
    return [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()] if m is not None else []


def _apply_bn(x: torch.Tensor, bn: BnParams | Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return _affine(x, *bn) if isinstance(bn, tuple) else bn(x)


def _affine(x: torch.Tensor, w: Any, b: Any, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The BN's inference map in float64, along axis 1: (x - mean) / sqrt(var + eps) * w + b."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    wide = lambda t: t.detach().cpu().double().reshape(shape)  # noqa: E731 - the replay runs on the CPU
    y = (x - wide(mean)) / torch.sqrt(wide(var) + eps)
    if isinstance(w, torch.Tensor):
        y = y * wide(w)
    if isinstance(b, torch.Tensor):
        y = y + wide(b)
    return y
