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
    _check_static_shapes(ep, ex)
    gm = copy_program(ep).module()  # .module() shares the program's tensors; the input stays untouched
    decisions, info = fold_module(gm, ex, seed)
    from ..verify.torch_runner import split_inputs
    args, kwargs = split_inputs(ep, ex)
    try:
        with _quiet():
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


def _check_static_shapes(ep: torch.export.ExportedProgram, ex: Sequence[Any]) -> None:
    """Inputs of another shape than a program's static one fail deep in torch.export: say so first."""
    user = list(ep.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for name, x in zip(user, ex):
        val = vals.get(name)
        if not isinstance(val, torch.Tensor) or not isinstance(x, torch.Tensor):
            continue
        fixed = [d if isinstance(d, int) else None for d in val.shape]
        if len(fixed) != x.dim() or any(f is not None and f != n for f, n in zip(fixed, x.shape)):
            want = "x".join("?" if f is None else str(f) for f in fixed)
            raise BnfoldError(f"input {name!r}: shape {'x'.join(map(str, x.shape))} does not fit the program, "
                              f"exported for {want} (its dimensions are static); give --input {name}:{want}")


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
            with _quiet():
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
    from ..verify import runners
    r = runners.OrtRunner(onnx_model, provider, label="exported ONNX")
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
    from .torch_files import _arg_names
    if isinstance(model, torch.jit.ScriptModule):
        try:
            return [a.name for a in model.forward.schema.arguments[1:]]
        except Exception:  # noqa: BLE001
            return []
    return _arg_names(model)


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
