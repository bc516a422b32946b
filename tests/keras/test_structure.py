"""Model structures: Sequential, nested and shared models, subclassed models, several inputs/outputs;
the input model is never mutated, and a wrong fold fails verification."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.keras_build import (L, assert_same_function, bn_names, decision, keras, node_counts, randomise,
                         weights_snapshot)

from bnfold.core.decisions import Reason
from bnfold.core.errors import BnfoldError
from tests.helpers.frameworks import keras_pass


def _feeds(model, rng, batch=2):
    return [rng.standard_normal((batch,) + tuple(x.shape[1:])).astype("float32") for x in model.inputs]


def _block(inp, name):
    x = L.Conv2D(4, 3, padding="same", use_bias=False, name=f"{name}_c")(inp)
    return L.ReLU(name=f"{name}_r")(L.BatchNormalization(name=f"{name}_bn")(x))


def test_sequential_model(rng):
    model = keras.Sequential([keras.Input((6, 6, 3), name="img"), L.Conv2D(4, 3, name="c"),
                              L.BatchNormalization(name="bn1"), L.ReLU(name="r"), L.Flatten(name="f"), L.Dense(5, name="d"),
                              L.BatchNormalization(name="bn2")], name="seq")
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    assert result.report.verification.passed is True
    assert isinstance(result.model, keras.Sequential) and result.model.name == "seq"
    assert [la.name for la in result.model.layers] == ["c", "r", "f", "d", "bn2"]  # bn2: the output, kept by name
    assert type(result.model.layers[-1]).__name__ == "Identity"
    assert result.model.inputs[0].name == "img"
    assert_same_function(model, result.model, feeds)


def test_nested_functional_and_sequential_models_called_twice(rng):
    ii = keras.Input((6, 6, 3))
    inner = keras.Model(ii, _block(ii, "in"), name="inner")
    seq = keras.Sequential([keras.Input((6, 6, 4)), L.DepthwiseConv2D(3, padding="same", name="dw"),
                            L.BatchNormalization(name="sbn")], name="seq")
    inp = keras.Input((6, 6, 3), name="x")
    a, b = inner(inp), inner(L.ReLU()(inp))  # the nested model is shared: its fold is the same for both
    out = L.BatchNormalization(name="outer_bn")(L.Conv2D(2, 1, name="head")(seq(L.Add()([a, b]))))
    model = keras.Model(inp, out, name="outer")
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    assert result.report.verification.passed is True
    folded = {d.bn: d.producer for d in result.report.folded}
    assert folded == {"inner/in_bn": "inner/in_c", "seq/sbn": "seq/dw", "outer_bn": "head"}
    assert bn_names(result.model) == []
    assert len(result.model.get_layer("inner")._inbound_nodes) == 2
    assert isinstance(result.model.get_layer("seq"), keras.Sequential)
    assert_same_function(model, result.model, feeds)


def test_shared_layer_stays_shared_and_folds_around_it(rng):
    inp = keras.Input((6, 6, 3))
    shared = L.Conv2D(3, 1, name="shared")
    x = L.BatchNormalization(name="bn")(L.Conv2D(3, 3, padding="same", name="c")(shared(inp)))
    model = keras.Model(inp, shared(x))
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    assert decision(result, "bn").is_folded and result.report.verification.passed is True
    new_shared = result.model.get_layer("shared")
    assert len(new_shared._inbound_nodes) == 2 and len(new_shared.weights) == 2
    assert_same_function(model, result.model, feeds)


def test_several_inputs_and_dict_outputs(rng):
    a, b = keras.Input((5,), name="a"), keras.Input((6, 6, 2), name="b")
    ya = L.BatchNormalization(name="bn_a")(L.Dense(4, name="da")(a))
    yb = L.GlobalAveragePooling2D()(_block(b, "b"))
    model = keras.Model({"a": a, "b": b}, {"left": ya, "right": L.Concatenate()([ya, yb])})
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    ver = result.report.verification
    assert ver.passed is True and set(ver.providers["keras-cpu"].outputs) == {"left", "right"}
    assert len(result.report.folded) == 2
    assert [x.name for x in result.model.inputs] == ["a", "b"]


def test_input_model_is_not_mutated(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, L.Dense(2)(_block(_block(inp, "one"), "two")))
    randomise(model, rng)
    before_w, before_nodes, before_layers = weights_snapshot(model), node_counts(model), list(model.layers)
    result = keras_pass.fold(model)
    assert len(result.report.folded) == 2 and result.model is not model
    assert all(np.array_equal(x, y) for x, y in zip(before_w, model.get_weights()))
    assert node_counts(model) == before_nodes and list(model.layers) == before_layers
    assert not set(map(id, result.model.weights)) & set(map(id, model.weights))


class _Traceable(keras.Model):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.c = L.Conv2D(4, 3, padding="same", use_bias=False, name="c")
        self.bn = L.BatchNormalization(name="bn")
        self.d = L.Dense(3, name="d")

    def call(self, x, training=None):
        x = self.bn(self.c(x), training=training)
        return self.d(keras.ops.mean(keras.ops.relu(x), axis=(1, 2)))


class _Untraceable(_Traceable):
    def call(self, x, training=None):
        x = self.bn(self.c(x), training=training)
        if keras.ops.convert_to_numpy(keras.ops.sum(x)) > 0:  # needs real values: no symbolic graph
            x = -x
        return self.d(keras.ops.mean(x, axis=(1, 2)))


def test_subclassed_model_is_traced_and_folded(rng):
    model = _Traceable(name="net")
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    model(feeds[0])
    randomise(model, rng)
    before_w, before_nodes = weights_snapshot(model), node_counts(model)
    result = keras_pass.fold(model, example_inputs=feeds)
    d = decision(result, "bn")
    assert d.is_folded and d.producer == "c" and result.report.verification.passed is True
    assert bn_names(result.model) == [] and result.model.name == "net"
    assert node_counts(model) == before_nodes
    assert all(np.array_equal(x, y) for x, y in zip(before_w, model.get_weights()))
    assert_same_function(model, result.model, feeds)


def test_untraceable_subclassed_model_reports_every_bn(rng):
    model = _Untraceable(name="net")
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    model(feeds[0])
    randomise(model, rng)
    before_nodes = node_counts(model)
    result = keras_pass.fold(model, example_inputs=feeds)
    d = decision(result, "bn")
    assert d.reason is Reason.UNSUPPORTED_PRODUCER and "traced" in d.detail
    assert result.report.verification.passed is True and node_counts(model) == before_nodes
    assert_same_function(model, result.model, feeds, rel=0.0)


def test_wrong_fold_fails_verification(rng):
    inp = keras.Input((8, 8, 3))
    x = _block(_block(inp, "one"), "two")
    model = keras.Model(inp, L.Conv2D(4, 3, name="head")(x))
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    assert result.report.verification.passed is True
    kernel_, bias = result.model.get_layer("two_c").get_weights()
    kernel_[..., 2] *= np.float32(1.002)  # one output channel off by 0.2%
    result.model.get_layer("two_c").set_weights([kernel_, bias])
    ver = keras_pass.check(model, result.model, example_inputs=feeds)
    assert ver.passed is False and not ver
    out = ver.providers["keras-cpu"].outputs["head"]
    assert out["max_abs"] > out["atol"] > 0
    assert ver.first_divergence["layer"] == "two_c"  # the layer a user must look at


class _Block(keras.layers.Layer):
    """A custom layer holding a Conv and a BN: its call() is code bnfold does not rewrite."""

    def __init__(self, filters=3, **kw):
        super().__init__(**kw)
        self.filters = filters
        self.conv = L.Conv2D(filters, 3, padding="same", name="inner_c")
        self.bn = L.BatchNormalization(name="inner_bn")

    def call(self, x, training=None):
        return self.bn(self.conv(x), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class _NoConfig(_Block):
    def __init__(self, factor, **kw):  # a required argument its config does not carry
        super().__init__(**kw)
        self.factor = factor


def test_custom_layer_with_a_bn_inside_is_reported_and_copied(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, _Block(name="blk")(_block(inp, "a")))
    feeds = _feeds(model, rng)
    model(feeds[0])
    randomise(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds)
    assert decision(result, "a_bn").is_folded
    d = decision(result, "blk/inner_bn")
    assert d.reason is Reason.UNSUPPORTED_PRODUCER and "custom layer" in d.detail
    assert result.report.verification.passed is True
    assert result.model.get_layer("blk") is not model.get_layer("blk")
    assert_same_function(model, result.model, feeds)


def test_layer_that_cannot_be_recreated_is_a_clear_error(rng):
    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, _NoConfig(2.0, name="odd")(_block(inp, "a")))
    randomise(model, rng)
    with pytest.raises(BnfoldError, match="'odd'.*get_config"):
        keras_pass.fold(model, verify=False)


def test_gpu_is_reported_as_run_only_when_tensorflow_sees_one(rng):
    from bnfold.keras import verify as keras_runner

    inp = keras.Input((6, 6, 3))
    model = keras.Model(inp, _block(inp, "a"))
    randomise(model, rng)
    ver = keras_pass.fold(model).report.verification
    gpu = ver.providers["keras-gpu"]
    assert gpu.ran is keras_runner.gpu_available()
    assert gpu.ran or "GPU" in gpu.why
    assert ver.passed is True and ver.providers["keras-cpu"].ran
    with pytest.raises(BnfoldError, match="tpu"):
        keras_pass.fold(model, providers=["tpu"])


@pytest.mark.cuda
def test_gpu_verification_passes_a_fold_and_fails_a_planted_error(rng):
    from bnfold.keras import verify as keras_runner

    if not keras_runner.gpu_available():
        pytest.skip("TensorFlow sees no GPU")
    inp = keras.Input((16, 16, 3))
    model = keras.Model(inp, L.Conv2D(8, 3, name="head")(_block(_block(inp, "one"), "two")))
    randomise(model, rng)
    feeds = _feeds(model, rng)
    result = keras_pass.fold(model, example_inputs=feeds, providers=["gpu"])
    gpu = result.report.verification.providers["keras-gpu"]
    assert gpu.ran and gpu.passed, gpu.to_dict()
    kernel_, bias = result.model.get_layer("two_c").get_weights()
    kernel_[..., 1] *= np.float32(1.01)  # well above TF32's rounding
    result.model.get_layer("two_c").set_weights([kernel_, bias])
    assert keras_pass.check(model, result.model, example_inputs=feeds, providers=["gpu"]).passed is False


def test_unbuilt_sequential_is_a_clear_error_and_built_one_folds(rng):
    model = keras.Sequential([L.Dense(3, name="d"), L.BatchNormalization(name="bn")], name="lazy")
    with pytest.raises(BnfoldError, match="not built"):
        keras_pass.fold(model, verify=False)
    model.build((None, 4))
    randomise(model, rng)
    result = keras_pass.fold(model, example_inputs=[rng.standard_normal((2, 4)).astype("float32")])
    assert decision(result, "bn").is_folded and result.report.verification.passed is True
