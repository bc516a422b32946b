"""The batched arithmetic of plain Conv->BN folds (bnfold/onnx/batched.py) writes exactly what the
one-BN-at-a-time path writes: the same bytes, the same decisions, the same reasons.

Every test folds the same model twice, with the batch on and off, and compares the serialised models
and the reports; the hand-built cases also check that the batch really took the BNs it should (a
comparison of two runs of the ordinary path would prove nothing) and that the folded model computes
the original's outputs. The hypothesis test draws the fuzz suite's random models (shared weights,
fan-out, chains, fp16/fp64, IR 3, training-mode and non-finite statistics...).
"""
from __future__ import annotations


import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings

import bnfold
from bnfold.onnx import batched
from tests.conftest import random_bn
from tests.fuzz.strategies_onnx import cases
from tests.helpers.batch_check import same_either_way, taken
from tests.helpers.onnx_build import G, count_ops, run_ort


def conv_bn(g: G, name: str, x: str, cin: int, cout: int, *, bias: bool = True, group: int = 1,
            k: int = 3, stats=None, eps: float = 1e-3, weight: str | None = None) -> str:
    w = weight or g.weight(f"{name}_w", (cout, cin // group, k, k))
    ins = [x, w] + ([g.init(f"{name}_b", g.rng.normal(0, 1, cout))] if bias else [])
    y = g.node("Conv", ins, [f"{name}_y"], name=name, pads=[k // 2] * 4, group=group)
    return g.bn(f"{name}_bn", y, cout, eps=eps, stats=stats)


def check_outputs(model: onnx.ModelProto, folded: onnx.ModelProto, shape) -> None:
    x = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    want, have = run_ort(model, {"x": x}), run_ort(folded, {"x": x})
    for a, b in zip(want, have):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4 * float(np.abs(a).max()))


def test_a_chain_of_plain_pairs_is_all_batched(monkeypatch):
    g = G(np.random.default_rng(1))
    x = "x"
    for i in range(24):
        x = conv_bn(g, f"c{i}", x, 4, 4, bias=i % 2 == 0, group=2 if i % 3 == 0 else 1, k=1 if i % 4 else 3)
    model = g.model([("x", [2, 4, 5, 5])], [(x, [2, 4, 5, 5])])
    assert taken(model, monkeypatch) == 24
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert count_ops(res.model, "BatchNormalization") == 0
    check_outputs(model, res.model, (2, 4, 5, 5))


def test_unnamed_nodes_are_named_alike_either_way(monkeypatch):
    """A node without a name is labelled by its op and first output: the conv a BN folds into is named by the
    output it had (the batch once named it by the BN's output, which the conv writes after the fold)."""
    g = G(np.random.default_rng(7))
    x = "x"
    for i in range(3):
        x = conv_bn(g, f"c{i}", x, 4, 4, bias=i != 1)
    model = g.model([("x", [1, 4, 5, 5])], [(x, [1, 4, 5, 5])])
    for n in model.graph.node:
        n.name = ""
    assert taken(model, monkeypatch) == 3
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert [(d.bn, d.producer) for d in res.report.folded] == [
        (f"BatchNormalization:c{i}_bn_out", f"Conv:c{i}_y") for i in range(3)]


def test_depthwise_grouped_and_biasless_convs(monkeypatch):
    g = G(np.random.default_rng(2))
    a = conv_bn(g, "dw", "x", 6, 6, group=6, bias=False)
    b = conv_bn(g, "grp", a, 6, 9, group=3)
    c = conv_bn(g, "pw", b, 9, 5, k=1, bias=False)
    model = g.model([("x", [1, 6, 7, 7])], [(c, [1, 5, 7, 7])])
    assert taken(model, monkeypatch) == 3
    same_either_way(model, monkeypatch)
    check_outputs(model, bnfold.fold(model, verify=False).model, (1, 6, 7, 7))


def test_extreme_statistics_give_the_ordinary_reasons(monkeypatch):
    """NaN statistics, a negative variance and a weight that overflows float32 after folding: the batch
    leaves them to the ordinary path, which names the reason."""
    rng = np.random.default_rng(3)
    g = G(rng)
    nan = random_bn(rng, 4)
    nan["var"] = nan["var"].copy()
    nan["var"][1] = np.nan
    neg = random_bn(rng, 4)
    neg["var"] = np.array([1.0, -2.0, 1.0, 1.0])
    huge = random_bn(rng, 4)
    huge["gamma"], huge["var"] = np.full(4, 3e38), np.full(4, 1e-6)
    x = conv_bn(g, "ok0", "x", 4, 4)
    x = conv_bn(g, "nan", x, 4, 4, stats=nan, eps=0.0)
    x = conv_bn(g, "neg", x, 4, 4, stats=neg, eps=1e-5)
    x = conv_bn(g, "big", x, 4, 4, stats=huge, eps=0.0)
    x = conv_bn(g, "ok1", x, 4, 4)
    model = g.model([("x", [1, 4, 3, 3])], [(x, [1, 4, 3, 3])])
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    skipped = {d.bn: d.reason.value for d in res.report.skipped}
    assert skipped == {"nan_bn": "NON_FINITE_PARAM", "neg_bn": "NON_FINITE_PARAM", "big_bn": "DTYPE_OVERFLOW"}
    assert taken(model, monkeypatch) == 2


def test_what_changed_since_the_batch_goes_the_ordinary_way(monkeypatch):
    """A BN after a BN (the second folds into the rewritten conv, from its float64 values), a BN before a
    conv (folded backward into it first), a Mul after a BN (absorbed), a conv output read twice, a weight
    two convs share and BN statistics shared by two BNs."""
    rng = np.random.default_rng(4)
    g = G(rng)
    x = conv_bn(g, "a", "x", 4, 4)
    x = g.bn("a2", x, 4, eps=1e-3)  # Conv -> BN -> BN
    x = g.bn("pre", x, 4, eps=1e-3)  # BN -> Conv -> BN
    x = conv_bn(g, "b", x, 4, 4)
    y = conv_bn(g, "c", x, 4, 4)
    y = g.node("Mul", [y, g.init("m", rng.uniform(0.5, 2, (1, 4, 1, 1)))], ["mul_y"])  # absorbed
    shared = g.weight("shared_w", (4, 4, 3, 3))
    p = conv_bn(g, "s1", y, 4, 4, weight=shared)
    q = conv_bn(g, "s2", y, 4, 4, weight=shared)
    fan = g.node("Conv", [p, g.weight("f_w", (4, 4, 1, 1))], ["fan_y"], name="fan")
    r = g.bn("fan_bn", fan, 4)
    z = g.node("Add", [g.node("Add", [q, r], ["add1"]), fan], ["out"])  # fan's output read twice
    st = random_bn(rng, 4)
    u = conv_bn(g, "t1", z, 4, 4, stats=st)
    v = conv_bn(g, "t2", z, 4, 4, stats=st)
    out = g.node("Add", [u, v], ["final"])
    model = g.model([("x", [1, 4, 5, 5])], [(out, [1, 4, 5, 5])])
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    check_outputs(model, res.model, (1, 4, 5, 5))
    assert 0 < taken(model, monkeypatch) < len(res.report.folded)


def test_unusual_tensors_and_attributes_go_the_ordinary_way(monkeypatch):
    """Values in float_data instead of raw bytes, float16 and float64, training_mode=0 spelled out, an
    initializer the caller may override (IR 4 graph input) and an IR 3 model: each folds (or not)
    exactly as it would alone."""
    rng = np.random.default_rng(5)
    for variant in ("float_data", "float16", "float64", "training_mode", "overridable", "ir3", "no_epsilon"):
        g = G(rng, np.float16 if variant == "float16" else np.float64 if variant == "float64" else np.float32)
        x = conv_bn(g, "p0", "x", 4, 4)
        w = g.weight("odd_w", (4, 4, 1, 1))
        y = g.node("Conv", [x, w, g.init("odd_b", rng.normal(0, 1, 4))], ["odd_y"], name="odd")
        attrs = {"training_mode": 0} if variant == "training_mode" else {}
        st = random_bn(rng, 4)
        ins = [y] + [g.init(f"odd_{k}", st[k]) for k in ("gamma", "beta", "mean", "var")]
        kw = {} if variant == "no_epsilon" else {"epsilon": 1e-3}
        z = g.node("BatchNormalization", ins, ["odd_out"], name="odd_bn", **kw, **attrs)
        z = conv_bn(g, "p1", z, 4, 4)
        if variant == "float_data":
            for t in g.inits:
                if t.name.startswith("odd_"):
                    t.CopyFrom(onnx.helper.make_tensor(t.name, t.data_type, list(t.dims),
                                                       onnx.numpy_helper.to_array(t).ravel().tolist()))
        et = onnx.helper.np_dtype_to_tensor_dtype(g.dtype)
        model = g.model([("x", [1, 4, 3, 3])], [(z, [1, 4, 3, 3])], ir=3 if variant == "ir3" else 8)
        if variant == "overridable":
            model.graph.input.append(onnx.helper.make_tensor_value_info("odd_gamma", et, [4]))
        if variant == "ir3":
            model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                     for t in model.graph.initializer)
            model.opset_import[0].version = 9
        onnx.checker.check_model(model)
        same_either_way(model, monkeypatch)
        n = taken(model, monkeypatch)
        assert n == (0 if variant in ("float16", "float64") else 3 if variant in ("ir3", "no_epsilon") else 2), variant


def test_weights_borrowed_from_the_callers_model(monkeypatch):
    """bnfold.fold(model) folds a copy that borrows big weights from the caller's model: those fold one at
    a time, the small ones in the batch, and the caller's model is untouched."""
    g = G(np.random.default_rng(6))
    a = conv_bn(g, "big", "x", 32, 64, k=3)  # 18,432 values: over the batch's limit
    b = conv_bn(g, "mid", a, 64, 16, k=3)  # 9,216: borrowed, yet small enough to batch
    c = conv_bn(g, "small", b, 16, 8, k=1)
    model = g.model([("x", [1, 32, 4, 4])], [(c, [1, 8, 4, 4])])
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=True)
    assert res.report.verification.verdict == "passed"
    assert len(res.report.folded) == 3


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases(max_blocks=4))
def test_random_models_fold_the_same_either_way(case, monkeypatch):
    same_either_way(case.model, monkeypatch)


