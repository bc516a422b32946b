"""PyTorch in float64, float16 and bfloat16: correct folds verify and are proven (no false alarm from the
lower precision), and the proof's bound, scaled by the dtype's unit roundoff, still catches a wrong fold."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import bnfold
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from tests.helpers.zoo_torch import set_random_bn

DTYPES = [torch.float64, torch.float16, torch.bfloat16]


def linear_bn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return set_random_bn(nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 5)), seed), \
        torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))


def conv_bn(seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return set_random_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 4, 1, groups=2), nn.BatchNorm2d(4)), seed), \
        torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("build", [linear_bn, conv_bn], ids=["linear", "conv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_folds_verify_and_are_proven(dtype, build, seed):
    model, x = build(seed)
    res = bnfold.fold(model.to(dtype), example_inputs=(x.to(dtype),))
    ver = res.report.verification
    assert res.report.folded and not res.report.skipped, res.report.to_dict()
    assert ver.verdict == "passed", ver.to_dict()
    assert ver.proofs == {"proven": len(res.report.folded), "failed": 0, "not_run": 0}, ver.proofs
    assert ver.inputs["input"]["dtype"] == str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype,factor", [(torch.float16, 1.01), (torch.bfloat16, 1.05), (torch.float64, 1.0000001)],
                         ids=str)
def test_a_wrong_fold_is_caught_in_every_precision(monkeypatch, dtype, factor):
    """One output channel off by a few units of the dtype's precision: beyond the 2u M bound."""
    real = kernel.fold_after

    def wrong(*a, **k):
        f = real(*a, **k)
        w = f.weight.astype(np.float64)
        w[2] *= factor
        f.weight = w.astype(f.weight.dtype)
        return f

    model, x = linear_bn(0)
    monkeypatch.setattr(kernel, "fold_after", wrong)
    res = bnfold.fold(model.to(dtype), example_inputs=(x.to(dtype),))
    assert {d.bn: d.reason for d in res.report.skipped} == {"1": Reason.VERIFICATION_FAILED}, res.report.to_dict()
    assert res.report.verification.verdict == "passed"
