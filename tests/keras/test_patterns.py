"""Every Keras producer kind folds (after, and before where exact), with each BN variant and layout."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, bn_names, decision, keras, randomise

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import keras_pass

PRODUCERS = {
    "Conv1D": ((9, 3), lambda: L.Conv1D(4, 3, padding="same")),
    "Conv2D": ((7, 7, 3), lambda: L.Conv2D(4, 3, strides=2)),
    "Conv2D_groups": ((7, 7, 4), lambda: L.Conv2D(6, 3, groups=2, padding="same")),
    "Conv3D": ((5, 5, 5, 2), lambda: L.Conv3D(3, 3)),
    "Conv1DTranspose": ((6, 3), lambda: L.Conv1DTranspose(4, 3, strides=2)),
    "Conv2DTranspose": ((5, 5, 3), lambda: L.Conv2DTranspose(4, 3, strides=2, padding="same")),
    "Conv3DTranspose": ((3, 3, 3, 2), lambda: L.Conv3DTranspose(3, 2)),
    "DepthwiseConv1D": ((9, 3), lambda: L.DepthwiseConv1D(3, depth_multiplier=2)),
    "DepthwiseConv2D": ((7, 7, 3), lambda: L.DepthwiseConv2D(3, depth_multiplier=3, padding="same")),
    "SeparableConv1D": ((9, 3), lambda: L.SeparableConv1D(5, 3, depth_multiplier=2)),
    "SeparableConv2D": ((7, 7, 3), lambda: L.SeparableConv2D(5, 3, padding="same")),
    "Dense": ((6,), lambda: L.Dense(5)),
    "Dense_rank3": ((4, 6), lambda: L.Dense(5)),
}


def _fold_checked(model, rng, **kw):
    """Fold with verification on and check the result independently as well."""
    feeds = [rng.standard_normal((2,) + tuple(x.shape[1:])).astype("float32") for x in model.inputs]
    result = keras_pass.fold(model, example_inputs=feeds, **kw)
    assert result.report.verification.passed is True, result.report.verification.to_dict()
    assert_same_function(model, result.model, feeds)
    # every fold is proven on its own (its float64 replay ran: not merely "not run"), within its bound
    for d in result.report.folded:
        assert d.proof.get("passed") is True and d.proof["ratio"] <= 1.0, d.to_dict()
    return result


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("kind", sorted(PRODUCERS))
def test_producer_then_bn_folds(kind, use_bias, rng):
    shape, make = PRODUCERS[kind]
    layer = make()
    layer = type(layer).from_config({**layer.get_config(), "use_bias": use_bias, "name": "prod"})
    inp = keras.Input(shape)
    model = keras.Model(inp, L.ReLU()(L.BatchNormalization(name="bn")(layer(inp))))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    d = decision(result, "bn")
    assert d.is_folded and d.producer == "prod" and d.direction == "after"
    assert bn_names(result.model) == []
    new = result.model.get_layer("prod")
    assert new.use_bias is True and type(new) is type(layer)


@pytest.mark.parametrize("center,scale", [(False, True), (True, False), (False, False)])
def test_bn_without_beta_or_gamma(center, scale, rng):
    inp = keras.Input((7, 7, 3))
    x = L.Conv2D(4, 3, use_bias=False, name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(center=center, scale=scale, epsilon=0.01, name="bn")(x))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    assert decision(result, "bn").is_folded


@pytest.mark.parametrize("kind", ["Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D",
                                  "SeparableConv2D"])
def test_channels_first_folds_on_axis_1(kind, rng):
    shapes = {"Conv1D": (3, 9), "Conv3D": (2, 5, 5, 5)}
    shape = shapes.get(kind, (3, 7, 7))
    cls = getattr(L, kind)
    layer = cls(4, 3, data_format="channels_first", name="c") if "Depthwise" not in kind else \
        cls(3, depth_multiplier=2, data_format="channels_first", name="c")
    inp = keras.Input(shape)
    model = keras.Model(inp, L.BatchNormalization(axis=1, name="bn")(layer(inp)))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    assert decision(result, "bn").is_folded


def test_channels_first_conv_with_last_axis_bn_is_axis_mismatch(rng):
    inp = keras.Input((3, 6, 6))
    x = L.Conv2D(4, 3, padding="same", data_format="channels_first", name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(axis=-1, name="bn")(x))  # normalises width, not channels
    randomise(model, rng)
    result = _fold_checked(model, rng)
    d = decision(result, "bn")
    assert d.reason is Reason.AXIS_MISMATCH and bn_names(result.model) == ["bn"]


def test_dense_on_sequence_with_bn_on_time_axis_is_axis_mismatch(rng):
    inp = keras.Input((5, 5))
    model = keras.Model(inp, L.BatchNormalization(axis=1, name="bn")(L.Dense(5, name="d")(inp)))
    randomise(model, rng)
    assert decision(_fold_checked(model, rng), "bn").reason is Reason.AXIS_MISMATCH


@pytest.mark.parametrize("consumer", ["dense", "conv_valid", "conv_valid_channels_first"])
def test_bn_before_dense_or_valid_conv_folds_backward(consumer, rng):
    if consumer == "dense":
        inp = keras.Input((6,))
        x, layer, axis = inp, L.Dense(4, use_bias=False, name="k"), -1
    else:
        first = consumer.endswith("channels_first")
        inp = keras.Input((3, 8, 8) if first else (8, 8, 3))
        x = inp
        layer = L.Conv2D(4, 3, strides=2, padding="valid", name="k",
                         data_format="channels_first" if first else "channels_last")
        axis = 1 if first else -1
    model = keras.Model(inp, layer(L.BatchNormalization(axis=axis, name="bn")(x)))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    d = decision(result, "bn")
    assert d.is_folded and d.direction == "before" and d.producer == "k"
    assert result.model.get_layer("k").use_bias


def test_bn_before_same_padded_conv_is_not_folded(rng):
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, L.Conv2D(4, 3, padding="same", name="k")(L.BatchNormalization(name="bn")(inp)))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    assert decision(result, "bn").reason is Reason.PADDING_BREAKS_BACKWARD_FOLD


def test_bn_chain_folds_both_into_the_conv(rng):
    inp = keras.Input((7, 7, 3))
    x = L.Conv2D(4, 3, name="c")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    model = keras.Model(inp, L.BatchNormalization(name="bn2", epsilon=0.1)(x))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    assert decision(result, "bn1").producer == "c" and decision(result, "bn2").producer == "c"
    assert bn_names(result.model) == []


def test_bn_on_both_sides_of_a_dense(rng):
    inp = keras.Input((6,))
    x = L.BatchNormalization(name="pre")(inp)
    x = L.Dense(4, name="d")(x)
    model = keras.Model(inp, L.BatchNormalization(name="post")(x))
    randomise(model, rng)
    result = _fold_checked(model, rng)
    assert decision(result, "pre").direction == "before" and decision(result, "post").direction == "after"
    # the output BN's name survives as an Identity: output names are what users compile and export by
    assert [type(la).__name__ for la in result.model.layers] == ["InputLayer", "Dense", "Identity"]
    assert list(result.model.output_names) == ["post"]


def test_fold_is_idempotent(rng):
    inp = keras.Input((7, 7, 3))
    x = L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c")(inp))
    model = keras.Model(inp, L.BatchNormalization(name="bn2")(L.Add()([x, x])))
    randomise(model, rng)
    once = _fold_checked(model, rng)
    twice = _fold_checked(once.model, rng)
    assert [d.bn for d in once.report.folded] == ["bn1"]
    assert twice.report.folded == [] and [d.bn for d in twice.report.skipped] == ["bn2"]
    assert np.array_equal(once.model.get_layer("c").get_weights()[0], twice.model.get_layer("c").get_weights()[0])
