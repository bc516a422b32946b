"""Keras folds are proven one by one: a planted wrong fold is caught by its own local proof, named, and
reverted alone (the rest stays folded and is verified again); --strict refuses instead.

A fold is damaged the way real bugs damage folds: one output channel's weight off by one part in 1e4,
a bias shifted by 1e-4 of its magnitude, two output channels' weights swapped (a wrong channel axis),
two groups swapped. The kernel is patched for exactly one call; every other fold of the run is right.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, keras, randomise

import bnfold
from bnfold.cli import main
from bnfold.core import kernel
from bnfold.core.decisions import Reason

TARGETS = {
    "Conv2D": lambda: L.Conv2D(6, 3, padding="same", name="target"),
    "Conv2D_groups": lambda: L.Conv2D(6, 3, groups=3, padding="same", name="target"),
    "DepthwiseConv2D": lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="target"),
    "SeparableConv2D": lambda: L.SeparableConv2D(6, 3, padding="same", name="target"),
    "Conv2DTranspose": lambda: L.Conv2DTranspose(6, 3, strides=2, padding="same", name="target"),
    "Dense": lambda: L.Dense(6, name="target"),
}


def _net(kind: str, rng: np.random.Generator):
    """stem -> bn_stem -> relu -> target -> bn_target -> relu -> tail -> bn_tail: three folds after a layer,
    the target's the second kernel call."""
    inp = keras.Input((8, 8, 3), name="x")
    y = L.ReLU(name="r1")(L.BatchNormalization(name="bn_stem")(L.Conv2D(6, 3, padding="same", name="stem")(inp)))
    y = L.ReLU(name="r2")(L.BatchNormalization(name="bn_target")(TARGETS[kind]()(y)))
    model = keras.Model(inp, L.BatchNormalization(name="bn_tail")(L.Conv2D(4, 1, name="tail")(y)))
    randomise(model, rng)
    return model


def _hurt(how: str, weight: np.ndarray, bias: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray]:
    w, b = weight.astype(np.float64), bias.astype(np.float64).copy()
    out = np.broadcast_to(layout.out_index(w.shape), w.shape)
    if how == "scale":
        w = np.where(out == 1, w * 1.0001, w)
    elif how == "bias":
        b[1] += 1e-4 * max(abs(b[1]), 1e-3)
    elif how in ("axis", "group"):
        size = 1 if how == "axis" else layout.out_channels(w.shape) // layout.groups
        first, second = out < size, (out >= size) & (out < 2 * size)
        w = w.copy()
        w[first], w[second] = w[second].copy(), w[first].copy()
    return w.astype(weight.dtype), b.astype(bias.dtype)


@pytest.fixture
def plant(monkeypatch):
    """Make the n-th call of kernel.fold_after (or fold_before) in the test return damaged weights."""
    def install(how: str, call: int = 2, which: str = "fold_after") -> list:
        real, calls = getattr(kernel, which), []

        def wrong(weight, bias, scale, shift, layout, *a, **k):
            f = real(weight, bias, scale, shift, layout, *a, **k)
            calls.append(layout)
            if len(calls) == call:
                f.weight, f.bias = _hurt(how, f.weight, f.bias, layout)
            return f
        monkeypatch.setattr(kernel, which, wrong)
        return calls
    return install


def _assert_healed(result, bad: str, expected_folded: set[str]) -> None:
    rep = result.report
    ver = rep.verification
    assert ver.verdict == "passed", ver.to_dict()
    [reverted] = rep.reverted
    assert reverted.bn == bad and reverted.reason is Reason.VERIFICATION_FAILED, [d.to_dict() for d in rep.decisions]
    assert "fold reverted" in reverted.detail and "max abs" in reverted.detail and "bound" in reverted.detail
    assert {d.bn for d in rep.folded} == expected_folded - {bad}
    assert all(d.proof and d.proof.get("passed") is True for d in rep.folded), [d.to_dict() for d in rep.folded]
    assert ver.proofs == {"proven": len(expected_folded) - 1, "failed": 0, "not_run": 0}
    assert "self_healing" in rep.info


@pytest.mark.parametrize("kind", sorted(TARGETS))
@pytest.mark.parametrize("how", ["scale", "bias", "axis"])
def test_a_damaged_fold_is_caught_named_and_reverted_alone(kind, how, rng, plant):
    model = _net(kind, rng)
    plant(how)
    result = bnfold.fold(model)
    _assert_healed(result, "bn_target", {"bn_stem", "bn_target", "bn_tail"})
    feeds = [np.random.default_rng(5).standard_normal((2, 8, 8, 3)).astype("float32")]
    assert_same_function(model, result.model, feeds)
    assert [la.name for la in result.model.layers if isinstance(la, L.BatchNormalization)] == ["bn_target"]


