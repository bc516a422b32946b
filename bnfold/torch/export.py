"""ONNX export of a folded PyTorch model, verified on onnxruntime against the original.

ONNX export uses torch.onnx.export(dynamo=True, optimize=False): the optimizer would fuse the BNs that
bnfold deliberately kept (its own rules, not bnfold's), and the report must describe the file.
TorchScript modules, which torch.export cannot take, go through the TorchScript-based exporter with
constant folding off (on, it fuses Conv+BN itself). The ONNX is then run on onnxruntime and compared with the *original* PyTorch model on the same device kind.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import BnfoldError
from ..core.files import atomic_write
from ..core.options import Options
from ..core.results import FoldResult, ProviderResult, Verification
from ..onnx.runtime import OrtRunner, availability
from ..verify import compare
from . import verify as tv
from .files import arg_names
from .fold import prepare
from .hooks import variants
from .quiet import quiet


def _onnx_bytes_dynamo(model: Any, example_inputs: tuple, tmp: str) -> None:
    import onnx
    prog = torch.onnx.export(model, tuple(example_inputs), dynamo=True, optimize=False, external_data=False)
    onnx.save(prog.model_proto, tmp)


def _onnx_bytes_legacy(model: Any, example_inputs: tuple, tmp: str) -> None:
    # constant folding in the TorchScript exporter fuses Conv+BN on its own; off, the BNs bnfold kept stay.
    # Inputs are named after forward's arguments: the exporter drops unused ones, names keep the rest apart.
    names = _torch_arg_names(model)
    torch.onnx.export(model, tuple(example_inputs), tmp, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL,
                      input_names=names if len(names) == len(example_inputs) else None)


def _clean(e: BaseException) -> str:
    import re
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def to_onnx(model: Any, example_inputs: tuple, path: str) -> str:
    """Export `model` (folded) to `path` atomically, keeping every remaining BN as BatchNormalization.
    Returns the exporter used: torch.export-based (dynamo) first, the TorchScript-based one for
    TorchScript modules or when the first fails."""
    tries = [] if isinstance(model, torch.jit.ScriptModule) else [("dynamo", _onnx_bytes_dynamo)]
    if not isinstance(model, torch.export.ExportedProgram):
        tries.append(("torchscript", _onnx_bytes_legacy))
    errors = []
    for name, how in tries:
        try:
            with quiet():
                atomic_write(path, lambda tmp: how(model, example_inputs, tmp))
            return name
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; try the next, then report
            errors.append(f"{name}: {_clean(e)}")
    raise BnfoldError("torch.onnx.export failed: " + "; ".join(errors), path)


def _ort_runs(onnx_model: Any, inputs: Sequence[tuple], provider: str,
              arg_names: Sequence[str] = ()) -> tuple[list[str], list[np.ndarray]]:
    """(output names, outputs by position) of the ONNX on each input tuple, concatenated over runs.

    Inputs go by name when every ONNX input is one of the torch model's argument names (an exporter
    may drop an unused argument), else by position. Outputs stay positional: an exporter may give two
    outputs one name."""
    r = OrtRunner(onnx_model, provider, label="exported ONNX")
    names = [i.name for i in r.session.get_inputs()]
    out_names = [o.name for o in r.session.get_outputs()]
    by_name = bool(arg_names) and set(names) <= set(arg_names)
    runs = []
    for args in inputs:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if by_name:
            given = dict(zip(arg_names, args))
            feeds = {n: _np(given[n]) for n in names}
        else:
            if len(tensors) != len(names):
                raise BnfoldError(f"the ONNX model takes {len(names)} inputs {names}, the PyTorch model "
                                  f"{len(tensors)} tensors, and their names do not match")
            feeds = {n: _np(t) for n, t in zip(names, tensors)}
        try:
            runs.append(r.session.run(None, feeds))
        except Exception as e:  # noqa: BLE001
            raise BnfoldError(f"onnxruntime failed to run the exported ONNX: {_clean(e)}") from None
    outs = [np.concatenate([np.asarray(run[i]).reshape(-1) for run in runs]) if len(runs) > 1 else run0
            for i, run0 in enumerate(runs[0])]
    return out_names, outs


def _np(t: torch.Tensor) -> np.ndarray:
    from .rules import to_numpy
    return to_numpy(t)


def verify_onnx_against_torch(original: Any, onnx_model: Any, example_inputs: tuple, opts: Options) -> Verification:
    """Run the ONNX on onnxruntime (CPU; CUDA when present) against the original on torch cpu / cuda."""
    providers, atol, rtol, seed = opts.providers, opts.atol, opts.rtol, opts.seed
    if isinstance(onnx_model, (str, os.PathLike)) and not os.path.exists(onnx_model):
        raise BnfoldError("no such file", os.fspath(onnx_model))
    src = os.fspath(onnx_model) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    ref_model = prepare(original)[0] if isinstance(original, nn.Module) and not isinstance(
        original, torch.jit.ScriptModule) else original
    inputs = variants(example_inputs, seed)
    devices, explicit = tv.requested_devices(providers)
    ver = Verification(tolerance=tv.tolerance_doc(atol, rtol))
    for dev in devices:
        ep_name = "CPUExecutionProvider" if dev == "cpu" else "CUDAExecutionProvider"
        ok, why = availability(ep_name)
        torch_why = tv.cuda_why_not() if dev == "cuda" else ""
        if not ok or torch_why:
            if explicit:
                raise BnfoldError(f"{ep_name} was requested but cannot run: {why or torch_why}")
            ver.providers[ep_name] = ProviderResult(ep_name, ran=False, why=why or torch_why)
            continue
        ref, noise, notes = tv.reference_runs(ref_model, inputs, dev, seed)
        onnx_names, cand_outs = _ort_runs(src, inputs, ep_name, _torch_arg_names(original))
        notes["reference"] = f"torch-{dev}"
        notes["onnx_outputs"] = onnx_names
        if len(cand_outs) != len(ref):
            ver.providers[ep_name] = ProviderResult(ep_name, ran=True, passed=False, notes=notes, outputs={
                "_": {"passed": False, "why": f"the ONNX model has {len(cand_outs)} outputs, the PyTorch model "
                                              f"{len(ref)}"}})
            continue
        cand = dict(zip(ref, cand_outs))
        passed, outs = compare.judge(ref, cand, noise, atol=atol, rtol=rtol)
        ver.providers[ep_name] = ProviderResult(ep_name, ran=True, passed=passed, outputs=outs, notes=notes)
        if not passed and ver.first_divergence is None:
            ver.first_divergence = compare.outputs_only_culprit(outs, dict(zip(ref, onnx_names)), ep_name)
    return ver


def _torch_arg_names(model: Any) -> list[str]:
    if isinstance(model, torch.jit.ScriptModule):
        try:
            return [a.name for a in model.forward.schema.arguments[1:]]
        except Exception:  # noqa: BLE001
            return []
    return arg_names(model)


def write_and_verify(res: FoldResult, original: Any, out_path: str, ex: tuple, opts: Options) -> FoldResult:
    """Export the folded model of `res` to ONNX at `out_path` and verify the ONNX against `original`."""
    t0 = time.perf_counter()
    exporter = to_onnx(res.model, ex, out_path)
    t1 = time.perf_counter()
    rep = res.report
    rep.output = out_path
    rep.info["onnx_export"] = {"dynamo": "torch.onnx.export(dynamo=True, optimize=False)",
                               "torchscript": "torch.onnx.export(dynamo=False, do_constant_folding=False)"}[exporter]
    rep.timing_s["save"] = t1 - t0
    if opts.verify:
        rep.verification = verify_onnx_against_torch(original, out_path, ex, opts)
    else:
        rep.verification = Verification(skipped_reason="verification off")
    rep.timing_s["verify"] = time.perf_counter() - t1
    return res
