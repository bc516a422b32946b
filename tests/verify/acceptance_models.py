"""Model builders shared by the verification acceptance tests (test_no_false_alarms.py and
test_no_vacuous_proofs.py).

Every BatchNorm gets statistics far from the defaults (mean != 0, var != 1, gamma != 1 with a random
sign, beta != 0): a default BatchNorm is a near-identity and would make a fold, right or wrong,
invisible. PyTorch models get random gamma/beta and then have their running statistics *calibrated*
by running random batches through them in train mode, so activations stay in a sane range however
deep the net is.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))


# --- running bnfold's CLI in-process, and reading its reports ---------------------------------------

def require(module: str, pip_name: str | None = None):
    """Import a package these acceptance tests need; a missing one is a setup failure, not a skip."""
    import importlib

    import pytest
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"this acceptance test needs {module!r} (pip install {pip_name or module}): {e}")


def cli(args: list[str]) -> tuple[int, str, str]:
    """Run bnfold's CLI in-process: (exit code, stdout, stderr). argparse errors are exit codes too."""
    from bnfold.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse: unknown option -> 2
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def cli_json(args: list[str]) -> tuple[int, dict, str]:
    rc, out, err = cli(args + ["--json"])
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        doc = {"_unparsable_stdout": out}
    return rc, doc, err


def why(doc: dict, err: str = "") -> str:
    """A short account of a JSON report for assertion messages."""
    ver = doc.get("verification", doc)
    parts = []
    if isinstance(ver, dict):
        parts.append(f"passed={ver.get('passed')} verdict={ver.get('verdict')}")
        parts.append(f"first_divergence={ver.get('first_divergence')}")
        for name, p in (ver.get("providers") or {}).items():
            if p.get("ran"):
                outs = {o: (s.get("max_abs"), s.get("atol"), s.get("passed")) for o, s in (p.get("outputs") or {}).items()}
                parts.append(f"{name}: outputs (max_abs, atol, passed)={outs}")
    if "skipped" in doc:
        parts.append(f"skipped={[(s.get('bn'), s.get('reason')) for s in doc['skipped']]}")
    if err.strip():
        parts.append(f"stderr={err.strip()[-600:]}")
    if "_unparsable_stdout" in doc:
        parts.append(f"stdout={doc['_unparsable_stdout'][-600:]}")
    return "; ".join(parts)


# --- BN statistics ---------------------------------------------------------------------------------

def far_bn(rng: np.random.Generator, c: int) -> dict[str, np.ndarray]:
    """BN parameters far from the defaults: mean != 0, var != 1, gamma != 1 (random sign), beta != 0."""
    return {
        "gamma": rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c),
        "beta": rng.normal(0.0, 1.0, c),
        "mean": rng.normal(0.5, 1.0, c),
        "var": rng.uniform(0.5, 3.0, c),
    }


def assert_far_from_defaults(model: onnx.ModelProto) -> None:
    """Every BatchNormalization of an ONNX model whose parameters are initializers has non-default
    statistics (a precondition of the tests, not a property of bnfold)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        p = [inits.get(i) for i in n.input[1:5]]
        if any(a is None for a in p):
            continue
        gamma, beta, mean, var = (np.asarray(a, np.float64) for a in p)
        assert not (np.allclose(gamma, 1) and np.allclose(beta, 0) and np.allclose(mean, 0) and np.allclose(var, 1)), \
            f"test setup: BN {n.name} has default statistics"


# --- ONNX light models shipped in the onnx wheel ----------------------------------------------------

def light_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def light_models_with_bn() -> list[str]:
    """Names (without light_ and .onnx) of the onnx wheel's light models that contain a BatchNormalization."""
    d = light_dir()
    out = []
    if not os.path.isdir(d):
        return out
    for f in sorted(os.listdir(d)):
        if f.startswith("light_") and f.endswith(".onnx"):
            m = onnx.load(os.path.join(d, f))
            if any(n.op_type == "BatchNormalization" for n in m.graph.node):
                out.append(f[len("light_"):-len(".onnx")])
    return out


# --- small hand-built ONNX graphs -------------------------------------------------------------------