@pytest.mark.parametrize("kind", ["DepthwiseConv2D", "Conv2D_groups"])
def test_a_swapped_group_is_caught(kind, rng, plant):
    model = _net(kind, rng)
    layouts = plant("group")
    result = bnfold.fold(model)
    assert layouts[1].groups > 1  # the damaged call was the grouped layer's
    _assert_healed(result, "bn_target", {"bn_stem", "bn_target", "bn_tail"})


@pytest.mark.parametrize("how", ["scale", "bias"])
def test_a_damaged_backward_fold_is_caught(how, rng, plant):
    inp = keras.Input((5, 6), name="x")
    y = L.ReLU(name="r")(L.Dense(6, name="d0")(inp))
    y = L.Dense(4, name="head")(L.BatchNormalization(name="bn_pre")(y))
    model = keras.Model(inp, L.BatchNormalization(name="bn_post")(y))
    randomise(model, rng)
    plant(how, call=1, which="fold_before")
    result = bnfold.fold(model)
    rep = result.report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    assert [d.bn for d in rep.reverted] == ["bn_pre"]
    assert [(d.bn, d.producer) for d in rep.folded] == [("bn_post", "head")] and rep.folded[0].proof["passed"]


def test_strict_refuses_and_names_the_fold(tmp_path, rng, plant, capsys):
    src = tmp_path / "m.keras"
    _net("SeparableConv2D", rng).save(src)
    plant("scale")
    code = main([str(src), "--json", "--strict"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["output"] is None and not os.path.exists(tmp_path / "m.folded.keras")
    ver = doc["verification"]
    assert ver["verdict"] == "failed" and ver["local_proofs"] == {"proven": 2, "failed": 1, "not_run": 0}
    [blamed] = ver["blame"]
    assert blamed["bn"] == "bn_target" and blamed["max_abs"] > blamed["bound"]
    [failed] = [f for f in doc["folded"] if f["proof"].get("passed") is False]
    assert failed["bn"] == "bn_target" and failed["proof"]["ratio"] > 1.0
    assert ver["first_divergence"]["layer"] == "target"


def test_self_healed_cli_run_writes_the_rest_and_reports_the_revert(tmp_path, rng, plant, capsys):
    src = tmp_path / "m.keras"
    model = _net("Conv2D", rng)
    model.save(src)
    plant("bias")
    code = main([str(src), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["verification"]["verdict"] == "passed", doc["verification"]
    [kept] = [s for s in doc["skipped"] if s["reason"] == "VERIFICATION_FAILED"]
    assert kept["bn"] == "bn_target" and "fold reverted" in kept["detail"]
    folded = keras.saving.load_model(doc["output"])
    assert_same_function(model, folded, [np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype("float32")])


def test_export_heals_too(tmp_path, rng, plant, capsys):
    src = tmp_path / "m.keras"
    _net("DepthwiseConv2D", rng).save(src)
    plant("axis")
    code = main(["export", str(src), "--to", "onnx", "--json", "-o", str(tmp_path / "m.onnx")])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    assert [s["bn"] for s in doc["skipped"] if s["reason"] == "VERIFICATION_FAILED"] == ["bn_target"]
    assert doc["verification"]["providers"]["CPUExecutionProvider"]["passed"] is True
    assert doc["verification"]["local_proofs"]["failed"] == 0


def test_a_chain_of_two_bns_is_proven_as_one_region(rng):
    """conv -> BN -> BN: both fold into the conv; the proof replays both BNs."""
    inp = keras.Input((6, 6, 3))
    y = L.BatchNormalization(name="bn2")(L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c")(inp)))
    model = keras.Model(inp, L.ReLU()(y))
    randomise(model, rng)
    rep = bnfold.fold(model).report
    assert rep.verification.verdict == "passed" and [d.producer for d in rep.folded] == ["c", "c"]
    assert all(d.proof["passed"] and d.proof["ratio"] <= 1.0 for d in rep.folded)


def test_proofs_need_no_decisions_from_check(rng):
    """bnfold.check has no fold to prove: no proof counts, no blame; a wrong candidate still fails."""
    model = _net("Conv2D", rng)
    folded = bnfold.fold(model).model
    ver = bnfold.check(model, folded)
    assert ver.verdict == "passed" and not ver.proofs and not ver.blame
    k, b = folded.get_layer("target").get_weights()
    k[..., 2] *= 1.001
    folded.get_layer("target").set_weights([k, b])
    bad = bnfold.check(model, folded)
    assert bad.verdict == "failed" and bad.first_divergence["layer"] == "target"
