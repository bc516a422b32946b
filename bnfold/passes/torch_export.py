"""torch.export programs and ONNX export.

An ExportedProgram is folded through its unlifted GraphModule (ep.module()): the BN nodes are erased
from the graph and the layers get new parameters, then the module is exported again with the
program's example inputs and the same dynamic dimensions, giving a new ExportedProgram.

ONNX export uses torch.onnx.export(dynamo=True, optimize=False): the optimizer would fuse the BNs that
bnfold deliberately kept (its own rules, not bnfold's), and the report must describe the file.
TorchScript modules, which torch.export cannot take, go through the TorchScript-based exporter with
constant folding off (on, it fuses Conv+BN itself). The ONNX is then run on onnxruntime and compared with the *original* PyTorch model on the same device kind.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import BnfoldError
from ..io import atomic_write
from ..results import FoldResult, ProviderResult, Report, Verification


def _dynamic_shapes(ep: torch.export.ExportedProgram, args: tuple) -> Any:
    """Dim.AUTO for every input dimension that was symbolic in `ep`, or None when all are static."""
    user = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    specs, dynamic = [], False
    for name in user:
        val = nodes[name].meta.get("val") if name in nodes else None
        if isinstance(val, torch.Tensor):
            dims = {i: torch.export.Dim.AUTO for i, d in enumerate(val.shape) if not isinstance(d, int)}
            dynamic = dynamic or bool(dims)
            specs.append(dims or None)
        else:
            specs.append(None)
    return tuple(specs) if dynamic and len(specs) == len(args) else None


def fold_exported(ep: torch.export.ExportedProgram, *, example_inputs: tuple | None, verify: bool,
                  providers: Sequence[str] | None, atol: Any, rtol: float | None, seed: int) -> FoldResult:
    """Fold the BN ops of an ExportedProgram; returns a new ExportedProgram."""
    from .torch_files import example_inputs_for
    from ..verify.torch_runner import copy_program
    from .torch_pass import fold_module, verify_result
    t0 = time.perf_counter()
    ex = example_inputs if example_inputs is not None else example_inputs_for(ep, seed=seed)
    gm = copy_program(ep).module()  # .module() shares the program's tensors; the input stays untouched
    decisions, info = fold_module(gm, ex, seed)
    from ..verify.torch_runner import split_inputs
    args, kwargs = split_inputs(ep, ex)
    try:
        new_ep = torch.export.export(gm, args, kwargs=kwargs or None, strict=False,
                                     dynamic_shapes=None if kwargs else _dynamic_shapes(ep, tuple(ex)))
    except Exception as e:  # noqa: BLE001 - re-export failing is a bnfold limitation, reported plainly
        raise BnfoldError(f"the folded program could not be exported again: {type(e).__name__}: {e}"[:400]) from None
    t1 = time.perf_counter()
    info["capture"] = "export-program"
    report = Report(framework="torch", decisions=decisions, info=info, timing_s={"fold": t1 - t0})
    report.verification = verify_result(ep, new_ep, ex, verify, providers, atol, rtol, seed)
    report.timing_s["verify"] = time.perf_counter() - t1
    return FoldResult(new_ep, report)


@contextlib.contextmanager
def _quiet() -> Any:
    """torch.onnx.export prints progress and warnings; the CLI's stdout must stay clean for --json."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _onnx_bytes_dynamo(model: Any, example_inputs: tuple, tmp: str) -> None:
    import onnx
    prog = torch.onnx.export(model, tuple(example_inputs), dynamo=True, optimize=False, external_data=False)
    onnx.save(prog.model_proto, tmp)


def _onnx_bytes_legacy(model: Any, example_inputs: tuple, tmp: str) -> None:
    # constant folding in the TorchScript exporter fuses Conv+BN on its own; off, the BNs bnfold kept stay
    torch.onnx.export(model, tuple(example_inputs), tmp, dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.EVAL)


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
            with _quiet():
                atomic_write(path, lambda tmp: how(model, example_inputs, tmp))
            return name
        except Exception as e:  # noqa: BLE001 - the exporters raise many types; try the next, then report
            errors.append(f"{name}: {_clean(e)}")
    raise BnfoldError("torch.onnx.export failed: " + "; ".join(errors), path)