def cast_gemm_bn(dtype: Any, seed: int = 0, n_in: int = 16, n_out: int = 12) -> onnx.ModelProto:
    """x (float32) -> Cast(dtype) -> Gemm(transB=1) -> BatchNormalization -> y (dtype).

    `dtype`: np.float64, np.float16 or "bfloat16". Weights and BN parameters are stored in `dtype`."""
    rng = np.random.default_rng(seed)
    if dtype == "bfloat16":
        import ml_dtypes
        np_dt, onnx_dt = np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16
    else:
        np_dt = np.dtype(dtype)
        onnx_dt = helper.np_dtype_to_tensor_dtype(np_dt)

    def init(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(a, np.float64).astype(np.float32).astype(np_dt)
                                       if np_dt != np.float64 else np.asarray(a, np.float64), name)

    bn = far_bn(rng, n_out)
    inits = [init("W", rng.normal(0, 0.3, (n_out, n_in))), init("B", rng.normal(0, 0.3, n_out)),
             init("gamma", bn["gamma"]), init("beta", bn["beta"]), init("mean", bn["mean"]), init("var", bn["var"])]
    nodes = [helper.make_node("Cast", ["x"], ["xc"], name="cast", to=onnx_dt),
             helper.make_node("Gemm", ["xc", "W", "B"], ["g"], name="gemm", transB=1),
             helper.make_node("BatchNormalization", ["g", "gamma", "beta", "mean", "var"], ["y"], name="bn",
                              epsilon=1e-5)]
    g = helper.make_graph(nodes, "cast_gemm_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n_in])],
                          [helper.make_tensor_value_info("y", onnx_dt, [4, n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-acceptance")
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def opset9_training_outputs_bn(seed: int = 0) -> onnx.ModelProto:
    """Opset 9: x -> Conv1 -> BN1 (all five outputs: Y, mean, var, saved_mean, saved_var; only Y used)
    -> Relu -> Conv2 -> BN2 (plain, one output) -> y. BN1 must be kept (TRAINING_MODE), BN2 folded."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(rng.normal(0, 0.3, (8, 3, 3, 3))), "w1"),
             numpy_helper.from_array(f32(rng.normal(0, 0.3, 8)), "b1"),
             numpy_helper.from_array(f32(rng.normal(0, 0.3, (6, 8, 3, 3))), "w2"),
             numpy_helper.from_array(f32(rng.normal(0, 0.3, 6)), "b2")]
    for name, c in (("bn1", 8), ("bn2", 6)):
        st = far_bn(rng, c)
        inits += [numpy_helper.from_array(f32(st[k]), f"{name}_{k}") for k in ("gamma", "beta", "mean", "var")]
    ps = lambda name: [f"{name}_{k}" for k in ("gamma", "beta", "mean", "var")]  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1"] + ps("bn1"),
                         ["bn1_y", "bn1_mean_out", "bn1_var_out", "bn1_saved_mean", "bn1_saved_var"], name="bn1",
                         epsilon=1e-5, momentum=0.9),
        helper.make_node("Relu", ["bn1_y"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2"] + ps("bn2"), ["y"], name="bn2", epsilon=1e-5),
    ]
    g = helper.make_graph(nodes, "opset9_bn_training_outputs",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], producer_name="bnfold-acceptance")
    m.ir_version = 4
    onnx.checker.check_model(m)
    return m


def all_zero_output_model(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv (bias -1000) -> BN -> Relu -> y: every output value is exactly 0 on normal inputs."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    st = far_bn(rng, 4)
    st["gamma"] = np.abs(st["gamma"])  # keep the sign: the huge negative conv bias stays negative
    inits = [numpy_helper.from_array(f32(rng.normal(0, 0.3, (4, 3, 3, 3))), "w"),
             numpy_helper.from_array(f32(np.full(4, -1000.0)), "b")]
    inits += [numpy_helper.from_array(f32(st[k]), f"bn_{k}") for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn_gamma", "bn_beta", "bn_mean", "bn_var"], ["n"],
                              name="bn", epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    g = helper.make_graph(nodes, "all_zero", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 16, 16])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-acceptance")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def rename_intermediates(model: onnx.ModelProto, suffix: str = "__renamed") -> onnx.ModelProto:
    """A copy in which every node output that is not a graph output gets a new name (so a verifier
    can compare the graph outputs only)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outs = {o.name for o in m.graph.output}
    new = {o: o + suffix for n in m.graph.node for o in n.output if o and o not in outs}
    for n in m.graph.node:
        n.input[:] = [new.get(i, i) for i in n.input]
        n.output[:] = [new.get(o, o) for o in n.output]
    del m.graph.value_info[:]
    return m


def scale_initializer(model: onnx.ModelProto, name: str, factor: float, index: Any = None) -> onnx.ModelProto:
    """A copy with initializer `name` multiplied by `factor` (on `index` only, when given)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    t = next(t for t in m.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    if index is None:
        a = (a.astype(np.float64) * factor).astype(a.dtype)
    else:
        a[index] = (a[index].astype(np.float64) * factor).astype(a.dtype)
    t.CopyFrom(numpy_helper.from_array(a, name))
    return m


# --- onnxruntime ------------------------------------------------------------------------------------

def ort_session(model: onnx.ModelProto | str, level: str = "disable", optimized_path: str | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_intermediates(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every node output of `model` (optimisations off), by name."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in m.graph.node:
        for o in n.output:
            if o and o not in have:
                m.graph.output.append(onnx.ValueInfoProto(name=o))
                have.add(o)
    sess = ort_session(m)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


# --- PyTorch -----------------------------------------------------------------------------------------

def torch_setup() -> None:
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)


def calibrate_bn(model: Any, make_batch: Callable[[int], Sequence[Any]], batches: int = 3, seed: int = 0) -> Any:
    """Random gamma (random sign) and beta for every BatchNorm, then running statistics measured on
    `batches` random batches (BN modules alone in train mode, cumulative average); returns the model
    in eval mode."""
    import torch
    import torch.nn as nn
    g = torch.Generator().manual_seed(seed)
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns, "test setup: the model has no BatchNorm"
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            if m.affine:
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_((0.5 + 1.5 * torch.rand(c, generator=g)) * sign)
                m.bias.copy_(torch.randn(c, generator=g))
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
            m.train()
        for b in range(batches):
            model(*make_batch(b))
    model.eval()
    with torch.no_grad():
        for m in bns:
            m.momentum = 0.1
            # the calibrated statistics are far from the defaults (a precondition, not a bnfold property)
            assert not (torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))
                        and torch.allclose(m.running_var, torch.ones_like(m.running_var)))
    return model


def export_onnx(model: Any, args: tuple, path: str | None = None, *, opset: int = 17,
                input_names: Sequence[str] = ("input",), output_names: Sequence[str] | None = None,
                dynamic_axes: dict | None = None) -> onnx.ModelProto:
    """TorchScript-based export keeping every BatchNormalization (no constant folding, eval mode)."""
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, dynamo=False, opset_version=opset, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=list(input_names),
                          output_names=list(output_names) if output_names else None, dynamic_axes=dynamic_axes)
    m = onnx.load_from_string(buf.getvalue())
    if path:
        onnx.save(m, path)
    return m


def resnet18(seed: int = 0, size: int = 64) -> tuple[Any, Any]:
    """torchvision resnet18 (random weights, calibrated BN) and one input of (1, 3, size, size)."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_bn(model, lambda b: (torch.randn(4, 3, size, size, generator=g),))
    return model, torch.randn(1, 3, size, size, generator=g)


class SmallConvNet:
    """A factory for a small conv net (3x3 kernels, BN, ReLU, global pool) that accepts any N/H/W."""

    @staticmethod
    def build(seed: int = 0):
        import torch
        import torch.nn as nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
                self.bn1 = nn.BatchNorm2d(8)
                self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
                self.bn2 = nn.BatchNorm2d(16)
                self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
                self.bn3 = nn.BatchNorm2d(16)
                self.head = nn.Conv2d(16, 5, 1)

            def forward(self, x):
                x = torch.relu(self.bn1(self.conv1(x)))
                x = torch.relu(self.bn2(self.conv2(x)))
                x = torch.relu(self.bn3(self.conv3(x)))
                return self.head(x)  # spatial output: a flip of a 3x3 kernel shows on any H, W > 1

        torch.manual_seed(seed)
        net = Net()
        g = torch.Generator().manual_seed(seed + 1)
        return calibrate_bn(net, lambda b: (torch.randn(4, 3, 24, 24, generator=g),))


def flip_3x3_kernels(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every Conv weight with a 3x3 kernel is flipped spatially (both axes)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    conv_weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    flipped = 0
    for t in m.graph.initializer:
        if t.name in conv_weights:
            a = numpy_helper.to_array(t)
            if a.ndim == 4 and a.shape[2:] == (3, 3):
                t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a[:, :, ::-1, ::-1]), t.name))
                flipped += 1
    assert flipped, "test setup: no 3x3 conv weight initializer found"
    return m


def swamped_difference_model(seed: int = 0, rel: float = 3e-6) -> onnx.ModelProto:
    """y = BN_a(Gemm(x, W)) - BN_b(Gemm(x, W * (1 + rel))), both BNs with the same (random) parameters.

    The output is a tiny difference of two large, nearly equal values: nudging the weights by one ulp
    moves it by a sizeable fraction of its own magnitude, so a tolerance derived from that noise is
    swamped (>= 1% of max |reference|) and cannot prove anything about a fold."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    w = f32(rng.normal(0, 0.3, (12, 16)))
    w2 = (w.astype(np.float64) * (1 + rel)).astype(np.float32)
    st = far_bn(rng, 12)
    inits = [numpy_helper.from_array(w, "W1"), numpy_helper.from_array(w2, "W2"),
             numpy_helper.from_array(f32(rng.normal(0, 0.3, 12)), "B")]
    for b in ("bn_a", "bn_b"):
        inits += [numpy_helper.from_array(f32(st[k]), f"{b}_{k}") for k in ("gamma", "beta", "mean", "var")]
    ps = lambda b: [f"{b}_{k}" for k in ("gamma", "beta", "mean", "var")]  # noqa: E731
    nodes = [helper.make_node("Gemm", ["x", "W1", "B"], ["ga"], name="gemm_a", transB=1),
             helper.make_node("BatchNormalization", ["ga"] + ps("bn_a"), ["a"], name="bn_a"),
             helper.make_node("Gemm", ["x", "W2", "B"], ["gb"], name="gemm_b", transB=1),
             helper.make_node("BatchNormalization", ["gb"] + ps("bn_b"), ["b"], name="bn_b"),
             helper.make_node("Sub", ["a", "b"], ["y"], name="sub")]
    g = helper.make_graph(nodes, "swamped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 12])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-acceptance")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def ssdlite(seed: int = 0, size: int = 320) -> tuple[Any, Any]:
    """torchvision ssdlite320_mobilenet_v3_large (random weights, calibrated BN) and one image."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_bn(model, lambda b: ([torch.rand(3, size, size, generator=g) for _ in range(2)],), batches=2)
    return model, torch.rand(3, size, size, generator=g)


def fasterrcnn(seed: int = 0, size: int = 128) -> tuple[Any, Any]:
    """torchvision fasterrcnn_mobilenet_v3_large_fpn (random weights, calibrated BN; small min/max size
    so that it runs quickly on a CPU) and one image. Random weights give no detections."""
    import torch
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=size, max_size=size)
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_bn(model, lambda b: ([torch.rand(3, size, size, generator=g) for _ in range(2)],), batches=2)
    return model, torch.rand(3, size, size, generator=g)


def torch_masked_net(seed: int = 0, channel: int = 3):
    """stem (Conv -> BN -> ReLU) -> body (Conv -> BN -> ReLU) -> mean -> Linear, calibrated BN, and the
    stem BN's channel `channel` made dead: gamma 0.5, beta -20, so the stem ReLU zeroes that channel on
    any input of normal scale. Input (N, 3, 16, 16)."""
    import torch
    import torch.nn as nn

    class MaskedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean((2, 3)))

    torch.manual_seed(seed)
    net = MaskedNet()
    g = torch.Generator().manual_seed(seed + 1)
    calibrate_bn(net, lambda b: (torch.randn(4, 3, 16, 16, generator=g),))
    with torch.no_grad():
        net.stem[1].weight[channel] = 0.5
        net.stem[1].bias[channel] = -20.0
    return net


