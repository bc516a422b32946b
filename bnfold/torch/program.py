"""torch.export programs: fold through the unlifted GraphModule, then export again.

An ExportedProgram is folded through its unlifted GraphModule (ep.module()): the BN nodes are erased
from the graph and the layers get new parameters, then the module is exported again with the
program's example inputs and the same dynamic dimensions, giving a new ExportedProgram.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import FoldResult, Report
from .files import example_inputs_for
from .fold import fold_module
from .quiet import quiet
from .verify import copy_program, split_inputs, verify_result


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


def fold_exported(ep: torch.export.ExportedProgram, opts: Options, example_inputs: tuple | None) -> FoldResult:
    """Fold the BN ops of an ExportedProgram; returns a new ExportedProgram."""
    seed = opts.seed
    t0 = time.perf_counter()
    ex = example_inputs if example_inputs is not None else example_inputs_for(ep, seed=seed)
    _check_static_shapes(ep, ex)
    gm = copy_program(ep).module()  # .module() shares the program's tensors; the input stays untouched
    decisions, info = fold_module(gm, ex, seed, opts.exclude)
    args, kwargs = split_inputs(ep, ex)
    try:
        with quiet():
            new_ep = torch.export.export(gm, args, kwargs=kwargs or None, strict=False,
                                         dynamic_shapes=None if kwargs else _dynamic_shapes(ep, tuple(ex)))
    except Exception as e:  # noqa: BLE001 - re-export failing is a bnfold limitation, reported plainly
        raise BnfoldError(f"the folded program could not be exported again: {type(e).__name__}: {e}"[:400]) from None
    t1 = time.perf_counter()
    info["capture"] = "export-program"
    report = Report(framework="torch", decisions=decisions, info=info, timing_s={"fold": t1 - t0})
    report.verification = verify_result(ep, new_ep, ex, opts, decisions)
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
