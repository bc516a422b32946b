"""The ONNX fold job: copy, fold, verify against the unfolded original, time each step."""
from __future__ import annotations

import time

import onnx

from ..core.hold import forget
from ..core.options import Options
from ..core.pause import paused_gc
from ..core.results import FoldResult, Report, Verification
from .names import readable_names
from .protos import copy_borrowing, fill_borrowed
from .scopes import fold_all_scopes, neighbourhoods


def fold_onnx(model: onnx.ModelProto, opts: Options, *, original_path: str | None = None,
              copy: bool = True) -> FoldResult:
    """Fold a copy of `model`; verify it unless told not to. `model` itself is never changed.

    copy=False folds `model` in place: only for a model nobody else holds and that needs no
    verification against itself (the CLI's freshly loaded file with --no-verify).
    """
    t0 = time.perf_counter()
    with paused_gc():
        borrowed: dict[str, onnx.TensorProto] = {}
        names = readable_names(model)  # before the fold: folding in place removes the BNs it names
        if copy or opts.verify or opts.dry_run:
            folded, borrowed = copy_borrowing(model)  # the weights a fold replaces are never copied
        else:
            folded = model
            forget(model)  # what the load noted of it stops being true here (core/hold.py)
        decisions = fold_all_scopes(folded, opts, borrowed)
        fill_borrowed(folded, borrowed)
        _name_readably(names, decisions)
    t_fold = time.perf_counter() - t0
    report = Report(model=original_path, framework="onnx", decisions=decisions)
    t1 = time.perf_counter()
    if not opts.verify:
        report.verification = Verification(skipped_reason="verification off (--no-verify)")
    else:
        from .verify import verify_onnx
        report.verification = verify_onnx(model, folded, opts, decisions)
    report.timing_s = {"fold": t_fold, "verify": time.perf_counter() - t1}
    if opts.dry_run:
        report.info["dry_run"] = True
        # what a reader needs to judge each decision: who feeds the BN and whom it feeds
        around = neighbourhoods(model)
        for d in decisions:
            if d.bn in around:
                d.extra.setdefault("neighbourhood", around[d.bn])
    return FoldResult(model=folded if not opts.dry_run else model, report=report)




def _name_readably(names: dict[str, str], decisions: list) -> None:
    """Beside generated node names, the module paths the exporter recorded (names.readable_names; the node
    name stays the key)."""
    if not names:
        return
    for d in decisions:
        if d.bn in names:
            d.extra.setdefault("module_path", names[d.bn])
        if d.producer and d.producer in names:
            d.extra.setdefault("into_module_path" if d.is_folded else "producer_module_path", names[d.producer])
