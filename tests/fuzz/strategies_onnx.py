"""Hypothesis strategies: small random *valid* ONNX models around BatchNormalization, and what bnfold
must do with every BatchNorm in them.

A drawn example is a `Case`: the ModelProto, the spec it was built from (pure data, so hypothesis
prints and shrinks it), and for every BatchNormalization node an `Expect` derived from how the graph
was built -- never from bnfold:

* ``fold``   the BN is foldable by construction (and in which direction, into which layer);
* ``keep``   folding it would change the function (fan-out, graph-output intermediate, zero padding
             read by a following conv, ReLU in between, another axis, training semantics, a folded
             value that does not fit the dtype, ...), with the reason codes that describe why;
* ``either`` folding would be exact but bnfold is allowed to refuse conservatively (e.g. SAME
             padding that happens to pad nothing, Gemm alpha=0) or a value is within a few % of the
             fp16 range, where "fits" depends on last-place rounding.

A model is one or more independent *blocks*, each with its own graph input:

    X -> producer -> mid -> BN [-> BN] -> consumer -> graph output(s)

producer:  graph input | Conv / ConvTranspose (1-3-D, groups incl. depthwise, strides, dilations,
           explicit pads, auto_pad, output_padding, bias or not) | Gemm (transA/transB, alpha, beta,
           C absent/scalar/[N]/[1,N]/[M,N]/[M,1]) | MatMul (+Add bias in either operand order) |
           3-D MatMul whose BN normalises another axis (or, through a Transpose, the right one)
mid:       nothing | Relu | Identity | Dropout (inference)
consumer:  graph output | Relu | per-channel Mul/Add | Conv / ConvTranspose / Gemm / MatMul (+Add) /
           Flatten|Reshape -> Gemm (backward folds) | two readers
flags:     the producer's output also feeds another node / is a graph output / is read by Shape;
           the first BN of a chain is a graph output; the BN output is also a graph output.

Per model: dtype fp32 / fp16 / fp64 (fp64 only with ops onnxruntime's CPU provider runs in fp64:
no Conv/ConvTranspose), BN opset 7/9 (11, 13) /14/15 (17), IR 3 (initializers as inputs) for opset 7,
BN parameters in another float type than the data (opset >= 15), parameters from Constant nodes,
an overridable initializer, training semantics (training_mode=1, or opset < 14 with the five
training outputs), random eps, zero / tiny variance, zero / negative gamma, fp16 overflow.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"fp32": np.float32, "fp16": np.float16, "fp64": np.float64}
# BNFOLD_FUZZ_AVOID_KNOWN=1: do not generate the triggers of bugs already reported and pinned in
# tests/fuzz/regressions (so that a long run looks for new ones). Off by default: the full space is fuzzed.
AVOID_KNOWN = os.environ.get("BNFOLD_FUZZ_AVOID_KNOWN", "") not in ("", "0")
FP16_MAX = float(np.finfo(np.float16).max)

# ----------------------------------------------------------------------------------------------
# Specs: plain frozen data, printed by hypothesis in a falsifying example
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BN:
    seed: int
    gamma: str = "random"      # random | zero_some | negative | large
    var: str = "random"        # random | zero_some | tiny
    eps: float = 1e-5
    t1: str | None = None      # dtype of scale/bias when not the data dtype (opset >= 15)
    t2: str | None = None      # dtype of mean/var when not the data dtype (opset >= 15)
    training: bool = False     # training_mode=1 (opset >= 14) or the five outputs (opset < 14)
    extra: str = "unused"      # training outputs: unused | used (graph outputs)
    constants: bool = False    # parameters come from Constant nodes
    overridable: bool = False  # the running mean is an initializer that is also a graph input (IR >= 4)


@dataclass(frozen=True)
class Conv:
    op: str                    # Conv | ConvTranspose
    cout: int
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...] | None   # explicit (begins..., ends...) or None (no attribute)
    auto_pad: str                  # NOTSET | SAME_UPPER | SAME_LOWER | VALID
    output_padding: tuple[int, ...] | None
    bias: bool
    kernel_attr: bool              # write kernel_shape explicitly
    wscale: float = 1.0


@dataclass(frozen=True)
class Gemm:
    n: int
    trans_a: bool
    trans_b: bool
    alpha: float
    beta: float
    c: str                     # none | scalar | n | 1n | mn | m1
    wscale: float = 1.0


@dataclass(frozen=True)
class MatMul:
    n: int
    bias: str                  # none | n | 1n | scalar
    bias_first: bool           # Add(bias, mm) instead of Add(mm, bias)
    wscale: float = 1.0


@dataclass(frozen=True)
class MatMul3D:
    """X [B, T, K] @ W [K, N] (+ bias) -> [B, T, N]; `transpose` puts the features on axis 1."""

    t: int
    n: int
    bias: str                  # none | n
    transpose: bool
    wscale: float = 1.0


@dataclass(frozen=True)
class FlattenGemm:
    how: str                   # flatten | reshape0 | reshape_m1 | reshape_batch | flatten_axis2 (wrong axis)
    n: int
    trans_b: bool
    bias: bool


@dataclass(frozen=True)
class Affine:
    mul: str                   # none | c1 ([C,1,..]) | scalar | 1c1 ([1,C,1,..])
    add: str                   # none | c1 | scalar


@dataclass(frozen=True)
class Block:
    seed: int
    batch: int
    dynamic_batch: bool
    in_channels: int           # input channels (Conv/input) or features K (Gemm/MatMul)
    spatial: tuple[int, ...]   # input spatial dims (Conv / BN on input)
    producer: Any              # "input" | Conv | Gemm | MatMul | MatMul3D
    mid: str                   # none | relu | identity | dropout
    bns: tuple[BN, ...]
    bn1_is_output: bool        # chain: the first BN's output is also a graph output
    consumer: Any              # "output" | "relu" | "two_readers" | Affine | Conv | Gemm | MatMul | FlattenGemm
    bn_out_is_output: bool     # the last BN's output is also a graph output (with a consumer layer)
    fanout: str                # none | node | output | shape (who else reads the producer's output)
    bn_shape: bool = False     # a Shape node also reads the last BN's output
    share: bool = False        # reuse the weight/bias initializers of earlier blocks of equal shape


@dataclass(frozen=True)
class ModelSpec:
    dtype: str
    opset: int
    ir: int
    blocks: tuple[Block, ...]


@dataclass
class Expect:
    bn: str
    verdict: str                       # fold | keep | either
    direction: str | None = None       # after | before (for fold)
    into: str | None = None            # the layer (node name) folded into
    reasons: frozenset = frozenset()   # acceptable Reason values (for keep)
    why: str = ""


@dataclass
class Case:
    spec: ModelSpec
    model: onnx.ModelProto
    expect: dict[str, Expect]
    bn_meta: dict[str, dict]           # BN name -> rank, channels, count, training
    batch: dict[str, int]              # graph input -> concrete batch used for our own feeds
    input_shapes: dict[str, list[int]]
    input_dtypes: dict[str, Any]

    def __repr__(self) -> str:  # hypothesis prints this for a falsifying example
        return f"Case({self.spec!r})"


# ----------------------------------------------------------------------------------------------
# Drawing specs
# ----------------------------------------------------------------------------------------------

def rare(n: int) -> st.SearchStrategy[bool]:
    """True about once in n draws; shrinks to False."""
    return st.sampled_from([False] * (n - 1) + [True])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def bn_specs(draw, dtype: str, opset: int, ir: int, first: bool = True) -> BN:
    fp16 = dtype == "fp16"
    seed = draw(st.integers(0, 2**31 - 1))
    gamma = draw(st.sampled_from(["random", "zero_some", "negative"] + (["large"] if fp16 else [])))
    var = draw(st.sampled_from(["random", "zero_some", "tiny"]))
    t1 = t2 = None
    if opset >= 15 and dtype in ("fp16", "fp32") and draw(rare(4)):
        other = "fp32" if dtype == "fp16" else "fp16"
        t1 = draw(st.sampled_from([None, other]))
        t2 = draw(st.sampled_from([None, other]))
    if fp16 or t1 == "fp16" or t2 == "fp16":
        # var + eps must stay a normal fp16 number: onnxruntime adds them in fp16, and a subnormal sum
        # (e.g. 0 + 1e-7) is off by up to 50% -- the original would be wrong, not the fold.
        eps = draw(st.sampled_from([1e-3, 1e-4, 0.1, 1e-2]))
    else:
        eps = draw(st.one_of(st.sampled_from([1e-5, 1e-3, 0.1, 0.0]),
                             st.floats(-8, 0).map(lambda e: float(np.float32(10.0 ** e)))))
    # Training semantics only for the first BN of a block: its input is then computed by the very same
    # ops in the folded model (nothing can fold into its producer), so batch statistics match exactly.
    # Behind a folded BN, last-place differences of the input would be divided by the batch std.
    training = first and draw(rare(16))
    extra = draw(st.sampled_from(["unused", "used"])) if training else "unused"
    if AVOID_KNOWN and training and opset < 14:
        extra = "used"  # known bug 1: opset < 14 training outputs present but unused -> folded
    constants = draw(rare(8))
    overridable = ir >= 4 and not constants and draw(rare(32))
    return BN(seed, gamma, var, eps, t1, t2, training, extra, constants, overridable)


@st.composite
def conv_specs(draw, op: str, cin: int, spatial: tuple[int, ...], for_consumer: bool = False) -> Conv:
    depthwise = draw(rare(5))
    groups = cin if depthwise else draw(st.sampled_from(_divisors(cin)))
    mult = draw(st.integers(1, max(1, 8 // groups)))
    cout = groups * mult
    if op == "Conv":
        auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    else:
        auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER"]))
    kernel, strides, dilations, pads_b, pads_e, out_pad = [], [], [], [], [], []
    for size in spatial:
        dil = 1 if auto_pad.startswith("SAME") else draw(st.integers(1, 2))
        kmax = 3 if op == "ConvTranspose" else max(1, min(3, (size - 1) // dil + 1))
        k = draw(st.integers(1, kmax))
        keff = dil * (k - 1) + 1
        # a transposed SAME conv with stride > kernel would need negative padding
        s = draw(st.integers(1, 2 if not (op == "ConvTranspose" and auto_pad == "SAME_UPPER") else min(2, k)))
        pb = pe = 0
        if auto_pad == "NOTSET":
            pb = draw(st.integers(0, keff - 1))
            pe = draw(st.integers(0, keff - 1))
        op_ = 0
        if op == "ConvTranspose" and auto_pad != "SAME_UPPER" and s > 1:
            op_ = draw(st.integers(0, s - 1))
        kernel.append(k)
        strides.append(s)
        dilations.append(dil)
        pads_b.append(pb)
        pads_e.append(pe)
        out_pad.append(op_)
    pads = None
    if auto_pad == "NOTSET" and (any(pads_b) or any(pads_e) or draw(st.booleans())):
        pads = tuple(pads_b + pads_e)
    conv = Conv(op, cout, groups, tuple(kernel), tuple(strides), tuple(dilations), pads, auto_pad,
                tuple(out_pad) if any(out_pad) else None, draw(st.booleans()),
                draw(st.booleans()) or auto_pad.startswith("SAME"), draw(st.sampled_from([1.0, 0.3, 3.0])))
    out = conv_out_spatial(conv, spatial)
    if min(out) < 1:  # a transposed conv with big pads can crop everything; shrink the pads away
        conv = Conv(op, cout, groups, conv.kernel, conv.strides, conv.dilations, None, conv.auto_pad,
                    conv.output_padding, conv.bias, conv.kernel_attr, conv.wscale)
    return conv


def conv_out_spatial(c: Conv, spatial: tuple[int, ...]) -> list[int]:
    d = len(spatial)
    pads = c.pads or (0,) * (2 * d)
    out = []
    for i, size in enumerate(spatial):
        k, s, dil = c.kernel[i], c.strides[i], c.dilations[i]
        keff = dil * (k - 1) + 1
        if c.op == "Conv":
            if c.auto_pad.startswith("SAME"):
                out.append(-(-size // s))
            else:
                pb, pe = (0, 0) if c.auto_pad == "VALID" else (pads[i], pads[i + d])
                out.append((size + pb + pe - keff) // s + 1)
        else:
            if c.auto_pad == "SAME_UPPER":
                out.append(size * s)
            else:
                pb, pe = (0, 0) if c.auto_pad == "VALID" else (pads[i], pads[i + d])
                op_ = c.output_padding[i] if c.output_padding else 0
                out.append(s * (size - 1) + op_ + keff - pb - pe)
    return out


def conv_reads_padding(c: Conv, spatial: tuple[int, ...]) -> bool | None:
    """True when the conv reads zero padding, False when not, None for SAME padding that pads nothing
    (exact, but bnfold may refuse without computing it)."""
    if c.auto_pad == "VALID":
        return False
    if c.auto_pad.startswith("SAME"):
        total = 0
        for i, size in enumerate(spatial):
            keff = c.dilations[i] * (c.kernel[i] - 1) + 1
            o = -(-size // c.strides[i])
            total += max(0, (o - 1) * c.strides[i] + keff - size)
        if total:
            return True
        return False if all(k == 1 for k in c.kernel) else None
    return bool(c.pads and any(c.pads))


@st.composite
def gemm_specs(draw, opset: int, dynamic_batch: bool, for_consumer: bool = False) -> Gemm:
    n = draw(st.integers(1, 8))
    trans_a = draw(st.booleans()) and not dynamic_batch
    trans_b = draw(st.booleans())
    alpha = draw(st.sampled_from([1.0, 0.5, -1.5, 2.0, 0.0] if not for_consumer else [1.0, 0.5, -1.5, 2.0, 0.0, 1e-3]))
    beta = draw(st.sampled_from([1.0, 0.25, -2.0, 0.0]))
    choices = ["n", "scalar", "1n"] + ([] if dynamic_batch else ["mn", "m1"]) + (["none"] if opset >= 11 else [])
    if AVOID_KNOWN and opset == 7:  # known bug 5: IR 3 input declaration keeps the old bias shape
        choices = [c for c in choices if c not in ("scalar", "m1")]
    c = draw(st.sampled_from(choices))
    return Gemm(n, trans_a, trans_b, float(np.float32(alpha)), float(np.float32(beta)), c,
                draw(st.sampled_from([1.0, 0.3, 3.0])))


@st.composite
def matmul_specs(draw, opset: int) -> MatMul:
    biases = ["none", "n", "1n", "scalar"]
    if AVOID_KNOWN and opset == 7:
        biases.remove("scalar")  # known bug 5
    return MatMul(draw(st.integers(1, 8)), draw(st.sampled_from(biases)), draw(st.booleans()),
                  draw(st.sampled_from([1.0, 0.3, 3.0])))


@st.composite
def blocks(draw, dtype: str, opset: int, ir: int) -> Block:
    fp64 = dtype == "fp64"
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 3))
    dynamic_batch = draw(rare(5))
    kinds = ["conv", "gemm", "matmul", "input", "convT", "matmul3d"]
    if fp64:
        kinds = ["gemm", "matmul", "input", "matmul3d"]
    kind = draw(st.sampled_from(kinds))
    in_channels = draw(st.integers(1, 8))
    spatial: tuple[int, ...] = ()
    if kind in ("conv", "convT"):
        d = draw(st.integers(1, 3))
        hi = {1: 8, 2: 6, 3: 4}[d]
        spatial = tuple(draw(st.integers(1, hi if kind == "conv" else min(hi, 4))) for _ in range(d))
        producer: Any = draw(conv_specs("Conv" if kind == "conv" else "ConvTranspose", in_channels, spatial))
        act_spatial = tuple(conv_out_spatial(producer, spatial))
        channels = producer.cout
    elif kind == "gemm":
        producer = draw(gemm_specs(opset, dynamic_batch))
        act_spatial, channels = (), producer.n
    elif kind == "matmul":
        producer = draw(matmul_specs(opset))
        act_spatial, channels = (), producer.n
    elif kind == "matmul3d":
        n = draw(st.integers(1, 8))
        t = n if draw(st.booleans()) else draw(st.integers(1, 8))
        producer = MatMul3D(t, n, draw(st.sampled_from(["none", "n"])), draw(st.booleans()),
                            draw(st.sampled_from([1.0, 0.3])))
        act_spatial, channels = ((t,), n) if producer.transpose else ((n,), t)
        spatial = (t,)
    else:
        producer = "input"
        rank = draw(st.integers(2, 5)) if not fp64 else draw(st.integers(2, 3))
        hi = {2: 1, 3: 8, 4: 6, 5: 4}[rank]
        spatial = tuple(draw(st.integers(1, hi)) for _ in range(rank - 2))
        act_spatial, channels = spatial, in_channels
    mid = draw(st.sampled_from(["none"] * 4 + ["relu", "identity", "dropout"])) if producer != "input" else "none"
    n_bn = draw(st.sampled_from([1, 1, 2]))
    if AVOID_KNOWN and isinstance(producer, MatMul3D) and producer.transpose:
        n_bn = 1  # known bug 3: the second BN behind MatMul -> Transpose is refused (rank unknown)
    bns = tuple(draw(bn_specs(dtype, opset, ir, j == 0)) for j in range(n_bn))
    bn1_is_output = n_bn == 2 and draw(rare(4))
    # consumer of the last BN's output
    rank = 2 + len(act_spatial)
    options = ["output", "relu", "affine", "two_readers"]
    if rank == 2:
        options += ["gemm", "matmul", "gemm", "matmul"]
    else:
        options += ["flatten_gemm", "matmul"]
        if not fp64 and rank >= 3:
            options += ["conv", "conv", "convT"]
    ck = draw(st.sampled_from(options))
    consumer: Any = ck
    if ck == "affine":
        consumer = Affine(draw(st.sampled_from(["c1", "scalar", "1c1", "none"])),
                          draw(st.sampled_from(["c1", "none", "scalar"])))
    elif ck in ("conv", "convT"):
        consumer = draw(conv_specs("Conv" if ck == "conv" else "ConvTranspose", channels, act_spatial, True))
    elif ck == "gemm":
        consumer = draw(gemm_specs(opset, dynamic_batch, True))
    elif ck == "matmul":
        consumer = draw(matmul_specs(opset))
    elif ck == "flatten_gemm":
        hows = ["flatten", "reshape0", "reshape_m1", "flatten_axis2"] + ([] if dynamic_batch else ["reshape_batch"])
        consumer = FlattenGemm(draw(st.sampled_from(hows)), draw(st.integers(1, 6)), draw(st.booleans()),
                               draw(st.booleans()))
    if AVOID_KNOWN and len(bns) == 2 and ck in ("conv", "gemm", "matmul", "flatten_gemm"):
        bns = bns[:1]  # known bug 6: BN0 -> BN1 -> layer folds BN1 backward but leaves BN0
    bn_out_is_output = ck not in ("output",) and draw(rare(6))
    fanout = draw(st.sampled_from(["none"] * 6 + ["node", "output", "shape"])) if producer != "input" else "none"
    bn1_is_output = bn1_is_output and len(bns) == 2
    return Block(seed, batch, dynamic_batch, in_channels, spatial, producer, mid, bns, bn1_is_output, consumer,
                 bn_out_is_output, fanout, draw(rare(6)), draw(st.sampled_from([False, True])))


@st.composite
def model_specs(draw, max_blocks: int = 1) -> ModelSpec:
    dtype = draw(st.sampled_from(["fp32", "fp16", "fp64", "fp32"]))
    opset = draw(st.sampled_from([15, 14, 9, 7, 11, 13, 17]))
    ir = 3 if opset == 7 and draw(rare(3)) else 8
    n = draw(st.integers(1, max_blocks))
    return ModelSpec(dtype, opset, ir, tuple(draw(blocks(dtype, opset, ir)) for _ in range(n)))


def cases(max_blocks: int = 1) -> st.SearchStrategy[Case]:
    """Random small valid ONNX models (1..max_blocks independent blocks) with per-BN expectations."""
    return model_specs(max_blocks).map(build)


# ----------------------------------------------------------------------------------------------
# Building the model (and, independently of bnfold, what must happen to every BN)
# ----------------------------------------------------------------------------------------------

def _np(name: str | None, default) -> Any:
    return DTYPES[name] if name else default


def _fits(values: list[np.ndarray], dtype) -> str:
    """'yes' / 'no' / 'edge' for whether every float64 value survives rounding to `dtype`."""
    dtype = np.dtype(dtype)
    if dtype != np.float16:
        return "yes"
    worst = max((float(np.max(np.abs(v))) if np.size(v) else 0.0) for v in values)
    if not np.isfinite(worst):
        return "no"
    if worst < 0.95 * FP16_MAX:
        return "yes"
    if worst > 1.05 * FP16_MAX:
        return "no"
    return "edge"


@dataclass
class _Layer:
    """A layer's constants as the fold math sees them (float64), and its channel geometry."""

    name: str
    w: np.ndarray
    out_idx: np.ndarray               # output channel of every weight element (broadcastable)
    in_idx: np.ndarray | None         # input channel (feature block) of every weight element
    bias: np.ndarray | None           # the stored bias (Gemm: C), float64
    dtype: Any
    n_out: int
    alpha: float = 1.0                # Gemm alpha / beta
    beta: float = 1.0


