"""What a Keras verification proves, and what it refuses to call a proof.

- The inputs are realistic and listed; --save-inputs writes them and --inputs replays them bit for bit.
- Every layer both models compute under the same name is compared: a change a ReLU masks on these
  inputs still fails, at the layer that changed, inside nested models too; the layer a BN was folded
  into is compared with the BN's output, whether bnfold folded it or another tool did.
- Options.exclude keeps a BN (its fold reverted); a BN the graph never calls is NOT_CALLED.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.keras_build import L, bn_names, decision, keras, randomise
from tests.keras.test_structure import _Traceable

import bnfold
from bnfold.cli import main
from bnfold.core.decisions import Reason
from tests.helpers.frameworks import keras_pass

DEAD = 3


def _masked(rng):
    """conv_a -> bn_a -> relu_a -> conv_b -> ... with channel DEAD of bn_a always negative: relu_a zeroes it."""
    inp = keras.Input((12, 12, 3), name="x")
    y = L.ReLU(name="relu_a")(L.BatchNormalization(name="bn_a")(L.Conv2D(6, 3, padding="same", name="conv_a")(inp)))
    y = L.ReLU(name="relu_b")(L.BatchNormalization(name="bn_b")(L.Conv2D(6, 3, padding="same", name="conv_b")(y)))
    model = keras.Model(inp, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(y)))
    randomise(model, rng)
    g, b, m, v = (np.array(w) for w in model.get_layer("bn_a").get_weights())
    g[DEAD], b[DEAD] = 0.5, -40.0
    model.get_layer("bn_a").set_weights([g, b, m, v])
    return model


def _copy(model):
    c = keras.models.clone_model(model)
    c.set_weights(model.get_weights())
    return c


def test_a_change_masked_by_a_relu_fails_at_the_changed_layer(rng):
    model = _masked(rng)
    cand = _copy(model)
    k, b = cand.get_layer("conv_a").get_weights()
    b[DEAD] += 1.0
    cand.get_layer("conv_a").set_weights([k, b])
    x = [np.random.default_rng(0).standard_normal((2, 12, 12, 3)).astype("float32")]
    assert np.array_equal(np.asarray(model(x[0])), np.asarray(cand(x[0])))  # the outputs cannot tell
    ver = keras_pass.check(model, cand)
    assert ver.verdict == "failed"
    assert ver.first_divergence["layer"] == "conv_a" and ver.first_divergence["module"] == "Conv2D"
    cpu = ver.providers["keras-cpu"]
    assert cpu.passed is False and "masked_divergence" in cpu.notes
    assert all(o["verdict"] == "passed" for o in cpu.outputs.values())
    # --outputs-only: the divergence is reported, not decisive
    loose = keras_pass.check(model, cand, outputs_only=True)
    assert loose.verdict == "passed" and loose.providers["keras-cpu"].notes["ignored_divergence"]["layer"] == "conv_a"


def test_a_folded_model_passes_and_a_damaged_fold_inside_a_nested_model_is_located(rng):
    inner_in = keras.Input((6, 6, 4))
    y = L.BatchNormalization(name="ibn")(L.Conv2D(4, 3, padding="same", name="ic")(inner_in))
    inner = keras.Model(inner_in, L.ReLU(name="ir")(y), name="block")
    inp = keras.Input((6, 6, 3))
    y = L.ReLU()(L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="c")(inp)))
    model = keras.Model(inp, L.Dense(2, name="head")(inner(y)))
    randomise(model, rng)
    folded = bnfold.fold(model)
    assert folded.report.verification.verdict == "passed" and [d.bn for d in folded.report.folded] == ["bn", "block/ibn"]
    assert folded.report.verification.providers["keras-cpu"].notes["intermediates_compared"] >= 6
    ver = bnfold.check(model, folded.model)  # no decisions: the folds are recognised as such
    assert ver.verdict == "passed", ver.to_dict()
    assert {f["layer"] for f in ver.providers["keras-cpu"].notes["folds_in_candidate"]} == {"c", "block/ic"}
    block = folded.model.get_layer("block")
    k, b = block.get_layer("ic").get_weights()
    b[0] += 1e-3 * max(1.0, abs(b[0]))
    block.get_layer("ic").set_weights([k, b])
    bad = bnfold.check(model, folded.model)
    assert bad.verdict == "failed" and bad.first_divergence["layer"] == "block/ic", bad.first_divergence


def test_inputs_are_listed_saved_and_replayed_bit_for_bit(tmp_path, rng, capsys):
    inp = keras.Input((None, None, 3), name="img")
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp))
    model = keras.Model(inp, L.ReLU()(y))
    randomise(model, rng)
    src, saved = tmp_path / "m.keras", tmp_path / "feeds.npz"
    keras_pass.save(model, str(src))
    assert main([str(src), "--json", "--dry-run", "--seed", "7", "--batches", "2", "--save-inputs", str(saved)]) == 0
    first = json.loads(capsys.readouterr().out)["verification"]
    assert first["inputs"]["img"]["shape"] == [2, 64, 64, 3] and first["inputs"]["img"]["batches"] == 2
    assert "seed 7" in first["inputs"]["img"]["how"] and "axis 1=64" in first["inputs"]["img"]["how"]
    with np.load(saved) as z:
        assert sorted(z.files) == ["img", "img@1"] and z["img"].shape == (2, 64, 64, 3)
    assert main([str(src), "--json", "--dry-run", "--inputs", str(saved)]) == 0
    again = json.loads(capsys.readouterr().out)["verification"]
    assert again["inputs"]["img"]["how"].startswith(f"from {saved}") and "2 batches" in again["inputs"]["img"]["how"]
    for key in ("max_abs", "ref_max_abs"):
        a = first["providers"]["keras-cpu"]["outputs"]
        b = again["providers"]["keras-cpu"]["outputs"]
        assert {k: v[key] for k, v in a.items()} == {k: v[key] for k, v in b.items()}


def test_user_shapes_and_library_example_inputs_are_listed(rng):
    inp = keras.Input((None, 4), name="seq")
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Dense(3, name="d")(inp)))
    randomise(model, rng)
    from bnfold.core.options import InputSpec
    ver = bnfold.fold(model, input_specs=[InputSpec("seq", (3, 5, 4))]).report.verification
    assert ver.inputs == {"seq": {"shape": [3, 5, 4], "dtype": "float32", "how": "random normal (seed 0); shape from --input"}}
    given = [rng.standard_normal((4, 7, 4)).astype("float32")]
    ver = bnfold.fold(model, example_inputs=given).report.verification
    assert ver.inputs["seq"]["shape"] == [4, 7, 4] and "example_inputs" in ver.inputs["seq"]["how"]


def test_excluded_bns_stay_and_say_why(rng):
    model = _masked(rng)
    res = keras_pass.fold(model, exclude={"bn_b": "its local proof failed: max abs 1 > bound 0"})
    d = decision(res, "bn_b")
    assert d.reason is Reason.VERIFICATION_FAILED and d.detail == "fold reverted: its local proof failed: max abs 1 > bound 0"
    assert decision(res, "bn_a").is_folded and bn_names(res.model) == ["bn_b"]
    assert res.report.verification.verdict == "passed"


class _Spare(_Traceable):
    """A subclassed model holding a BatchNorm its call() never uses."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.spare = L.BatchNormalization(name="spare")


