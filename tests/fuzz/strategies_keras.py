"""Hypothesis strategies for small random Keras functional models with BatchNorms, and what each BN's fold
must be by construction.

A model is a chain of blocks on a 1-D/2-D/3-D image (channels_last or channels_first) or on a 2-D / 3-D
Dense input. Each block puts one BatchNorm (random statistics far from the defaults, random
center/scale/epsilon) in a place whose outcome is known:
  after    linear producer -> BN: folds after (Conv1D/2D/3D with groups/dilation/strides, Conv*Transpose,
           DepthwiseConv1D/2D, SeparableConv1D/2D, Dense on the last axis)
  before   ReLU -> BN -> Dense or padding="valid" Conv: folds before (into a layer that may have an activation)
  keep     a BN that must stay: after a producer with an activation inside it, after a producer whose
           output also feeds an Add (fan-out) or is a model output, normalising another axis than the
           channels, on the model input, or before a padding="same" Conv
and any block may sit inside a nested functional model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from tests.helpers.keras_build import L, keras

FOLD, KEEP, EITHER = "fold", "keep", "either"


@dataclass
class Case:
    """A model, what must happen to each of its BNs (path -> fold / keep / either), and how it was drawn."""

    model: Any
    expect: dict[str, str]
    input_shape: tuple[int, ...]
    steps: list[str] = field(default_factory=list)


class _Builder:
    def __init__(self, draw: Any, rank: int, channels_first: bool) -> None:
        self.draw, self.rank, self.first = draw, rank, channels_first
        self.expect: dict[str, str] = {}
        self.steps: list[str] = []
        self.outputs: list[Any] = []
        self.n = 0

    # -- shapes --------------------------------------------------------------------------------------
    def axis(self, y: Any) -> int:
        return 1 if self.first else len(y.shape) - 1

    def channels(self, y: Any) -> int:
        return int(y.shape[self.axis(y)])

    def spatial(self, y: Any) -> list[int]:
        if not self.rank:
            return []  # a Dense input: its middle axes are not spatial
        dims = list(y.shape[1:])
        return [int(d) for d in (dims[1:] if self.first else dims[:-1])]

    def fmt(self) -> str:
        return "channels_first" if self.first else "channels_last"

    # -- layers ----------------------------------------------------------------------------------------
    def bn(self, y: Any, prefix: str, axis: int | None = None) -> tuple[Any, str]:
        self.n += 1
        name = f"bn{self.n}"
        d = self.draw
        layer = L.BatchNormalization(axis=self.axis(y) if axis is None else axis, name=name,
                                     center=d(st.sampled_from([True, True, False])),
                                     scale=d(st.sampled_from([True, True, False])),
                                     epsilon=d(st.sampled_from([1e-3, 1e-5, 0.1])))
        return layer(y), prefix + name

    def producer(self, y: Any, kinds: list[str], activation: str | None = None) -> tuple[Any, str]:
        """A random linear layer (or one with `activation` inside) on `y`."""
        d = self.draw
        self.n += 1
        name = f"p{self.n}"
        c, space = self.channels(y), self.spatial(y)
        kind = d(st.sampled_from(kinds))
        filters = d(st.sampled_from([2, 3, 4, 6]))
        small = min(space) if space else 0
        k = d(st.integers(1, min(3, small))) if space else 1
        padding = d(st.sampled_from(["same", "valid"])) if small > k else "same"
        stride = d(st.sampled_from([1, 2])) if small >= 4 and max(space) <= 10 else 1
        common = dict(name=name, use_bias=d(st.booleans()), activation=activation, padding=padding)
        n = self.rank
        if kind == "conv":
            groups = d(st.sampled_from([g for g in (1, 2, 3) if c % g == 0 and filters % g == 0]))
            dilation = d(st.sampled_from([1, 2])) if stride == 1 and small >= 2 * k + 1 and k > 1 else 1
            layer = getattr(L, f"Conv{n}D")(filters, k, strides=stride, groups=groups, dilation_rate=dilation,
                                             data_format=self.fmt(), **common)
        elif kind == "transpose":
            layer = getattr(L, f"Conv{n}DTranspose")(filters, k, strides=stride, data_format=self.fmt(), **common)
        elif kind == "depthwise":
            layer = getattr(L, f"DepthwiseConv{n}D")(k, strides=stride, depth_multiplier=d(st.sampled_from([1, 2])),
                                                      data_format=self.fmt(), **common)
        elif kind == "separable":
            layer = getattr(L, f"SeparableConv{n}D")(filters, k, strides=stride, data_format=self.fmt(),
                                                      depth_multiplier=d(st.sampled_from([1, 2])), **common)
        else:
            layer = L.Dense(filters, name=name, use_bias=common["use_bias"], activation=activation)
        self.steps.append(f"{type(layer).__name__}({layer.get_config().get('filters', filters)})")
        return layer(y), name

    def kinds(self) -> list[str]:
        out = ["conv", "transpose"]
        if self.rank in (1, 2):
            out += ["depthwise", "separable"]
        if not self.first and self.rank:
            out.append("dense")
        return out if self.rank else ["dense"]

    def relu(self, y: Any) -> Any:
        self.n += 1
        return L.ReLU(name=f"relu{self.n}")(y)

    # -- blocks ----------------------------------------------------------------------------------------
    def block(self, y: Any, prefix: str, side_outputs: bool = True) -> Any:
        d = self.draw
        what = d(st.sampled_from(["after", "after", "after", "before", "activation", "fanout", "axis", "same_conv"]
                                 + (["output"] if side_outputs else [])))
        self.steps.append(what)
        if what == "after":
            p, _ = self.producer(y, self.kinds())
            z, bn = self.bn(p, prefix)
            self.expect[bn] = FOLD
            return self.relu(z) if d(st.booleans()) else z
        if what in ("activation", "fanout", "output", "axis"):
            p, _ = self.producer(y, self.kinds(), activation="relu" if what == "activation" else None)
            axis = None
            if what == "axis" and len(p.shape) > 2:
                others = [a for a in range(1, len(p.shape)) if a != self.axis(p)]
                axis = d(st.sampled_from(others))
            z, bn = self.bn(p, prefix, axis)
            # a rank-2 Dense output has no other axis to normalise: that BN is an ordinary fold
            self.expect[bn] = FOLD if what == "axis" and axis is None else KEEP
            if what == "fanout":
                z = L.Add(name=f"add{self.n}")([z, p])
            elif what == "output":
                self.outputs.append(p)
            return self.relu(z)  # a ReLU reads the BN: nothing to fold it into from the front either
        # before / same_conv: ReLU -> BN -> a layer reading it alone
        z, bn = self.bn(self.relu(y), prefix)
        space = self.spatial(z)
        if what == "same_conv" and space:
            self.expect[bn] = KEEP
            return getattr(L, f"Conv{self.rank}D")(3, 3, padding="same", data_format=self.fmt(),
                                                   name=f"sc{self.n}")(z)
        self.expect[bn] = FOLD
        act = d(st.sampled_from([None, "relu", "tanh"]))
        if space and (self.first or d(st.booleans())):
            k = d(st.integers(1, min(2, min(space))))
            self.n += 1
            return getattr(L, f"Conv{self.rank}D")(d(st.sampled_from([2, 4])), k, padding="valid", activation=act,
                                                   data_format=self.fmt(), name=f"vc{self.n}")(z)
        self.n += 1
        return L.Dense(d(st.sampled_from([2, 5])), activation=act, name=f"vd{self.n}")(z)


@st.composite
def cases(draw: Any) -> Case:
    """A random functional model with its expected fold decisions; its weights are not yet randomised."""
    rank = draw(st.sampled_from([0, 1, 2, 2, 3]))  # 0: Dense only
    first = rank > 0 and draw(st.booleans())
    b = _Builder(draw, rank, first)
    c = draw(st.integers(2, 4))
    if rank == 0:
        shape = (draw(st.integers(3, 7)),) if draw(st.booleans()) else (draw(st.integers(2, 4)), draw(st.integers(3, 6)))
    else:
        space = tuple(draw(st.integers(4 if rank == 3 else 5, 5 if rank == 3 else 8)) for _ in range(rank))
        shape = (c, *space) if first else (*space, c)
    inp = keras.Input(shape, name="x")
    y = inp
    if draw(st.integers(0, 9)) == 0:  # a BN on the model input has no layer before it
        y, bn = b.bn(y, "")
        b.expect[bn] = KEEP
        y = b.relu(y)
    for i in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 4)) == 0:
            inner_in = keras.Input(tuple(y.shape[1:]), name=f"inner{i}_in")
            sub = _Builder(draw, rank, first)
            sub.n = b.n
            y = keras.Model(inner_in, sub.block(inner_in, f"inner{i}/", side_outputs=False), name=f"inner{i}")(y)
            b.n = sub.n
            b.expect.update(sub.expect)
            b.steps.append(f"nested[{', '.join(sub.steps)}]")
        else:
            y = b.block(y, "")
    # a linear head with a bias: an output a dead ReLU cannot leave all zero
    if rank and first:
        y = getattr(L, f"Conv{rank}D")(3, 1, data_format="channels_first", name="head")(y)
    else:
        y = L.Dense(3, name="head")(y)
    model = keras.Model(inp, [y, *b.outputs] if b.outputs else y)
    _bias_quirk(model, b.expect)
    return Case(model, b.expect, shape, b.steps)


def _bias_quirk(model: Any, expect: dict[str, str]) -> None:
    """Keras on TensorFlow adds a channels_first bias along the last axis when that axis is as long as the
    channels; bnfold refuses those producers (UNSUPPORTED_PRODUCER). Whether a draw hit that is read off the
    built shapes: such a BN may go either way."""
    def walk(m: Any, prefix: str) -> None:
        for layer in m.layers:
            if isinstance(layer, keras.Model):
                walk(layer, f"{prefix}{layer.name}/")
            if getattr(layer, "data_format", None) != "channels_first" or not layer._inbound_nodes:
                continue
            out = layer._inbound_nodes[0].outputs[0]
            if len(out.shape) > 2 and out.shape[-1] == out.shape[1]:
                for node in layer._outbound_nodes + layer._inbound_nodes[0].parent_nodes:
                    op = node.operation
                    if isinstance(op, L.BatchNormalization) and f"{prefix}{op.name}" in expect:
                        expect[f"{prefix}{op.name}"] = EITHER

    walk(model, "")


def random_weights(model: Any, rng: np.random.Generator) -> None:
    """Random float weights; every BN far from its defaults (mean != 0, var != 1, gamma != 1 of random sign,
    beta != 0)."""
    from tests.helpers.keras_build import randomise

    randomise(model, rng)