def _ort_runs(onnx_model: Any, inputs: Sequence[tuple], provider: str) -> dict[str, np.ndarray]:
    from ..verify import runners
    r = runners.OrtRunner(onnx_model, provider, label="exported ONNX")
    names = [i.name for i in r.session.get_inputs()]
    runs = []
    for args in inputs:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        feeds = {n: _np(t) for n, t in zip(names, tensors)}
        runs.append(r.run(feeds, "exported ONNX"))
    if len(runs) == 1:
        return runs[0]
    return {k: np.concatenate([np.asarray(r[k]).reshape(-1) for r in runs]) for k in runs[0]}


def _np(t: torch.Tensor) -> np.ndarray:
    from .torch_rules import to_numpy
    return to_numpy(t)


def verify_onnx_against_torch(original: Any, onnx_model: Any, example_inputs: tuple, *,
                              providers: Sequence[str] | None = None, atol: Any = None, rtol: float | None = None,
                              seed: int = 0) -> Verification:
    """Run the ONNX on onnxruntime (CPU; CUDA when present) against the original on torch cpu / cuda."""
    from ..verify import compare, runners, torch_runner
    from .torch_hooks import variants
    from .torch_pass import _prepare
    import torch.nn as nn
    if isinstance(onnx_model, (str, os.PathLike)) and not os.path.exists(onnx_model):
        raise BnfoldError("no such file", os.fspath(onnx_model))
    src = os.fspath(onnx_model) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    ref_model = _prepare(original)[0] if isinstance(original, nn.Module) and not isinstance(
        original, torch.jit.ScriptModule) else original
    inputs = variants(example_inputs, seed)
    devices, explicit = torch_runner.requested_devices(providers)
    ver = Verification(tolerance=torch_runner.tolerance_doc(atol, rtol))
    for dev in devices:
        ep_name = "CPUExecutionProvider" if dev == "cpu" else "CUDAExecutionProvider"
        ok, why = runners.availability(ep_name)
        torch_why = torch_runner.cuda_why_not() if dev == "cuda" else ""
        if not ok or torch_why:
            if explicit:
                raise BnfoldError(f"{ep_name} was requested but cannot run: {why or torch_why}")
            ver.providers[ep_name] = ProviderResult(ep_name, ran=False, why=why or torch_why)
            continue
        ref, noise, notes = torch_runner.reference_runs(ref_model, inputs, dev, seed)
        cand_raw = _ort_runs(src, inputs, ep_name)
        if len(cand_raw) != len(ref):
            raise BnfoldError(f"the ONNX model has {len(cand_raw)} outputs, the PyTorch model {len(ref)}")
        cand = dict(zip(ref, cand_raw.values()))
        notes["reference"] = f"torch-{dev}"
        notes["onnx_outputs"] = list(cand_raw)
        passed, outs = compare.judge(ref, cand, noise, atol=atol, rtol=rtol)
        ver.providers[ep_name] = ProviderResult(ep_name, ran=True, passed=passed, outputs=outs, notes=notes)
    return ver


def export_onnx(model: Any, out_path: str, *, example_inputs: tuple | None, verify: bool,
                providers: Sequence[str] | None, atol: Any, rtol: float | None, seed: int) -> FoldResult:
    """Fold, export the folded model to ONNX, verify the ONNX against the original PyTorch model."""
    from .torch_files import example_inputs_for
    from .torch_pass import fold
    ex = example_inputs if example_inputs is not None else example_inputs_for(model, seed=seed)
    res = fold(model, example_inputs=ex, verify=False, seed=seed)
    t0 = time.perf_counter()
    exporter = to_onnx(res.model, ex, out_path)
    t1 = time.perf_counter()
    rep = res.report
    rep.output = out_path
    rep.info["onnx_export"] = {"dynamo": "torch.onnx.export(dynamo=True, optimize=False)",
                               "torchscript": "torch.onnx.export(dynamo=False, do_constant_folding=False)"}[exporter]
    rep.timing_s["save"] = t1 - t0
    if verify:
        rep.verification = verify_onnx_against_torch(model, out_path, ex, providers=providers, atol=atol, rtol=rtol,
                                                     seed=seed)
    else:
        rep.verification = Verification(skipped_reason="verification off")
    rep.timing_s["verify"] = time.perf_counter() - t1
    return res


__all__ = ["fold_exported", "to_onnx", "verify_onnx_against_torch", "export_onnx"]