@pytest.mark.parametrize("standalone", ["affine", "keep"])
def test_standalone_option_is_unaffected(standalone, monkeypatch):
    g = G(np.random.default_rng(7))
    x = g.bn("lonely", "x", 4)
    x = conv_bn(g, "c", x, 4, 4)
    x = g.bn("after_relu", g.node("Relu", [x], ["r"]), 4)
    model = g.model([("x", [1, 4, 3, 3])], [(x, [1, 4, 3, 3])])
    same_either_way(model, monkeypatch, standalone=standalone)


def test_past_the_batch_memory_cap_bns_fold_alone(monkeypatch):
    """The batch stops gathering once its weights hold MAX_TOTAL values (its memory is ~20 bytes a value):
    the rest fold one at a time, into the same bytes."""
    g = G(np.random.default_rng(8))
    x = "x"
    for i in range(10):
        x = conv_bn(g, f"c{i}", x, 4, 4, k=1)  # 16 weight values each
    model = g.model([("x", [1, 4, 3, 3])], [(x, [1, 4, 3, 3])])
    monkeypatch.setattr(batched, "MAX_TOTAL", 40)
    assert taken(model, monkeypatch) == 3  # 0, 16, 32 values gathered before each: the fourth would start at 48
    same_either_way(model, monkeypatch)
