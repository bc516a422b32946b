"""The fold kernel against a float64 oracle, over op x ndim x groups x bias x dtype x affine."""
from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnfold.core import kernel, layouts
from bnfold.core.decisions import Reason, Skip
from tests.conftest import random_bn

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float16), BF16]
EPS = {np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float16): 2.0 ** -11, BF16: 2.0 ** -8}


def bn_params(rng, c, affine):
    st = random_bn(rng, c)
    if not affine:
        st["gamma"], st["beta"] = None, None
    return st


def bn_ref(y: np.ndarray, st, eps, axis=1) -> np.ndarray:
    shape = [1] * y.ndim
    shape[axis] = -1
    g = np.ones(y.shape[axis]) if st["gamma"] is None else st["gamma"]
    b = np.zeros(y.shape[axis]) if st["beta"] is None else st["beta"]
    return (y - st["mean"].reshape(shape)) / np.sqrt(st["var"].reshape(shape) + eps) * g.reshape(shape) \
        + b.reshape(shape)


def conv64(x, w, b, nd, groups, transposed):
    xt, wt = torch.from_numpy(x), torch.from_numpy(w.astype(np.float64))
    bt = None if b is None else torch.from_numpy(b.astype(np.float64))
    if transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
        return fn(xt, wt, bt, stride=2, groups=groups).numpy()
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    return fn(xt, wt, bt, padding=1, groups=groups).numpy()


def check_rounded_once(folded: np.ndarray, exact: np.ndarray, dtype) -> None:
    """A value rounded once from float64 is within half an ulp of the exact value."""
    f64 = folded.astype(np.float64)
    tiny = np.finfo(np.float16).tiny if dtype == np.float16 else 1e-30
    rel = np.abs(f64 - exact) / np.maximum(np.abs(exact), tiny)
    assert rel.max() <= EPS[np.dtype(dtype)] * 1.0001, rel.max()


CONV_CASES = list(itertools.product([1, 2, 3], ["g1", "g2", "dw"], [True, False], [False, True], DTYPES, [True, False]))


