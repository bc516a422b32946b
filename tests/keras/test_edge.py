"""Adversarial cases for the Keras 3 path: layouts the pattern tests do not reach, structures that
share layers across graph levels, dtype and naming side effects, and command-line failure modes.

Every fold is judged twice: by bnfold's own verifier and by an independent Keras run of the folded
model against the unfolded one (inference mode, random BN statistics far from the defaults)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, bn_names, decision, keras, outputs, randomise

from bnfold.cli import main
from bnfold.core.decisions import Reason
from tests.helpers.frameworks import keras_pass


def _feeds(model, rng, batch=2):
    return [rng.standard_normal((batch,) + tuple(x.shape[1:])).astype(x.dtype) for x in model.inputs]


def _decided_once(result, expected):
    """Every BN of the model appears exactly once in the report, and no other name does."""
    names = [d.bn for d in result.report.decisions]
    assert sorted(names) == sorted(expected), names
    assert len(names) == len(set(names)), names


def _fold(model, rng, expected_bns, feeds=None, rel=1e-5, **kw):
    feeds = feeds if feeds is not None else _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds, **kw)
    _decided_once(result, expected_bns)
    assert result.report.verification.passed is True, result.report.verification.to_dict()
    assert_same_function(model, result.model, feeds, rel=rel)
    return result


def _listing(path):
    return sorted(p.name for p in path.iterdir())


# --- layouts the pattern tests do not cover ------------------------------------------------------

AFTER = {
    "Conv3DTranspose_cf_stride_outpad": ((2, 3, 3, 3), 1, lambda: L.Conv3DTranspose(
        3, 2, strides=2, output_padding=1, data_format="channels_first", name="p")),
    "Conv1DTranspose_dilated": ((6, 3), -1, lambda: L.Conv1DTranspose(4, 3, dilation_rate=2, name="p")),
    "Conv2DTranspose_stride_outpad_same": ((4, 4, 3), -1, lambda: L.Conv2DTranspose(
        5, 3, strides=2, output_padding=1, padding="same", use_bias=False, name="p")),
    "SeparableConv2D_cf_dm2_nobias": ((3, 8, 8), 1, lambda: L.SeparableConv2D(
        5, 3, depth_multiplier=2, data_format="channels_first", use_bias=False, name="p")),
    "SeparableConv1D_cf_dm2_dilated": ((3, 9), 1, lambda: L.SeparableConv1D(
        4, 3, depth_multiplier=2, data_format="channels_first", dilation_rate=2, name="p")),
    "DepthwiseConv1D_cf_dm2": ((3, 9), 1, lambda: L.DepthwiseConv1D(
        3, depth_multiplier=2, data_format="channels_first", name="p")),
    "DepthwiseConv2D_dm3_strided_nobias": ((7, 7, 2), -1, lambda: L.DepthwiseConv2D(
        3, strides=2, depth_multiplier=3, use_bias=False, name="p")),
    "Conv1D_causal_dilated": ((9, 3), -1, lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2, name="p")),
    "Dense_rank4": ((3, 3, 5), -1, lambda: L.Dense(4, name="p")),
    "Conv3D_grouped_cf": ((4, 4, 4, 4), 1, lambda: L.Conv3D(6, 2, groups=2, data_format="channels_first",
                                                            name="p")),
    "Conv2D_groups4_dilated_strided": ((9, 9, 8), -1, lambda: L.Conv2D(
        4, 3, groups=4, dilation_rate=2, padding="same", name="p")),
}


@pytest.mark.parametrize("kind", sorted(AFTER))
def test_producer_layout_variants_fold_after(kind, rng):
    shape, axis, make = AFTER[kind]
    inp = keras.Input(shape)
    model = keras.Model(inp, L.BatchNormalization(axis=axis, epsilon=0.5, name="bn")(make()(inp)))
    randomise(model, rng)
    result = _fold(model, rng, ["bn"])
    d = decision(result, "bn")
    assert d.is_folded and d.producer == "p" and d.direction == "after"
    assert bn_names(result.model) == [] and result.model.get_layer("p").use_bias


BEFORE = {
    "Conv2D_groups2": ((8, 8, 4), -1, lambda: L.Conv2D(6, 3, groups=2, name="k")),
    "Conv2D_groups4_dilated": ((8, 8, 4), -1, lambda: L.Conv2D(4, 3, groups=4, dilation_rate=2, name="k")),
    "Conv3D_grouped_cf": ((4, 4, 4, 4), 1, lambda: L.Conv3D(6, 2, groups=2, data_format="channels_first",
                                                            name="k")),
    "Dense_rank4": ((3, 3, 5), -1, lambda: L.Dense(4, use_bias=False, name="k")),
}


@pytest.mark.parametrize("kind", sorted(BEFORE))
def test_grouped_and_high_rank_consumers_fold_before(kind, rng):
    shape, axis, make = BEFORE[kind]
    inp = keras.Input(shape)
    model = keras.Model(inp, make()(L.BatchNormalization(axis=axis, name="bn")(inp)))
    randomise(model, rng)
    d = decision(_fold(model, rng, ["bn"]), "bn")
    assert d.is_folded and d.producer == "k" and d.direction == "before"


def test_bn_before_a_causal_conv_is_refused(rng):
    inp = keras.Input((9, 3))
    model = keras.Model(inp, L.Conv1D(4, 3, padding="causal", name="k")(L.BatchNormalization(name="bn")(inp)))
    randomise(model, rng)
    result = _fold(model, rng, ["bn"], rel=0.0)
    assert decision(result, "bn").reason is Reason.PADDING_BREAKS_BACKWARD_FOLD


def test_negative_variance_with_an_epsilon_that_makes_it_positive_folds(rng):
    inp = keras.Input((6, 6, 3))
    bn = L.BatchNormalization(epsilon=2.0, name="bn")
    model = keras.Model(inp, bn(L.Conv2D(4, 3, name="c")(inp)))
    randomise(model, rng)
    g, b, m, v = bn.get_weights()
    bn.set_weights([g, b, m, -0.5 * v])  # var + eps stays within (0.5, 1.75): Keras computes it fine
    assert decision(_fold(model, rng, ["bn"]), "bn").is_folded


def test_bn_chain_with_a_skipped_middle_bn_does_not_jump_over_it(rng):
    inp = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c")(inp))
    x = L.BatchNormalization(renorm=True, name="bn2")(x)
    model = keras.Model(inp, L.BatchNormalization(name="bn3")(x))
    randomise(model, rng)
    result = _fold(model, rng, ["bn1", "bn2", "bn3"])
    assert decision(result, "bn1").producer == "c"
    assert decision(result, "bn2").reason is Reason.UNSUPPORTED_BN_MODE
    assert not decision(result, "bn3").is_folded and bn_names(result.model) == ["bn2", "bn3"]


def test_float64_model_folds_to_float64_precision(rng):
    inp = keras.Input((6, 6, 3), dtype="float64")
    x = L.Conv2D(4, 3, dtype="float64", name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(dtype="float64", name="bn")(x))
    randomise(model, rng)
    feeds = [rng.standard_normal((2, 6, 6, 3))]
    result = _fold(model, rng, ["bn"], feeds=feeds, rel=1e-12)
    assert outputs(result.model, feeds)[0].dtype == np.float64


# --- structures ----------------------------------------------------------------------------------

def test_sequential_nested_in_sequential_without_its_own_input(rng):
    inner = keras.Sequential([L.Dense(3, name="d"), L.BatchNormalization(name="bn")], name="inner")
    model = keras.Sequential([keras.Input((6,)), inner, L.Dense(2, name="o")])
    randomise(model, rng)
    result = _fold(model, rng, ["inner/bn"])
    assert decision(result, "inner/bn").producer == "inner/d"


def test_time_distributed_layers_are_reported_and_left_alone(rng):
    inp = keras.Input((2, 5, 5, 3))
    x = L.TimeDistributed(L.Conv2D(4, 3), name="td")(inp)
    x = L.BatchNormalization(name="bn")(x)
    model = keras.Model(inp, L.TimeDistributed(L.BatchNormalization(name="tbn"), name="tdbn")(x))
    randomise(model, rng)
    result = _fold(model, rng, ["bn", "tdbn/tbn"], rel=0.0)
    assert all(d.reason is Reason.UNSUPPORTED_PRODUCER for d in result.report.skipped)


def test_frozen_bn_called_in_training_mode_gets_one_decision(rng):
    # Keras runs a trainable=False BN on its moving statistics even when called with training=True.
    inp = keras.Input((6, 6, 3))
    bn = L.BatchNormalization(name="bn")
    bn.trainable = False
    model = keras.Model(inp, bn(L.Conv2D(4, 3, name="c")(inp), training=True))
    randomise(model, rng)
    d = decision(_fold(model, rng, ["bn"]), "bn")
    assert d.producer == "c" if d.is_folded else d.reason is Reason.TRAINING_MODE


def test_masked_sequence_gets_one_decision(rng):
    inp = keras.Input((5,), dtype="int32")
    x = L.Embedding(10, 4, mask_zero=True, name="e")(inp)
    x = L.BatchNormalization(name="bn")(L.Dense(4, name="d")(x))
    model = keras.Model(inp, L.GlobalAveragePooling1D()(x))
    randomise(model, rng)
    feeds = [np.array([[1, 2, 0, 0, 3], [4, 0, 5, 6, 7]], "int32")]
    _fold(model, rng, ["bn"], feeds=feeds)


def test_subclassed_model_inside_a_functional_one(rng):
    class Sub(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.c = L.Conv2D(4, 3, padding="same", name="c")
            self.bn = L.BatchNormalization(name="bn")

        def call(self, x, training=None):
            return self.bn(self.c(x), training=training)

    inp = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="obn")(L.Conv2D(3, 1, name="oc")(inp))
    model = keras.Model(inp, Sub(name="sub")(x))
    randomise(model, rng)
    result = _fold(model, rng, ["obn", "sub/bn"])
    assert decision(result, "obn").producer == "oc"
    assert decision(result, "sub/bn").reason is Reason.UNSUPPORTED_PRODUCER


def test_normalization_and_rescaling_before_folds_and_exports(tmp_path, rng):
    import onnxruntime as ort

    inp = keras.Input((6, 6, 3))
    x = L.Normalization(mean=[0.5, 1.0, -1.0], variance=[2.0, 0.5, 1.0], name="norm")(inp)
    x = L.BatchNormalization(name="pre")(L.Rescaling(2.0, offset=-0.3, name="resc")(x))
    model = keras.Model(inp, L.BatchNormalization(name="post")(L.Conv2D(4, 3, name="c")(x)))
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = _fold(model, rng, ["pre", "post"], feeds=feeds)
    assert {d.bn: d.direction for d in result.report.folded} == {"pre": "before", "post": "after"}
    out = tmp_path / "n.onnx"
    exp = keras_pass.export_onnx(model, str(out), example_inputs=feeds)
    assert exp.report.verification.passed is True
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: feeds[0]})[0]
    ref = outputs(model, feeds)[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


class _WithVariable(keras.Model):
    """A subclassed model whose call() reads a variable of its own, not one of a sub-layer."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.c = L.Conv2D(4, 3, name="c")
        self.bn = L.BatchNormalization(name="bn")

    def build(self, shape):
        self.alpha = self.add_weight(shape=(4,), initializer="ones", name="alpha")
        super().build(shape)

    def call(self, x, training=None):
        return self.bn(self.c(x), training=training) * self.alpha


