"""Verification in PyTorch: the original against a candidate on CPU and, when present, CUDA.

Same rules as the ONNX verifier (compare.judge): the reference is the unfolded original; its noise is
measured by running the original with every floating parameter and buffer nudged one ulp
(compare.perturb); on CUDA a second noise run toggles TF32, which PyTorch enables for convolutions by
default. Each model runs on the example inputs and on two variants of them (torch/feeds.py), so a
branch the first input does not take is still exercised.

Besides the outputs, every submodule output both models compute at the same module path is compared
(torch/taps.py, torch/divergence.py): the first that diverges fails the verification even when a ReLU
hides it from the outputs. An ExportedProgram is compared through torch.export.unflatten (its module
paths); TorchScript submodules cannot carry hooks, so a TorchScript comparison is outputs only, and the
report says so. When folds are given, each is proven on its own (torch/proofs.py), and a failure is
traced back to the folds it points at: the blame self-healing acts on.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from ..core.decisions import Decision
from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import ProviderResult, Verification
from ..verify import compare
from . import feeds as feeds
from . import proofs as proofs
from .divergence import Intermediates
from .taps import Taps

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
                # a clone: numpy over the tensor's own memory would make it non-resizable (an observer
                # resizes its min/max); from_numpy makes a 0-dim array (a ReZero gate, an observer's min_val)
                # a (1,) tensor
                t.copy_(from_numpy(compare.perturb(to_numpy(t.detach().clone()), rng), t).reshape(t.shape))


def outputs(result: Any) -> dict[str, np.ndarray]:
    """Named numpy copies of every tensor in a (nested) model output."""
    from .taps import copy_value
    leaves = [t for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
    if len(leaves) == 1:
        return {"output": copy_value(leaves[0])}
    return {f"output.{i}": copy_value(t) for i, t in enumerate(leaves)}


def moved(args: tuple, device: str) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def run(model: Any, inputs: Sequence[tuple], device: str) -> dict[str, np.ndarray]:
    """Run `model` (already on `device`) on each input tuple; outputs concatenated per name."""
    runs = []
    with torch.no_grad():
        for args in inputs:
            runs.append(outputs(model(*moved(args, device))))
    return concat(runs)


def concat(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
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
    """(reference outputs, noise runs, notes) of the original on `device` (outputs only)."""
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


@dataclass
class Instance:
    """A private copy of a model on one device: what to call, and whose submodules to tap (None: none)."""

    call: Any
    root: Any
    why_untapped: str = ""


def instance(model: Any, device: str) -> Instance:
    """A private copy of `model` on `device`. An ExportedProgram is unflattened, so that its submodules
    (torch.export keeps their paths) can be tapped like an nn.Module's."""
    if isinstance(model, torch.export.ExportedProgram):
        private = copy_program(model)
        if not all(t.device.type == device for t in private.state_dict.values()):
            from torch.export.passes import move_to_device_pass
            private = move_to_device_pass(private, device)
        try:
            from .quiet import quiet
            with quiet():
                flat = torch.export.unflatten(private)
            return Instance(positional(private, flat), flat)
        except Exception as e:  # noqa: BLE001 - then the program is compared by its outputs
            why = f"torch.export.unflatten failed ({type(e).__name__}); outputs compared only"
            return Instance(positional(private, private.module()), None, why)
    if isinstance(model, torch.jit.ScriptModule):
        return Instance(on_device(model, device), None, "TorchScript submodules cannot carry forward hooks, so "
                                                        "only the outputs are compared and no fold is proven locally")
    m = on_device(model, device)
    return Instance(m, m)


def verify_torch(original: Any, candidate: Any, inputs: Sequence[tuple], *, providers: Sequence[str] | None = None,
                 atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
                 decisions: list[Decision] | None = None, outputs_only: bool = False) -> Verification:
    """Compare torch model `candidate` with `original` on every requested (or available) device:
    outputs and same-path module outputs, and with `decisions`, each fold's local proof."""
    devices, explicit = requested_devices(providers)
    ver = Verification(tolerance=tolerance_doc(atol, rtol))
    job = _Job(original, candidate, inputs, atol, rtol, seed, decisions, outputs_only)
    for dev in devices:
        key = f"torch-{dev}"
        why = cuda_why_not() if dev == "cuda" else ""
        if why:
            if explicit:
                raise BnfoldError(f"device cuda was requested but cannot run: {why}")
            ver.providers[key] = ProviderResult(key, ran=False, why=why)
            continue
        ver.providers[key] = job.device(dev, ver)
    if job.prover is not None:
        ver.proofs, ver.blame = job.prover.finish(job.untapped)
        for b in job.div_blame:
            if all(b["bn"] != other["bn"] for other in ver.blame):
                ver.blame.append(b)
    return ver


