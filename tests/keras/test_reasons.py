"""Each reason a Keras BN is left alone, provoked; the returned model still computes the same function."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, bn_names, decision, keras, randomise

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import keras_pass


def _fold(model, rng, rel=1e-5):
    feeds = [rng.standard_normal((2,) + tuple(x.shape[1:])).astype("float32") for x in model.inputs]
    result = keras_pass.fold(model, example_inputs=feeds)
    assert result.report.verification.passed is True, result.report.verification.to_dict()
    assert_same_function(model, result.model, feeds, rel)
    assert sorted(d.bn for d in result.report.decisions) == sorted(bn_names(model))
    return result


def _conv_bn(inp, **conv):
    return L.BatchNormalization(name="bn")(L.Conv2D(4, 3, padding="same", name="c", **conv)(inp))


def test_nonlinear_activation_inside_the_producer(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, _conv_bn(inp, activation="relu"))
    randomise(model, rng)
    d = decision(_fold(model, rng), "bn")
    assert d.reason is Reason.NONLINEAR_PRODUCER and "relu" in d.detail


def test_producer_output_feeding_another_layer(rng):
    inp = keras.Input((6, 6, 3))
    c = L.Conv2D(4, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, L.Add()([L.BatchNormalization(name="bn")(c), L.ReLU(name="side")(c)]))
    randomise(model, rng)
    d = decision(_fold(model, rng), "bn")
    assert d.reason is Reason.PRODUCER_FANOUT and "side" in d.detail


def test_producer_output_that_is_a_model_output(rng):
    inp = keras.Input((6, 6, 3))
    c = L.Conv2D(4, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, [L.BatchNormalization(name="bn")(c), c])
    randomise(model, rng)
    assert decision(_fold(model, rng), "bn").reason is Reason.INTERMEDIATE_IS_OUTPUT


def test_shared_producer_layer(rng):
    inp = keras.Input((6, 6, 3))
    conv = L.Conv2D(3, 3, padding="same", name="shared")
    a = L.BatchNormalization(name="bn_a")(conv(inp))
    b = L.BatchNormalization(name="bn_b")(conv(L.ReLU()(inp)))
    model = keras.Model(inp, L.Add()([a, b]))
    randomise(model, rng)
    result = _fold(model, rng)
    for bn in ("bn_a", "bn_b"):
        assert decision(result, bn).reason is Reason.SHARED_PRODUCER
    assert len(result.model.get_layer("shared")._inbound_nodes) == 2  # still one layer, called twice


def test_shared_batchnorm_layer(rng):
    inp = keras.Input((6, 6, 3))
    bn = L.BatchNormalization(name="bn")
    a = bn(L.Conv2D(3, 3, padding="same", name="c1")(inp))
    b = bn(L.Conv2D(3, 3, padding="same", name="c2")(inp))
    model = keras.Model(inp, L.Add()([a, b]))
    randomise(model, rng)
    d = decision(_fold(model, rng), "bn")
    assert d.reason is Reason.SHARED_PRODUCER and "2 places" in d.detail


@pytest.mark.parametrize("mode", ["renorm", "synchronized"])
def test_bn_modes_other_than_plain(mode, rng):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn", **{mode: True})(x))
    randomise(model, rng)
    d = decision(_fold(model, rng), "bn")
    assert d.reason is Reason.UNSUPPORTED_BN_MODE and mode in d.detail


def test_bn_called_in_training_mode(rng):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn")(x, training=True))
    randomise(model, rng)
    result = keras_pass.fold(model, example_inputs=[rng.standard_normal((4, 6, 6, 3)).astype("float32")])
    assert decision(result, "bn").reason is Reason.TRAINING_MODE
    assert bn_names(result.model) == ["bn"]


@pytest.mark.parametrize("bad", ["nan", "negative_variance"])
def test_non_finite_statistics(bad, rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, _conv_bn(inp))
    randomise(model, rng)
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    if bad == "nan":
        mean[1] = np.nan
    else:
        var[2] = -1.0
    bn.set_weights([gamma, beta, mean, var])
    result = keras_pass.fold(model, verify=False)
    assert decision(result, "bn").reason is Reason.NON_FINITE_PARAM
    assert bn_names(result.model) == ["bn"]


def test_bn_on_a_model_input_with_nothing_to_fold_into(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, L.ReLU()(L.BatchNormalization(name="bn")(inp)))
    randomise(model, rng)
    assert decision(_fold(model, rng), "bn").reason is Reason.NO_PRODUCER


def test_bn_after_an_add(rng):
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(3, 3, padding="same", name="c")(inp)
    model = keras.Model(inp, L.ReLU()(L.BatchNormalization(name="bn")(L.Add(name="add")([x, inp]))))
    randomise(model, rng)
    d = decision(_fold(model, rng), "bn")
    assert d.reason is Reason.UNSUPPORTED_PRODUCER and "add" in d.detail


def test_float16_overflow_is_refused(rng):
    inp = keras.Input((6, 6, 3), dtype="float16")
    x = L.Conv2D(4, 3, padding="same", name="c", dtype="float16")(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn", dtype="float16")(x))
    randomise(model, rng)
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    gamma[0] = 60000.0  # s = 6e4 / sqrt(var + eps) pushes the folded kernel past float16's 65504
    bn.set_weights([gamma, beta, mean, var])
    model.get_layer("c").set_weights([np.full((3, 3, 3, 4), 2.0, np.float16), np.zeros(4, np.float16)])
    result = keras_pass.fold(model, verify=False)
    d = decision(result, "bn")
    assert d.reason is Reason.DTYPE_OVERFLOW and "float16" in d.detail


def test_mixed_float16_checks_the_compute_dtype(rng):
    policy = keras.DTypePolicy("mixed_float16")
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="c", dtype=policy)(inp)
    model = keras.Model(inp, L.BatchNormalization(name="bn", dtype=policy)(x))
    randomise(model, rng)
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    gamma[3] = 1e7  # fits the float32 variables, not the float16 the conv computes in
    bn.set_weights([gamma, beta, mean, var])
    assert model.get_layer("c").get_weights()[0].dtype == np.float32
    d = decision(keras_pass.fold(model, verify=False), "bn")
    assert d.reason is Reason.DTYPE_OVERFLOW and "float16" in d.detail


def test_mixed_float16_folds_within_float16_noise(rng):
    policy = keras.DTypePolicy("mixed_float16")
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, L.Activation("linear", dtype="float32")(_conv_bn(inp, dtype=policy)))
    model.get_layer("bn").dtype_policy = policy
    randomise(model, rng)
    result = _fold(model, rng, rel=4e-3)
    assert decision(result, "bn").is_folded
    assert result.model.get_layer("c").dtype_policy.name == "mixed_float16"
