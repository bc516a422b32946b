"""keras.applications architectures with random BN statistics: every BN that follows a conv/dense is
folded, the outputs match within float noise, and the folded model saves and reloads."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, keras, outputs, randomise

from tests.helpers.frameworks import keras_pass

# Small inputs keep these fast on two cores; each is at least the architecture's minimum size.
ARCHS = {
    "MobileNetV2": (64, 64, 3),
    "MobileNetV3Small": (64, 64, 3),
    "ResNet50": (64, 64, 3),
    "ResNet50V2": (64, 64, 3),
    "Xception": (71, 71, 3),
    "InceptionV3": (75, 75, 3),
    "EfficientNetB0": (64, 64, 3),
    "DenseNet121": (64, 64, 3),
    "NASNetMobile": (64, 64, 3),
}
LINEAR_PRODUCERS = (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Dense)


def _expected_foldable(model) -> set[str]:
    """BNs whose input is computed by a conv/dense without activation (what must fold), found directly."""
    out = set()
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            prod = layer._inbound_nodes[0].input_tensors[0]._keras_history[0]
            if isinstance(prod, LINEAR_PRODUCERS) and prod.get_config().get("activation") in (None, "linear"):
                out.add(layer.name)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_application_folds_and_reloads(arch, tmp_path):
    keras.backend.clear_session()
    rng = np.random.default_rng(7)
    model = getattr(keras.applications, arch)(weights=None, input_shape=ARCHS[arch], classes=10,
                                               classifier_activation=None)
    randomise(model, rng, weights=False)
    feeds = [rng.standard_normal((1,) + ARCHS[arch]).astype("float32") * 40.0]  # image-like range
    result = keras_pass.fold(model, example_inputs=feeds)
    ver = result.report.verification
    assert ver.passed is True, ver.to_dict()
    folded = {d.bn for d in result.report.folded}
    assert folded == _expected_foldable(model)
    assert all(d.reason.value == "UNSUPPORTED_PRODUCER" for d in result.report.skipped)
    n_bn = sum(isinstance(la, L.BatchNormalization) for la in model.layers)
    assert len(result.report.decisions) == n_bn
    assert sum(isinstance(la, L.BatchNormalization) for la in result.model.layers) == n_bn - len(folded)
    assert_same_function(model, result.model, feeds, rel=1e-4)

    path = str(tmp_path / f"{arch}.folded.keras")
    keras_pass.save(result.model, path)
    again = keras_pass.load(path)
    assert np.array_equal(outputs(again, feeds)[0], outputs(result.model, feeds)[0])
