"""The ONNX fold job: copy, fold, verify against the unfolded original, time each step."""
from __future__ import annotations

import time
from typing import Callable, Mapping, Sequence

import onnx

from ..results import FoldResult, Report, Verification
from ..verify.inputs import InputSpec
from .onnx_pass import fold_model
from .onnx_scopes import neighbourhoods


def fold_onnx(model: onnx.ModelProto, *, verify: bool = True, providers: Sequence[str] | None = None,
              atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
              input_specs: Sequence[InputSpec] = (), inputs_npz: str | None = None, batches: int = 1,
              standalone: str = "keep", dry_run: bool = False, original_path: str | None = None,
              progress: Callable[[str], None] | None = None, copy: bool = True,
              outputs_only: bool = False) -> FoldResult:
    """Fold a copy of `model`; verify it unless told not to. `model` itself is never changed.

    copy=False folds `model` in place: only for a model nobody else holds and that needs no
    verification against itself (the CLI's freshly loaded file with --no-verify).
    """
    t0 = time.perf_counter()
    if copy or verify or dry_run:
        folded = onnx.ModelProto()
        folded.CopyFrom(model)
    else:
        folded = model
    decisions = fold_model(folded, standalone=standalone)
    t_fold = time.perf_counter() - t0
    report = Report(model=original_path, framework="onnx", decisions=decisions)
    t1 = time.perf_counter()
    if not verify:
        report.verification = Verification(skipped_reason="verification off (--no-verify)")
    else:
        from ..verify.onnx_verify import verify_onnx
        report.verification = verify_onnx(model, folded, providers=providers, atol=atol, rtol=rtol, seed=seed,
                                          input_specs=input_specs, inputs_npz=inputs_npz, batches=batches,
                                          outputs_only=outputs_only,
                                          progress=progress)
    report.timing_s = {"fold": t_fold, "verify": time.perf_counter() - t1}
    if dry_run:
        report.info["dry_run"] = True
        # what a reader needs to judge each decision: who feeds the BN and whom it feeds
        around = neighbourhoods(model)
        for d in decisions:
            if d.bn in around:
                d.extra.setdefault("neighbourhood", around[d.bn])
    return FoldResult(model=folded if not dry_run else model, report=report)
