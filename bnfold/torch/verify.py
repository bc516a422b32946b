"""Verification in PyTorch: the original against a candidate on CPU and, when present, CUDA.

Same rules as the ONNX verifier (compare.judge): the reference is the unfolded original; its noise is
measured by running the original with every floating parameter and buffer nudged one ulp
(compare.perturb); on CUDA a second noise run toggles TF32, which PyTorch enables for convolutions by
default. Each model runs on the example inputs and on two variants of them (negated, fresh random), so
a branch the first input does not take is still exercised.
"""
from __future__ import annotations

import copy
import io
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import ProviderResult, Verification
from ..verify import compare

DEVICES = ("cpu", "cuda")


def requested_devices(providers: Sequence[str] | None) -> tuple[list[str], bool]:
    """(devices, explicit) from --providers; 'CPUExecutionProvider'-style names are accepted too."""
    if not providers:
        return list(DEVICES), False
    out = []
    for p in providers:
        key = p.strip().lower().replace("executionprovider", "")
        key = {"gpu": "cuda", "torch-cpu": "cpu", "torch-cuda": "cuda"}.get(key, key)
        if key not in DEVICES:
            raise BnfoldError(f"--providers: {p!r} is not a PyTorch device; use cpu or cuda")
        if key not in out:
            out.append(key)
    return out, True


def cuda_why_not() -> str:
    """Empty when a CUDA device is usable from PyTorch, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch (torch.cuda.is_available() is False)"
    return ""


def as_callable(model: Any) -> Any:
    """Something callable with the example inputs (an ExportedProgram runs through .module())."""
    if isinstance(model, torch.export.ExportedProgram):
        return positional(model, model.module())
    return model


def split_inputs(ep: Any, flat: Sequence[Any]) -> tuple[tuple, dict[str, Any]]:
    """A program's flat user inputs (bnfold's example inputs) as the (args, kwargs) it was exported with."""
    from torch.utils._pytree import tree_unflatten
    spec = ep.call_spec.in_spec
    if spec is None:
        return tuple(flat), {}
    args, kwargs = tree_unflatten(list(flat), spec)
    return tuple(args), dict(kwargs)


class _Positional(torch.nn.Module):
    """Calls a program module that takes keyword inputs with bnfold's flat, positional inputs."""

    def __init__(self, ep: Any, module: Any) -> None:
        super().__init__()
        self.ep, self.module = ep, module

    def forward(self, *flat: Any) -> Any:
        args, kwargs = split_inputs(self.ep, flat)
        return self.module(*args, **kwargs)


def positional(ep: Any, module: Any) -> Any:
    """`module` (ep.module()) as is, or wrapped when the program was exported with keyword inputs."""
    spec = ep.call_spec.in_spec
    if spec is None or spec.num_children != 2 or spec.child(1).num_leaves == 0:
        return module
    return _Positional(ep, module)


def copy_program(ep: Any) -> Any:
    """A deep copy of an ExportedProgram (torch's own pytree code warns about itself while copying)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(ep)


def on_device(model: Any, device: str) -> Any:
    """A private copy of `model` on `device`; the caller's model is never moved or mutated."""
    if isinstance(model, torch.export.ExportedProgram):
        # .module() shares the program's tensors, and the noise run nudges them in place: copy first
        private = copy_program(model)
        if all(t.device.type == device for t in private.state_dict.values()):
            return positional(private, private.module())
        from torch.export.passes import move_to_device_pass
        moved = move_to_device_pass(private, device)  # also rewrites devices baked into the graph
        return positional(moved, moved.module())
    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(model, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location=device)
    return copy.deepcopy(model).to(device)


def perturbed(model: Any, seed: int) -> None:
    """Nudge every floating parameter and buffer of `model` (a private copy) by about one ulp."""
    from .rules import from_numpy, to_numpy
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        for _, t in tensors:
            if t.is_floating_point() and t.numel():
                # reshape: a 0-dim tensor comes back from numpy as shape [1], which copy_ refuses
                t.copy_(from_numpy(compare.perturb(to_numpy(t), rng), t).reshape(t.shape))


def outputs(result: Any) -> dict[str, np.ndarray]:
    """Named numpy copies of every tensor in a (nested) model output."""
    from .rules import to_numpy
    leaves = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
    if len(leaves) == 1:
        return {"output": to_numpy(leaves[0])}
    return {f"output.{i}": to_numpy(t) for i, t in enumerate(leaves)}


def run(model: Any, inputs: Sequence[tuple], device: str) -> dict[str, np.ndarray]:
    """Run `model` (already on `device`) on each input tuple; outputs concatenated per name."""
    runs = []
    with torch.no_grad():
        for args in inputs:
            moved = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
            runs.append(outputs(model(*moved)))
    if len(runs) == 1:
        return runs[0]
    return {k: np.concatenate([np.asarray(r[k]).reshape(-1) for r in runs]) for k in runs[0]}


class _TF32:
    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = self.on
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def tolerance_doc(atol: Any, rtol: float | None) -> dict[str, Any]:
    if atol is None and rtol is None:
        return {"atol": None, "rtol": None, "how": "auto",
                "rule": f"max|cand-ref| <= max({compare.NOISE_MULTIPLE:g} x noise, {compare.FLOOR_ULPS:g} ulp x max|ref|)"}
    return {"atol": dict(atol) if isinstance(atol, Mapping) else atol, "rtol": rtol, "how": "user"}