def torch_rezero_net(seed: int = 0):
    """Conv -> BN -> ReLU, then a residual branch Conv -> BN scaled by a 0-dim parameter (ReZero)."""
    import torch
    import torch.nn as nn

    class ReZeroNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(8)
            self.alpha = nn.Parameter(torch.tensor(0.5))  # 0-dim float parameter

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return y + self.alpha * self.bn2(self.conv2(y))

    torch.manual_seed(seed)
    net = ReZeroNet()
    g = torch.Generator().manual_seed(seed + 1)
    return calibrate_bn(net, lambda b: (torch.randn(4, 3, 16, 16, generator=g),))


# --- Keras -----------------------------------------------------------------------------------------

def keras_randomise_bn(model: Any, rng: np.random.Generator) -> None:
    """Every Keras BatchNormalization gets parameters far from the defaults."""
    import keras
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization) and layer.moving_mean is not None:
            st = far_bn(rng, int(layer.moving_mean.shape[0]))
            for var, key in ((layer.gamma, "gamma"), (layer.beta, "beta"), (layer.moving_mean, "mean"),
                             (layer.moving_variance, "var")):
                if var is not None:
                    var.assign(st[key].astype(keras.backend.standardize_dtype(var.dtype)))


_REZERO_LAYER: Any = None


