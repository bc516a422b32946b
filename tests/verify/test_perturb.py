"""compare.perturb, the noise run's nudge: every element ends at x * (1 + e) or x * (1 - e) computed in
float64 and rounded once to its dtype (or one ulp away where that rounds back to x), up or down at random.

The check is written from the definition, not from the code: perturb computes float32 arrays in float32 with
an exactly representable factor, and these tests hold that to the float64 product rounded once.
"""
from __future__ import annotations

import numpy as np
import pytest

from bnfold.verify import compare


def _cases(dtype: np.dtype) -> np.ndarray:
    rng = np.random.default_rng(11)
    fi = np.finfo(dtype)
    parts = [rng.standard_normal(70_001) * 10.0 ** rng.integers(-3, 4, 70_001),  # past one chunk, odd length
             rng.standard_normal(999) * float(fi.tiny),  # subnormal and near it
             rng.uniform(0.5, 1.0, 999) * float(fi.max),  # near the top: 1 + e overflows some
             2.0 ** rng.integers(-20, 20, 999) * rng.choice([-1.0, 1.0], 999),  # exact powers of two
             np.array([0.0, -0.0, np.inf, -np.inf, np.nan, float(fi.smallest_subnormal), float(fi.max)])]
    with np.errstate(over="ignore"):
        return np.concatenate(parts).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("eps", [None, 2.0 ** -20, 1e-3, 0.3])
def test_each_element_moves_to_one_of_its_two_rounded_products(dtype, eps):
    a = _cases(np.dtype(dtype))
    e = compare.perturbation_eps(a.dtype) if eps is None else eps
    with np.errstate(over="ignore", invalid="ignore"):
        y = compare.perturb(a, np.random.default_rng(3), eps)
        x = a.astype(np.float64)
        up, down = (x * (1.0 + e)).astype(a.dtype), (x * (1.0 - e)).astype(a.dtype)
    assert y.dtype == a.dtype and y.shape == a.shape
    finite = np.isfinite(a)
    went_up = (y == up) & finite
    went_down = (y == down) & finite
    stuck = finite & (up == a) & (a != 0)  # rounds back to itself: moved one ulp instead
    with np.errstate(over="ignore"):
        nudged = (y == np.nextafter(a, np.inf)) | (y == np.nextafter(a, -np.inf))
    ok = np.where(stuck & (e >= compare.perturbation_eps(a.dtype)), nudged | went_up | went_down, went_up | went_down)
    bad = np.flatnonzero(finite & ~ok)
    assert bad.size == 0, (a[bad[:5]], y[bad[:5]], up[bad[:5]], down[bad[:5]])
    assert np.array_equal(np.isnan(y), np.isnan(a)) and np.array_equal(y[np.isinf(a)], a[np.isinf(a)])
    plain = finite & (a != 0) & (up != down)
    if plain.sum() > 10_000:  # (a nudge far below the dtype's ulp leaves every element where it was)
        share = went_up[plain].mean()
        assert 0.48 < share < 0.52, share  # fair: one random bit an element


def test_the_same_seed_gives_the_same_nudges_and_another_seed_others():
    a = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    one = compare.perturb(a, np.random.default_rng(5))
    assert np.array_equal(one, compare.perturb(a, np.random.default_rng(5)))
    assert not np.array_equal(one, compare.perturb(a, np.random.default_rng(6)))
    assert np.all(one != a)  # float32, one ulp relative: every non-zero element moves
