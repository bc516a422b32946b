"""Build the small sample ONNX models that the README and the tests fold.

Needs only onnx and numpy; onnxruntime, when installed, is used to prove every model runs and gives
finite outputs. Seeded, so regenerating gives byte-identical files:

    python sample_models/generate.py

Every BatchNorm gets statistics far from the defaults (mean ~ N(0.5, 1), var ~ U(0.5, 3),
gamma ~ U(0.5, 2) with random signs, beta ~ N(0, 1)): a BN near identity would hide layout bugs.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime >= 1.14 reads it; newer IR versions lock out older runtimes for no gain
SEED = 20261122
HERE = Path(__file__).resolve().parent


class Builder:
    """Collects nodes and initializers of one graph; names are unique by construction."""

    def __init__(self, seed: int, dtype: type = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int, gain: float = 1.0) -> str:
        # He-style scale keeps activations O(1) through the chain, which fp16 needs.
        w = self.rng.standard_normal(shape) * (gain * np.sqrt(2.0 / fan_in))
        return self.const(name, w.astype(self.dtype))

    def bias(self, name: str, n: int) -> str:
        return self.const(name, (self.rng.standard_normal(n) * 0.5).astype(self.dtype))

    def bn_stats(self, n: int) -> dict[str, np.ndarray]:
        gamma = self.rng.uniform(0.5, 2.0, n) * self.rng.choice([-1.0, 1.0], n)
        return {"scale": gamma, "B": self.rng.normal(0.0, 1.0, n),
                "mean": self.rng.normal(0.5, 1.0, n), "var": self.rng.uniform(0.5, 3.0, n)}

    def bn(self, name: str, x: str, n: int, out: str | None = None,
           stats: dict[str, np.ndarray] | None = None, eps: float = 1e-5) -> str:
        stats = stats if stats is not None else self.bn_stats(n)
        ins = [x] + [self.const(f"{name}.{k}", stats[k].astype(self.dtype)) for k in ("scale", "B", "mean", "var")]
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node("BatchNormalization", ins, [out], name=name, epsilon=eps))
        return out

    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True,
             pad: int | None = None, gain: float = 1.0, out: str | None = None) -> str:
        pad = k // 2 if pad is None else pad
        ins = [x, self.weight(f"{name}.weight", (cout, cin // group, k, k), cin // group * k * k, gain)]
        if bias:
            ins.append(self.bias(f"{name}.bias", cout))
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node("Conv", ins, [out], name=name, kernel_shape=[k, k], group=group,
                                           pads=[pad] * 4, strides=[1, 1]))
        return out

    def conv_t(self, name: str, x: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True,
               stride: int = 1, pad: int = 1, output_padding: int = 0, out: str | None = None) -> str:
        # ConvTranspose weight is (C_in, C_out/group, k, k): the layout most folding tools get wrong.
        ins = [x, self.weight(f"{name}.weight", (cin, cout // group, k, k), cin // group * k * k)]
        if bias:
            ins.append(self.bias(f"{name}.bias", cout))
        attrs = {"kernel_shape": [k, k], "group": group, "pads": [pad] * 4, "strides": [stride, stride]}
        if output_padding:
            attrs["output_padding"] = [output_padding] * 2
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node("ConvTranspose", ins, [out], name=name, **attrs))
        return out

    def op(self, op_type: str, name: str, ins: list[str], out: str | None = None, **attrs: object) -> str:
        out = out or f"{name}_out"
        self.nodes.append(helper.make_node(op_type, ins, [out], name=name, **attrs))
        return out

    def model(self, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="bnfold-sample-models", doc_string=doc)
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m, full_check=True)
        return m


def vi(name: str, shape: list[int | str], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def resnet_block(seed: int) -> onnx.ModelProto:
    """Stem Conv->BN->Relu, a basic residual block, then GlobalAveragePool -> Flatten -> Gemm logits."""
    b = Builder(seed)
    x = b.conv("stem_conv", "input", 3, 8, bias=False)
    x = b.bn("stem_bn", x, 8)
    stem = b.op("Relu", "stem_relu", [x])
    y = b.conv("block_conv1", stem, 8, 8, bias=True)
    y = b.bn("block_bn1", y, 8)
    y = b.op("Relu", "block_relu1", [y])
    y = b.conv("block_conv2", y, 8, 8, bias=False)
    y = b.bn("block_bn2", y, 8)
    y = b.op("Add", "block_add", [y, stem])
    y = b.op("Relu", "block_relu2", [y])
    y = b.op("GlobalAveragePool", "pool", [y])
    y = b.op("Flatten", "flatten", [y], axis=1)
    w, c = b.weight("fc.weight", (10, 8), 8), b.bias("fc.bias", 10)
    b.op("Gemm", "fc", [y, w, c], out="logits", transB=1)
    return b.model("resnet_block", [vi("input", ["N", 3, 16, 16])], [vi("logits", ["N", 10])],
                   "ResNet-style basic block; dynamic batch dimension N.")


def mobilenet_block(seed: int) -> onnx.ModelProto:
    """Inverted residual: 1x1 expand -> depthwise 3x3 -> 1x1 project, each with BN, ReLU6 as Clip."""
    b = Builder(seed)
    lo, hi = b.const("relu6_min", np.array(0.0, np.float32)), b.const("relu6_max", np.array(6.0, np.float32))
    y = b.conv("expand_conv", "input", 8, 32, k=1, bias=False)
    y = b.bn("expand_bn", y, 32)
    y = b.op("Clip", "expand_relu6", [y, lo, hi])
    y = b.conv("dw_conv", y, 32, 32, k=3, group=32, bias=False)
    y = b.bn("dw_bn", y, 32)
    y = b.op("Clip", "dw_relu6", [y, lo, hi])
    y = b.conv("project_conv", y, 32, 8, k=1, bias=True)
    y = b.bn("project_bn", y, 8)
    b.op("Add", "residual_add", [y, "input"], out="output")
    return b.model("mobilenet_block", [vi("input", [1, 8, 16, 16])], [vi("output", [1, 8, 16, 16])],
                   "MobileNetV2-style inverted residual block with a depthwise conv.")


def decoder(seed: int) -> onnx.ModelProto:
    """Grouped, depthwise and strided ConvTranspose, each followed by BN."""
    b = Builder(seed)
    # C_out/group (6) differs from C_in/group (4) so a fold along the wrong axis cannot pass by luck.
    y = b.conv_t("up_grouped", "input", 8, 12, group=2, bias=True)
    y = b.bn("up_grouped_bn", y, 12)
    y = b.op("Relu", "up_grouped_relu", [y])
    y = b.conv_t("up_depthwise", y, 12, 12, group=12, bias=False)
    y = b.bn("up_depthwise_bn", y, 12)
    y = b.conv_t("up_stride2", y, 12, 4, stride=2, pad=1, output_padding=1, bias=True)
    b.bn("up_stride2_bn", y, 4, out="output")
    return b.model("decoder", [vi("input", [1, 8, 8, 8])], [vi("output", [1, 4, 16, 16])],
                   "Decoder with grouped (group=2), depthwise and stride-2 ConvTranspose layers.")


def mlp(seed: int) -> onnx.ModelProto:
    """Gemm (transB 1 and 0, alpha/beta), MatMul+Add and plain MatMul, each followed by BN on (N, C)."""
    b = Builder(seed)
    y = b.op("Gemm", "fc1", ["input", b.weight("fc1.weight", (32, 16), 16), b.bias("fc1.bias", 32)], transB=1)
    y = b.bn("fc1_bn", y, 32)
    y = b.op("Relu", "fc1_relu", [y])
    y = b.op("Gemm", "fc2", [y, b.weight("fc2.weight", (32, 24), 32), b.bias("fc2.bias", 24)],
             transB=0, alpha=0.5, beta=2.0)
    y = b.bn("fc2_bn", y, 24)
    y = b.op("MatMul", "fc3_matmul", [y, b.weight("fc3.weight", (24, 20), 24)])
    y = b.op("Add", "fc3_add", [y, b.bias("fc3.bias", 20)])
    y = b.bn("fc3_bn", y, 20)
    y = b.op("MatMul", "fc4_matmul", [y, b.weight("fc4.weight", (20, 10), 20)])
    b.bn("fc4_bn", y, 10, out="output")
    return b.model("mlp", [vi("input", [2, 16])], [vi("output", [2, 10])],
                   "MLP: Gemm transB=1, Gemm transB=0 alpha=0.5 beta=2, MatMul+Add, MatMul; each -> BN.")


DEAD_CHANNEL = 3


def fp16(seed: int) -> onnx.ModelProto:
    """float16 conv net; conv2_bn has a dead channel (var=0, gamma=40) whose folded weight overflows.

    s = 40/sqrt(0 + 1e-5) ~ 12649, and that channel's conv weights reach 8, so the folded weight is
    ~1e5 > 65504 (fp16 max): folding writes inf and the model turns NaN. Unfolded, the BN output of
    that channel may saturate but ReLU6 (Clip) bounds it, so the original model stays finite.
    """
    b = Builder(seed, np.float16)
    lo, hi = b.const("relu6_min", np.array(0.0, np.float16)), b.const("relu6_max", np.array(6.0, np.float16))
    y = b.conv("conv1", "input", 4, 8, bias=True)
    y = b.bn("conv1_bn", y, 8)
    y = b.op("Relu", "conv1_relu", [y])
    y = b.conv("conv2", y, 8, 8, bias=False)
    w2 = next(t for t in b.inits if t.name == "conv2.weight")
    arr = numpy_helper.to_array(w2).copy()
    arr[DEAD_CHANNEL, 0, 1, 1] = 8.0
    w2.CopyFrom(numpy_helper.from_array(arr, "conv2.weight"))
    stats = b.bn_stats(8)
    stats["var"][DEAD_CHANNEL], stats["scale"][DEAD_CHANNEL] = 0.0, 40.0
    y = b.bn("conv2_bn", y, 8, stats=stats)
    y = b.op("Clip", "conv2_relu6", [y, lo, hi])
    y = b.conv("conv3", y, 8, 4, k=1, bias=False)
    b.bn("conv3_bn", y, 4, out="output")
    h = TensorProto.FLOAT16
    return b.model("fp16", [vi("input", [1, 4, 16, 16], h)], [vi("output", [1, 4, 16, 16], h)],
                   "float16 conv net; conv2_bn channel 3 is dead (var=0, gamma=40): folding it overflows fp16.")


def skip_cases(seed: int) -> onnx.ModelProto:
    """One BN per skip reason, plus one ordinary Conv->BN that folds.

    bn_on_input: its input is a graph input (NO_PRODUCER). bn_after_relu: produced by Relu and
    read by a padded conv, so neither direction is exact (PADDING_BREAKS_BACKWARD_FOLD). bn_fanout: conv_fanout's output also feeds add_fanout (PRODUCER_FANOUT).
    bn_after_output: conv_graph_output's output is a graph output (INTERMEDIATE_IS_OUTPUT).
    """
    b = Builder(seed)
    y = b.bn("bn_on_input", "input", 4)
    y = b.op("Relu", "relu", [y])
    y = b.bn("bn_after_relu", y, 4)
    c = b.conv("conv_fanout", y, 4, 4, bias=True)
    y = b.bn("bn_fanout", c, 4)
    y = b.op("Add", "add_fanout", [y, c])
    c = b.conv("conv_graph_output", y, 4, 4, bias=False, out="conv_out")
    y = b.bn("bn_after_output", c, 4)
    y = b.conv("conv_ok", y, 4, 4, bias=True)
    b.bn("bn_ok", y, 4, out="output")
    return b.model("skip_cases", [vi("input", [1, 4, 8, 8])],
                   [vi("output", [1, 4, 8, 8]), vi("conv_out", [1, 4, 8, 8])],
                   "One BN per skip reason (NO_PRODUCER, UNSUPPORTED_PRODUCER, PRODUCER_FANOUT, "
                   "INTERMEDIATE_IS_OUTPUT) and one foldable Conv->BN (conv_ok -> bn_ok).")


MODELS: dict[str, Callable[[int], onnx.ModelProto]] = {
    "resnet_block": resnet_block,
    "mobilenet_block": mobilenet_block,
    "decoder": decoder,
    "mlp": mlp,
    "fp16": fp16,
    "skip_cases": skip_cases,
}


def run_check(model: onnx.ModelProto, seed: int) -> list[np.ndarray]:
    """Run with onnxruntime, optimisations off (ORT would fold BN itself), on seeded random inputs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        dt = np.float16 if "float16" in i.type else np.float32
        feeds[i.name] = rng.standard_normal(shape).astype(dt)
    outs = sess.run(None, feeds)
    for o, meta in zip(outs, sess.get_outputs()):
        if not np.isfinite(o).all():
            raise RuntimeError(f"{model.graph.name}: output {meta.name} is not finite")
    return outs


def main(argv: list[str] | None = None) -> None:
    """Write every sample model next to this script (or to --out)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE, help="directory to write into (default: beside this script)")
    args = ap.parse_args(argv)
    try:
        import onnxruntime  # noqa: F401
        have_ort = True
    except ImportError:
        have_ort = False
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (name, build) in enumerate(MODELS.items()):
        model = build(SEED + i)
        path = args.out / f"{name}.onnx"
        onnx.save(model, path)
        ran = "ran in onnxruntime" if have_ort and run_check(model, SEED) is not None else "not run (no onnxruntime)"
        print(f"{path.name:22s} {path.stat().st_size:7d} bytes  {len(model.graph.node):3d} nodes  {ran}")


if __name__ == "__main__":
    main()
