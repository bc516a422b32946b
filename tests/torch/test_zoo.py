"""Every zoo architecture: all foldable BNs fold, the result is as accurate as the original against a
float64 run, the input is untouched, and folding again changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.helpers.zoo_torch import ZOO, build, example_input

# BN -> ReLU -> Conv and BN after a concatenation have no layer to fold into.
EXPECTED_SKIPS = {"densenet": {Reason.UNSUPPORTED_PRODUCER}}


def _bn_paths(model: torch.nn.Module) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_folds_and_stays_accurate(name: str) -> None:
    model = build(name, seed=3)
    x = example_input(name, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = torch_pass.fold(model, example_inputs=(x,))
    rep = res.report

    # one decision per BN module, and only the expected kinds of skip
    assert sorted(d.bn for d in rep.decisions) == sorted(_bn_paths(model))
    assert {d.reason for d in rep.skipped} <= EXPECTED_SKIPS.get(name, set())
    assert len(rep.folded) >= (5 if name == "densenet" else len(_bn_paths(model)))
    assert rep.info["capture"] == "fx"
    assert rep.verification.passed is True
    assert rep.verification.providers["torch-cpu"].ran

    # the input model is untouched and the result is an eval-mode module of the same class
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _bn_paths(model) and type(res.model) is type(model) and not res.model.training
    assert len(_bn_paths(res.model)) == len(rep.skipped)

    # no less accurate than the unfolded model against a float64 evaluation
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        err_orig = (model(x).double() - ref64).abs().max().item()
        err_fold = (res.model(x).double() - ref64).abs().max().item()
    floor = 4 * torch.finfo(torch.float32).eps * ref64.abs().max().item()
    assert err_fold <= 1.5 * err_orig + floor, (err_fold, err_orig)

    # idempotent: a second fold finds nothing new and leaves the weights bit-identical
    again = torch_pass.fold(res.model, example_inputs=(x,), verify=False)
    assert not again.report.folded
    sd1, sd2 = res.model.state_dict(), again.model.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_wrong_fold_fails_verification() -> None:
    """A fold that is off by 0.2% in one output channel must not pass."""
    model = build("resnet_basic", seed=1)
    x = example_input("resnet_basic")
    res = torch_pass.fold(model, example_inputs=(x,), verify=False)
    broken = copy.deepcopy(res.model)
    with torch.no_grad():
        broken.layers[1].conv1.weight[3].mul_(1.002)
    ver = torch_pass.check(model, broken, example_inputs=(x,))
    assert ver.passed is False
    out = ver.providers["torch-cpu"].outputs["output"]
    assert out["max_abs"] > out["atol"] > 0
    assert ver.first_divergence["layer"] == "layers.1.conv1"  # the broken conv itself (compared with its BN's value)
    assert torch_pass.check(model, res.model, example_inputs=(x,)).passed is True
