"""kernel.AffineConv against a float64 oracle: random sums of conv branches (1-3 spatial axes, groups, strides,
dilations, any kernels whose taps lie on one grid), x itself, and per-channel scales and shifts, written as
one conv, compute what the branches compute; branches that cannot be one conv are refused with the reason.
"""
from __future__ import annotations

import numpy as np
import pytest

from bnfold.core.decisions import Reason, Skip
from bnfold.core.kernel import AffineConv
from bnfold.core.layouts import Window, merge_windows


def conv_ref(x: np.ndarray, ac: AffineConv) -> np.ndarray:
    """Direct convolution in float64, zero padding, groups, strides and dilations."""
    w, windows, groups = ac.weight, ac.windows, ac.groups
    xp = np.pad(x, [(0, 0), (0, 0)] + [(wd.pad_begin, wd.pad_end) for wd in windows])
    sizes = [(xp.shape[2 + i] - (wd.kernel - 1) * wd.dilation - 1) // wd.stride + 1 for i, wd in enumerate(windows)]
    m, cpg = w.shape[0], w.shape[1]
    mpg = m // groups
    out = np.zeros((x.shape[0], m, *sizes))
    for k in np.ndindex(*w.shape[2:]):
        sl = tuple(slice(i * wd.dilation, i * wd.dilation + (n - 1) * wd.stride + 1, wd.stride)
                   for i, wd, n in zip(k, windows, sizes))
        patch = xp[(slice(None), slice(None)) + sl]
        for g in range(groups):
            out[:, g * mpg:(g + 1) * mpg] += np.einsum("nc...,mc->nm...", patch[:, g * cpg:(g + 1) * cpg],
                                                       w[(slice(g * mpg, (g + 1) * mpg), slice(None)) + k])
    return out + ac.bias.reshape((1, -1) + (1,) * len(windows))


def evaluate(x: np.ndarray, ac: AffineConv) -> np.ndarray:
    if ac.weight is None:
        return x * ac.diag.reshape((1, -1) + (1,) * (x.ndim - 2)) + ac.bias.reshape((1, -1) + (1,) * (x.ndim - 2))
    return conv_ref(x, ac)


def random_block(rng: np.random.Generator):
    """Branches that are one conv: common stride and slack, first taps on one dilation grid."""
    nd = int(rng.integers(1, 4))
    c = int(rng.choice([2, 4, 6]))
    groups = int(rng.choice([g for g in (1, 2, c) if c % g == 0]))
    identity = bool(rng.integers(0, 2))
    stride = 1 if identity else int(rng.integers(1, 4))
    dil = int(rng.integers(1, 3))
    residue = 0 if identity else int(rng.integers(0, dil))  # every first tap sits at -residue mod dil
    slack = 0 if identity else int(rng.integers(0, 3))
    branches = []
    for _ in range(int(rng.integers(1, 4))):
        windows = []
        for _ in range(nd):
            while True:
                k = int(rng.integers(1, 5))
                d = dil if k > 1 else int(rng.integers(1, 3))  # a one-tap kernel's dilation is irrelevant
                pads = [pb for pb in range(residue, residue + 3 * dil, dil) if pb <= slack + (k - 1) * dil]
                if pads:
                    break
            pb = int(rng.choice(pads))
            windows.append(Window(k, stride, d, pb, slack - pb + (k - 1) * (d if k > 1 else 0)))
        w = rng.normal(size=(c, c // groups, *[wd.kernel for wd in windows]))
        bias = rng.normal(size=c) if rng.integers(0, 2) else None
        branches.append(AffineConv.conv(w, bias, groups, tuple(windows)))
    return nd, c, identity, branches


@pytest.mark.parametrize("seed", range(150))
def test_random_blocks_match_their_branches(seed):
    """The general rule (any kernels whose taps lie on one grid; the passes ask for centred ones too)."""
    rng = np.random.default_rng(seed)
    nd, c, identity, branches = random_block(rng)
    x = rng.normal(size=(2, c) + tuple(int(rng.integers(5, 9)) for _ in range(nd)))
    total, ref = None, None
    terms = [(b, 1.0) for b in branches] + ([(AffineConv.identity(c), -1.0)] if identity else [])
    for ac, sign in terms:
        s, t = rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c), rng.normal(size=c)
        ac = ac.then(s, t)  # each branch's BN
        y = evaluate(x, ac) * sign
        ref = y if ref is None else ref + y
        total = ac.then(np.full(c, sign), np.zeros(c)) if total is None else total.plus(ac, sign, centred=False)
    s, t = rng.normal(size=c), rng.normal(size=c)
    total = total.then(s, t)  # a BN after the sum
    ref = ref * s.reshape((1, -1) + (1,) * nd) + t.reshape((1, -1) + (1,) * nd)
    got = evaluate(x, total)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert all(w.kernel >= 1 and w.pad_begin >= 0 and w.pad_end >= 0 for w in total.windows)


def test_centred_kernels_merge_into_the_largest():
    merged, starts = merge_windows([Window(3, 1, 1, 1, 1), Window(1), Window(5, 1, 1, 2, 2)])
    assert merged == Window(5, 1, 1, 2, 2) and starts == [1, 2, 0]


def test_a_one_tap_kernel_fits_any_dilation():
    merged, starts = merge_windows([Window(3, 1, 2, 2, 2), Window(1, 1, 1, 0, 0)])
    assert merged == Window(3, 1, 2, 2, 2) and starts == [0, 1]


@pytest.mark.parametrize("a, b, why", [
    (Window(3, 2, 1, 1, 1), Window(1, 1, 1, 0, 0), "strides differ"),
    (Window(3, 1, 1, 1, 1), Window(3, 1, 1, 1, 0), "outputs differ in length"),
    (Window(3, 1, 2, 2, 2), Window(3, 1, 1, 1, 1), "dilations differ"),
    (Window(3, 1, 2, 1, 3), Window(1, 1, 1, 0, 0), "grid"),
])
def test_windows_that_are_not_one_conv(a, b, why):
    assert why in merge_windows([a, b], centred=False)


@pytest.mark.parametrize("a, b", [(Window(3, 1, 1, 1, 1), Window(2, 1, 1, 1, 0)),
                                  (Window(3, 1, 1, 1, 1), Window(3, 1, 1, 2, 0)),
                                  (Window(3, 2, 1, 0, 2), Window(1, 2, 1, 0, 0))])
def test_kernels_off_a_common_centre_merge_only_when_asked(a, b):
    """Exact either way (the taps lie on one grid), but the passes keep to centred blocks."""
    assert "not centred" in merge_windows([a, b])
    assert not isinstance(merge_windows([a, b], centred=False), str)


def test_refusals_carry_their_reason():
    rng = np.random.default_rng(0)
    dense = AffineConv.conv(rng.normal(size=(4, 4, 3, 3)), None, 1, (Window(3, 1, 1, 1, 1),) * 2)
    depthwise = AffineConv.conv(rng.normal(size=(4, 1, 3, 3)), None, 4, (Window(3, 1, 1, 1, 1),) * 2)
    widening = AffineConv.conv(rng.normal(size=(8, 4, 1, 1)), None, 1, (Window(),) * 2)
    cases = [(lambda: dense.plus(depthwise), "groups"), (lambda: dense.plus(widening), "broadcasting"),
             (lambda: widening.plus(AffineConv.identity(8)), "x itself"),
             (lambda: dense.plus(AffineConv.conv(rng.normal(size=(4, 4, 3)), None, 1, (Window(3, 1, 1, 1, 1),))),
              "spatial axes")]
    for make, word in cases:
        with pytest.raises(Skip) as e:
            make()
        assert e.value.reason is Reason.BRANCH_MISMATCH and word in e.value.detail
    with pytest.raises(Skip) as e:
        dense.then(np.ones(3), np.zeros(3))
    assert e.value.reason is Reason.AXIS_MISMATCH
    with pytest.raises(Skip) as e:
        AffineConv.conv(rng.normal(size=(4, 4, 3, 3)), None, 1, (Window(1),) * 2)
    assert e.value.reason is Reason.AXIS_MISMATCH


def test_identity_meets_groups_as_a_dirac_kernel():
    rng = np.random.default_rng(1)
    for groups in (1, 2, 4):
        conv = AffineConv.conv(rng.normal(size=(4, 4 // groups, 3, 3)), None, groups, (Window(3, 1, 1, 1, 1),) * 2)
        total = conv.plus(AffineConv.identity(4).then(np.arange(1.0, 5.0), np.zeros(4)))
        x = rng.normal(size=(1, 4, 5, 5))
        np.testing.assert_allclose(conv_ref(x, total), conv_ref(x, conv) + x * np.arange(1.0, 5.0).reshape(1, 4, 1, 1),
                                   rtol=1e-12, atol=1e-12)


def test_rounded_once_and_overflow_is_refused():
    ac = AffineConv.conv(np.full((2, 2, 1, 1), 1e3), None, 1, (Window(),) * 2).then(np.full(2, 1e3), np.zeros(2))
    f = ac.rounded(np.float32)
    assert f.weight.dtype == np.float32 and f.weight[0, 0, 0, 0] == np.float32(1e6)
    with pytest.raises(Skip) as e:
        ac.rounded(np.float16)
    assert e.value.reason is Reason.DTYPE_OVERFLOW
    with pytest.raises(ValueError):
        AffineConv.identity(2).rounded(np.float32)