class _Builder:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.dt = DTYPES[spec.dtype]
        self.et = helper.np_dtype_to_tensor_dtype(np.dtype(self.dt))
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.expect: dict[str, Expect] = {}
        self.bn_meta: dict[str, dict] = {}
        self.batch: dict[str, int] = {}
        self.input_shapes: dict[str, list[int]] = {}
        self.input_dtypes: dict[str, Any] = {}
        self.overridable: list[onnx.TensorProto] = []
        self._dyn_batch: str | None = None  # the symbolic batch dim of the block being built
        self._share = False                 # the block being built reuses earlier weights of equal shape
        self._by_shape: dict[tuple, tuple[str, np.ndarray]] = {}

    # -- graph helpers ---------------------------------------------------------------------------
    def init(self, name: str, value: np.ndarray, dtype=None) -> str:
        arr = np.asarray(value).astype(dtype or self.dt)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def const_node(self, name: str, value: np.ndarray, dtype) -> str:
        t = numpy_helper.from_array(np.asarray(value).astype(dtype), name + "_value")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_const", value=t))
        return name

    def node(self, op: str, ins: list[str], outs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs[0]

    def output(self, name: str, shape: list, et: int | None = None, batched: bool = True) -> None:
        """Declare a graph output; its batch dim is symbolic when the block's input batch is (onnxruntime
        plans buffers from declared output shapes: a static batch there would be a false promise)."""
        dims: list[Any] = list(shape)
        if batched and self._dyn_batch is not None and dims:
            dims[0] = self._dyn_batch
        self.outputs.append(helper.make_tensor_value_info(name, et or self.et, dims))

    def stored(self, arr: np.ndarray, dtype) -> np.ndarray:
        """The value as the model stores it, back in float64 (what any fold must start from)."""
        return np.asarray(arr).astype(dtype).astype(np.float64)

    # -- model -------------------------------------------------------------------------------------
    def build(self) -> Case:
        for i, b in enumerate(self.spec.blocks):
            self.block(f"b{i}_", b)
        spec = self.spec
        inputs = list(self.inputs)
        if spec.ir < 4:  # IR 3: every initializer is also declared as a graph input
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        else:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.overridable]
        g = helper.make_graph(self.nodes, "fuzz", inputs, self.outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", spec.opset)], producer_name="bnfold-fuzz")
        m.ir_version = spec.ir
        return Case(spec, m, self.expect, self.bn_meta, self.batch, self.input_shapes, self.input_dtypes)

    def graph_input(self, name: str, shape: list[int], dynamic_batch: bool, batch_axis: int = 0) -> str:
        dims: list[Any] = list(shape)
        if dynamic_batch:
            dims[batch_axis] = f"{name}_N"
        self.inputs.append(helper.make_tensor_value_info(name, self.et, dims))
        self.input_shapes[name] = list(shape)
        self.input_dtypes[name] = self.dt
        return name

    def weight(self, rng, name: str, shape, fan_in: int, scale: float) -> tuple[str, np.ndarray]:
        w = rng.normal(0.0, scale / math.sqrt(max(1, fan_in)), size=shape)
        return self._shared_init(name, w)

    def bias(self, rng, name: str, shape) -> tuple[str, np.ndarray]:
        return self._shared_init(name, rng.normal(0.0, 0.5, shape))

    def _shared_init(self, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
        """A new initializer -- or, in a block that shares, an earlier block's of the same shape, so that
        two layers read one tensor (a fold must then write a new one, not change it in place)."""
        key = tuple(np.shape(value))
        if self._share and key in self._by_shape:
            return self._by_shape[key]
        self.init(name, value)
        self._by_shape.setdefault(key, (name, self.stored(value, self.dt)))
        return name, self.stored(value, self.dt)

    # -- one block ---------------------------------------------------------------------------------
    def block(self, p: str, b: Block) -> None:
        rng = np.random.default_rng(b.seed)
        x = f"{p}x"
        self._dyn_batch = f"{x}_N" if b.dynamic_batch else None
        self._share = b.share
        act, shape, layer, fwd_reason = self.producer(p, b, rng, x)
        if b.fanout == "node":
            self.node("Relu", [act], [f"{p}other"], name=f"{p}other")
            self.output(f"{p}other", list(shape))
            fwd_reason = fwd_reason or ("PRODUCER_FANOUT", "the layer's output also feeds a Relu")
        elif b.fanout == "output":
            self.output(act, list(shape))
            fwd_reason = fwd_reason or ("INTERMEDIATE_IS_OUTPUT", "the layer's output is a graph output")
        elif b.fanout == "shape":
            self.node("Shape", [act], [f"{p}shape"], name=f"{p}shape")
            self.output(f"{p}shape", [len(shape)], TensorProto.INT64, batched=False)
        if b.mid == "relu":
            act = self.node("Relu", [act], [f"{p}relu"], name=f"{p}relu")
            fwd_reason = ("UNSUPPORTED_PRODUCER", "a Relu sits between the layer and the BN")
        elif b.mid == "identity":
            act = self.node("Identity", [act], [f"{p}ident"], name=f"{p}ident")
        elif b.mid == "dropout":  # inference Dropout copies its input (no mask output, no training flag)
            attrs = {"ratio": 0.25} if self.spec.opset < 12 else {}
            act = self.node("Dropout", [act], [f"{p}drop"], name=f"{p}drop", **attrs)
        channels = shape[1]
        # the BatchNorms
        bn_names, bn_st = [], []
        for j, bn in enumerate(b.bns):
            name = f"{p}bn{j}"
            out = f"{p}bn{j}_out"
            s, t, level = self.batchnorm(name, bn, act, out, list(shape), channels)
            bn_names.append(name)
            bn_st.append((s, t, level))
            if j == 0 and b.bn1_is_output:
                self.output(out, list(shape))
            act = out
        # the consumer
        cons, cons_reason, post_s, post_t = self.consumer(p, b, rng, act, list(shape), channels)
        self.decide(b, bn_names, bn_st, layer, fwd_reason, cons, cons_reason, post_s, post_t)

    def producer(self, p: str, b: Block, rng, x: str):
        pr, B = b.producer, b.batch
        self.batch[x] = B
        if pr == "input":
            shape = [B, b.in_channels, *b.spatial]
            self.graph_input(x, shape, b.dynamic_batch)
            return x, shape, None, ("NO_PRODUCER", "the BN reads a graph input")
        if isinstance(pr, Conv):
            cin = b.in_channels
            shape_in = [B, cin, *b.spatial]
            self.graph_input(x, shape_in, b.dynamic_batch)
            layer = self.conv_layer(p + "layer", pr, rng, x, cin, b.spatial, f"{p}layer_out")
            out_sp = conv_out_spatial(pr, b.spatial)
            return f"{p}layer_out", [B, pr.cout, *out_sp], layer, None
        if isinstance(pr, Gemm):
            K = b.in_channels
            shape_in = [K, B] if pr.trans_a else [B, K]
            self.graph_input(x, shape_in, b.dynamic_batch, 1 if pr.trans_a else 0)
            layer = self.gemm_layer(p + "layer", pr, rng, x, K, B, f"{p}layer_out")
            return f"{p}layer_out", [B, pr.n], layer, None
        if isinstance(pr, MatMul):
            K = b.in_channels
            self.graph_input(x, [B, K], b.dynamic_batch)
            layer, out = self.matmul_layer(p + "layer", pr, rng, x, K, B, f"{p}layer_out")
            return out, [B, pr.n], layer, None
        assert isinstance(pr, MatMul3D)
        K = b.in_channels
        self.graph_input(x, [B, pr.t, K], b.dynamic_batch)
        wn, w = self.weight(rng, f"{p}layer_w", (K, pr.n), K, pr.wscale)
        mm = self.node("MatMul", [x, wn], [f"{p}layer_mm"], name=f"{p}layer")
        bias = None
        out = mm
        if pr.bias == "n":
            bname, bias = self.bias(rng, f"{p}layer_b", (pr.n,))
            out = self.node("Add", [mm, bname], [f"{p}layer_add"], name=f"{p}layer_add")
        if pr.transpose:
            out = self.node("Transpose", [out], [f"{p}layer_out"], name=f"{p}layer_t", perm=[0, 2, 1])
            layer = _Layer(f"{p}layer", w, np.arange(pr.n)[None, :], np.arange(K)[:, None], bias, self.dt, pr.n)
            return out, [B, pr.n, pr.t], layer, None
        return out, [B, pr.t, pr.n], None, ("AXIS_MISMATCH", "the 3-D MatMul's features are on the last axis, "
                                                             "the BN normalises axis 1")

    def conv_layer(self, name: str, c: Conv, rng, x: str, cin: int, spatial, out: str,
                   wname: str | None = None) -> _Layer:
        if c.op == "Conv":
            wshape = (c.cout, cin // c.groups, *c.kernel)
            fan_in = (cin // c.groups) * math.prod(c.kernel)
        else:
            wshape = (cin, c.cout // c.groups, *c.kernel)
            fan_in = (cin // c.groups) * math.prod(c.kernel)
        wn, w = self.weight(rng, wname or f"{name}_w", wshape, fan_in, c.wscale)
        ins = [x, wn]
        bias = None
        if c.bias:
            bname, bias = self.bias(rng, f"{name}_b", (c.cout,))
            ins.append(bname)
        attrs: dict[str, Any] = {}
        if c.groups != 1 or rng.integers(0, 2):
            attrs["group"] = c.groups
        if c.kernel_attr:
            attrs["kernel_shape"] = list(c.kernel)
        if any(s != 1 for s in c.strides) or rng.integers(0, 2):
            attrs["strides"] = list(c.strides)
        if any(v != 1 for v in c.dilations):
            attrs["dilations"] = list(c.dilations)
        if c.pads is not None:
            attrs["pads"] = list(c.pads)
        if c.auto_pad != "NOTSET":
            attrs["auto_pad"] = c.auto_pad
        if c.output_padding is not None:
            attrs["output_padding"] = list(c.output_padding)
        self.node(c.op, ins, [out], name=name, **attrs)
        nd = w.ndim
        if c.op == "Conv":
            o = np.arange(wshape[0]).reshape([-1] + [1] * (nd - 1))
            i = np.arange(wshape[1]).reshape([1, -1] + [1] * (nd - 2))
            per_group_out = c.cout // c.groups
            in_idx = (o // per_group_out) * wshape[1] + i
            return _Layer(name, w, o, in_idx, bias, self.dt, c.cout)
        i = np.arange(wshape[0]).reshape([-1] + [1] * (nd - 1))
        o = np.arange(wshape[1]).reshape([1, -1] + [1] * (nd - 2))
        out_idx = (i // (cin // c.groups)) * wshape[1] + o
        return _Layer(name, w, out_idx, None, bias, self.dt, c.cout)

    def gemm_layer(self, name: str, g: Gemm, rng, x: str, K: int, M: int, out: str) -> _Layer:
        wshape = (g.n, K) if g.trans_b else (K, g.n)
        wn, w = self.weight(rng, f"{name}_w", wshape, K, g.wscale)
        ins = [x, wn]
        cshape = {"scalar": (), "n": (g.n,), "1n": (1, g.n), "mn": (M, g.n), "m1": (M, 1), "none": None}[g.c]
        bias = None
        if cshape is not None:
            cname, bias = self.bias(rng, f"{name}_c", cshape)
            ins.append(cname)
        attrs: dict[str, Any] = {}
        if g.trans_a:
            attrs["transA"] = 1
        if g.trans_b:
            attrs["transB"] = 1
        if g.alpha != 1.0:
            attrs["alpha"] = g.alpha
        if g.beta != 1.0:
            attrs["beta"] = g.beta
        self.node("Gemm", ins, [out], name=name, **attrs)
        if g.trans_b:
            o, i = np.arange(g.n)[:, None], np.arange(K)[None, :]
        else:
            o, i = np.arange(g.n)[None, :], np.arange(K)[:, None]
        return _Layer(name, w, o, i, bias, self.dt, g.n, g.alpha, g.beta)

    def matmul_layer(self, name: str, mspec: MatMul, rng, x: str, K: int, M: int, out: str) -> tuple[_Layer, str]:
        wn, w = self.weight(rng, f"{name}_w", (K, mspec.n), K, mspec.wscale)
        bias = None
        if mspec.bias == "none":
            self.node("MatMul", [x, wn], [out], name=name)
        else:
            mm = self.node("MatMul", [x, wn], [f"{name}_mm"], name=name)
            bshape = {"n": (mspec.n,), "1n": (1, mspec.n), "scalar": ()}[mspec.bias]
            bn_, bias = self.bias(rng, f"{name}_b", bshape)
            self.node("Add", [bn_, mm] if mspec.bias_first else [mm, bn_], [out], name=f"{name}_add")
        return _Layer(name, w, np.arange(mspec.n)[None, :], np.arange(K)[:, None], bias, self.dt, mspec.n), out

    def batchnorm(self, name: str, bn: BN, x: str, out: str, shape: list[int], C: int):
        rng = np.random.default_rng(bn.seed)
        sign = rng.choice([-1.0, 1.0], C)
        gamma = rng.uniform(0.3, 2.5, C) * sign
        if bn.gamma == "zero_some":
            gamma[rng.random(C) < 0.4] = 0.0
        elif bn.gamma == "negative":
            gamma = -np.abs(gamma)
        elif bn.gamma == "large":
            gamma = rng.uniform(50.0, 3000.0, C) * sign
        beta = rng.normal(0.0, 1.5, C)
        mean = rng.normal(0.3, 1.5, C)
        var = rng.uniform(0.05, 4.0, C)
        if bn.var == "zero_some":
            var[rng.random(C) < 0.5] = 0.0
        elif bn.var == "tiny":
            var = rng.uniform(0.0, 1e-6, C)
        t1 = _np(bn.t1, self.dt)
        t2 = _np(bn.t2, self.dt)
        vals = {"scale": (gamma, t1), "bias": (beta, t1), "mean": (mean, t2), "var": (var, t2)}
        names = []
        for k, (v, dt) in vals.items():
            pname = f"{name}_{k}"
            if bn.constants:
                self.const_node(pname, v, dt)
            else:
                self.init(pname, v, dt)
                if bn.overridable and k == "mean":
                    self.overridable.append(self.inits[-1])
            names.append(pname)
        outs = [out]
        attrs: dict[str, Any] = {}
        if bn.eps != 1e-5 or (AVOID_KNOWN and self.spec.dtype == "fp64"):  # known bug 2: default epsilon
            attrs["epsilon"] = bn.eps
        opset = self.spec.opset
        if bn.training:
            if opset >= 14:
                attrs["training_mode"] = 1
                outs += [f"{name}_rmean", f"{name}_rvar"]
            else:
                outs += [f"{name}_rmean", f"{name}_rvar", f"{name}_smean", f"{name}_svar"]
            if bn.extra == "used":  # the training outputs have the running statistics' type (T2)
                et2 = helper.np_dtype_to_tensor_dtype(np.dtype(t2))
                self.output(outs[1], [C], et2, batched=False)
                self.output(outs[-1], [C], et2, batched=False)
        self.node("BatchNormalization", [x] + names, outs, name=name, **attrs)
        g64, b64 = self.stored(gamma, t1), self.stored(beta, t1)
        m64, v64 = self.stored(mean, t2), self.stored(var, t2)
        eps = float(np.float32(bn.eps))
        denom = v64 + eps
        # reasons the BN itself cannot fold for, whatever its neighbours (any of them may be reported)
        level_reasons, level_whys = set(), []
        if bn.training:
            level_reasons.add("TRAINING_MODE")
            level_whys.append("the BN runs in training mode" + (
                " (opset < 14 with the five training outputs)" if opset < 14 else " (training_mode=1)"))
        if bn.overridable:
            level_reasons.add("NON_CONSTANT_PARAM")
            level_whys.append("the running mean is an overridable initializer")
        if (denom <= 0).any():
            level_reasons.add("NON_FINITE_PARAM")
            level_whys.append("variance + epsilon is zero for some channel")
        level = (frozenset(level_reasons), "; ".join(level_whys)) if level_reasons else None
        with np.errstate(divide="ignore", invalid="ignore"):
            s = g64 / np.sqrt(denom)
            t = b64 - s * m64
        count = shape[0] * math.prod(shape[2:])
        self.bn_meta[name] = {"rank": len(shape), "channels": C, "count": count, "training": bn.training,
                              "gamma": g64, "beta": b64, "mean": m64, "var": v64, "eps": eps}
        return s, t, level

    def consumer(self, p: str, b: Block, rng, act: str, shape: list[int], C: int):
        """Wire what reads the last BN's output; returns (layer for a backward fold or None, the reason
        a backward fold is impossible or None, and an extra per-channel (s, t) absorbed after the BN)."""
        c = b.consumer
        ones = np.ones(C)
        zeros = np.zeros(C)
        B = shape[0]
        if b.bn_out_is_output and c != "output":
            self.output(act, list(shape))
        if b.bn_shape:  # reads only the shape: must not block a fold
            self.node("Shape", [act], [f"{p}bn_shape"], name=f"{p}bn_shape")
            self.output(f"{p}bn_shape", [len(shape)], TensorProto.INT64, batched=False)
        if c == "output":
            self.output(act, list(shape))
            return None, None, ones, zeros
        if c == "relu":
            self.node("Relu", [act], [f"{p}y"], name=f"{p}post_relu")
            self.output(f"{p}y", list(shape))
            return None, None, ones, zeros
        if c == "two_readers":
            self.node("Relu", [act], [f"{p}y"], name=f"{p}post_relu")
            self.output(f"{p}y", list(shape))
            if len(shape) == 2 or self.spec.dtype == "fp64":  # onnxruntime has no fp64 Conv on CPU
                wn, _ = self.weight(rng, f"{p}post_w", (shape[-1], 3), shape[-1], 1.0)
                self.node("MatMul", [act, wn], [f"{p}y2"], name=f"{p}post")
                self.output(f"{p}y2", shape[:-1] + [3])
            else:
                wn, _ = self.weight(rng, f"{p}post_w", (2, C) + (1,) * (len(shape) - 2), C, 1.0)
                self.node("Conv", [act, wn], [f"{p}y2"], name=f"{p}post")
                self.output(f"{p}y2", [B, 2, *shape[2:]])
            return None, ("PRODUCER_FANOUT", "the BN output feeds two nodes"), ones, zeros
        if isinstance(c, Affine):
            rank = len(shape)
            ms, ts = ones, zeros
            cur = act
            bshape = {"c1": (C,) + (1,) * (rank - 2), "1c1": (1, C) + (1,) * (rank - 2), "scalar": ()}
            if c.mul != "none":
                mv = rng.uniform(0.5, 2.0, bshape[c.mul]) * rng.choice([-1.0, 1.0])
                self.init(f"{p}post_mul_c", mv)
                cur = self.node("Mul", [cur, f"{p}post_mul_c"], [f"{p}post_mul"], name=f"{p}post_mul")
                ms = self.stored(mv, self.dt).reshape(-1) if mv.ndim else np.full(C, self.stored(mv, self.dt))
            if c.add != "none":
                av = rng.normal(0, 1.0, bshape[c.add])
                self.init(f"{p}post_add_c", av)
                cur = self.node("Add", [cur, f"{p}post_add_c"], [f"{p}post_add"], name=f"{p}post_add")
                ts = self.stored(av, self.dt).reshape(-1) if av.ndim else np.full(C, self.stored(av, self.dt))
            self.output(cur, list(shape))
            if b.bn_out_is_output or b.bn_shape:  # the BN output has two readers: nothing is absorbed
                return None, None, ones, zeros
            return None, None, ms, ts
        if isinstance(c, Conv):
            sp = tuple(shape[2:])
            layer = self.conv_layer(f"{p}post", c, rng, act, C, sp, f"{p}y")
            self.output(f"{p}y", [B, c.cout, *conv_out_spatial(c, sp)])
            if c.op == "ConvTranspose":
                return layer, ("PADDING_BREAKS_BACKWARD_FOLD", "the next layer is a ConvTranspose"), ones, zeros
            reads = conv_reads_padding(c, sp)
            if reads is True:
                return layer, ("PADDING_BREAKS_BACKWARD_FOLD", "the next conv reads zero padding"), ones, zeros
            if reads is None:
                return layer, ("EITHER", "SAME padding that pads nothing"), ones, zeros
            return layer, None, ones, zeros
        if isinstance(c, Gemm):
            # Gemm(A^T) with A = [B, C] contracts the batch: K = B, M = C
            K, M = (B, C) if c.trans_a else (C, B)
            layer = self.gemm_layer(f"{p}post", c, rng, act, K, M, f"{p}y")
            if c.trans_a:
                self.output(f"{p}y", [C, c.n])
                return layer, ("AXIS_MISMATCH", "the next Gemm transposes its input"), ones, zeros
            self.output(f"{p}y", [B, c.n])
            if c.alpha == 0.0:
                return layer, ("EITHER", "alpha=0"), ones, zeros
            return layer, None, ones, zeros
        if isinstance(c, MatMul):
            last = shape[-1]
            layer, out = self.matmul_layer(f"{p}post", c, rng, act, last, B, f"{p}y")
            self.output(out, shape[:-1] + [c.n])
            if len(shape) != 2:
                why = "the next MatMul contracts the last axis, not the channels"
                return layer, ("AXIS_MISMATCH", why), ones, zeros
            return layer, None, ones, zeros
        assert isinstance(c, FlattenGemm)
        block = math.prod(shape[2:])
        if c.how == "flatten":
            flat = self.node("Flatten", [act], [f"{p}flat"], name=f"{p}flat", axis=1)
        elif c.how == "flatten_axis2":
            flat = self.node("Flatten", [act], [f"{p}flat"], name=f"{p}flat", axis=2)
        else:
            target = {"reshape0": [0, -1], "reshape_m1": [-1, C * block], "reshape_batch": [B, -1]}[c.how]
            self.init(f"{p}flat_shape", np.array(target, np.int64), np.int64)
            flat = self.node("Reshape", [act, f"{p}flat_shape"], [f"{p}flat"], name=f"{p}flat")
        rows, K = (B, C * block) if c.how != "flatten_axis2" else (B * C, block)
        wshape = (c.n, K) if c.trans_b else (K, c.n)
        wn, w = self.weight(rng, f"{p}post_w", wshape, K, 1.0)
        ins = [flat, wn]
        bias = None
        if c.bias or self.spec.opset < 11:  # Gemm's C is optional from opset 11 on
            bname, bias = self.bias(rng, f"{p}post_b", (c.n,))
            ins.append(bname)
        self.node("Gemm", ins, [f"{p}y"], name=f"{p}post", **({"transB": 1} if c.trans_b else {}))
        if c.how == "flatten_axis2":  # rows = batch x channels
            self.output(f"{p}y", [None if b.dynamic_batch else rows, c.n], batched=False)
        else:
            self.output(f"{p}y", [rows, c.n])
        if c.how == "flatten_axis2":
            return None, ("AXIS_MISMATCH", "Flatten(axis=2) mixes batch and channels"), ones, zeros
        if c.trans_b:
            o, i = np.arange(c.n)[:, None], np.arange(K)[None, :] // block
            layer = _Layer(f"{p}post", w, o, i, bias, self.dt, c.n)
        else:
            o, i = np.arange(c.n)[None, :], np.arange(K)[:, None] // block
            layer = _Layer(f"{p}post", w, o, i, bias, self.dt, c.n)
        return layer, None, ones, zeros

    # -- expectations ------------------------------------------------------------------------------
    def decide(self, b: Block, names, bn_st, layer: _Layer | None, fwd_reason, cons: _Layer | None, cons_reason,
               post_s, post_t) -> None:
        """What bnfold must do with each BN of the block, from the construction alone."""
        n = len(names)
        fwd = layer if fwd_reason is None else None
        fwd_wb = (fwd.w, _after_bias(fwd)) if fwd is not None else None
        either_from = None
        results: list[Expect] = []
        for j, (name, (s, t, level)) in enumerate(zip(names, bn_st)):
            last = j == n - 1
            if last:  # the consumer's per-channel Mul/Add joins the last BN's affine map
                s, t = s * post_s, t * post_s + post_t
            if either_from is not None:
                results.append(Expect(name, "either", why=f"follows {either_from}, whose fate is not fixed"))
                continue
            if level is not None:
                results.append(Expect(name, "keep", reasons=level[0], why=level[1]))
                fwd, fwd_reason = None, ("UNSUPPORTED_PRODUCER", "the BN reads another (kept) BN")
                continue
            reasons: set[str] = set()
            whys: list[str] = []
            if fwd is not None:
                w_new, b_new = fold_after(fwd, *fwd_wb, s, t)
                fits = _fits([w_new, b_new], fwd.dtype)
                if fits == "yes":
                    results.append(Expect(name, "fold", "after", fwd.name, why="the layer before is foldable"))
                    fwd_wb = (w_new, b_new)
                    if j == 0 and b.bn1_is_output:
                        fwd, fwd_reason = None, ("INTERMEDIATE_IS_OUTPUT", "the previous BN's output (now the "
                                                 "layer's) is a graph output")
                    continue
                if fits == "edge":
                    results.append(Expect(name, "either", why="a folded value is within 5% of the fp16 range"))
                    either_from = name
                    continue
                reasons.add("DTYPE_OVERFLOW")
                whys.append("a value folded into the layer before overflows fp16")
            else:
                reasons.add(fwd_reason[0])
                whys.append(fwd_reason[1])
            # backward: only the last BN reads the consumer
            verdict = "keep"
            if not last:
                whys.append("its only reader is another BN")
            elif b.bn_out_is_output:
                reasons.add("INTERMEDIATE_IS_OUTPUT")
                whys.append("the BN output is a graph output")
            elif cons_reason is not None and cons_reason[0] == "EITHER":
                verdict = "either"
                whys.append(cons_reason[1])
            elif cons_reason is not None:
                reasons.add(cons_reason[0])
                whys.append(cons_reason[1])
            elif cons is None:
                whys.append("no layer reads the BN output")
            else:
                w_new, b_new = fold_before(cons, cons.w, _before_bias(cons), s, t)
                fits = _fits([w_new, b_new], cons.dtype)
                if fits == "yes":
                    verdict = "fold"
                    # a chain BN0 -> BN1 -> layer: once BN1 is folded, BN0 reads the layer alone and folds too
                    if n == 2 and results[0].verdict == "keep" and bn_st[0][2] is None and not b.bn1_is_output:
                        s0, t0 = bn_st[0][0], bn_st[0][1]
                        w2, b2 = fold_before(cons, w_new, b_new, s0, t0)
                        f2 = _fits([w2, b2], cons.dtype)
                        if f2 == "yes":
                            results[0] = Expect(names[0], "fold", "before", cons.name,
                                                why="once BN1 is folded into the next layer, BN0 reads it alone")
                        elif f2 == "edge":
                            results[0] = Expect(names[0], "either", why="composite fold near the fp16 range")
                        else:
                            results[0] = Expect(names[0], "keep", reasons=results[0].reasons | {"DTYPE_OVERFLOW"},
                                                why=results[0].why)
                elif fits == "edge":
                    verdict = "either"
                    whys.append("a value folded into the next layer is within 5% of the fp16 range")
                else:
                    reasons.add("DTYPE_OVERFLOW")
                    whys.append("a value folded into the next layer overflows fp16")
            if verdict == "fold":
                results.append(Expect(name, "fold", "before", cons.name, why="the next layer is foldable"))
            elif verdict == "either":
                results.append(Expect(name, "either", why="; ".join(whys)))
                either_from = name
            else:
                results.append(Expect(name, "keep", reasons=frozenset(reasons), why="; ".join(whys)))
            fwd, fwd_reason = None, ("UNSUPPORTED_PRODUCER", "the BN reads another (kept) BN")
        for e in results:
            self.expect[e.bn] = e


def _after_bias(layer: _Layer) -> np.ndarray:
    """The bias as a forward fold scales it: Gemm beta*C, else the stored bias (0 when absent)."""
    if layer.bias is None:
        return np.zeros(layer.n_out)
    return layer.bias * layer.beta


def _before_bias(layer: _Layer) -> np.ndarray:
    """The bias as a backward fold adds to it: Gemm folds as alpha*(x sW + (beta/alpha*C + tW))."""
    if layer.bias is None:
        return np.zeros(layer.n_out)
    return layer.bias * (layer.beta / layer.alpha if layer.alpha else 1.0)


def fold_after(layer: _Layer, w: np.ndarray, bias: np.ndarray, s: np.ndarray, t: np.ndarray):
    """Our own float64 fold of y = s*x + t after the layer: (W * s[out], s * bias + t)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return w * s[layer.out_idx], s * bias + t


def fold_before(layer: _Layer, w: np.ndarray, bias: np.ndarray, s: np.ndarray, t: np.ndarray):
    """Our own float64 fold of y = s*x + t before the layer: (W * s[in], bias + sum W * t[in] per output)."""
    with np.errstate(over="ignore", invalid="ignore"):
        w_new = w * s[layer.in_idx]
        contrib = np.broadcast_to(w * t[layer.in_idx], w.shape)
        per_out = np.zeros(layer.n_out)
        np.add.at(per_out, np.broadcast_to(layer.out_idx, w.shape).reshape(-1), contrib.reshape(-1))
        return w_new, bias + per_out


def build(spec: ModelSpec) -> Case:
    return _Builder(spec).build()
