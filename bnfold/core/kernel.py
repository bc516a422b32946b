"""The fold math, in one place: y = s*x + t with s = gamma/sqrt(var+eps), t = beta - s*mean.

After a layer:  W' = W * s[out(W)],   b' = s*b + t.
Before a layer: W' = W * s[in(W)],    b' = b + sum(W * t[in(W)]) per output channel (exact only
without zero padding).
Everything is computed in float64 and rounded once to the model's dtype; a value that does not fit
that dtype raises Skip(DTYPE_OVERFLOW) and nothing is written. Passes never do this arithmetic.

Affine maps of one tensor as one conv (AffineConv): y = conv(x, W) + b. A sum of branches reading the
same x (kxk, 1x1, 1xk convs, x itself, each followed by per-channel scales and shifts, BN among them)
is one such map: kernels zero-padded into one window that covers them all (layouts.merge_windows),
x itself as a Dirac kernel of whatever groups it meets, per-channel (s, t) after it as W*s[out], s*b + t.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .decisions import Reason, Skip
from .layouts import IDENTITY_WINDOW, Layout, Window, merge_windows


@dataclass
class Folded:
    """New layer parameters in the model's dtypes (and, when asked, the float64 values before rounding:
    a second fold into the same layer starts from those, so a chain is rounded once)."""

    weight: np.ndarray
    bias: np.ndarray
    weight64: np.ndarray | None = None
    bias64: np.ndarray | None = None


def _f64(x: np.ndarray | float | None, name: str) -> np.ndarray | None:
    if x is None:
        return None
    return np.asarray(x).astype(np.float64)


def bn_scale_shift(gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray | None,
                   var: np.ndarray | None, eps: float, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (s, t) in float64 for an inference BatchNorm. None means the affine default
    (gamma=1, beta=0) or, for mean/var, 0 and 1. Raises Skip(NON_FINITE_PARAM) on bad statistics."""
    parts = [p for p in (gamma, beta, mean, var) if p is not None]
    n = channels if channels is not None else (np.asarray(parts[0]).size if parts else None)
    if n is None:
        raise ValueError("cannot tell the channel count of a BatchNorm with no parameters")
    if len(parts) == 4 and all(isinstance(p, np.ndarray) and p.shape == (n,) for p in parts):
        # the common case in a dozen numpy calls instead of forty: the per-BN cost of a long graph
        p64 = np.array(parts, dtype=np.float64)
        # a finite sum means every value is finite (the exact look runs only when it is not)
        if not (math.isfinite(np.add.reduce(p64, axis=None)) or _all(np.isfinite(p64))) or not math.isfinite(eps):
            raise Skip(Reason.NON_FINITE_PARAM, "a BatchNorm parameter is NaN or Inf")
        return _scale_shift(p64[0], p64[1], p64[2], p64[3], eps)

    def vec(x: np.ndarray | None, default: float, what: str) -> np.ndarray:
        if x is None:
            return np.full(n, default, np.float64)
        v = np.asarray(x).astype(np.float64).reshape(-1)
        if v.size == 1 and n != 1:
            v = np.full(n, v[0])
        if v.size != n:
            raise Skip(Reason.AXIS_MISMATCH, f"BatchNorm {what} has {v.size} values for {n} channels")
        return v

    g = vec(gamma, 1.0, "scale")
    b = vec(beta, 0.0, "bias")
    m = vec(mean, 0.0, "mean")
    v = vec(var, 1.0, "variance")
    if not (np.isfinite(g).all() and np.isfinite(b).all() and np.isfinite(m).all() and np.isfinite(v).all()
            and np.isfinite(eps)):
        raise Skip(Reason.NON_FINITE_PARAM, "a BatchNorm parameter is NaN or Inf")
    return _scale_shift(g, b, m, v, eps)