def keras_rezero_layer() -> Any:
    """A Keras layer multiplying its input by one 0-dim trainable weight (registered once)."""
    global _REZERO_LAYER
    if _REZERO_LAYER is None:
        import keras

        @keras.saving.register_keras_serializable(package="bnfold_acceptance")
        class ReZeroScale(keras.layers.Layer):
            def build(self, input_shape):
                self.alpha = self.add_weight(shape=(), initializer=keras.initializers.Constant(0.5), name="alpha")

            def call(self, x):
                return x * self.alpha

        _REZERO_LAYER = ReZeroScale
    return _REZERO_LAYER


def keras_rezero_net(seed: int = 0) -> Any:
    import keras
    L = keras.layers
    inp = keras.Input((16, 16, 3), name="x")
    y = L.Conv2D(8, 3, padding="same", name="conv1")(inp)
    y = L.BatchNormalization(name="bn1")(y)
    y = L.ReLU(name="relu1")(y)
    z = L.Conv2D(8, 3, padding="same", name="conv2")(y)
    z = L.BatchNormalization(name="bn2")(z)
    z = keras_rezero_layer()(name="rezero")(z)
    model = keras.Model(inp, L.Add(name="add")([y, z]))
    keras_randomise_bn(model, np.random.default_rng(seed))
    assert any(len(w.shape) == 0 for w in model.weights), "test setup: no 0-dim weight"
    return model


