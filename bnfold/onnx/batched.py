"""Plain Conv -> BatchNormalization folds of small layers, their arithmetic done for all of them at once.

A graph of thousands of small Conv->BN pairs spends its fold time in per-BN numpy calls: about thirty,
a microsecond or more each, on arrays of a few values. Before the per-BN loop, Batch gathers the BNs
that would fold the plainest way (four float32 per-channel initializers and an epsilon; the input
written by a Conv whose float32 weight and bias are initializers held in memory, of at most
MAX_ELEMENTS values) and has kernel.fold_after_many compute every scale, shift, folded weight and bias
in a dozen numpy calls over all of them.

The loop takes a BN's precomputed result only while nothing it was computed from has changed: the Conv
still writes the BN's input and reads the same weight and bias, none of those tensors nor the BN's own
was rewritten since, no earlier fold went into that Conv, and no Mul/Add after the BN waits to be
absorbed. Anything else, and every fold the kernel marks failed, takes the ordinary path, which also
says why a fold is refused. The kernel's arithmetic is fold_after's, value for value, so the bytes
written are the same either way (tests/onnx/test_batched.py compares them).
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..core import kernel, layouts
from .layout import shape_reader
from .nodes import EPSILON_DEFAULT, ONNX_DOMAINS, attr

if TYPE_CHECKING:
    from .folder import OnnxFolder

MAX_ELEMENTS = 1 << 14  # a bigger weight folds alone: its arithmetic outweighs the calls, and gathering would copy it
# weight elements of all plans together: the batch holds about 20 bytes an element (the gathered float32, its
# float64 product, the rounded result) until the loop ends; past this, BNs fold alone (a fold's peak memory)
MAX_TOTAL = 1 << 21
ENABLED = sys.byteorder == "little"  # off: every BN takes the ordinary path (the tests compare both)

_F32 = onnx.TensorProto.FLOAT
_EXTERNAL = onnx.TensorProto.EXTERNAL
_BN_ATTRS = frozenset({"epsilon", "momentum"})
_FLOAT_ATTR = onnx.AttributeProto.FLOAT


class Plan:
    """One BN's precomputed fold into the Conv `conv` (offsets into Batch's flat arrays)."""

    __slots__ = ("conv", "weight", "bias", "params", "names", "layout", "shape", "at", "w_at", "size", "ok")

    def __init__(self, conv: onnx.NodeProto, weight: str, bias: str | None, params: tuple[str, ...],
                 names: tuple[str, ...], layout: layouts.Layout, shape: tuple[int, ...], size: int) -> None:
        self.conv, self.weight, self.bias, self.params, self.names = conv, weight, bias, params, names
        self.layout, self.shape, self.size = layout, shape, size  # size: weight elements
        self.at = self.w_at = 0  # first channel, first weight element
        self.ok = True


class Batch:
    """The precomputed folds of one graph's plain Conv->BN pairs (see the module docstring)."""

    def __init__(self, f: "OnnxFolder", bns: list[onnx.NodeProto], conv_layout) -> None:
        self.f = f
        self.plans: dict[int, Plan] = {}
        self._raw: tuple[bytes, bytes] | None = None  # w32 and b32 as bytes, made at the first raw()
        self.taken = 0  # plans used (OnnxFolder counts them; the rest went the ordinary way)
        # (group, weight shape) -> (layout, weight bytes), layout False if refused
        self._layouts: dict[tuple, tuple[layouts.Layout | bool, int]] = {}
        if not ENABLED or f.opset < 9:  # (before opset 9, is_test and spatial decide what a BN computes)
            return
        raws = [bytearray() for _ in range(6)]  # gamma, beta, mean, var, weight, bias (each tensor's bytes appended)
        eps: list[float] = []
        channels: list[int] = []
        rests: list[int] = []
        has_bias: list[bool] = []
        at = w_at = 0
        for bn in bns:
            if w_at >= MAX_TOTAL:
                break
            p = self._plan(bn, conv_layout, raws, eps, has_bias)
            if p is None:
                continue
            c = p.shape[0]
            p.at, p.w_at = at, w_at
            at += c
            w_at += p.size
            channels.append(c)
            rests.append(p.size // c)
            self.plans[id(bn)] = p
        if not self.plans:
            return
        self._compute(raws, np.array(eps, np.float64), np.array(channels), np.array(rests), np.array(has_bias))

    def _plan(self, bn: onnx.NodeProto, conv_layout, raws: list[bytearray], eps: list[float],
              has_bias: list[bool]) -> Plan | None:
        ix = self.f.ix
        ins = bn.input[:]
        if len(ins) != 5 or len(bn.output) != 1:
            return None
        e = EPSILON_DEFAULT
        for a in bn.attribute[:]:
            if a.type != _FLOAT_ATTR:
                return None
            name = a.name
            if name == "epsilon":
                e = a.f
            elif name != "momentum":
                return None
        conv = ix.producer.get(ins[0])
        if conv is None or conv.op_type != "Conv" or conv.domain not in ONNX_DOMAINS:
            return None
        cins = conv.input[:]
        if len(cins) < 2 or not cins[1] or conv.output[0] != ins[0]:
            return None
        weight, bias = cins[1], (cins[2] if len(cins) > 2 and cins[2] else None)
        params = tuple(ins[1:])
        names = (*params, weight, bias) if bias else (*params, weight)
        if ((ix.ir_version >= 4 and not ix.graph_inputs.isdisjoint(names))  # (overridable: ix.overridable)
                or (ix.borrowed and not ix.borrowed.keys().isdisjoint(names))):
            return None
        inits = ix.inits
        tensors = []
        for name in names:
            t = inits.get(name)
            if t is None or t.data_type != _F32 or t.data_location == _EXTERNAL:
                return None
            tensors.append(t)
        shape = tuple(tensors[4].dims[:])
        if not shape:
            return None
        n = shape[0]  # channels: every parameter and the bias hold exactly n values, in one axis
        one = [n]
        if (tensors[0].dims[:] != one or tensors[1].dims[:] != one or tensors[2].dims[:] != one
                or tensors[3].dims[:] != one or (bias and tensors[5].dims[:] != one)):
            return None
        group = attr(conv, "group", 1)  # (as the ordinary path reads it: the first, if given twice)
        if type(group) is not int:
            return None  # a malformed attribute: the ordinary path decides what it means
        key = (group, shape)
        cached = self._layouts.get(key)
        if cached is None:
            layout = conv_layout("Conv", group)
            ok = not layout.check(shape) and 0 < math.prod(shape) <= MAX_ELEMENTS
            cached = self._layouts[key] = (layout, math.prod(shape)) if ok else (False, 0)
        layout, elements = cached
        size = 4 * elements
        if layout is False:
            return None
        blobs = [t.raw_data for t in tensors]  # (read once the weight's size is known to be small)
        c4 = 4 * n  # raw data that does not fill the dims (none at all: other fields hold the values) goes below
        if (len(blobs[0]) != c4 or len(blobs[1]) != c4 or len(blobs[2]) != c4 or len(blobs[3]) != c4
                or len(blobs[4]) != size or (bias and len(blobs[5]) != c4)):
            return None  # data that does not fill its dims: the ordinary path reads it and says so
        for buf, r in zip(raws, blobs):
            buf += r  # (no bytes object kept a tensor: a long chain's plans held 192k)
        if not bias:
            raws[5] += bytes(c4)
        eps.append(e)
        has_bias.append(bias is not None)
        return Plan(conv, weight, bias, params, names, layout, shape, elements)

    def _compute(self, raws, eps, channels, rests, has_bias) -> None:
        g, b, m, v, w, bias = (np.frombuffer(memoryview(r).toreadonly(), np.float32) for r in raws)
        r = kernel.fold_after_many(g, b, m, v, eps, channels, w, rests, bias, has_bias, np.dtype(np.float32))
        if r.failed.any():
            plans = list(self.plans.values())
            for k in np.flatnonzero(r.failed):
                plans[k].ok = False  # the ordinary path says why (kernel's Skip)
        self.w64, self.w32, self.b64, self.b32 = r.weight64, r.weight, r.bias64, r.bias

    def take(self, bn: onnx.NodeProto) -> tuple[Plan, str, str, str, list, list] | None:
        """`bn`'s precomputed fold, if it still holds (see the module docstring), with the conv's data input,
        the BN's input (the conv's output), the BN's output, and the readers of each of those two (the index's
        lists); None: the ordinary path (which also refuses a BN input that is a graph output or has other
        readers, as OnnxFolder._single_use)."""
        p = self.plans.get(id(bn))
        if p is None or not p.ok:
            return None
        f, ix = self.f, self.f.ix
        x = bn.input[0]
        if ix.producer.get(x) is not p.conv or id(p.conv) in f.exact or x in ix.graph_outputs:
            return None
        cins = p.conv.input[:]
        if cins[1] != p.weight or (cins[2] if len(cins) > 2 and cins[2] else None) != p.bias:
            return None
        written = f.written
        if written and not written.isdisjoint(p.names):
            return None
        readers = ix.consumers.get(x, ())
        if len(readers) > 1 and sum(not shape_reader(u) for u in readers) > 1:
            return None
        out = bn.output[0]
        users = ix.consumers.get(out, ())
        if (len(users) == 1 and users[0].op_type in ("Mul", "Add") and users[0].domain in ONNX_DOMAINS
                and out not in ix.graph_outputs):
            return None  # absorb_affine_chain may take it into the BN's map
        return p, cins[0], x, out, readers, users

    def folded(self, p: Plan, keep_exact: bool) -> kernel.Folded:
        c, n = p.shape[0], p.size
        w = self.w32[p.w_at:p.w_at + n].reshape(p.shape)
        b = self.b32[p.at:p.at + c]
        if not keep_exact:
            return kernel.Folded(w, b)
        return kernel.Folded(w, b, self.w64[p.w_at:p.w_at + n].reshape(p.shape), self.b64[p.at:p.at + c].copy())

    def raw(self, p: Plan) -> tuple[bytes, bytes]:
        """The folded float32 weight and bias of `p` as raw data (folded()'s values, without arrays)."""
        if self._raw is None:  # once: a fold that needs no float64 values writes slices of these
            self._raw = self.w32.tobytes(), self.b32.tobytes()
        w_raw, b_raw = self._raw
        w, b = 4 * p.w_at, 4 * p.at
        return w_raw[w:w + 4 * p.size], b_raw[b:b + 4 * p.shape[0]]
