"""Are two ONNX models the same function? Reference = the unfolded original, optimisations off.

For each provider: run original, candidate and a noise model (the original with every weight nudged
one ulp) on the same feeds; judge the candidate against the noise (compare.judge). On CUDA with TF32
the original is also run with TF32 toggled, since TF32 rounding dominates the noise there. When an
output fails, the culprit search compares intermediate tensors present in both models, in topological
order, and names the earliest one that diverges.
"""
from __future__ import annotations

import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ..core.errors import BnfoldError
from ..core.options import Options
from .ondisk import for_session, loaded, over_two_gb
from .feeds import make_feeds, model_inputs
from .noise import nudge_by_name, perturbed, perturbed_lazily
from .protos import with_outputs
from ..core.results import ProviderResult, Verification
from ..verify import compare
from . import runtime as runners

def _same_signature(original: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    a = [i.name for i in model_inputs(original)]
    b = [i.name for i in model_inputs(candidate)]
    if sorted(a) != sorted(b):
        raise BnfoldError(f"the models have different inputs: {a} vs {b}")
    oa = [o.name for o in original.graph.output]
    ob = {o.name for o in candidate.graph.output}
    missing = [o for o in oa if o not in ob]
    if missing:
        raise BnfoldError(f"the candidate lacks outputs {missing} of the original")


def _requested(providers: Sequence[str] | None) -> tuple[list[str], bool]:
    if not providers:
        # CPU and CUDA are always reported (CUDA as "not run" where it cannot); TensorRT only when present
        trt = runners.DEFAULT_ORDER[2]
        return list(runners.DEFAULT_ORDER[:2]) + ([trt] if runners.availability(trt)[0] else []), False
    return [runners.provider_name(p) for p in providers], True


def _options(provider: str, tf32: bool | None = None) -> dict[str, Any]:
    if provider == "CUDAExecutionProvider" and tf32 is not None:
        return {"use_tf32": "1" if tf32 else "0"}
    return {}


def _run_all(model: onnx.ModelProto | str, provider: str, feeds: list[dict[str, np.ndarray]], label: str,
             options: Mapping[str, Any] | None = None, optimize: bool = False) -> list[dict[str, np.ndarray]]:
    r = runners.OrtRunner(model, provider, options, label, optimize=optimize)
    return [r.run(f, label) for f in feeds]


def _concat(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(runs) == 1:
        return runs[0]
    return {k: np.concatenate([np.asarray(r[k]).reshape(-1) for r in runs]) for k in runs[0]}


def verify_onnx(original: onnx.ModelProto, candidate: onnx.ModelProto, opts: Options) -> Verification:
    """Compare `candidate` with `original` on every requested (or available) provider.

    Besides the graph outputs, every tensor both models compute under the same name is compared:
    a wrong fold whose effect is masked downstream on these inputs (a ReLU that happens to cut the
    damaged channel) still fails, and the earliest diverging tensor is named. With
    `outputs_only=True` only the graph outputs decide (for candidates that reuse a tensor name for a
    different value); a failure is still traced to the earliest diverging tensor.
    """
    providers, atol, rtol, seed, outputs_only = opts.providers, opts.atol, opts.rtol, opts.seed, opts.outputs_only
    say = opts.say
    _same_signature(original, candidate)
    feeds = make_feeds(original, opts.input_specs, opts.inputs_npz, seed, opts.batches)
    names, explicit = _requested(providers)
    if over_two_gb(original) or over_two_gb(candidate):
        # too big for one protobuf: onnxruntime reads the big weights from external data files,
        # memory-mapped. An original loaded from disk is used where it lies; the candidate's changed
        # weights and the noise model's nudged ones are written to a temporary folder, one at a time.
        say("model over 2 GB: onnxruntime reads the weights from external data files")
        with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
            noise_model, later = perturbed_lazily(original, seed)
            plain = (for_session(original, folder, "original"), for_session(candidate, folder, "candidate"),
                     for_session(noise_model, folder, "noise", nudge_by_name(seed), later))
            del noise_model
            inner = common_tensors(original, candidate)
            models = tuple(m.with_outputs(inner) for m in plain) if inner else plain
            return _verify_models(original, candidate, models, plain, inner, feeds, names, explicit, atol, rtol,
                                  outputs_only, "model over 2 GB: verified from external data files", say)
    else:
        original, candidate = loaded(original), loaded(candidate)  # onnxruntime runs them from memory
        noise_model = perturbed(original, seed)
        inner = common_tensors(original, candidate)
        models = plain = (original, candidate, noise_model)
        if inner:
            models = tuple(with_outputs(m, inner) for m in models)
    return _verify_models(original, candidate, models, plain, inner, feeds, names, explicit, atol, rtol,
                          outputs_only, "", say)


def _verify_models(original: onnx.ModelProto, candidate: onnx.ModelProto, models: tuple, plain: tuple,
                   inner: list[str],
                   feeds: list[dict[str, np.ndarray]], names: list[str], explicit: bool, atol: Any,
                   rtol: float | None, outputs_only: bool, big_note: str, say: Callable[[str], None]) -> Verification:
    ver = Verification(tolerance=_tolerance_doc(atol, rtol))
    out_names = [o.name for o in original.graph.output]
    for name in names:
        ok, why = runners.availability(name)
        if not ok:
            if explicit:
                raise BnfoldError(f"provider {name} was requested but cannot run: {why}")
            ver.providers[name] = ProviderResult(name, ran=False, why=why)
            continue
        say(f"verifying on {name}")
        notes: dict[str, Any] = {"noise_sources": ["weights nudged one ulp"]}
        if big_note:
            notes["note"] = big_note
        try:
            ref, cand, noise1 = (_concat(_run_all(m, name, feeds, lbl))
                                 for m, lbl in zip(models, ("original", "candidate", "noise model")))
        except BnfoldError:
            if not inner:
                raise
            # some intermediate cannot be an output (e.g. a sequence); compare the outputs only
            inner, models = [], plain
            ref, cand, noise1 = (_concat(_run_all(m, name, feeds, lbl))
                                 for m, lbl in zip(models, ("original", "candidate", "noise model")))
        noise = [noise1]
        if name == "CUDAExecutionProvider":
            notes["tf32"] = True  # onnxruntime's CUDA EP default; the noise run below measures its effect
            noise.append(_concat(_run_all(models[0], name, feeds, "original (TF32 off)", _options(name, tf32=False))))
            notes["noise_sources"].append("TF32 on vs off")
        pick = lambda d, keys: {k: d[k] for k in keys if k in d}  # noqa: E731
        passed, outs = compare.judge(pick(ref, out_names), pick(cand, out_names), [pick(n, out_names) for n in noise],
                                     atol=atol, rtol=rtol)
        compare.require_evidence(outs)
        if not passed and atol is None and rtol is None:
            # Before calling it a failure: the original under onnxruntime's basic optimisations (its own
            # Conv+BN fusion) is a correct fold made another way, and its distance from the reference is
            # fold-sized noise that weight nudges miss (cancellation inside the BN arithmetic, amplified
            # downstream, e.g. by a Div). Only run when needed: it costs another session.
            fused = _concat(_run_all(plain[0], name, feeds, "original (onnxruntime-optimised)", optimize=True))
            noise.append(fused)
            notes["noise_sources"].append("onnxruntime's own BN fusion of the original")
            passed, outs = compare.judge(pick(ref, out_names), pick(cand, out_names),
                                         [pick(n, out_names) for n in noise], atol=atol, rtol=rtol)
        if inner:
            notes["intermediates_compared"] = len(inner)
            div = _first_divergence(inner, ref, cand, noise, atol, rtol)
            if div is not None:
                div.update(_who(original, candidate, div["tensor"]), provider=name)
                if outputs_only and passed:
                    notes["ignored_divergence"] = div  # reported, not decisive, as asked
                    div = None
            if div is not None:
                if passed:
                    notes["masked_divergence"] = (
                        "the outputs agree on these inputs, but an intermediate tensor diverges: the error is "
                        "masked downstream (e.g. a ReLU cut the damaged channel) and shows on other inputs")
                passed = False
                if ver.first_divergence is None:
                    ver.first_divergence = div
        ver.providers[name] = ProviderResult(name, ran=True, passed=passed, outputs=outs, notes=notes)
        if not passed and ver.first_divergence is None:
            worst = max(outs, key=lambda k: outs[k].get("max_abs", 0) / (outs[k].get("atol") or 1e-300))
            ver.first_divergence = {"tensor": worst, **_who(original, candidate, worst), "provider": name,
                                    "max_abs": outs[worst].get("max_abs"), "atol": outs[worst].get("atol")}
    return ver


def common_tensors(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Tensors computed by nodes of both models under the same name, in the original's node order
    (graph outputs excluded: they are compared anyway)."""
    cand = {o for n in candidate.graph.node for o in n.output if o}
    outs = {o.name for o in original.graph.output}
    seen: set[str] = set()
    order = []
    for n in original.graph.node:
        for o in n.output:
            if o and o in cand and o not in outs and o not in seen:
                seen.add(o)
                order.append(o)
    return order


def _first_divergence(order: Sequence[str], ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray],
                      noise: list[Mapping[str, np.ndarray]], atol: Any, rtol: float | None) -> dict[str, Any] | None:
    user_atol = atol if not isinstance(atol, Mapping) else None
    auto = user_atol is None and rtol is None
    for name in order:
        if name not in ref or name not in cand:
            continue
        if auto and compare.quick_pass(np.asarray(ref[name]), np.asarray(cand[name]),
                                       [np.asarray(n[name]) for n in noise if name in n]):
            continue
        ok, st = compare.judge({name: ref[name]}, {name: cand[name]}, [{name: n[name]} for n in noise if name in n],
                               atol=user_atol, rtol=rtol)
        if not ok:
            e = st[name]
            return {"tensor": name, "max_abs": e.get("max_abs"), "max_rel": e.get("max_rel"), "atol": e.get("atol"),
                    "noise_max_abs": e.get("noise_max_abs")}
    return None


def _who(original: onnx.ModelProto, candidate: onnx.ModelProto, tensor: str) -> dict[str, Any]:
    cn = next((n for n in candidate.graph.node if tensor in n.output), None)
    on = next((n for n in original.graph.node if tensor in n.output), None)
    return {"node": _label(cn), "op": cn.op_type if cn is not None else None, "original_node": _label(on)}


def _tolerance_doc(atol: Any, rtol: float | None) -> dict[str, Any]:
    if atol is None and rtol is None:
        return {"atol": None, "rtol": None, "how": "auto",
                "rule": f"max|cand-ref| <= max({compare.NOISE_MULTIPLE:g} x noise, {compare.FLOOR_ULPS:g} ulp x max|ref|)"}
    return {"atol": dict(atol) if isinstance(atol, Mapping) else atol, "rtol": rtol, "how": "user"}


def _label(n: onnx.NodeProto | None) -> str | None:
    if n is None:
        return None
    return n.name or f"{n.op_type}:{n.output[0]}"