def keras_masked_net(seed: int = 0, channel: int = 3) -> Any:
    """conv_a -> bn_a -> relu_a -> conv_b -> bn_b -> relu_b -> GAP -> Dense, random BN, and bn_a's
    channel `channel` made dead (gamma 0.5, beta -20): relu_a zeroes it on inputs of normal scale."""
    import keras
    L = keras.layers
    inp = keras.Input((16, 16, 3), name="x")
    y = L.Conv2D(8, 3, padding="same", name="conv_a")(inp)
    y = L.BatchNormalization(name="bn_a")(y)
    y = L.ReLU(name="relu_a")(y)
    y = L.Conv2D(8, 3, padding="same", name="conv_b")(y)
    y = L.BatchNormalization(name="bn_b")(y)
    y = L.ReLU(name="relu_b")(y)
    y = L.GlobalAveragePooling2D(name="gap")(y)
    model = keras.Model(inp, L.Dense(4, name="head")(y))
    keras_randomise_bn(model, np.random.default_rng(seed))
    bn = model.get_layer("bn_a")
    gamma, beta, mean, var = (np.array(w) for w in bn.get_weights())
    gamma[channel], beta[channel] = 0.5, -20.0
    bn.set_weights([gamma, beta, mean, var])
    return model


# --- subprocess script: Keras applications under another Keras backend --------------------------------

KERAS_BACKEND_SCRIPT = r'''
import importlib.machinery, json, os, sys
if os.environ.get("BNFOLD_TEST_HIDE_TENSORFLOW") == "1":
    # tensorflow absent, as on a machine with Keras on the torch or jax backend only: the path finder
    # does not see it, so `import tensorflow` raises ModuleNotFoundError and find_spec gives None
    class _NoTensorflow(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return None
            return super().find_spec(name, path, target)
    sys.meta_path[:] = [_NoTensorflow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
import numpy as np
import keras
import bnfold
sys.path.insert(0, os.environ["BNFOLD_TEST_HELPERS"])
from acceptance_models import keras_randomise_bn
model = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))
keras_randomise_bn(model, np.random.default_rng(0))
doc = {"backend": keras.backend.backend(), "tensorflow_loaded": "tensorflow" in sys.modules}
try:
    res = bnfold.fold(model)
    doc.update(report=res.report.to_dict(), n_bn=len(res.report.decisions))
except Exception as e:
    doc.update(error=f"{type(e).__name__}: {e}")
print("BNFOLD_RESULT " + json.dumps(doc, default=str))
'''
