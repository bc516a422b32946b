"""Property-based fuzzing of the Keras pass: random small functional models (strategies_keras), checked
independently of bnfold's own verifier.

1. No crash: bnfold.fold on a valid model raises nothing.
2. The folded model computes the original's function: Keras runs the original in float64 (every layer
   re-made with a float64 dtype) as the truth; the folded float32 model may be off from it by no more
   than a small multiple of the original float32 model's own error (or 64 ulp of the output's scale).
   bnfold's verdict on it is "passed" (no false alarm) and every fold's local proof holds.
3. The decisions are right: every BN is decided once; one foldable by construction is folded, one that
   must stay is skipped; a folded BN is gone from the folded model.
4. Folding the folded model again folds nothing and changes no output bit.
5. The input model is unchanged (weights bit for bit, no layer called anew).

Examples: BNFOLD_FUZZ_KERAS_EXAMPLES, else BNFOLD_FUZZ_EXAMPLES, else 200 (derandomized: the same ones
on every run).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnfold  # noqa: E402
from tests.fuzz.strategies_keras import EITHER, FOLD, KEEP, Case, cases, random_weights  # noqa: E402
from tests.helpers.keras_build import L, keras, node_counts, outputs, weights_snapshot  # noqa: E402

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_KERAS_EXAMPLES") or os.environ.get("BNFOLD_FUZZ_EXAMPLES") or 200)
# BNFOLD_FUZZ_SHRINK=0 reports failing examples as found (shrinking a Keras model costs minutes)
PHASES = [p for p in Phase if p is not Phase.shrink or os.environ.get("BNFOLD_FUZZ_SHRINK") != "0"]
EPS32 = float(np.finfo(np.float32).eps)
ERROR_MULTIPLE = 16.0
FLOOR_ULPS = 64.0


class _ChannelsLast(keras.layers.Layer):
    """A channels_first layer computed channels_last on transposed data (TensorFlow has no float64
    channels_first convolutions on the CPU; a Keras kernel's layout does not depend on the format)."""

    def __init__(self, inner, **kw):
        super().__init__(dtype="float64", **kw)
        self.inner = inner

    def call(self, x):
        return keras.ops.moveaxis(self.inner(keras.ops.moveaxis(x, 1, -1)), -1, 1)


def _float64_twin(model):
    """The same model computing in float64: every layer re-made from its config with a float64 dtype."""
    def clone(layer):
        if isinstance(layer, keras.Model):
            return _float64_twin(layer)
        cfg = {**layer.get_config(), "dtype": "float64"}
        if cfg.get("data_format") == "channels_first" and not isinstance(layer, L.BatchNormalization):
            return _ChannelsLast(type(layer).from_config({**cfg, "data_format": "channels_last"}), name=layer.name)
        return type(layer).from_config(cfg)

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    return twin


def _bns(model, prefix: str = "") -> list[str]:
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out += _bns(layer, f"{prefix}{layer.name}/")
        elif isinstance(layer, L.BatchNormalization):
            out.append(prefix + layer.name)
    return out


def _check_numbers(case: Case, result, feeds) -> None:
    o32 = outputs(case.model, feeds)
    f32 = outputs(result.model, feeds)
    o64 = outputs(_float64_twin(case.model), [f.astype(np.float64) for f in feeds])
    assert len(f32) == len(o32) == len(o64)
    for a, b, truth in zip(o32, f32, o64):
        assert a.shape == b.shape == truth.shape
        scale = float(np.abs(truth).max())
        own = float(np.abs(a - truth).max())
        got = float(np.abs(b.astype(np.float64) - truth).max())
        limit = max(ERROR_MULTIPLE * own, FLOOR_ULPS * EPS32 * scale)
        note(f"error of the original {own:.3g}, of the folded model {got:.3g}, limit {limit:.3g}, scale {scale:.3g}")
        assert np.isfinite(b).all() == np.isfinite(a).all()
        assert got <= limit, f"folded model off by {got:.3g} from float64 truth; the original itself by {own:.3g}"


def _check_decisions(case: Case, result) -> None:
    rep = result.report
    decided = [d.bn for d in rep.decisions]
    assert sorted(decided) == sorted(case.expect), (decided, case.expect)
    assert len(set(decided)) == len(decided)
    for d in rep.decisions:
        want = case.expect[d.bn]
        event(f"{want}: {d.pattern if d.is_folded else d.reason.value}")
        if want == FOLD:
            assert d.is_folded, f"{d.bn} is foldable by construction: {d.to_dict()}"
        elif want == KEEP:
            assert not d.is_folded, f"{d.bn} must stay: {d.to_dict()}"
        else:
            assert want == EITHER
    left = set(_bns(result.model))
    assert not left & {d.bn for d in rep.folded}, left
    assert {d.bn for d in rep.skipped} <= left


# Keras seeds its initializers with the random module while a strategy builds the layers: no effect on the draws
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True, phases=PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_random_keras_model_folds_to_the_same_function(case: Case, seed: int) -> None:
    note(f"blocks: {case.steps}; input {case.input_shape}; expect {case.expect}")
    rng = np.random.default_rng(seed)
    random_weights(case.model, rng)
    feeds = [rng.standard_normal((2, *case.input_shape)).astype(np.float32)]
    before_w, before_nodes = weights_snapshot(case.model), node_counts(case.model)

    result = bnfold.fold(case.model, example_inputs=feeds)

    ver = result.report.verification
    note(str(result.report.to_dict()))
    event(f"verdict {ver.verdict}")
    assert ver.verdict in ("passed", "inconclusive"), ver.to_dict()
    if ver.verdict == "inconclusive":  # only when an output of the original itself proves nothing
        o32 = outputs(case.model, feeds)
        assert any(not np.abs(o).max() > 0 for o in o32) or all(
            "inconclusive" in st for p in ver.providers.values() if p.ran for st in p.outputs.values()), ver.to_dict()
    assert ver.proofs.get("failed", 0) == 0 and not ver.blame
    for d in result.report.folded:
        assert d.proof and d.proof.get("passed") is True, d.to_dict()
    assert not result.report.reverted
    _check_decisions(case, result)
    _check_numbers(case, result, feeds)

    again = bnfold.fold(result.model, example_inputs=feeds, verify=False)
    assert not again.report.folded, [d.to_dict() for d in again.report.folded]
    assert all(np.array_equal(a, b) for a, b in zip(outputs(again.model, feeds), outputs(result.model, feeds)))

    after_w = weights_snapshot(case.model)
    assert len(after_w) == len(before_w) and all(np.array_equal(a, b) for a, b in zip(before_w, after_w))
    assert node_counts(case.model) == before_nodes