def _with_variable(rng):
    model = _WithVariable(name="wv")
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    model(feeds[0])
    randomise(model, rng)
    model.alpha.assign(rng.normal(size=4).astype("float32"))
    return model, feeds


def test_subclassed_model_with_its_own_variable_folds_and_reloads(tmp_path, rng):
    model, feeds = _with_variable(rng)
    result = _fold(model, rng, ["bn"], feeds=feeds)
    path = tmp_path / "wv.keras"
    keras_pass.save(result.model, str(path))
    assert_same_function(model, keras_pass.load(str(path)), feeds)


# --- command line --------------------------------------------------------------------------------

def _save_conv_bn(path, rng, shape=(6, 6, 3), policy=None):
    if policy:
        keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input(shape, name="img")
        model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp)))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    randomise(model, rng)
    keras_pass.save(model, str(path))
    return model


def test_wrong_output_extensions_exit_2_and_write_nothing(tmp_path, rng, capsys):
    src = tmp_path / "m.keras"
    _save_conv_bn(src, rng)
    assert main([str(src), "-o", str(tmp_path / "m.onnx")]) == 2
    assert main([str(src), "-o", str(tmp_path / "m.pt")]) == 2
    assert main(["export", str(src), "--to", "onnx", "-o", str(tmp_path / "m2.keras")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("bnfold: error:") for line in err)
    assert _listing(tmp_path) == ["m.keras"]


def test_mixed_precision_export_is_refused_but_fold_works(tmp_path, rng, capsys):
    src = tmp_path / "mixed.keras"
    model = _save_conv_bn(src, rng, policy="mixed_float16")
    assert main(["export", str(src), "--to", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "float16" in err and len(err.strip().splitlines()) == 1
    assert _listing(tmp_path) == ["mixed.keras"]
    assert main([str(src)]) == 0
    folded = keras_pass.load(str(tmp_path / "mixed.folded.keras"))
    assert bn_names(folded) == [] and folded.get_layer("c").compute_dtype == "float16"
    assert_same_function(model, folded, _feeds(model, rng), rel=2e-2)  # float16 compute


def test_export_of_a_lambda_model_needs_trust(tmp_path, rng, capsys):
    inp = keras.Input((6, 6, 3))
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp))
    model = keras.Model(inp, L.Lambda(lambda t: t * 0.5, name="half")(x))
    randomise(model, rng)
    src = tmp_path / "lam.keras"
    keras_pass.save(model, str(src))
    assert main(["export", str(src), "--to", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "--trust" in err and len(err.strip().splitlines()) == 1
    assert _listing(tmp_path) == ["lam.keras"]


def test_dynamic_spatial_dims_with_an_input_shape(tmp_path, rng, capsys):
    inp = keras.Input((None, None, 3), name="img")
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp)))
    randomise(model, rng)
    src = tmp_path / "dyn.keras"
    keras_pass.save(model, str(src))
    assert main([str(src), "--input", "img:2x8x8x3"]) == 0
    assert_same_function(model, keras_pass.load(str(tmp_path / "dyn.folded.keras")),
                         [rng.standard_normal((1, 11, 7, 3)).astype("float32")])

