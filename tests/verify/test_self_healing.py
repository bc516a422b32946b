"""Planted wrong folds are caught by their own local proof, named, and reverted alone; --strict refuses.

A fold is damaged the way real bugs damage folds: one output channel's weight off by one part in 1e4,
a bias shifted by 1e-4 of its magnitude, two channels' scales swapped (a wrong channel axis), two
groups swapped. Only the damaged fold may be reverted; the rest of the model stays folded and the
result is verified again.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.cli import main
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from bnfold.onnx import batched
from tests.conftest import SAMPLES
from tests.helpers.fold_damage import damage
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function


@pytest.fixture
def damage_second_fold(monkeypatch):
    """Make the second fold_after call of a run return damaged weights (the others stay right). The damage is
    planted in the one-BN kernel, so the batch of plain Conv->BN folds (onnx/batched.py, which writes the
    same bytes: tests/onnx/test_batched.py) is off; test_a_damaged_batched_fold_is_caught plants in it."""
    def plant(how: str, groups: int = 1) -> None:
        monkeypatch.setattr(batched, "ENABLED", False)
        real, calls = kernel.fold_after, []

        def wrong(*a, **k):
            f = real(*a, **k)
            calls.append(1)
            return damage(f, how, groups) if len(calls) == 2 else f
        monkeypatch.setattr(kernel, "fold_after", wrong)
    return plant


@pytest.mark.parametrize("how", ["scale", "bias", "axis"])
def test_a_damaged_fold_is_caught_named_and_reverted_alone(tmp_path, damage_second_fold, how):
    src = tmp_path / "m.onnx"
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), src)
    clean = bnfold.fold(str(src))
    damage_second_fold(how)
    res = bnfold.fold(str(src))
    rep = res.report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    [reverted] = rep.reverted
    assert reverted.reason is Reason.VERIFICATION_FAILED and "max abs" in reverted.detail and "bound" in reverted.detail
    assert reverted.bn == clean.report.folded[1].bn  # exactly the damaged one
    assert {d.bn for d in rep.folded} == {d.bn for d in clean.report.folded} - {reverted.bn}
    assert all(d.proof and d.proof.get("passed") for d in rep.folded)
    assert "self_healing" in rep.info
    assert_same_function(onnx.load(str(src)), res.model)


def test_a_swapped_group_is_caught(rng, damage_second_fold):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (8, 4, 3, 3))], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 8, out="y1")
    g.node("Conv", ["y1", g.weight("w2", (8, 2, 3, 3))], ["c2"], name="conv2", group=4, pads=[1, 1, 1, 1])
    g.bn("bn2", "c2", 8, out="y")
    model = g.model([("x", [1, 4, 8, 8])], [("y", [1, 8, 8, 8])])
    damage_second_fold("group", groups=4)
    res = bnfold.fold(model)
    assert {d.bn: d.reason for d in res.report.skipped} == {"bn2": Reason.VERIFICATION_FAILED}
    assert [d.bn for d in res.report.folded] == ["bn1"] and res.report.verification.verdict == "passed"


@pytest.mark.parametrize("where", ["weight", "bias"])
def test_a_damaged_batched_fold_is_caught(rng, monkeypatch, where):
    """A wrong value from the batch of plain Conv->BN folds (onnx/batched.py) is caught, named and reverted
    like any other: the damage is planted in the batch's own results (one channel of the second plan)."""
    g = G(rng)
    x = "x"
    for i in range(4):
        g.node("Conv", [x, g.weight(f"w{i}", (6, 6, 3, 3)), g.weight(f"b{i}", (6,))], [f"c{i}"], name=f"conv{i}",
               pads=[1, 1, 1, 1])
        x = g.bn(f"bn{i}", f"c{i}", 6, out=f"y{i}")
    model = g.model([("x", [1, 6, 8, 8])], [(x, [1, 6, 8, 8])])
    real, calls = batched.Batch._compute, []

    def damaged(self, *a, **k):
        real(self, *a, **k)
        calls.append(1)
        if len(calls) > 1:
            return  # the pass again, with the caught fold reverted
        p = list(self.plans.values())[1]
        if where == "weight":
            self.w32[p.w_at:p.w_at + 9] *= np.float32(1.0001)  # channel 0's first input plane
        else:
            self.b32[p.at] += np.float32(1e-3) * max(abs(self.b32[p.at]), np.float32(1))
    monkeypatch.setattr(batched.Batch, "_compute", damaged)
    res = bnfold.fold(model)
    assert {d.bn: d.reason for d in res.report.skipped} == {"bn1": Reason.VERIFICATION_FAILED}
    assert res.report.verification.verdict == "passed"
    assert_same_function(model, res.model)


def test_strict_refuses_instead_and_names_the_fold(tmp_path, damage_second_fold, capsys):
    src = tmp_path / "m.onnx"
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), src)
    damage_second_fold("scale")
    code = main([str(src), "--json", "--strict"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["output"] is None and not os.path.exists(tmp_path / "m.folded.onnx")
    ver = doc["verification"]
    assert ver["verdict"] == "failed" and ver["local_proofs"]["failed"] == 1
    [blamed] = ver["blame"]
    failed = [f for f in doc["folded"] if f["proof"].get("passed") is False]
    assert [f["bn"] for f in failed] == [blamed["bn"]] and blamed["max_abs"] > blamed["bound"]


def test_self_healed_run_writes_and_reports_the_revert(tmp_path, damage_second_fold, capsys):
    src = tmp_path / "m.onnx"
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), src)
    damage_second_fold("bias")
    code = main([str(src), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verification"]["verdict"] == "passed"
    [kept] = [s for s in doc["skipped"] if s["reason"] == "VERIFICATION_FAILED"]
    assert "fold reverted" in kept["detail"]
    assert_same_function(onnx.load(str(src)), onnx.load(doc["output"]))


def test_every_correct_fold_is_proven_locally(tmp_path):
    """The samples' folds are all proven by their float64 replay (none merely 'not run')."""
    for name in ("resnet_block", "mobilenet_block", "mlp", "skip_cases", "decoder"):
        res = bnfold.fold(os.path.join(SAMPLES, f"{name}.onnx"))
        ver = res.report.verification
        assert ver.verdict == "passed", (name, ver.to_dict())
        assert ver.proofs["failed"] == 0 and ver.proofs["proven"] == len(res.report.folded), (name, ver.proofs)
        for d in res.report.folded:
            assert d.proof["ratio"] <= 1.0, (name, d.to_dict())