class _Job:
    """One verification: per device, the three models on every batch, tapped; the proofs on the first."""

    def __init__(self, original: Any, candidate: Any, inputs: Sequence[tuple], atol: Any, rtol: float | None,
                 seed: int, decisions: list[Decision] | None, outputs_only: bool) -> None:
        self.original, self.candidate, self.inputs = original, candidate, list(inputs)
        self.atol, self.rtol, self.seed = atol, rtol, seed
        self.decisions, self.outputs_only = decisions, outputs_only
        self.prover = proofs.Prover(decisions) if decisions is not None else None
        self.div_blame: list[dict[str, Any]] = []
        self.untapped = ""

    def device(self, dev: str, ver: Verification) -> ProviderResult:
        ref, cand = instance(self.original, dev), instance(self.candidate, dev)
        noisy = instance(self.original, dev)
        perturbed(noisy.call, self.seed)
        notes: dict[str, Any] = {"noise_sources": ["parameters and buffers nudged one ulp"]}
        if dev == "cuda":
            notes["tf32"] = bool(torch.backends.cudnn.allow_tf32)
            notes["noise_sources"].append("TF32 on vs off")
        untapped = ref.why_untapped or cand.why_untapped or (
            "" if ref.root is not None and cand.root is not None else "the models' submodules cannot be tapped")
        inter = Intermediates(self.decisions, self.atol, self.rtol)
        self.untapped = self.untapped or untapped
        bns = {d.bn for d in self.decisions or () if d.is_folded}
        state = {n: t.detach().clone() for n, t in ref.call.named_buffers() if t.is_floating_point()}
        # original, candidate, noisy original (and on CUDA the original with TF32 toggled): outputs per batch
        outs: list[list[dict[str, np.ndarray]]] = [[] for _ in range(4 if dev == "cuda" else 3)]
        for args in self.inputs:
            args = moved(args, dev)
            want = self.prover.wanted if self.prover is not None and not untapped else set()
            taps = [Taps(ref.root, full=True, capture=want, bns=bns), Taps(cand.root, capture=want),
                    Taps(noisy.root, full=True, bns=bns)]
            for i, (inst, tap) in enumerate(zip((ref, cand, noisy), taps)):
                outs[i].append(outputs(tap.run(inst.call, args)))
            if dev == "cuda":
                taps.append(Taps(ref.root, full=True, bns=bns))
                with _TF32(not torch.backends.cudnn.allow_tf32):
                    outs[3].append(outputs(taps[3].run(ref.call, args)))
            if want:
                self.prover.step(ref.root, cand.root, taps[0], taps[1])
            if not untapped:
                inter.add(taps[0], taps[1], taps[2:])
        changed = [n for n, t in ref.call.named_buffers() if n in state and not torch.equal(state[n], t)]
        if changed:
            notes["stateful"] = (f"running the original changed {len(changed)} of its buffers ({', '.join(changed[:3])}"
                                 f"{', ...' if len(changed) > 3 else ''}): it updates its own state in eval mode (e.g. "
                                 "quantization observers), so two copies agree only after the same runs")
        ref_out, cand_out = concat(outs[0]), concat(outs[1])
        passed, judged = compare.judge(ref_out, cand_out, [concat(o) for o in outs[2:]], atol=self.atol,
                                       rtol=self.rtol)
        compare.require_evidence(judged)
        if untapped:
            notes["intermediates"] = f"not compared: {untapped}"
        else:
            notes["intermediates_compared"] = inter.compared
            if inter.uncompared:
                notes["intermediates_not_compared"] = dict(list(inter.uncompared.items())[:10])
        div = inter.first_divergence(dev) if not untapped else None
        if inter.unstable:
            notes["unstable"] = {"count": len(inter.unstable), "first": inter.unstable[:5],
                                 "why": "module outputs that diverge only by amplified rounding (tensor-free code fed "
                                        "with values that agree) and what is computed from them: not decisive"}
        if div is not None and self.outputs_only and passed:
            notes["ignored_divergence"] = div  # reported, not decisive, as asked
            div = None
        if div is not None:
            if passed:
                notes["masked_divergence"] = (
                    "the outputs agree on these inputs, but a module's output diverges: the error is masked "
                    "downstream (e.g. a ReLU cut the damaged channel) and shows on other inputs")
            passed = False
            if ver.first_divergence is None:
                ver.first_divergence = div
                self.div_blame = inter.blame(div)
        if not passed and ver.first_divergence is None:
            worst = max((k for k in judged if judged[k].get("verdict") == "failed"),
                        key=lambda k: judged[k].get("max_abs", 0) / (judged[k].get("atol") or 1e-300))
            ver.first_divergence = {"layer": None, "module": None, "output": worst, "device": dev,
                                    "max_abs": judged[worst].get("max_abs"), "atol": judged[worst].get("atol"),
                                    "why": f"no module output both models compute diverges; the model output "
                                           f"{worst!r} does"}
        return ProviderResult(f"torch-{dev}", ran=True, passed=passed, outputs=judged, notes=notes)


def verify_result(original: Any, candidate: Any, ex: tuple | None, opts: Options,
                  decisions: list[Decision] | None = None) -> Verification:
    """Verification of a torch model against the original on the example inputs and their variants (or
    the batches of --inputs), or why it was not run. With the fold's `decisions`, folds are proven too."""
    if not opts.verify:
        return Verification(skipped_reason="verification off")
    if ex is None:
        return Verification(skipped_reason="no example inputs: pass example_inputs (or --input) to verify")
    feeds.check_savable(original, ex, opts)
    runs, doc = feeds.batches(original, ex, opts)
    ver = verify_torch(original, candidate, runs, providers=opts.providers, atol=opts.atol, rtol=opts.rtol,
                       seed=opts.seed, decisions=decisions, outputs_only=opts.outputs_only)
    ver.inputs = doc
    if opts.save_inputs:
        feeds.save(original, runs, opts.save_inputs)
    return ver
