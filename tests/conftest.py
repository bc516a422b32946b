"""Shared fixtures: random BN statistics far from the defaults, and small ONNX builders."""
from __future__ import annotations

import os

import numpy as np
import pytest

from bnfold.keras.files import before_tensorflow

# Test modules import tensorflow themselves: quiet its start-up, and load triton (CUDA builds of torch)
# before it, or the first torch.export after a Keras test crashes the process.
before_tensorflow()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "sample_models")


def random_bn(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """BN statistics far from the defaults: mean != 0, var != 1, gamma != 1 (random sign), beta != 0."""
    return {
        "gamma": rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c),
        "beta": rng.normal(0.0, 1.0, c),
        "mean": rng.normal(0.5, 1.0, c),
        "var": rng.uniform(0.5, 3.0, c),
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def samples_dir() -> str:
    return SAMPLES
