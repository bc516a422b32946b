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
