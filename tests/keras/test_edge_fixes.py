"""Keras cases an adversarial pass found wrong, each fixed: a layer shared across nesting levels, the
channels_first bias quirk of Keras' TensorFlow backend, dynamic input shapes, dict inputs, per-layer
dtypes, output names, variables captured by a traced call(), and the check report's culprit line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, decision, keras, outputs, randomise
from tests.keras.test_edge import _decided_once, _feeds, _fold, _listing, _with_variable

from bnfold.cli import main
from bnfold.core.decisions import Reason
from bnfold.core.errors import BnfoldError
from tests.helpers.frameworks import keras_pass


def _shared_across_levels(rng, outer_bn=False):
    """Conv `c` is called inside a nested model (followed by a BN there) and in the outer graph."""
    c = L.Conv2D(3, 1, name="c")
    ii = keras.Input((5, 5, 3))
    inner = keras.Model(ii, L.BatchNormalization(name="ibn")(c(ii)), name="inner")
    inp = keras.Input((5, 5, 3))
    y, z = inner(inp), c(L.ReLU(name="r")(inp))
    out = L.Add(name="add")([y, z])
    if outer_bn:
        out = L.BatchNormalization(name="obn")(L.Conv2D(2, 1, name="oc")(out))
    model = keras.Model(inp, out)
    randomise(model, rng)
    return model


def test_layer_shared_between_a_nested_model_and_the_outer_graph_is_not_folded(rng):
    model = _shared_across_levels(rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds, verify=False)
    _decided_once(result, ["inner/ibn"])
    d = decision(result, "inner/ibn")
    assert d.is_folded or d.reason is Reason.SHARED_PRODUCER  # folding into a private copy of c is fine too
    assert_same_function(model, result.model, feeds)


def test_verifying_a_model_with_a_layer_shared_across_levels_does_not_crash(rng):
    model = _shared_across_levels(rng, outer_bn=True)
    result = keras_pass.fold(model, example_inputs=_feeds(model, rng))
    assert result.report.verification.passed is True
    assert decision(result, "obn").producer == "oc"


@pytest.mark.parametrize("kind", ["Conv2D", "SeparableConv2D", "Conv2D_nobias"])
def test_channels_first_producer_whose_width_equals_its_channels(kind, rng):
    # Output (N, 5, 5, 5): Keras 3's TF ops.add picks bias_add's data format from the last axis.
    inp = keras.Input((3, 7, 7))
    cls = L.SeparableConv2D if kind.startswith("Separable") else L.Conv2D
    layer = cls(5, 3, data_format="channels_first", use_bias=not kind.endswith("nobias"), name="p")
    model = keras.Model(inp, L.BatchNormalization(axis=1, name="bn")(layer(inp)))
    randomise(model, rng)
    _fold(model, rng, ["bn"])


def _dynamic(tmp_path, rng, pool: int | None):
    inp = keras.Input((None, None, 3), name="img")
    y = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp))
    if pool:
        y = L.MaxPooling2D(pool, name="pool")(y)
    model = keras.Model(inp, y)
    randomise(model, rng)
    src = tmp_path / "dyn.keras"
    keras_pass.save(model, str(src))
    return src


def test_dynamic_spatial_dims_get_a_realistic_default(tmp_path, rng, capsys):
    """None dims: batch 2, every other 64 (never 1, where a 3x3 kernel sees only its centre)."""
    src = _dynamic(tmp_path, rng, None)
    assert main([str(src), "--json"]) == 0
    ver = json.loads(capsys.readouterr().out)["verification"]
    assert ver["inputs"]["img"]["shape"] == [2, 64, 64, 3] and "defaulted" in ver["inputs"]["img"]["how"]


def test_dynamic_spatial_dims_grow_until_the_model_runs(tmp_path, rng, capsys):
    src = _dynamic(tmp_path, rng, 100)  # a 100-wide pooling window cannot run on 64 (62 after the conv)
    assert main([str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["inputs"]["img"]["shape"] == [2, 128, 128, 3]


def test_dynamic_spatial_dims_too_small_at_every_size_is_exit_2(tmp_path, rng, capsys):
    src = _dynamic(tmp_path, rng, 400)
    assert main([str(src)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(src) in err[0] and "--input" in err[0] and "320" in err[0]
    assert _listing(tmp_path) == ["dyn.keras"]


def test_dict_example_inputs_for_a_dict_input_model(rng):
    a, b = keras.Input((5,), name="a"), keras.Input((4,), name="b")
    model = keras.Model({"a": a, "b": b}, L.BatchNormalization(name="bn")(L.Dense(3, name="d")(
        L.Concatenate()([a, b]))))
    randomise(model, rng)
    feeds = {"b": rng.standard_normal((2, 4)).astype("float32"), "a": rng.standard_normal((2, 5)).astype("float32")}
    try:
        result = keras_pass.fold(model, example_inputs=feeds)
    except BnfoldError:
        return  # a clear refusal is acceptable; a crash deep in Keras is not
    assert result.report.verification.passed is True and decision(result, "bn").is_folded
    assert_same_function(model, result.model, [feeds["a"], feeds["b"]])


@pytest.mark.parametrize("conv_dtype,bn_dtype", [("float32", "float64"), ("float16", "float32")])
def test_bn_computing_in_another_dtype_than_its_producer_keeps_the_output_dtype(conv_dtype, bn_dtype, rng):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, dtype=conv_dtype, name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(dtype=bn_dtype, name="bn")(x))
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    _decided_once(result, ["bn"])
    assert decision(result, "bn").reason is Reason.DTYPE_MISMATCH
    assert [o.dtype for o in outputs(result.model, feeds)] == [o.dtype for o in outputs(model, feeds)]
    assert_same_function(model, result.model, feeds)


def test_output_names_survive_when_the_output_bn_is_folded(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, [L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp)),
                              L.Dense(2, name="d")(inp)])
    randomise(model, rng)
    result = _fold(model, rng, ["bn"])
    assert decision(result, "bn").is_folded
    assert list(result.model.output_names) == list(model.output_names)  # ['bn', 'd'] users compile against


def test_folded_subclassed_model_does_not_share_a_variable_with_the_input(rng):
    model, feeds = _with_variable(rng)
    result = _fold(model, rng, ["bn"], feeds=feeds)
    before = outputs(result.model, feeds)[0]
    model.alpha.assign(model.alpha.numpy() * 3.0)  # the user keeps training / editing the original
    assert np.array_equal(outputs(result.model, feeds)[0], before)


def test_check_text_names_the_first_diverging_layer(tmp_path, rng, capsys):
    inp = keras.Input((6, 6, 3), name="img")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", name="c")(inp))
    model = keras.Model(inp, L.Conv2D(2, 3, name="head")(L.ReLU(name="r")(x)))
    randomise(model, rng)
    src, bad = tmp_path / "a.keras", tmp_path / "b.keras"
    keras_pass.save(model, str(src))
    folded = keras_pass.fold(model).model
    k, b = folded.get_layer("c").get_weights()
    k[..., 1] *= np.float32(1.01)
    folded.get_layer("c").set_weights([k, b])
    keras_pass.save(folded, str(bad))
    assert main(["check", str(src), str(bad)]) == 1
    line = [ln for ln in capsys.readouterr().out.splitlines() if "first divergence" in ln]
    assert line and "'c'" in line[0] and "None" not in line[0], line


def test_standalone_affine_is_refused_for_keras_models(rng, tmp_path, capsys):
    """The option rewrites ONNX graphs only: asked of a Keras model it is a usage error, not ignored."""
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.ReLU(name="r")(inp)))
    randomise(model, rng)
    src = tmp_path / "m.keras"
    keras_pass.save(model, str(src))
    assert main([str(src), "--standalone", "affine"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ONNX" in err[0] and str(src) in err[0]
    assert _listing(tmp_path) == ["m.keras"]
