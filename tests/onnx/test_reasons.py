"""Every reason code the ONNX pass can give, each provoked on purpose; folds verified with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import bnfold
from bnfold.core.decisions import Reason
from tests.helpers.onnx_build import G, count_ops, run_ort


def fold(model: onnx.ModelProto, **kw):
    return bnfold.fold(model, **kw)


def only_skip(res) -> tuple[Reason, str]:
    assert len(res.report.skipped) == 1, res.report.to_dict()
    d = res.report.skipped[0]
    return d.reason, d.detail


def conv_bn(rng, dtype=np.float32, **bn_attrs) -> G:
    g = G(rng, dtype)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y", **bn_attrs)
    return g


X = ("x", [1, 3, 6, 6])
Y = ("y", [1, 4, 6, 6])


def test_training_mode_attribute(rng):
    m = conv_bn(rng, training_mode=1).model([X], [Y], opset=15)
    reason, detail = only_skip(fold(m, verify=False))
    assert reason is Reason.TRAINING_MODE and "training_mode=1" in detail


def test_training_outputs_in_use(rng):
    g = conv_bn(rng)
    bn = g.nodes[-1]
    bn.output.extend(["rm", "rv"])
    m = g.model([X], [Y, ("rm", [4]), ("rv", [4])], opset=15)
    bn.attribute.append(helper.make_attribute("training_mode", 0))
    reason, _ = only_skip(fold(m, verify=False))
    assert reason is Reason.TRAINING_MODE


def test_spatial_zero(rng):
    g = conv_bn(rng, spatial=0)
    m = g.model([X], [Y], opset=8, ir=3)
    reason, _ = only_skip(fold(m, verify=False))
    assert reason is Reason.SPATIAL_MODE


def test_scale_from_graph_input_is_non_constant(rng):
    g = conv_bn(rng)
    bn = g.nodes[-1]
    bn.input[1] = "gamma_in"
    m = g.model([X, ("gamma_in", [4])], [Y])
    reason, detail = only_skip(fold(m, verify=False))
    assert reason is Reason.NON_CONSTANT_PARAM and "gamma_in" in detail


def test_overridable_initializer_is_non_constant(rng):
    g = conv_bn(rng)
    m = g.model([X], [Y], ir=8)
    m.graph.input.append(helper.make_tensor_value_info("bn_mean", onnx.TensorProto.FLOAT, [4]))
    reason, detail = only_skip(fold(m, verify=False))
    assert reason is Reason.NON_CONSTANT_PARAM and "overridable" in detail


def test_weight_computed_at_run_time_is_non_constant(rng):
    g = G(rng)
    g.node("Mul", [g.weight("w0", (4, 3, 3, 3)), "w_scale"], ["w"], name="scale_w")
    g.node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y")
    reason, detail = only_skip(fold(g.model([X, ("w_scale", [1])], [Y]), verify=False))
    assert reason is Reason.NON_CONSTANT_PARAM and "'w'" in detail


def test_nan_statistics(rng):
    g = conv_bn(rng)
    var = next(t for t in g.inits if t.name == "bn_var")
    v = onnx.numpy_helper.to_array(var).copy()
    v[2] = np.nan
    var.CopyFrom(onnx.numpy_helper.from_array(v, "bn_var"))
    reason, _ = only_skip(fold(g.model([X], [Y]), verify=False))
    assert reason is Reason.NON_FINITE_PARAM


def test_fanout_and_graph_output(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y")
    g.node("Relu", ["c"], ["r"], name="relu")
    res = fold(g.model([X], [Y, ("r", [1, 4, 6, 6])]))
    reason, detail = only_skip(res)
    assert reason is Reason.PRODUCER_FANOUT and "relu" in detail
    assert res.report.verification.passed

    g = conv_bn(rng)
    res = fold(g.model([X], [Y, ("c", [1, 4, 6, 6])]))
    reason, _ = only_skip(res)
    assert reason is Reason.INTERMEDIATE_IS_OUTPUT


def test_matmul_on_3d_input_with_equal_sizes_is_axis_mismatch(rng):
    """(N, T, K) @ (K, N') with T == N': BN's channel axis 1 is T, not the features."""
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (5, 4))], ["mm"], name="mm")
    g.bn("bn", "mm", 4, out="y")
    res = fold(g.model([("x", [2, 4, 5])], [("y", [2, 4, 4])]))
    reason, detail = only_skip(res)
    assert reason is Reason.AXIS_MISMATCH and "rank 3" in detail
    assert res.report.verification.passed


def test_fp16_dead_channel_overflow_is_kept(rng):
    g = G(rng, np.float16)
    g.node("Conv", ["x", g.init("w", np.full((2, 3, 1, 1), 200.0))], ["c"], name="conv")
    g.bn("bn", "c", 2, out="y", stats={"gamma": np.array([40.0, 1.0]), "beta": np.zeros(2),
                                        "mean": np.zeros(2), "var": np.array([0.0, 1.0])})
    m = g.model([("x", [1, 3, 2, 2])], [("y", [1, 2, 2, 2])])
    res = fold(m)
    reason, detail = only_skip(res)
    assert reason is Reason.DTYPE_OVERFLOW and "float16" in detail
    assert count_ops(res.model, "BatchNormalization") == 1
    x = np.full((1, 3, 2, 2), 1e-4, np.float16)
    assert np.isfinite(run_ort(res.model, {"x": x})[0].astype(np.float32)).all()


def test_unsupported_and_missing_producer(rng):
    g = G(rng)
    g.node("Relu", ["x"], ["r"], name="relu")
    g.bn("bn_relu", "r", 3, out="y1")
    g.bn("bn_input", "x", 3, out="y2")
    res = fold(g.model([X], [("y1", [1, 3, 6, 6]), ("y2", [1, 3, 6, 6])]))
    reasons = {d.bn: d.reason for d in res.report.skipped}
    assert reasons == {"bn_relu": Reason.UNSUPPORTED_PRODUCER, "bn_input": Reason.NO_PRODUCER}
    assert res.report.verification.passed


def test_every_reason_code_is_provoked_somewhere():
    """Each Reason appears in at least one test that asserts it (here or in the framework passes' tests)."""
    import pathlib
    text = "".join(p.read_text() for p in pathlib.Path(__file__).parents[1].rglob("test_*.py"))
    missing = [r.value for r in Reason if f"Reason.{r.value}" not in text.replace(
        'f"Reason.{r.value}"', "")]
    assert not missing, f"no test provokes {missing}"
