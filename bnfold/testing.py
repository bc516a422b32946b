"""pytest helpers: assert that two models compute the same function."""
from __future__ import annotations

from typing import Any

from .core.errors import VerificationFailed
from .report import verification_lines
from .core.results import Verification


def assert_equivalent(original: Any, candidate: Any, **opts: Any) -> Verification:
    """Raise VerificationFailed (an AssertionError) unless `candidate` matches `original`.

    Accepts what bnfold.check accepts (paths, onnx.ModelProto, torch/keras originals) and its options
    (providers, atol, rtol, seed, input_specs, inputs_npz, batches, example_inputs). Returns the
    Verification when it passes.
    """
    from .api import check
    ver = check(original, candidate, **opts)
    if ver.passed is not True:
        raise VerificationFailed("models are not equivalent:\n" + "\n".join(verification_lines(ver)))
    return ver
