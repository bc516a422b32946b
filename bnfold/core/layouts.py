"""Weight layouts: which axis holds output / input channels and how groups split them.

A layout is data, not a flag: the same kernel folds an ONNX ConvTranspose, a Keras depthwise conv and
a flattened Gemm because each is described by where its channels live.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Channel geometry of a weight tensor.

    out_axis / in_axis: axes indexing output and input channels (negative axes allowed).
    groups: number of channel groups.
    out_within_group: False for conv-style weights, where out_axis spans all output channels and
        in_axis spans one group's input channels (ONNX/PyTorch Conv ``(M, C/g, k...)``, Keras Conv
        ``(k..., C/g, M)``). True for transposed-style weights, where in_axis spans all input channels
        and out_axis one group's output channels, so the output channel of an element is
        ``group(in) * (M/g) + out`` (ONNX/PyTorch ConvTranspose ``(C, M/g, k...)``, Keras depthwise
        ``(k..., C, multiplier)``).
    in_block: the layer's input features are channels flattened with `in_block` features per channel
        (BN -> Flatten -> Gemm); 1 for ordinary layers.
    """

    out_axis: int
    in_axis: int
    groups: int = 1
    out_within_group: bool = False
    in_block: int = 1

    def _axes(self, ndim: int) -> tuple[int, int]:
        return self.out_axis % ndim, self.in_axis % ndim

    def out_channels(self, shape: tuple[int, ...]) -> int:
        o, i = self._axes(len(shape))
        return shape[o] * self.groups if self.out_within_group else shape[o]

    def in_channels(self, shape: tuple[int, ...]) -> int:
        o, i = self._axes(len(shape))
        n = shape[i] if self.out_within_group else shape[i] * self.groups
        return n // self.in_block

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Return why this layout does not describe `shape`, or None when it does."""
        if len(shape) < 2:
            return f"weight of rank {len(shape)} has no channel axes"
        o, i = self._axes(len(shape))
        if o == i:
            return "output and input channel axes coincide"
        if self.groups < 1:
            return f"groups={self.groups}"
        if self.out_within_group and shape[i] % self.groups:
            return f"{shape[i]} input channels are not divisible by groups={self.groups}"
        if not self.out_within_group and shape[o] % self.groups:
            return f"{shape[o]} output channels are not divisible by groups={self.groups}"
        if (shape[i] * (1 if self.out_within_group else self.groups)) % self.in_block:
            return f"input features are not a whole number of blocks of {self.in_block}"
        return None

    def _grid(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        nd = len(shape)
        o, i = self._axes(nd)
        view_o = [1] * nd
        view_o[o] = shape[o]
        view_i = [1] * nd
        view_i[i] = shape[i]
        return np.arange(shape[o]).reshape(view_o), np.arange(shape[i]).reshape(view_i)

    def out_index(self, shape: tuple[int, ...]) -> np.ndarray:
        """Output channel of every weight element (an int array broadcastable to `shape`)."""
        io, ii = self._grid(shape)
        if not self.out_within_group:
            return io
        o, i = self._axes(len(shape))
        in_per_group = shape[i] // self.groups
        return (ii // in_per_group) * shape[o] + io

    def in_index(self, shape: tuple[int, ...]) -> np.ndarray:
        """Input channel of every weight element (an int array broadcastable to `shape`)."""
        io, ii = self._grid(shape)
        if self.out_within_group:
            return ii // self.in_block
        o, i = self._axes(len(shape))
        out_per_group = shape[o] // self.groups
        return ((io // out_per_group) * shape[i] + ii) // self.in_block


# Layouts by framework and layer kind -------------------------------------------------------------

def conv(groups: int = 1) -> Layout:
    """ONNX Conv / PyTorch ConvNd: (M, C/g, k...)."""
    return Layout(out_axis=0, in_axis=1, groups=groups)


def conv_transpose(groups: int = 1) -> Layout:
    """ONNX ConvTranspose / PyTorch ConvTransposeNd: (C, M/g, k...)."""
    return Layout(out_axis=1, in_axis=0, groups=groups, out_within_group=True)


def gemm(trans_b: bool) -> Layout:
    """ONNX Gemm's B: (K, N), or (N, K) with transB=1. PyTorch Linear is gemm(trans_b=True)."""
    return Layout(out_axis=0, in_axis=1) if trans_b else Layout(out_axis=1, in_axis=0)


