"""PyTorch pass: fold BatchNorm in nn.Modules, GraphModules and torch.export programs.

Math (kernel.py): W' = W * s[out], b' = s*b + t after a layer; W' = W * s[in], b' = b + W.t before one,
with s = gamma/sqrt(var+eps), t = beta - s*mean. The model's dataflow is captured (torch_capture: fx,
then torch.export, then module hooks), every BN call is checked (torch_rules) and folds are written into
a deep copy; the caller's model is never touched. Capturing and folding repeat until nothing new
folds, so Conv->BN->BN folds completely and running bnfold on its own output changes nothing.

Training mode: folding is for inference. A model whose root is in train() is folded and verified as
its eval() form, and report.info["eval_mode"] says so. A BN left in train() inside an eval() model is
taken as deliberate (it uses batch statistics at inference) and is skipped with TRAINING_MODE.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..decisions import Decision, Reason, Skip
from ..errors import BnfoldError
from ..results import FoldResult, Report, Verification
from . import torch_bnlike as bnlike
from . import torch_rules as rules
from .torch_capture import Capture, capture_export, capture_fx
from .torch_hooks import capture_runs

MAX_ROUNDS = 4


def _as_tuple(example_inputs: Any) -> tuple | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def capture(work: nn.Module, example_inputs: tuple | None, seed: int) -> tuple[list[Capture], str, list[str]]:
    """Captures of `work` by the first method that succeeds, its name, and why earlier ones failed."""
    failures = []
    try:
        return [capture_fx(work, example_inputs)], ("fx" if not isinstance(work, torch.fx.GraphModule) else "fx-graph"), failures
    except Exception as e:  # noqa: BLE001 - any trace failure means: try the next method
        failures.append(f"fx: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    if example_inputs is None:
        raise BnfoldError("torch.fx cannot trace this model and no example inputs were given for the "
                          f"torch.export and module-hooks fallbacks ({failures[0]}); pass example_inputs / --input")
    try:
        return [capture_export(work, example_inputs)], "export", failures
    except Exception as e:  # noqa: BLE001
        failures.append(f"export: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    return capture_runs(work, example_inputs, seed), "module-hooks", failures


def _combine(caps: list[Capture], work: nn.Module, surgery: bool) -> list[rules.Plan]:
    """One plan per BN name. With several runs (module hooks), a fold is kept only if every run that
    calls the BN or its layer planned exactly that fold."""
    per_run = [rules.decide(c, work, surgery) for c in caps]
    if len(per_run) == 1:
        return _dedupe(per_run[0])
    first: dict[str, rules.Plan] = {}
    for plans in per_run:
        for p in plans:
            first.setdefault(p.name, p)
    out = []
    for name, p in first.items():
        if p.skip is None:
            for cap, plans in zip(caps, per_run):
                seen = {q.name for q in plans} | {op.name for op in cap.ops}
                mine = [q for q in plans if q.name == name]
                involved = name in seen or (p.layer is not None and p.layer.name in seen)
                if involved and not any(q.key == p.key for q in mine):
                    other = next((q for q in mine if q.skip is not None), None)
                    p = other or rules.Plan(name, p.bn, skip=Skip(
                        Reason.PRODUCER_FANOUT, f"on another input {p.layer.name if p.layer else 'the layer'} "
                        "runs without this BatchNorm (data-dependent control flow)", producer=p.layer.name if p.layer else None))
                    break
        out.append(p)
    return out


def _dedupe(plans: list[rules.Plan]) -> list[rules.Plan]:
    seen: dict[str, rules.Plan] = {}
    for p in plans:
        seen.setdefault(p.name, p)
    return list(seen.values())


def fold_module(work: nn.Module, example_inputs: tuple | None, seed: int = 0) -> tuple[list[Decision], dict[str, Any]]:
    """Fold `work` in place (a private copy). Returns one Decision per BN and report info."""
    surgery = isinstance(work, torch.fx.GraphModule)
    decided: dict[str, Decision] = {}
    info: dict[str, Any] = {}
    for _ in range(MAX_ROUNDS):
        caps, method, failures = capture(work, example_inputs, seed)
        info.setdefault("capture", method)
        if failures:
            info.setdefault("capture_fallbacks", failures)
        if method == "module-hooks":
            info.setdefault("capture_note", f"observed {len(caps)} runs (the example inputs and variants); a fold is "
                                            "kept only where every run agrees")
        new = waiting = 0
        edited: set[str] = set()  # layers changed this round: their captured parameters are stale now
        for plan in _combine(caps, work, surgery):
            if plan.name in decided and decided[plan.name].is_folded:
                continue
            if plan.skip is None and plan.layer is not None and _layer_key(plan.layer) in edited:
                waiting += 1  # BN -> layer -> BN: the second fold waits for the next round's fresh capture
                continue
            if plan.skip is not None:
                s = plan.skip
                decided[plan.name] = Decision.skipped(plan.name, s.reason, s.detail, s.producer)
                continue
            try:
                extra = rules.apply(work, plan, surgery)
            except Skip as e:
                decided[plan.name] = Decision.skipped(plan.name, e.reason, e.detail, plan.layer.name if plan.layer else None)
                continue
            decided[plan.name] = Decision.folded(plan.name, plan.layer.name, rules.pattern(plan), plan.direction, **extra)
            edited.add(_layer_key(plan.layer))
            new += 1
        if surgery:
            work.graph.eliminate_dead_code()
            work.delete_all_unused_submodules()
            work.recompile()
        if not new or (not waiting and all(d.is_folded for d in decided.values())):
            break
    _uncalled(work, decided)
    return list(decided.values()), info


def _layer_key(layer: rules.Op) -> str:
    return layer.module if layer.module is not None else (layer.params.get("weight") or layer.name)


def _uncalled(work: nn.Module, decided: dict[str, Decision]) -> None:
    """A BN module that no capture saw as a BatchNorm still gets a decision: never called, or (a
    BatchNorm-named module of another kind) the reason bnfold could not understand it."""
    handled = set(decided)
    for path, m in work.named_modules():
        if path in handled or not bnlike.needs_decision(m):
            continue
        bad = None if isinstance(m, _BatchNorm) else bnlike.problem(m)
        if bad is not None:
            decided[path] = Decision.skipped(path, bad.reason, bad.detail)
        else:
            decided[path] = Decision.skipped(path, Reason.NO_PRODUCER, "the BatchNorm module is never called by "
                                                                      "forward() on the captured path")
    if isinstance(work, torch.fx.GraphModule):
        # a graph keeps the traced module paths and classes only in node metadata
        for n in work.graph.nodes:
            hit = bnlike.bn_stack_entry(n, None) or _torch_bn_entry(n)
            if hit is not None and hit[1] not in decided:
                decided[hit[1]] = Decision.skipped(hit[1], Reason.UNSUPPORTED_BN_MODE, f"{hit[1]} ({hit[2]}): its traced "
                                                   "ops were not recognised as one per-channel affine map")


def _torch_bn_entry(node: Any) -> tuple[str, str, str] | None:
    """(key, path, class) of a torch.nn BatchNorm whose forward produced `node` (node metadata)."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, entry in reversed(list(stack.items())):
        name, cls = bnlike._entry_class(entry)
        if bnlike._torch_bn_class(cls, None):
            return key, (entry[0] if isinstance(entry, tuple) else key), name
    return None