def reference_runs(original: Any, inputs: Sequence[tuple], device: str,
                   seed: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], dict[str, Any]]:
    """(reference outputs, noise runs, notes) of the original on `device`."""
    ref_model = on_device(original, device)
    ref = run(as_callable(ref_model), inputs, device)
    noisy = on_device(original, device)
    noisy = as_callable(noisy)
    perturbed(noisy, seed)
    noise = [run(noisy, inputs, device)]
    notes: dict[str, Any] = {"noise_sources": ["parameters and buffers nudged one ulp"]}
    if device == "cuda":
        notes["tf32"] = bool(torch.backends.cudnn.allow_tf32)
        with _TF32(not torch.backends.cudnn.allow_tf32):
            noise.append(run(as_callable(ref_model), inputs, device))
        notes["noise_sources"].append("TF32 on vs off")
    return ref, noise, notes


def verify_torch(original: Any, candidate: Any, inputs: Sequence[tuple], *, providers: Sequence[str] | None = None,
                 atol: float | Mapping[str, float] | None = None, rtol: float | None = None,
                 seed: int = 0) -> Verification:
    """Compare torch model `candidate` with `original` on every requested (or available) device."""
    devices, explicit = requested_devices(providers)
    ver = Verification(tolerance=tolerance_doc(atol, rtol))
    for dev in devices:
        key = f"torch-{dev}"
        why = cuda_why_not() if dev == "cuda" else ""
        if why:
            if explicit:
                raise BnfoldError(f"device cuda was requested but cannot run: {why}")
            ver.providers[key] = ProviderResult(key, ran=False, why=why)
            continue
        ref, noise, notes = reference_runs(original, inputs, dev, seed)
        cand = run(as_callable(on_device(candidate, dev)), inputs, dev)
        passed, outs = compare.judge(ref, cand, noise, atol=atol, rtol=rtol)
        ver.providers[key] = ProviderResult(key, ran=True, passed=passed, outputs=outs, notes=notes)
        if not passed and ver.first_divergence is None:
            ver.first_divergence = first_divergence(original, candidate, tuple(inputs[0]), dev, seed, atol, rtol)
    return ver


def _module_outputs(model: Any, args: tuple, device: str) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """Every submodule's first output on `args`, by path, in call order."""
    order: list[str] = []
    seen: dict[str, dict[str, np.ndarray]] = {}
    handles = []

    def hook(path: str) -> Any:
        def record(mod: Any, inp: Any, out: Any) -> None:
            if path not in seen:
                try:
                    seen[path] = outputs(out)
                    order.append(path)
                except (TypeError, RuntimeError):
                    pass
        return record

    for path, m in model.named_modules():
        if path:
            handles.append(m.register_forward_hook(hook(path)))
    try:
        run(model, [args], device)
    finally:
        for h in handles:
            h.remove()
    return order, seen


def first_divergence(original: Any, candidate: Any, args: tuple, device: str, seed: int, atol: Any = None,
                     rtol: float | None = None) -> dict[str, Any] | None:
    """The earliest module (in the original's call order) whose output differs beyond tolerance.

    Only modules of the same class at the same path in both models are compared, and not the layers a
    BN may have been folded into (their outputs legitimately differ) nor the BN slots themselves.
    """
    import torch.nn as nn
    from .capture import module_kind
    if not (isinstance(original, nn.Module) and isinstance(candidate, nn.Module)) or isinstance(
            original, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        return None
    ref_model, cand_model, noisy = on_device(original, device), on_device(candidate, device), on_device(original, device)
    perturbed(noisy, seed)
    order, ref = _module_outputs(ref_model, args, device)
    _, cand = _module_outputs(cand_model, args, device)
    _, noise = _module_outputs(noisy, args, device)
    cand_mods = dict(cand_model.named_modules())
    for path in order:
        om, cm = ref_model.get_submodule(path), cand_mods.get(path)
        if cm is None or type(om) is not type(cm) or module_kind(om) is not None or path not in cand:
            continue
        ok, stats = compare.judge(ref[path], cand[path], [noise.get(path, {})], atol=atol, rtol=rtol)
        if not ok:
            worst = max(stats.values(), key=lambda s: s.get("max_abs", 0.0))
            return {"layer": path, "module": type(om).__name__, "device": device,
                    "max_abs": worst.get("max_abs"), "atol": worst.get("atol")}
    return None


def verify_result(original: Any, candidate: Any, ex: tuple | None, opts: Options) -> Verification:
    """Verification of a folded torch model on the example inputs and variants, or why it was not run."""
    from .hooks import variants
    if not opts.verify:
        return Verification(skipped_reason="verification off")
    if ex is None:
        return Verification(skipped_reason="no example inputs: pass example_inputs (or --input) to verify")
    return verify_torch(original, candidate, variants(ex, opts.seed), providers=opts.providers, atol=opts.atol,
                        rtol=opts.rtol, seed=opts.seed)
