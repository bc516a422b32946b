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
import time
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.decisions import Decision, Reason, Skip
from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import FoldResult, Report
from . import blocks as blocks
from . import bnlike as bnlike
from . import rewrite as rewrite
from . import rules as rules
from .capture import Capture, capture_export, capture_fx
from .hooks import capture_runs
from .verify import verify_result

MAX_ROUNDS = 4



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


def fold_module(work: nn.Module, example_inputs: tuple | None, seed: int = 0,
                exclude: Mapping[str, str] | None = None) -> tuple[list[Decision], dict[str, Any]]:
    """Fold `work` in place (a private copy). Returns one Decision per BN and report info. A BN in
    `exclude` (Options.exclude: its fold failed its proof) is kept, with VERIFICATION_FAILED."""
    surgery = isinstance(work, torch.fx.GraphModule)
    decided: dict[str, Decision] = {}
    info: dict[str, Any] = {}
    near: dict[str, Skip] = {}  # BNs of blocks that could not be merged, and why
    if not surgery:  # multi-branch blocks first: their BNs go with the block, not one by one
        record = (lambda paths: rewrite.record_inputs(work, paths, example_inputs)) if example_inputs is not None \
            else None
        decided.update((d.bn, d) for d in blocks.merge_blocks(work, record, exclude, near))
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
        plans = _combine(caps, work, surgery)
        owners = {p.bn.attrs.get("owner") or "" for p in plans if p.skip is None and p.bn.module is None}
        samples = rewrite.record_inputs(work, owners - {""}, example_inputs) if (
            owners and not surgery and example_inputs is not None) else {}
        for plan in plans:
            if plan.name in decided and decided[plan.name].is_folded:
                continue
            if plan.skip is None and plan.layer is not None and (exclude or {}).get(plan.name) is not None:
                decided[plan.name] = Decision.skipped(plan.name, Reason.VERIFICATION_FAILED,
                                                      f"fold reverted: {exclude[plan.name]}", plan.layer.name)
                continue
            if plan.skip is None and plan.layer is not None and _layer_key(plan.layer) in edited:
                waiting += 1  # BN -> layer -> BN: the second fold waits for the next round's fresh capture
                continue
            if plan.skip is not None:
                s = plan.skip
                decided[plan.name] = Decision.skipped(plan.name, s.reason, s.detail, s.producer)
                continue
            try:
                extra = rewrite.apply(work, plan, surgery, samples)
            except Skip as e:
                decided[plan.name] = Decision.skipped(plan.name, e.reason, e.detail, plan.layer.name if plan.layer else None)
                continue
            decided[plan.name] = Decision.folded(plan.name, plan.layer.name, rewrite.pattern(plan), plan.direction, **extra)
            edited.add(_layer_key(plan.layer))
            new += 1
        if surgery:
            work.graph.eliminate_dead_code()
            work.delete_all_unused_submodules()
            work.recompile()
        if not new or (not waiting and all(d.is_folded for d in decided.values())):
            break
    _uncalled(work, decided)
    for name, why in near.items():  # a BN left without a layer (a block's identity BN) says why its block stayed
        d = decided.get(name)
        if d is not None and not d.is_folded and d.reason in (Reason.NO_PRODUCER, Reason.PRODUCER_FANOUT):
            decided[name] = Decision.skipped(name, why.reason, f"{why.detail}; alone: {d.detail}", why.producer)
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
            decided[path] = Decision.skipped(path, Reason.NOT_CALLED, "the BatchNorm module is never called by "
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
        name, cls = bnlike.entry_class(entry)
        if bnlike.torch_bn_class(cls, None):
            return key, (entry[0] if isinstance(entry, tuple) else key), name
    return None


def prepare(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
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


def fold_nn(model: nn.Module, opts: Options, ex: tuple | None) -> FoldResult:
    """Fold a copy of an nn.Module (or GraphModule); verify it against an unfolded copy."""
    t0 = time.perf_counter()
    work, info = prepare(model)
    decisions, cap_info = fold_module(work, ex, opts.seed, opts.exclude)
    info.update(cap_info)
    t1 = time.perf_counter()
    report = Report(framework="torch", decisions=decisions, info=info, timing_s={"fold": t1 - t0})
    reference, _ = prepare(model)
    report.verification = verify_result(reference, work, ex, opts, decisions)
    report.timing_s["verify"] = time.perf_counter() - t1
    return FoldResult(work, report)
