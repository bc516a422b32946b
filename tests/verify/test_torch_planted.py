"""PyTorch: planted wrong folds are caught by their own local proof, named, and reverted alone; --strict refuses.

A fold is damaged the way real bugs damage folds, inside the kernel's result for one chosen BatchNorm: one
output channel's weight off by one part in 1e4, a bias shifted by 1e-4 of its magnitude, two channels
swapped (a wrong channel axis), two groups swapped. Every layer kind is damaged: Conv2d, depthwise and
grouped Conv2d, ConvTranspose2d, Linear, and a backward fold (BN -> Linear). Only the damaged fold may be
reverted; the rest of the model stays folded, proven and verified, and still computes the original function.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn

import bnfold
from bnfold.cli import main
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from bnfold.torch import rewrite, script
from tests.helpers import fold_damage
from tests.helpers.zoo_torch import set_random_bn


class Planted(nn.Module):
    """Conv -> BN, depthwise Conv -> BN, grouped Conv -> BN, ConvTranspose -> BN, Linear -> BN1d, and a
    BN1d -> Linear that can only fold backward (a ReLU precedes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_conv = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 1, groups=2)
        self.bn_gconv = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 10)
        self.bn_fc = nn.BatchNorm1d(10)
        self.bn_back = nn.BatchNorm1d(10)
        self.head = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_conv(self.conv(x)))
        y = torch.relu(self.bn_dw(self.dw(y)))
        y = torch.relu(self.bn_gconv(self.gconv(y)))
        y = torch.relu(self.bn_up(self.up(y))).mean((2, 3))
        y = torch.relu(self.bn_fc(self.fc(y)))
        return self.head(self.bn_back(y))


def planted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return set_random_bn(Planted(), seed)


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
FOLDS = {"bn_conv": ("conv", "after"), "bn_dw": ("dw", "after"), "bn_gconv": ("gconv", "after"),
         "bn_up": ("up", "after"), "bn_fc": ("fc", "after"), "bn_back": ("head", "before")}


@pytest.fixture
def damage(monkeypatch):
    """damage(bn, how, groups): the kernel's result for that BN's fold comes back damaged; every other
    fold (and any later fold of that BN, e.g. after self-healing excluded it) is right."""
    def plant(bn: str, how: str, groups: int = 1) -> None:
        state = {"on": False}
        real_after, real_before = kernel.fold_after, kernel.fold_before

        def marking(real):  # the fold of `bn` is being written (modules and programs, or TorchScript)
            def apply(root, plan, *rest):
                state["on"] = plan.name == bn
                try:
                    return real(root, plan, *rest)
                finally:
                    state["on"] = False
            return apply

        def wrap(real):
            def fold(*a, **k):
                f = real(*a, **k)
                return fold_damage.damage(f, how, groups) if state["on"] else f
            return fold
        monkeypatch.setattr(rewrite, "apply", marking(rewrite.apply))
        monkeypatch.setattr(script, "_apply", marking(script._apply))
        monkeypatch.setattr(kernel, "fold_after", wrap(real_after))
        monkeypatch.setattr(kernel, "fold_before", wrap(real_before))
    return plant


def _same_function(original: nn.Module, folded: nn.Module) -> None:
    """An independent float64 check: the folded model is within float32 rounding of the original."""
    with torch.no_grad():
        ref = original.double()(X.double())
        got = folded.double()(X.double())
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), (got - ref).abs().max()


CASES = [("bn_conv", "scale", 1), ("bn_conv", "bias", 1), ("bn_conv", "axis", 1),
         ("bn_dw", "scale", 1), ("bn_dw", "group", 8),
         ("bn_gconv", "group", 2), ("bn_gconv", "axis", 1),
         ("bn_up", "scale", 1), ("bn_up", "bias", 1), ("bn_up", "group", 2),
         ("bn_fc", "scale", 1), ("bn_fc", "bias", 1), ("bn_fc", "axis", 1),
         ("bn_back", "scale", 1), ("bn_back", "bias", 1), ("bn_back", "axis", 1)]


def test_every_fold_of_the_planted_model_is_proven_locally():
    res = bnfold.fold(planted(), example_inputs=(X,))
    rep = res.report
    assert {d.bn: (d.producer, d.direction) for d in rep.folded} == FOLDS, rep.to_dict()
    assert rep.verification.verdict == "passed" and rep.verification.proofs == {"proven": 6, "failed": 0, "not_run": 0}
    for d in rep.folded:
        assert d.proof["passed"] and 0 < d.proof["bound"] and d.proof["ratio"] <= 1.0, d.to_dict()


@pytest.mark.parametrize("bn,how,groups", CASES)
def test_a_damaged_fold_is_caught_named_and_reverted_alone(damage, bn, how, groups):
    model = planted()
    damage(bn, how, groups)
    res = bnfold.fold(model, example_inputs=(X,))
    rep = res.report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    [reverted] = rep.reverted
    assert reverted.bn == bn and reverted.reason is Reason.VERIFICATION_FAILED, rep.to_dict()
    assert reverted.detail.startswith("fold reverted: ") and "max abs" in reverted.detail
    assert {d.bn for d in rep.folded} == set(FOLDS) - {bn}
    assert all(d.proof and d.proof.get("passed") for d in rep.folded)
    assert isinstance(res.model.get_submodule(bn), nn.modules.batchnorm._BatchNorm)  # the BN is kept, and runs
    assert "self_healing" in rep.info
    _same_function(planted(), res.model)