def test_a_bn_the_graph_never_calls_is_not_called(rng):
    model = _Spare(name="net")
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    model.spare.build((None, 4))
    model(feeds[0])
    randomise(model, rng)
    res = keras_pass.fold(model, example_inputs=feeds)
    assert decision(res, "spare").reason is Reason.NOT_CALLED and decision(res, "bn").is_folded
    assert res.report.verification.verdict == "passed"


def test_a_traced_subclassed_model_is_proven_through_its_traced_graph(rng):
    model = _Traceable(name="net")
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    model(feeds[0])
    randomise(model, rng)
    res = keras_pass.fold(model, example_inputs=feeds)
    ver = res.report.verification
    assert ver.verdict == "passed" and ver.proofs == {"proven": 1, "failed": 0, "not_run": 0}
    assert "subclassed" in ver.providers["keras-cpu"].notes["intermediates"]


@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_proofs_hold_for_channels_first_and_bias_free_layers(center, scale, rng):
    inp = keras.Input((3, 7, 7))
    y = L.Conv2D(4, 3, use_bias=False, data_format="channels_first", name="c")(inp)
    y = L.BatchNormalization(axis=1, center=center, scale=scale, name="bn")(y)
    y = L.Conv2D(2, 1, padding="valid", data_format="channels_first", name="v")(
        L.BatchNormalization(axis=1, name="bn2")(L.ReLU()(y)))
    model = keras.Model(inp, y)
    randomise(model, rng)
    rep = bnfold.fold(model).report
    assert [(d.bn, d.direction) for d in rep.folded] == [("bn", "after"), ("bn2", "before")]
    assert rep.verification.proofs == {"proven": 2, "failed": 0, "not_run": 0}, [d.proof for d in rep.folded]


@pytest.mark.parametrize("policy", ["float64", "float16", "bfloat16", "mixed_float16", "mixed_bfloat16"])
def test_every_dtype_policy_verifies_and_proves_its_folds(policy, rng):
    """No false alarm from a model's own precision: each fold is proven with the weights' own rounding
    and Keras' run of the original region is recognised at the compute dtype's precision."""
    inp = keras.Input((10, 10, 3))
    y = L.ReLU(dtype=policy)(L.BatchNormalization(name="bn1", dtype=policy)(
        L.Conv2D(8, 3, padding="same", name="c1", dtype=policy)(inp)))
    y = L.BatchNormalization(name="bn2", dtype=policy)(L.SeparableConv2D(6, 3, name="sep", dtype=policy)(y))
    y = L.GlobalAveragePooling2D(dtype=policy)(y)
    model = keras.Model(inp, L.BatchNormalization(name="bn3", dtype=policy)(L.Dense(4, name="d", dtype=policy)(y)))
    randomise(model, rng)
    rep = bnfold.fold(model).report
    assert rep.verification.verdict == "passed", rep.verification.to_dict()
    assert rep.verification.proofs == {"proven": 3, "failed": 0, "not_run": 0}, [d.proof for d in rep.folded]
