"""timm's re-parameterisable models in their training form, exported to ONNX with BatchNormalization kept,
come out of bnfold with no more Conv and no more BatchNormalization than timm's own reparameterize_model
leaves (its model exported and counted the same way), proven fold by fold and end to end.

Random weights; BN parameters far from the defaults (gamma of random sign, beta != 0) and running
statistics calibrated on one random batch in train mode (momentum 1: the batch's own statistics), so the
activations stay in range through the depth. Smallest variants, 64x64 inputs.
"""
from __future__ import annotations

import copy
import functools
import io
from collections import Counter

import onnx
import pytest

import bnfold
from tests.helpers.onnx_fold_check import assert_same_function
from tests.helpers.timm_train_form import build_calibrated

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

MODELS = ["mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9", "repvgg_a0"]  # last: reused below


@functools.lru_cache(maxsize=1)
def build(name: str):
    return build_calibrated(name, num_classes=10, size=64)


def export(model, dynamo: bool = False) -> onnx.ModelProto:
    x = (torch.randn(1, 3, 64, 64),)
    if dynamo:
        return torch.onnx.export(model, x, dynamo=True, optimize=False, verbose=False).model_proto
    f = io.BytesIO()
    torch.onnx.export(model, x, f, dynamo=False, do_constant_folding=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    return onnx.load_from_string(f.getvalue())


def ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


@functools.lru_cache(maxsize=1)
def reference(name: str) -> Counter:
    """Op counts of timm's own re-parameterisation of the model, exported the same way."""
    from timm.utils.model import reparameterize_model
    return ops(export(reparameterize_model(copy.deepcopy(build(name)))))


def check(name: str, original: onnx.ModelProto, reference: Counter) -> None:
    res = bnfold.fold(original)
    ver = res.report.verification
    assert ver.verdict == "passed", ver.to_dict()
    assert ver.proofs["failed"] == 0 and ver.proofs["not_run"] == 0, ver.proofs
    assert not res.report.skipped, [d.to_dict() for d in res.report.skipped]
    got = ops(res.model)
    assert got["Conv"] <= reference["Conv"] and got["BatchNormalization"] <= reference["BatchNormalization"], \
        (name, got, reference)
    assert any(d.pattern.startswith("RepBlock(") for d in res.report.folded)
    assert_same_function(original, res.model, rel=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_training_form_export_folds_to_timm_reparameterized_counts(name):
    original, ref = export(build(name)), reference(name)
    assert ops(original)["Conv"] > ref["Conv"] or ops(original)["BatchNormalization"] > ref["BatchNormalization"]
    check(name, original, ref)


def test_dynamo_export_folds_too():
    """torch.onnx's dynamo exporter writes zero conv biases as Expand(CastLike(0, x), Shape(x)) subgraphs."""
    name = MODELS[-1]  # built (and its reference counted) by the last case above
    check(name, export(build(name), dynamo=True), reference(name))
