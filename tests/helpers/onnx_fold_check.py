"""One helper every ONNX fold test ends with: fold, verify with onnxruntime, and check the guarantees.

The guarantees: the verifier passes against the unfolded model, an independent onnxruntime run (all
optimisations off) agrees within a tolerance scaled to the outputs, onnx.checker accepts the result,
the input model is untouched, output names are unchanged, and a second fold changes nothing.
"""
from __future__ import annotations

import numpy as np
import onnx

import bnfold
from bnfold.core.decisions import Reason
from bnfold.onnx.feeds import make_feeds


def ort_session(model: onnx.ModelProto | str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def assert_same_function(original: onnx.ModelProto, folded: onnx.ModelProto, rel: float = 1e-4, seed: int = 3) -> None:
    """Direct onnxruntime comparison (independent of bnfold's verifier) on seeded random inputs."""
    feeds = make_feeds(original, seed=seed)[0]
    ref = ort_session(original).run(None, feeds)
    out = ort_session(folded).run(None, feeds)
    for r, o in zip(ref, out):
        r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
        assert r64.shape == o64.shape
        scale = max(1.0, float(np.abs(r64).max()))
        assert np.abs(r64 - o64).max() <= rel * scale, (np.abs(r64 - o64).max(), scale)


def fold_verified(model: onnx.ModelProto, rel: float = 1e-4, reference: onnx.ModelProto | None = None,
                  **kw) -> bnfold.FoldResult:
    """Fold `model`, prove the result right in every way we can, and return the FoldResult.

    `reference`: the same function as `model` with every parameter a plain initializer; the result
    must also match it (besides bnfold's own verification against `model`).
    """
    before = model.SerializeToString()
    res = bnfold.fold(model, **kw)
    assert model.SerializeToString() == before, "the input model was mutated"
    ver = res.report.verification
    assert ver is not None and ver.passed is True, ver.to_dict() if ver is not None else None
    if reference is not None:
        ver = bnfold.check(reference, res.model)
        assert ver.passed is True, ver.to_dict()
    onnx.checker.check_model(res.model, full_check=True)
    assert [o.name for o in res.model.graph.output] == [o.name for o in model.graph.output]
    assert_same_function(model, res.model, rel=rel)
    again = bnfold.fold(res.model, verify=False, standalone=kw.get("standalone", "keep"))
    assert not again.report.folded, again.report.to_dict()
    assert again.model.SerializeToString() == res.model.SerializeToString(), "a second fold changed the model"
    return res


def decisions(res: bnfold.FoldResult) -> dict[str, object]:
    """bn name -> pattern (folded) or Reason (skipped)."""
    return {d.bn: (d.pattern if d.is_folded else d.reason) for d in res.report.decisions}


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


__all__ = ["fold_verified", "assert_same_function", "decisions", "ops", "ort_session", "Reason"]