def matmul() -> Layout:
    """Constant right operand of MatMul, (K, N)."""
    return Layout(out_axis=1, in_axis=0)


def linear() -> Layout:
    """PyTorch Linear: (out_features, in_features)."""
    return gemm(trans_b=True)


def keras_conv(groups: int = 1) -> Layout:
    """Keras ConvND kernel: (k..., C/g, M)."""
    return Layout(out_axis=-1, in_axis=-2, groups=groups)


def keras_conv_transpose() -> Layout:
    """Keras ConvNDTranspose kernel: (k..., M, C)."""
    return Layout(out_axis=-2, in_axis=-1)


def keras_depthwise(in_channels: int) -> Layout:
    """Keras DepthwiseConv kernel: (k..., C, multiplier); output channel = c * multiplier + m."""
    return Layout(out_axis=-1, in_axis=-2, groups=in_channels, out_within_group=True)


def keras_dense() -> Layout:
    """Keras Dense kernel: (in, out)."""
    return Layout(out_axis=1, in_axis=0)


# Where a convolution reads its input along each spatial axis -----------------------------------

@dataclass(frozen=True)
class Window:
    """How a convolution reads one spatial axis: output i reads input positions i*stride + first,
    first + dilation, ..., last (zero outside the input). The output length is
    floor((L - 1 + slack) / stride) + 1 for an input of length L, so two windows with the same stride
    and slack give outputs of the same length for every L, position by position on the same grid.
    """

    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    pad_begin: int = 0
    pad_end: int = 0

    @property
    def first(self) -> int:
        return -self.pad_begin

    @property
    def last(self) -> int:
        return self.first + (self.kernel - 1) * self.dilation

    @property
    def slack(self) -> int:
        return self.pad_end - self.last


IDENTITY_WINDOW = Window()  # x itself: a 1-wide kernel at offset 0, stride 1, no padding


def merge_windows(windows: list[Window], centred: bool = True) -> tuple[Window, list[int]] | str:
    """One window reading everything each of `windows` reads, and where each one's kernel starts inside
    it; or why no such window exists. Zero-padding a kernel into the merged one is exact: the merged
    window's padding covers each one's, and the extra taps carry zero weight.

    `centred` (the policy of the passes) also asks every kernel to share one centre, as the blocks of
    RepVGG, MobileOne, ACNet and friends do: a 1x1 in the middle of a 3x3 with pads 1, not a 2x2 padded
    (1, 0), which would merge exactly too (its taps lie inside the 3x3's) but off-centre."""
    strides = {w.stride for w in windows}
    if len(strides) > 1:
        return f"strides differ ({', '.join(str(s) for s in sorted(strides))})"
    slacks = {w.slack for w in windows}
    if len(slacks) > 1:
        return "outputs differ in length (the kernels' padding does not line up: " + \
               ", ".join(f"kernel {w.kernel} pads {w.pad_begin},{w.pad_end}" for w in windows) + ")"
    # a 1-wide kernel reads one tap whatever its dilation: it fits any dilation
    dilations = {w.dilation for w in windows if w.kernel > 1}
    if len(dilations) > 1:
        return f"dilations differ ({', '.join(str(d) for d in sorted(dilations))})"
    d = dilations.pop() if dilations else 1
    first = min(w.first for w in windows)
    misaligned = [w for w in windows if (w.first - first) % d]
    if misaligned:
        w = misaligned[0]
        return f"a kernel {w.kernel} with pads {w.pad_begin},{w.pad_end} is off the dilation-{d} grid of the others"
    if centred and len({w.first + w.last for w in windows}) > 1:
        return "kernels are not centred on one another (" + \
               ", ".join(f"kernel {w.kernel} pads {w.pad_begin},{w.pad_end}" for w in windows) + ")"
    last = max(w.last for w in windows)
    merged = Window(kernel=(last - first) // d + 1, stride=strides.pop(), dilation=d, pad_begin=-first,
                    pad_end=slacks.pop() + last)
    return merged, [(w.first - first) // d for w in windows]