def _prepare(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    from torch.nn.modules.lazy import LazyModuleMixin
    for path, m in model.named_modules():
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
            raise BnfoldError(f"{path or type(m).__name__} is a lazy module that has not been initialised: run one "
                              "forward pass (or pass example_inputs to the model) before folding")
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - deepcopy fails in many ways on exotic modules
        names = {n.rpartition(".")[2] for n, _ in model.named_parameters()}
        hint = next((f"; torch.nn.utils.{fn} makes the weight a computed tensor: use remove_{fn}() or "
                     f"torch.nn.utils.parametrizations.{fn}" for fn, p in (("weight_norm", "weight_g"),
                                                                           ("spectral_norm", "weight_orig"))
                     if p in names), "")
        raise BnfoldError(f"the model cannot be copied for folding ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:160]}){hint}") from None
    info: dict[str, Any] = {}
    if work.training:
        work.eval()
        info["eval_mode"] = ("the model was in train() mode; it was folded and verified in eval() mode, since "
                             "folding is for inference")
    return work, info


def fold(model: Any, *, example_inputs: Any = None, verify: bool = True, providers: Sequence[str] | None = None,
         atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
         dry_run: bool = False) -> FoldResult:
    """Fold an nn.Module, GraphModule, ExportedProgram or TorchScript module; the result has the same type."""
    from ..verify import torch_runner
    torch_runner.requested_devices(providers)  # reject bad names before any work
    ex = _as_tuple(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        from .torch_export import fold_exported
        return fold_exported(model, example_inputs=ex, verify=verify, providers=providers, atol=atol, rtol=rtol,
                             seed=seed)
    if isinstance(model, torch.jit.ScriptModule):
        from .torch_script import fold_script
        return fold_script(model, example_inputs=ex, verify=verify, providers=providers, atol=atol, rtol=rtol, seed=seed)
    if not isinstance(model, nn.Module):
        raise BnfoldError(f"cannot fold a {type(model).__name__}: expected an nn.Module, ExportedProgram or TorchScript module")
    t0 = time.perf_counter()
    work, info = _prepare(model)
    decisions, cap_info = fold_module(work, ex, seed)
    info.update(cap_info)
    t1 = time.perf_counter()
    report = Report(framework="torch", decisions=decisions, info=info, timing_s={"fold": t1 - t0})
    reference, _ = _prepare(model)
    report.verification = verify_result(reference, work, ex, verify, providers, atol, rtol, seed)
    report.timing_s["verify"] = time.perf_counter() - t1
    return FoldResult(work, report)


def verify_result(original: Any, candidate: Any, ex: tuple | None, verify: bool, providers: Sequence[str] | None,
                  atol: Any, rtol: float | None, seed: int) -> Verification:
    """Verification of a folded torch model, or the reason it was not run."""
    from ..verify import torch_runner
    from .torch_hooks import variants
    if not verify:
        return Verification(skipped_reason="verification off")
    if ex is None:
        return Verification(skipped_reason="no example inputs: pass example_inputs (or --input) to verify")
    return torch_runner.verify_torch(original, candidate, variants(ex, seed), providers=providers, atol=atol,
                                     rtol=rtol, seed=seed)


def check(original: Any, candidate: Any, *, example_inputs: Any = None, providers: Sequence[str] | None = None,
          atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0) -> Verification:
    """Is `candidate` (a torch model, an ONNX file path or ModelProto) the same function as `original`?"""
    ex = _as_tuple(example_inputs)
    if ex is None:
        ex = example_inputs_for(original, seed=seed)
    if isinstance(candidate, (str, os.PathLike)) or type(candidate).__name__ == "ModelProto":
        from .torch_export import verify_onnx_against_torch
        return verify_onnx_against_torch(original, candidate, ex, providers=providers, atol=atol, rtol=rtol, seed=seed)
    ref, _ = _prepare(original) if isinstance(original, nn.Module) and not isinstance(original, torch.jit.ScriptModule) \
        else (original, None)
    return verify_result(ref, candidate, ex, True, providers, atol, rtol, seed)


def export_onnx(model: Any, out_path: str, *, example_inputs: Any = None, verify: bool = True,
                providers: Sequence[str] | None = None, atol: float | Mapping[str, float] | None = None,
                rtol: float | None = None, seed: int = 0) -> FoldResult:
    """Fold, export the folded model to ONNX at `out_path`, and verify the ONNX against the original."""
    from .torch_export import export_onnx as _export
    return _export(model, out_path, example_inputs=_as_tuple(example_inputs), verify=verify, providers=providers,
                   atol=atol, rtol=rtol, seed=seed)


from .torch_files import example_inputs_for, load, save  # noqa: E402  (re-exported public API)

__all__ = ["fold", "check", "export_onnx", "load", "save", "example_inputs_for", "fold_module"]