@pytest.mark.parametrize("nd,groups,bias,transposed,dtype,affine", CONV_CASES)
def test_conv_fold_after_matches_float64_oracle(nd, groups, bias, transposed, dtype, affine):
    rng = np.random.default_rng(hash((nd, groups, bias, transposed, str(dtype), affine)) % 2**32)
    cin = 4
    g = {"g1": 1, "g2": 2, "dw": cin}[groups]
    cout = 6 if groups != "dw" else 8  # depthwise with multiplier 2
    k = (3,) * nd
    if transposed:
        w = rng.normal(0, 0.5, (cin, cout // g) + k)
        layout = layouts.conv_transpose(g)
    else:
        w = rng.normal(0, 0.5, (cout, cin // g) + k)
        layout = layouts.conv(g)
    w = w.astype(dtype)
    b = rng.normal(0, 0.5, cout).astype(dtype) if bias else None
    st = bn_params(rng, cout, affine)
    eps = 1e-3
    s, t = kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], eps, channels=cout)
    out = kernel.fold_after(w, b, s, t, layout)
    assert out.weight.dtype == w.dtype and out.weight.shape == w.shape and out.bias.shape == (cout,)

    x = rng.normal(0, 1, (2, cin) + (5,) * nd)
    ref = bn_ref(conv64(x, w, b, nd, g, transposed), st, eps)
    got = conv64(x, out.weight, out.bias, nd, g, transposed)
    # exact weights (float64) give the oracle to float64 precision: checks the layout
    exact_w = w.astype(np.float64) * s[np.broadcast_to(layout.out_index(w.shape), w.shape)]
    exact_b = (s * (b.astype(np.float64) if b is not None else 0.0)) + t
    np.testing.assert_allclose(conv64(x, exact_w, exact_b, nd, g, transposed), ref, rtol=1e-10, atol=1e-10)
    check_rounded_once(out.weight, exact_w, dtype)
    check_rounded_once(out.bias, exact_b, dtype)
    # and the rounded fold stays within a few ulps of the dtype at the output
    scale = conv64(np.abs(x), np.abs(exact_w), np.abs(exact_b), nd, g, transposed)
    assert (np.abs(got - ref) <= 4 * EPS[np.dtype(dtype)] * scale + 1e-12).all()


@pytest.mark.parametrize("trans_b,alpha,beta,bias,dtype", list(itertools.product(
    [0, 1], [1.0, 0.5], [1.0, 2.5], ["none", "vec", "row", "scalar"], [np.float32, np.float16])))
def test_gemm_fold_after(trans_b, alpha, beta, bias, dtype):
    rng = np.random.default_rng(7)
    k, n = 5, 6
    b_mat = rng.normal(0, 0.5, (n, k) if trans_b else (k, n)).astype(dtype)
    c = {"none": None, "vec": rng.normal(0, 1, n), "row": rng.normal(0, 1, (1, n)),
         "scalar": rng.normal(0, 1, ())}[bias]
    c = None if c is None else np.asarray(c).astype(dtype)
    st = random_bn(rng, n)
    s, t = kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-5)
    out = kernel.fold_after(b_mat, c, s, t, layouts.gemm(bool(trans_b)), bias_scale=beta if c is not None else 1.0)
    a = rng.normal(0, 1, (3, k))
    bm = b_mat.astype(np.float64).T if trans_b else b_mat.astype(np.float64)
    y = alpha * a @ bm + (beta * c.astype(np.float64) if c is not None else 0.0)
    ref = bn_ref(y, st, 1e-5)
    bm2 = out.weight.astype(np.float64).T if trans_b else out.weight.astype(np.float64)
    got = alpha * a @ bm2 + out.bias.astype(np.float64)  # beta is reset to 1 by the pass
    tol = 8 * EPS[np.dtype(dtype)] * (np.abs(alpha) * np.abs(a) @ np.abs(bm2) + np.abs(out.bias.astype(np.float64)))
    assert (np.abs(got - ref) <= tol + 1e-12).all()


@pytest.mark.parametrize("layout_name", ["keras_conv", "keras_conv_g2", "keras_depthwise", "keras_transpose",
                                         "keras_dense", "linear"])
def test_keras_and_torch_layouts_match_their_onnx_equivalent(layout_name):
    """A Keras kernel is a transposed ONNX/PyTorch weight; folding either way gives the same numbers."""
    rng = np.random.default_rng(3)
    c, m = 4, 2
    if layout_name.startswith("keras_conv"):
        g = 2 if layout_name.endswith("g2") else 1
        w_t = rng.normal(size=(6, c // g, 3, 3))
        w_k = np.transpose(w_t, (2, 3, 1, 0))
        lt, lk, cout = layouts.conv(g), layouts.keras_conv(g), 6
    elif layout_name == "keras_depthwise":
        w_t = rng.normal(size=(c * m, 1, 3, 3))  # torch depthwise: out = c*m + j
        w_k = np.transpose(w_t.reshape(c, m, 3, 3), (2, 3, 0, 1))
        lt, lk, cout = layouts.conv(c), layouts.keras_depthwise(c), c * m
    elif layout_name == "keras_transpose":
        w_t = rng.normal(size=(c, 6, 3, 3))  # (C_in, M, k, k)
        w_k = np.transpose(w_t, (2, 3, 1, 0))  # (k, k, M, C_in)
        lt, lk, cout = layouts.conv_transpose(1), layouts.keras_conv_transpose(), 6
    elif layout_name == "keras_dense":
        w_t = rng.normal(size=(6, c))
        w_k = w_t.T
        lt, lk, cout = layouts.linear(), layouts.keras_dense(), 6
    else:
        w_t = rng.normal(size=(6, c))
        w_k = w_t.copy()
        lt, lk, cout = layouts.linear(), layouts.gemm(True), 6
    st = random_bn(rng, cout)
    s, t = kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-3)
    a = kernel.fold_after(w_t, None, s, t, lt)
    b = kernel.fold_after(w_k, None, s, t, lk)
    if layout_name.startswith("keras_conv"):
        back = np.transpose(b.weight, (3, 2, 0, 1))
    elif layout_name == "keras_depthwise":
        back = np.transpose(b.weight, (2, 3, 0, 1)).reshape(c * m, 1, 3, 3)
    elif layout_name == "keras_transpose":
        back = np.transpose(b.weight, (3, 2, 0, 1))
    elif layout_name == "keras_dense":
        back = b.weight.T
    else:
        back = b.weight
    np.testing.assert_array_equal(back, a.weight)
    np.testing.assert_array_equal(b.bias, a.bias)


@pytest.mark.parametrize("nd,groups,transposed", list(itertools.product([1, 2], [1, 2], [False, True])))
def test_fold_before_without_padding(nd, groups, transposed):
    rng = np.random.default_rng(11)
    cin, cout = 4, 6
    k = (3,) * nd
    w = rng.normal(0, 0.5, ((cin, cout // groups) if transposed else (cout, cin // groups)) + k)
    b = rng.normal(0, 0.5, cout)
    layout = layouts.conv_transpose(groups) if transposed else layouts.conv(groups)
    st = random_bn(rng, cin)
    s, t = kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-5)
    out = kernel.fold_before(w, b, s, t, layout)
    x = rng.normal(0, 1, (2, cin) + (6,) * nd)
    xt = torch.from_numpy(bn_ref(x, st, 1e-5))
    fn = getattr(F, f"conv{'_transpose' if transposed else ''}{nd}d")
    ref = fn(xt, torch.from_numpy(w), torch.from_numpy(b), groups=groups).numpy()
    got = fn(torch.from_numpy(x), torch.from_numpy(out.weight), torch.from_numpy(out.bias), groups=groups).numpy()
    if transposed:
        # a transposed conv with no padding still reads every input at the borders exactly once per tap,
        # but output borders see fewer taps: the shift contribution differs there; interior is exact
        sl = (slice(None), slice(None)) + (slice(2, -2),) * nd
        np.testing.assert_allclose(got[sl], ref[sl], rtol=1e-9, atol=1e-9)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_flattened_fold_before_uses_in_block():
    rng = np.random.default_rng(5)
    c, hw, n = 3, 4, 5
    w = rng.normal(size=(n, c * hw))  # Gemm transB=1 over Flatten(N, C, 2, 2)
    st = random_bn(rng, c)
    s, t = kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-5)
    lay = layouts.Layout(out_axis=0, in_axis=1, in_block=hw)
    out = kernel.fold_before(w, None, s, t, lay)
    x = rng.normal(size=(2, c, 2, 2))
    ref = bn_ref(x, st, 1e-5).reshape(2, -1) @ w.T
    got = x.reshape(2, -1) @ out.weight.T + out.bias
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_overflow_is_refused_not_written():
    w = np.ones((2, 1, 1, 1), np.float16) * 100
    s, t = kernel.bn_scale_shift(np.array([40.0, 1.0]), np.zeros(2), np.zeros(2), np.array([0.0, 1.0]), 1e-5)
    with pytest.raises(Skip) as e:
        kernel.fold_after(w, None, s, t, layouts.conv())
    assert e.value.reason is Reason.DTYPE_OVERFLOW
    # the same statistics fit float32
    assert np.isfinite(kernel.fold_after(w.astype(np.float32), None, s, t, layouts.conv()).weight).all()


@pytest.mark.parametrize("bad", ["nan_gamma", "inf_mean", "neg_var"])
def test_non_finite_statistics(bad):
    c = 3
    st = {"gamma": np.ones(c), "beta": np.zeros(c), "mean": np.zeros(c), "var": np.ones(c)}
    if bad == "nan_gamma":
        st["gamma"][1] = np.nan
    elif bad == "inf_mean":
        st["mean"][0] = np.inf
    else:
        st["var"][2] = -1.0
    with pytest.raises(Skip) as e:
        kernel.bn_scale_shift(st["gamma"], st["beta"], st["mean"], st["var"], 1e-5)
    assert e.value.reason is Reason.NON_FINITE_PARAM


def test_channel_count_mismatch_is_axis_mismatch():
    s, t = np.ones(5), np.zeros(5)
    with pytest.raises(Skip) as e:
        kernel.fold_after(np.ones((4, 2, 3, 3), np.float32), None, s, t, layouts.conv())
    assert e.value.reason is Reason.AXIS_MISMATCH


@pytest.mark.parametrize("layout,shape", [(layouts.conv(2), (24, 8, 3, 3)), (layouts.conv_transpose(4), (16, 6, 3, 3)),
                                          (layouts.gemm(False), (30, 50)), (layouts.keras_depthwise(6), (3, 3, 6, 2))])
def test_big_weights_are_scaled_in_slices_with_identical_results(monkeypatch, layout, shape):
    rng = np.random.default_rng(2)
    w = rng.normal(size=shape).astype(np.float32)
    n = layout.out_channels(shape)
    s, t = rng.normal(size=n), rng.normal(size=n)
    whole = kernel.fold_after(w, None, s, t, layout)
    monkeypatch.setattr(kernel, "CHUNK", 50)
    sliced = kernel.fold_after(w, None, s, t, layout)
    np.testing.assert_array_equal(whole.weight, sliced.weight)
    np.testing.assert_array_equal(whole.bias, sliced.bias)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_fold_after_many_is_fold_after_layer_by_layer(dtype):
    """The batched kernel gives fold_after's bits for every layer, and marks failed exactly the layers
    fold_after (or bn_scale_shift) refuses: non-finite statistics or epsilon, variance + eps <= 0, a folded
    weight or bias that does not fit the dtype. Biases of -0.0 and absent biases keep their signs."""
    rng = np.random.default_rng(11)
    layers = []
    for k in range(60):
        c, rest = int(rng.integers(1, 7)), int(rng.integers(1, 20))
        st = random_bn(rng, c)
        g, b, m, v = (np.asarray(st[n], np.float64).astype(dtype) for n in ("gamma", "beta", "mean", "var"))
        eps = float(np.float32(10.0 ** rng.uniform(-6, -1)))
        w = rng.normal(0, 0.5, (c, rest)).astype(dtype)
        bias = rng.normal(0, 1, c).astype(dtype) if k % 3 else None
        trouble = k % 10
        if trouble == 1:
            v = v.copy()
            v[0] = np.nan
        elif trouble == 2:
            v = v.copy()
            v[-1] = -1.0
            eps = 0.0
        elif trouble == 3:
            g = np.full(c, np.finfo(dtype).max / 4, dtype)
            v = np.full(c, np.finfo(dtype).tiny, dtype)
        elif trouble == 4:
            eps = float("inf")
        elif trouble == 5 and bias is not None:
            bias = np.full(c, -0.0, dtype)
            b = np.zeros(c, dtype)
            m = np.zeros(c, dtype)
        layers.append((g, b, m, v, eps, w, bias))
    cat = lambda i: np.concatenate([lay[i] for lay in layers])  # noqa: E731
    r = kernel.fold_after_many(
        cat(0), cat(1), cat(2), cat(3), np.array([lay[4] for lay in layers]), np.array([len(lay[0]) for lay in layers]),
        np.concatenate([lay[5].ravel() for lay in layers]), np.array([lay[5].shape[1] for lay in layers]),
        np.concatenate([lay[6] if lay[6] is not None else np.zeros(len(lay[0]), dtype) for lay in layers]),
        np.array([lay[6] is not None for lay in layers]), np.dtype(dtype))
    at = w_at = 0
    refused = 0
    for k, (g, b, m, v, eps, w, bias) in enumerate(layers):
        c, n = len(g), w.size
        try:
            s, t = kernel.bn_scale_shift(g, b, m, v, eps)
            want = kernel.fold_after(w, bias, s, t, layouts.gemm(trans_b=True), bias_dtype=w.dtype, keep_exact=True)
        except Skip:
            assert r.failed[k], k
            refused += 1
        else:
            assert not r.failed[k], k
            for have, exp in ((r.scale[at:at + c], s), (r.shift[at:at + c], t), (r.bias[at:at + c], want.bias),
                              (r.bias64[at:at + c], want.bias64), (r.weight[w_at:w_at + n], want.weight.ravel()),
                              (r.weight64[w_at:w_at + n], want.weight64.ravel())):
                assert have.dtype == exp.dtype and have.tobytes() == exp.tobytes(), k
        at, w_at = at + c, w_at + n
    assert 10 <= refused < len(layers) // 2  # the troubles are really refused, the rest really folded