@pytest.mark.parametrize("bn,how,groups", CASES)
def test_strict_fails_and_blames_only_the_damaged_fold(damage, bn, how, groups):
    damage(bn, how, groups)
    res = bnfold.fold(planted(), example_inputs=(X,), strict=True)
    ver = res.report.verification
    assert ver.verdict == "failed" and not ver and not res.report.reverted
    assert ver.proofs["failed"] == 1 and ver.proofs["proven"] == 5, ver.proofs
    assert {b["bn"] for b in ver.blame} == {bn}, ver.blame
    [failed] = [d for d in res.report.folded if not d.proof["passed"]]
    assert failed.bn == bn and failed.proof["max_abs"] > failed.proof["bound"] > 0 and failed.proof["ratio"] > 1
    assert ver.hint() and "--strict" in ver.hint()


def test_strict_cli_on_a_pickled_module_exits_1_and_writes_nothing(tmp_path, damage, capsys):
    src = tmp_path / "planted.pt"
    torch.save(planted(), src)
    damage("bn_gconv", "group", 2)
    code = main([str(src), "--trust", "--input", "x:2x3x8x8", "--strict", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["output"] is None and not os.path.exists(tmp_path / "planted.folded.pt")
    ver = doc["verification"]
    assert ver["verdict"] == "failed" and ver["local_proofs"]["failed"] == 1
    [blamed] = ver["blame"]
    assert blamed["bn"] == "bn_gconv" and blamed["max_abs"] > blamed["bound"]
    assert [f["bn"] for f in doc["folded"] if f["proof"].get("passed") is False] == ["bn_gconv"]


def test_cli_heals_a_pickled_module_and_writes_the_rest_folded(tmp_path, damage, capsys):
    src = tmp_path / "planted.pt"
    torch.save(planted(), src)
    damage("bn_up", "bias")
    code = main([str(src), "--trust", "--input", "x:2x3x8x8", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verification"]["verdict"] == "passed", doc["verification"]
    [kept] = [s for s in doc["skipped"] if s["reason"] == "VERIFICATION_FAILED"]
    assert kept["bn"] == "bn_up" and kept["detail"].startswith("fold reverted:")
    written = torch.load(doc["output"], weights_only=False)
    _same_function(planted(), written)


def test_exported_program_damaged_fold_is_healed(damage):
    ep = torch.export.export(planted(), (X,), strict=False)
    damage("bn_dw", "scale")
    res = bnfold.fold(ep, example_inputs=(X,))
    rep = res.report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    assert [d.bn for d in rep.reverted] == ["bn_dw"]
    assert rep.verification.proofs["failed"] == 0 and rep.verification.proofs["proven"] == len(rep.folded) == 5
    _same_function(planted(), res.model.module())


def test_torchscript_damaged_fold_fails_without_a_local_proof(damage):
    """TorchScript submodules take no hooks: the proofs cannot run, the outputs still catch the damage."""
    sm = torch.jit.script(planted())
    damage("bn_gconv", "group", 2)
    res = bnfold.fold(sm, example_inputs=(X,))
    ver = res.report.verification
    assert ver.verdict == "failed" and not ver.blame and ver.proofs["not_run"] == len(res.report.folded)
    assert "TorchScript" in ver.providers["torch-cpu"].notes["intermediates"]
    assert all("TorchScript" in d.proof["not_run"] for d in res.report.folded)


def test_a_divergence_at_a_folded_layer_blames_that_fold_when_no_proof_runs(damage, monkeypatch):
    """Without local proofs (made unavailable here), the end-to-end first divergence at the damaged layer
    (compared against its BN's output in the original) still names the fold, and healing reverts it."""
    from bnfold.torch import proofs
    monkeypatch.setattr(proofs, "_prove_region", lambda *a: {"not_run": "switched off for this test"})
    damage("bn_conv", "bias")
    res = bnfold.fold(planted(), example_inputs=(X,), strict=True)
    ver = res.report.verification
    assert ver.first_divergence["layer"] == "conv" and ver.first_divergence["module"] == "Conv2d"
    assert [b["bn"] for b in ver.blame] == ["bn_conv"] and "diverges at 'conv'" in ver.blame[0]["why"]
    healed = bnfold.fold(planted(), example_inputs=(X,))
    assert [d.bn for d in healed.report.reverted] == ["bn_conv"] and healed.report.verification.verdict == "passed"


def test_a_fold_on_a_branch_only_a_variant_takes_is_proven_there(damage):
    """The example input takes one branch; the negated variant takes the other: both folds are proven,
    each on the batch that calls its layer, and a wrong fold on the second branch is caught."""
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.bn_a(self.a(x))
            return self.bn_b(self.b(x))

    torch.manual_seed(0)
    model = set_random_bn(Branchy(), 0)
    x = X.abs()  # sum > 0: branch a; its negation takes branch b
    res = bnfold.fold(model, example_inputs=(x,))
    assert res.report.verification.proofs == {"proven": 2, "failed": 0, "not_run": 0}, res.report.to_dict()
    damage("bn_b", "scale")
    res = bnfold.fold(model, example_inputs=(x,), strict=True)
    assert [b["bn"] for b in res.report.verification.blame] == ["bn_b"], res.report.verification.to_dict()
