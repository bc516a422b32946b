"""Real timm and torchvision architectures, not imitations of them: every BN that is foldable is gone
at run time, every BN that still runs was skipped with a reason, nothing crashed, and the folded model
is as accurate as the original against a float64 run.

The models are built by the libraries themselves (random weights, BN statistics calibrated on random
batches, then pushed far from the defaults: real_models.py) at small inputs, so the whole file stays
within a couple of minutes on two cores. BN calls are counted by bn_calls.census, independently of
bnfold: a call is foldable when its input comes straight from a conv/linear output read by nothing else.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.helpers.torch_threads import one_thread  # noqa: F401 (autouse: runs this module single-threaded)
from tests.torch.bn_calls import census
from tests.torch.real_models import qat_model, timm_model, torchvision_model

# name -> (builder, what it covers)
MODELS: dict[str, tuple[Callable[[], tuple[nn.Module, tuple]], str]] = {
    "regnetz_005": (lambda: timm_model("regnetz_005"), "BatchNormAct2d reading x.ndim through _assert"),
    "cs3darknet_s": (lambda: timm_model("cs3darknet_s"), "CSP family, BatchNormAct2d"),
    "dla46_c": (lambda: timm_model("dla46_c"), "DLA tree aggregation"),
    "ghostnet_050": (lambda: timm_model("ghostnet_050"), "GhostNet: cheap ops, concatenations, SE"),
    "regnetx_002": (lambda: timm_model("regnetx_002"), "RegNet, grouped convs"),
    "resnet26t": (lambda: timm_model("resnet26t"), "ResNet with a deep tiered stem"),
    "efficientformerv2_s0": (lambda: timm_model("efficientformerv2_s0"), "LayerScale2d, attention with BN"),
    "levit_128s": (lambda: timm_model("levit_128s"), "Linear -> flatten -> BatchNorm1d, attention-bias cache"),
    "tf_efficientnet_lite0": (lambda: timm_model("tf_efficientnet_lite0"), "fx cannot trace (Conv2dSame): torch.export"),
    "mobilevit_xxs": (lambda: timm_model("mobilevit_xxs"), "fx cannot trace: torch.export"),
    "repvgg_a0": (lambda: timm_model("repvgg_a0"), "BN on identity branches: kept, with a reason"),
    "tv_mobilenet_v3_small": (lambda: torchvision_model("mobilenet_v3_small"), "torchvision classification"),
    "tv_deeplabv3_mobilenet_v3_large": (lambda: torchvision_model("deeplabv3_mobilenet_v3_large", size=48),
                                        "torchvision segmentation"),
    "tv_r3d_18": (lambda: torchvision_model("r3d_18", size=32), "BatchNorm3d video model"),
    "tv_fasterrcnn_frozen": (lambda: torchvision_model("fasterrcnn_mobilenet_v3_large_fpn", frozen=True, size=96,
                                                       min_size=96, max_size=96),
                             "FrozenBatchNorm2d detection model neither fx nor torch.export captures"),
    "tv_qat_mobilenet_v2": (lambda: qat_model("mobilenet_v2"), "QAT-prepared: 0-dim observer buffers"),
}
EXPORT_ONNX = {"regnetz_005", "levit_128s", "tf_efficientnet_lite0"}


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _max_err(model: nn.Module, x: tuple, ref: list[torch.Tensor]) -> float:
    with torch.no_grad():
        got = _leaves(model(*x))
    assert [g.shape for g in got] == [r.shape for r in ref]
    return max(((g.double() - r).abs().max().item() for g, r in zip(got, ref) if g.is_floating_point()),
               default=0.0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_model_folds_every_foldable_bn(name: str, tmp_path) -> None:
    model, x = MODELS[name][0]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = census(model, *x)
    assert calls.calls, "the model makes no BatchNorm calls"

    res = torch_pass.fold(model, example_inputs=x)
    rep = res.report
    decided = {d.bn: d for d in rep.decisions}
    left = census(res.model, *x)

    # every BN that ran got exactly one decision; what still runs is exactly what was skipped
    assert len(decided) == len(rep.decisions)
    assert set(calls.counts) <= set(decided), set(calls.counts) - set(decided)
    assert set(left.counts) == {d.bn for d in rep.skipped if d.bn in calls.counts}, rep.to_dict()["skipped"]
    assert all(left.counts[n] == calls.counts[n] for n in left.counts)
    missed = [n for n in calls.foldable if n in left.counts]
    assert not missed, [(n, decided[n].reason, decided[n].detail) for n in missed]
    for n in calls.through_layout:  # a layout op between: folded, unless the channel axis provably moves
        assert n not in left.counts or decided[n].reason is Reason.AXIS_MISMATCH, decided[n]

    v = rep.verification
    if v.verdict == "inconclusive":  # random weights can make a model chaotic: its own one-ulp noise swamps
        # the outputs; then every fold must have its own local proof, and none may fail
        assert v.proofs == {"proven": len(rep.folded), "failed": 0, "not_run": 0} and rep.folded, v.to_dict()
    else:
        assert v.passed is True, rep.to_dict()["verification"]
    assert type(res.model) is type(model) and not res.model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model was changed"

    # no less accurate than the unfolded model against a float64 evaluation of it (fake-quantize ops
    # have no float64 kernels: there the fp32 original is the reference)
    with torch.no_grad():
        try:
            ref = _leaves(copy.deepcopy(model).double()(*(t.double() for t in x)))
        except RuntimeError:
            ref = [t.double() for t in _leaves(model(*x))]
    scale = max(r.abs().max().item() for r in ref if r.is_floating_point())
    err_orig, err_fold = _max_err(model, x, ref), _max_err(res.model, x, ref)
    assert err_fold <= 4 * err_orig + 16 * torch.finfo(torch.float32).eps * scale, (err_fold, err_orig, scale)

    if name in EXPORT_ONNX:
        import onnx

        from bnfold.torch.export import to_onnx
        path = str(tmp_path / "folded.onnx")
        to_onnx(res.model, x, path)
        bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node)
        assert bns == sum(left.counts.values()), (bns, left.counts)