def _scale_shift(g: np.ndarray, b: np.ndarray, m: np.ndarray, v: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    denom = v + float(eps)
    if denom.size and not np.minimum.reduce(denom, axis=None) > 0 and np.logical_or.reduce(denom <= 0, axis=None):
        bad = int(np.argmax(denom <= 0))
        raise Skip(Reason.NON_FINITE_PARAM, f"variance + epsilon is not positive (channel {bad}: {denom[bad]:g})")
    s = g / np.sqrt(denom)
    t = b - s * m
    return s, t


def round_to(x: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Round a float64 array once to `dtype`; raise Skip(DTYPE_OVERFLOW) if a value is not finite or
    does not fit (one pass over the data when all is well: the cause is looked for only on failure)."""
    if not isinstance(dtype, np.dtype):
        dtype = np.dtype(dtype)
    if dtype == _F64:
        y = x.copy()
    else:
        top = _FMAX.get(dtype)
        if top is not None and x.size and np.maximum.reduce(np.abs(x), axis=None) <= top:
            return x.astype(dtype)  # every value fits: finite, and no overflow warning to silence
        with np.errstate(over="ignore", invalid="ignore"):
            y = x.astype(dtype)
    # (dtype.name is computed in Python on every call: ask for it only for the non-numpy float types)
    finite = np.isfinite(y.astype(np.float32)) if dtype.kind != "f" and dtype.name == "bfloat16" else np.isfinite(y)
    if _all(finite):
        return y
    if not np.isfinite(x).all():
        raise Skip(Reason.DTYPE_OVERFLOW, f"folded {what} is not finite even in float64")
    idx = np.unravel_index(int(np.argmin(finite.reshape(-1))), x.shape) if x.ndim else ()
    raise Skip(Reason.DTYPE_OVERFLOW,
               f"folded {what} {float(x[idx]):.4g} at {tuple(int(i) for i in idx)} exceeds {dtype.name}")


_F64 = np.dtype(np.float64)
_FMAX = {np.dtype(t): float(np.finfo(t).max) for t in (np.float32, np.float16)}
_IEEE = (np.dtype(np.float16), np.dtype(np.float32), _F64)  # float64 times these is float64, exactly


def _all(mask: np.ndarray) -> bool:
    # ndarray.all() goes through a Python wrapper: a few microseconds that add up over 100k BNs
    return bool(np.logical_and.reduce(mask, axis=None))


def _check(weight: np.ndarray, layout: Layout, channels: int, want: str) -> None:
    why = layout.check(tuple(weight.shape))
    if why:
        raise Skip(Reason.AXIS_MISMATCH, why)
    have = layout.out_channels(weight.shape) if want == "out" else layout.in_channels(weight.shape)
    if have != channels:
        raise Skip(Reason.AXIS_MISMATCH,
                   f"BatchNorm has {channels} channels but the layer has {have} {want}put channels")


def fold_after(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
               layout: Layout, bias_scale: float = 1.0, bias_dtype: np.dtype | None = None,
               weight_dtype: np.dtype | None = None, keep_exact: bool = False) -> Folded:
    """Fold y = s*x + t applied to the layer's output into its weight and bias.

    `bias` (None if absent) broadcasts against the channel vector on its last axis (Conv (M,), Gemm
    (N,), (1, N), (M, N) or a scalar). `bias_scale` multiplies the bias inside the layer (Gemm beta).
    `weight_dtype` is the dtype to round the weight to (default: the weight's own, which a chained fold
    passing the float64 values of an earlier fold must give); `keep_exact` also returns those values.
    """
    channels = scale.shape[0]
    _check(weight, layout, channels, "out")
    wdt = np.dtype(weight_dtype) if weight_dtype is not None else weight.dtype
    if layout.out_within_group:
        factor = scale[layout.out_index(weight.shape)]
    else:  # scale[arange along the out axis]: the vector itself, shaped to broadcast along that axis
        view = [1] * weight.ndim
        view[layout.out_axis % weight.ndim] = channels
        factor = scale.reshape(view)
    w64 = None
    if keep_exact:
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0: round_to names the value that is not finite
            w64 = np.multiply(weight, factor, dtype=np.float64)
    w_new = round_to(w64, wdt, "weight") if w64 is not None else _scaled(weight, factor, wdt)
    if bias is None:
        b_new = shift.copy()
    else:
        b64 = bias if bias.dtype in _IEEE and bias_scale == 1.0 else bias.astype(np.float64) * float(bias_scale)
        b_new = scale * b64 + shift
    bdt = bias_dtype if bias_dtype is not None else (bias.dtype if bias is not None else wdt)
    return Folded(w_new, round_to(b_new, bdt, "bias"), w64, b_new if keep_exact else None)


@dataclass
class FoldedMany:
    """fold_after's results for many layers at once, flat: per output channel (scale, shift, bias64, bias)
    and per weight element (weight64, weight), each layer's run after the one before; `failed[k]` marks a
    layer whose fold fold_after would refuse (its values are then meaningless)."""

    scale: np.ndarray
    shift: np.ndarray
    weight64: np.ndarray
    weight: np.ndarray
    bias64: np.ndarray
    bias: np.ndarray
    failed: np.ndarray


def fold_after_many(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: np.ndarray,
                    channels: np.ndarray, weight: np.ndarray, rests: np.ndarray, bias: np.ndarray,
                    has_bias: np.ndarray, dtype: np.dtype) -> FoldedMany:
    """bn_scale_shift and fold_after for many small layers in a dozen numpy calls instead of thirty each:
    layers whose output channel is the weight's leading axis (Conv, Gemm with transB) and whose weight,
    bias and BN statistics all have the IEEE float type `dtype`.

    Per layer k: channels[k] output channels, eps[k], rests[k] weight elements per output channel. The
    statistics and biases are given per channel, all layers one after the other (a layer without a bias,
    has_bias[k] False, holds zeros there); the weights flat, likewise. Every value goes through the same
    float64 operations, in the same order, as bn_scale_shift and fold_after one layer at a time, so the
    results are the same bits. A layer fold_after would refuse with Skip (statistics or epsilon not finite,
    variance + epsilon not positive, a folded value that is not finite in `dtype`) is marked failed: the
    caller folds it alone, which names the reason."""
    p64 = np.array([gamma, beta, mean, var], np.float64)
    eps_c = np.repeat(np.asarray(eps, np.float64), channels)
    bad = ~(np.isfinite(p64).all(axis=0) & np.isfinite(eps_c))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        denom = p64[3] + eps_c  # _scale_shift
        bad |= ~(denom > 0)
        s = p64[0] / np.sqrt(denom)
        t = p64[1] - s * p64[2]
        w64 = weight * np.repeat(s, np.repeat(rests, channels))  # fold_after: W * s[out]
        b64 = np.where(np.repeat(has_bias, channels), s * bias + t, t)  # s*b + t, or t without a bias
        w, b = w64.astype(dtype), b64.astype(dtype)  # round_to, its values checked below
    failed = np.zeros(len(channels), bool)
    for mask, sizes in ((bad | ~np.isfinite(b), channels), (~np.isfinite(w), channels * rests)):
        where = np.flatnonzero(mask)
        if where.size:
            failed[np.searchsorted(np.cumsum(sizes), where, side="right")] = True
    return FoldedMany(s, t, w64, w, b64, b, failed)


CHUNK = 1 << 20  # elements per float64 temporary: big weights are scaled in slices of ~8 MiB


def _scaled(weight: np.ndarray, factor: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """weight * factor (float64, broadcast to weight's shape), rounded once to `dtype`, a slice of
    axis 0 at a time so a 256 MiB weight does not need 1 GiB of float64 temporaries (a fold's peak memory
    is the folded weights plus these: ~8 MiB slices keep it within 1.3x the file for a ResNet-50)."""
    if weight.ndim == 0 or weight.size <= CHUNK:
        # the ufunc widens `weight` to float64 block by block: no full-size float64 copy of it
        prod = weight * factor if weight.dtype in _IEEE else np.multiply(weight, factor, dtype=np.float64)
        return round_to(prod, dtype, "weight")
    out = np.empty(weight.shape, dtype=dtype)
    f = np.broadcast_to(factor, weight.shape)
    step = max(1, CHUNK // max(1, weight[0].size))
    for i in range(0, weight.shape[0], step):
        part = np.multiply(weight[i:i + step], f[i:i + step], dtype=np.float64)
        out[i:i + step] = round_to(part, dtype, "weight")
    return out


def fold_before(weight: np.ndarray, bias: np.ndarray | None, scale: np.ndarray, shift: np.ndarray,
                layout: Layout, bias_scale: float = 1.0, bias_dtype: np.dtype | None = None,
                weight_dtype: np.dtype | None = None, keep_exact: bool = False) -> Folded:
    """Fold y = s*x + t applied to the layer's *input* into its weight and bias.

    Exact for Linear/Gemm/MatMul and for convolutions that never read zero padding. The returned bias
    is a vector over output channels (bias_scale is the layer's own multiplier of its bias).
    """
    channels = scale.shape[0]
    _check(weight, layout, channels, "in")
    w64 = weight.astype(np.float64)
    in_idx = layout.in_index(weight.shape)
    w_new = w64 * scale[in_idx]
    contrib = w64 * shift[in_idx]
    nd = weight.ndim
    o = layout.out_axis % nd
    if layout.out_within_group:
        out_idx = np.broadcast_to(layout.out_index(weight.shape), weight.shape).reshape(-1)
        per_out = np.bincount(out_idx, weights=np.broadcast_to(contrib, weight.shape).reshape(-1),
                              minlength=layout.out_channels(weight.shape))
    else:
        per_out = contrib.sum(axis=tuple(a for a in range(nd) if a != o))
    if bias is None:
        b_new = per_out
    else:
        b64 = bias.astype(np.float64) * float(bias_scale)
        b_new = b64 + per_out
    wdt = np.dtype(weight_dtype) if weight_dtype is not None else weight.dtype
    bdt = bias_dtype if bias_dtype is not None else (bias.dtype if bias is not None else wdt)
    return Folded(round_to(w_new, wdt, "weight"), round_to(b_new, bdt, "bias"),
                  w_new if keep_exact else None, b_new if keep_exact else None)


def affine(scale: np.ndarray, shift: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A standalone BN as per-channel (scale, shift) constants in `dtype`."""
    return round_to(scale, dtype, "scale"), round_to(shift, dtype, "shift")


def compose_affine(scale: np.ndarray, shift: np.ndarray, mul: np.ndarray | None = None,
                   add: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) followed by x*mul + add, in float64: returns the combined per-channel (s, t)."""
    s, t = scale, shift
    if mul is not None:
        m = np.asarray(mul, np.float64)
        s, t = s * m, t * m
    if add is not None:
        t = t + np.asarray(add, np.float64)
    return s, t


@dataclass(frozen=True)
class AffineConv:
    """y = conv(x, weight) + bias over `groups` and one Window per spatial axis, in float64; with `weight`
    None, y = diag * x + bias per channel (x itself, scaled): a Dirac kernel once it meets a conv.

    weight: (M, C/groups, k...); bias, diag: (M,). Framework-neutral: ONNX Conv and PyTorch ConvNd share
    this layout (layouts.conv); a pass converts its own attributes into windows.
    """

    bias: np.ndarray
    weight: np.ndarray | None = None
    groups: int = 1
    windows: tuple[Window, ...] = ()
    diag: np.ndarray | None = None

    @classmethod
    def conv(cls, weight: np.ndarray, bias: np.ndarray | None, groups: int,
             windows: tuple[Window, ...]) -> "AffineConv":
        """A convolution as it stands (bias None means zero)."""
        w = np.asarray(weight).astype(np.float64)
        why = _conv_window_check(w.shape, groups, windows)
        if why:
            raise Skip(Reason.AXIS_MISMATCH, why)
        b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias).astype(np.float64).reshape(-1)
        if b.size != w.shape[0]:
            raise Skip(Reason.AXIS_MISMATCH, f"a bias of {b.size} values for {w.shape[0]} output channels")
        return cls(bias=b, weight=w, groups=int(groups), windows=tuple(windows))

    @classmethod
    def identity(cls, channels: int) -> "AffineConv":
        """x itself."""
        return cls(bias=np.zeros(channels), diag=np.ones(channels))

    @property
    def out_channels(self) -> int:
        return int(self.bias.size)

    @property
    def in_channels(self) -> int | None:
        """Channels of x (None for x itself, which has as many as it puts out)."""
        return None if self.weight is None else int(self.weight.shape[1] * self.groups)

    def then(self, scale: np.ndarray, shift: np.ndarray) -> "AffineConv":
        """This map followed by y*scale + shift per output channel."""
        s = np.asarray(scale, np.float64).reshape(-1)
        t = np.asarray(shift, np.float64).reshape(-1)
        n = self.out_channels
        if s.size != n or t.size != n:
            raise Skip(Reason.AXIS_MISMATCH, f"a per-channel scale/shift of {max(s.size, t.size)} values follows "
                                             f"{n} channels")
        w = None if self.weight is None else self.weight * s.reshape((-1,) + (1,) * (self.weight.ndim - 1))
        d = None if self.diag is None else self.diag * s
        return AffineConv(bias=self.bias * s + t, weight=w, groups=self.groups, windows=self.windows, diag=d)

    def plus(self, other: "AffineConv", sign: float = 1.0, centred: bool = True) -> "AffineConv":
        """self + sign * other, both maps of the same x. Skip(BRANCH_MISMATCH) when they cannot be one conv
        (or, with `centred`, when their kernels do not share a centre: layouts.merge_windows)."""
        if self.out_channels != other.out_channels:
            raise Skip(Reason.BRANCH_MISMATCH, f"branches of {self.out_channels} and {other.out_channels} channels "
                                               "are summed by broadcasting")
        bias = self.bias + sign * other.bias
        if self.weight is None and other.weight is None:
            return AffineConv(bias=bias, diag=self.diag + sign * other.diag)  # type: ignore[operator]
        if self.weight is None or other.weight is None:
            conv, ident = (other, self) if self.weight is None else (self, other)
            ident = ident._as_conv(conv)
            a, b = (ident, conv) if self.weight is None else (conv, ident)
        else:
            a, b = self, other
        if a.groups != b.groups:
            raise Skip(Reason.BRANCH_MISMATCH, f"branches with groups={a.groups} and groups={b.groups}")
        if a.in_channels != b.in_channels:
            raise Skip(Reason.BRANCH_MISMATCH, f"branches read {a.in_channels} and {b.in_channels} input channels")
        if len(a.windows) != len(b.windows):
            raise Skip(Reason.BRANCH_MISMATCH, f"branches of {len(a.windows)} and {len(b.windows)} spatial axes")
        merged, starts = [], []
        for wa, wb in zip(a.windows, b.windows):
            m = merge_windows([wa, wb], centred)
            if isinstance(m, str):
                raise Skip(Reason.BRANCH_MISMATCH, m)
            merged.append(m[0])
            starts.append(m[1])
        shape = a.weight.shape[:2] + tuple(w.kernel for w in merged)  # type: ignore[union-attr]
        weight = np.zeros(shape)
        for w, k, sgn in ((a.weight, 0, 1.0), (b.weight, 1, sign)):
            at = (slice(None), slice(None)) + tuple(slice(st[k], st[k] + n) for st, n in zip(starts, w.shape[2:]))
            weight[at] += sgn * w
        return AffineConv(bias=bias, weight=weight, groups=a.groups, windows=tuple(merged))

    def _as_conv(self, like: "AffineConv") -> "AffineConv":
        """x (scaled by diag) as a Dirac kernel with `like`'s groups: output channel o reads input channel o."""
        c = like.in_channels
        if c != self.out_channels:
            raise Skip(Reason.BRANCH_MISMATCH, f"x itself ({self.out_channels} channels) is summed with a conv "
                                               f"reading {c} channels")
        per_group = c // like.groups
        if like.out_channels != c:
            raise Skip(Reason.BRANCH_MISMATCH, f"x itself is summed with a conv of {like.out_channels} output "
                                               f"channels from {c}")
        weight = np.zeros((c, per_group) + (1,) * len(like.windows))
        o = np.arange(c)
        weight[(o, o % per_group) + (0,) * len(like.windows)] = self.diag
        return AffineConv(bias=self.bias, weight=weight, groups=like.groups,
                          windows=(IDENTITY_WINDOW,) * len(like.windows))

    def rounded(self, dtype: np.dtype, bias_dtype: np.dtype | None = None) -> Folded:
        """Weight and bias rounded once to the model's dtypes (Skip(DTYPE_OVERFLOW) when they do not fit)."""
        if self.weight is None:
            raise ValueError("a per-channel map of x has no convolution to write")
        return Folded(round_to(self.weight, dtype, "weight"), round_to(self.bias, bias_dtype or dtype, "bias"))


def _conv_window_check(shape: tuple[int, ...], groups: int, windows: tuple[Window, ...]) -> str | None:
    """Why a conv weight of `shape` does not fit `groups` and `windows`, or None."""
    if len(shape) != len(windows) + 2:
        return f"a weight of rank {len(shape)} for {len(windows)} spatial axes"
    if groups < 1 or shape[0] % groups:
        return f"{shape[0]} output channels are not divisible by groups={groups}"
    for n, w in zip(shape[2:], windows):
        if n != w.kernel or w.stride < 1 or w.dilation < 1 or w.pad_begin < 0 or w.pad_end < 0:
            return f"kernel {list(shape[2:])} does not match its window {w}"
    return None
