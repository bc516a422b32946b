"""Helpers for the Keras tests: random BN statistics far from the defaults, and numeric checks."""
from __future__ import annotations

import os

import numpy as np

from tests.conftest import random_bn

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

L = keras.layers


def randomise(model, rng: np.random.Generator, weights: bool = True) -> None:
    """Give every BN random statistics (and every other float weight random values, when asked)."""
    for layer in model._flatten_layers():
        if isinstance(layer, L.BatchNormalization):
            if layer.moving_mean is None:
                continue
            st = random_bn(rng, int(layer.moving_mean.shape[0]))
            pairs = [(layer.gamma, st["gamma"]), (layer.beta, st["beta"]),
                     (layer.moving_mean, st["mean"]), (layer.moving_variance, st["var"])]
            for var, value in pairs:
                if var is not None:
                    var.assign(value.astype(keras.backend.standardize_dtype(var.dtype)))
        elif weights and layer.weights and not isinstance(layer, keras.Model) and not layer._layers:
            layer.set_weights([rng.normal(0, 0.3, np.shape(w)).astype(np.asarray(w).dtype)
                               for w in layer.get_weights()])


def outputs(model, feeds) -> list[np.ndarray]:
    out = model(feeds[0] if len(feeds) == 1 else list(feeds), training=False)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]


def assert_same_function(original, folded, feeds, rel: float = 1e-5) -> None:
    """Independent of bnfold's verifier: outputs agree to `rel` of their magnitude."""
    a, b = outputs(original, feeds), outputs(folded, feeds)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = max(float(np.abs(x).max()), 1e-6)
        assert float(np.abs(x.astype(np.float64) - y).max()) <= rel * scale, (np.abs(x - y).max(), scale)


def bn_names(model) -> list[str]:
    return [layer.name for layer in model._flatten_layers() if isinstance(layer, L.BatchNormalization)]


def decision(result, bn: str):
    found = [d for d in result.report.decisions if d.bn == bn]
    assert len(found) == 1, [d.to_dict() for d in result.report.decisions]
    return found[0]


def weights_snapshot(model) -> list[np.ndarray]:
    return [np.array(w, copy=True) for w in model.get_weights()]


def node_counts(model) -> list[tuple[str, int, int]]:
    return [(layer.name, len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in model._flatten_layers()]
