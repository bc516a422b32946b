"""Adversarial inputs for the batched Conv->BN arithmetic (bnfold/onnx/batched.py): each model is folded with
the batch on and off, and the serialised models, the reports and the untouched input are compared; where the
batch should have taken BNs the count is checked (two runs of the ordinary path would prove nothing), and the
folded model is run with onnxruntime against the unfolded one.

Covered: initializer names shared between BN parameters and conv weights/biases of other layers (written in
place by an earlier fold, read by a later planned BN, in both orders), random graphs sharing names across
roles, 1-D/3-D convs, a Conv with two outputs, a BN with empty extra outputs, epsilon twice / as INT,
data that does not fill its dims, -0.0, denormals and the float32 rounding edge, non-finite weights, the
MAX_ELEMENTS edge, If and Loop bodies with local, outer and shadowing initializers, a node order that is
not topological, a BN before a planned BN's conv (the stale-plan guards), retries, names given twice, the
owned in-place fold, reverted folds (Options.exclude and a real failed proof), the command line on a plain
and an external-data file, and more fuzz models. Four bugs these found are fixed and stay tested here: two about the Conv's `group`
attribute (read differently by the batch than by the ordinary path: given twice, of the wrong type), two in
GraphEdits._write_const on both paths (a new constant named like a graph-output initializer overwrote it, or
crashed once that output's readers were gone).
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.api import fold_with
from bnfold.cli import main
from bnfold.core.options import Options
from bnfold.onnx import batched
from bnfold.onnx.edits import GraphEdits
from tests.conftest import random_bn
from tests.fuzz.strategies_onnx import cases
from tests.helpers.batch_check import same_either_way, taken
from tests.helpers.onnx_build import G, run_ort

C = 4
F = TensorProto.FLOAT


def same_function(model: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict, rel: float = 2e-4) -> None:
    for a, b in zip(run_ort(model, feeds), run_ort(folded, feeds)):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a64.shape == b64.shape
        assert np.abs(a64 - b64).max() <= rel * max(1.0, float(np.abs(a64).max()))


def x_feed(shape, seed: int = 0) -> dict:
    return {"x": np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)}


def conv_bn(g: G, name: str, x: str, *, w: str | None = None, b: str | None = None, params=None,
            eps: float = 1e-3, k: int = 3) -> str:
    w = w or g.weight(f"{name}_w", (C, C, k, k))
    ins = [x, w] + ([b] if b else [])
    y = g.node("Conv", ins, [f"{name}_y"], name=name, pads=[k // 2] * 4)
    if params is None:
        st = random_bn(g.rng, C)
        params = [g.init(f"{name}_{q}", st[q]) for q in ("gamma", "beta", "mean", "var")]
    return g.node("BatchNormalization", [y, *params], [f"{name}_out"], name=f"{name}_bn", epsilon=eps)


def positive(g: G, name: str) -> str:
    """A per-channel vector that is a valid variance, scale, shift or bias alike."""
    return g.init(name, g.rng.uniform(0.5, 2.0, C))


# -- bugs -----------------------------------------------------------------------------------------

def test_a_conv_with_group_given_twice_decides_as_without_the_batch(monkeypatch):
    g = G(np.random.default_rng(0))
    conv = helper.make_node("Conv", ["x", g.weight("w", (C, C, 3, 3)), g.init("b", g.rng.normal(0, 1, C))], ["y"],
                            name="conv", pads=[1] * 4)
    conv.attribute.extend([helper.make_attribute("group", 3), helper.make_attribute("group", 1)])
    g.nodes.append(conv)
    z = g.bn("bn", "y", C, eps=1e-3)
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    same_either_way(model, monkeypatch)


@pytest.mark.parametrize("group", ["two", [1]])
def test_a_conv_group_of_the_wrong_type_before_a_refused_bn_does_not_crash_the_batch(group, monkeypatch):
    g = G(np.random.default_rng(0))
    g.node("Conv", ["x", g.weight("w", (C, C, 3, 3))], ["y"], name="conv", pads=[1] * 4, group=group)
    st = random_bn(g.rng, C)
    st["var"] = np.array([1.0, np.nan, 1.0, 1.0])
    z = g.bn("bn", "y", C, eps=1e-3, stats=st)
    a = conv_bn(g, "fine", z)
    model = g.model([("x", [1, C, 5, 5])], [(a, [1, C, 5, 5])])
    monkeypatch.setattr(batched, "ENABLED", False)
    off = bnfold.fold(model, verify=False).report
    assert {d.bn: d.reason.value for d in off.skipped} == {"bn": "NON_FINITE_PARAM"}
    same_either_way(model, monkeypatch)


@pytest.mark.parametrize("where", ["matmul_bias", "standalone_scale"])
def test_a_new_constant_does_not_overwrite_a_graph_output_of_the_same_name(where, monkeypatch):
    g = G(np.random.default_rng(21))
    if where == "matmul_bias":
        y = g.node("MatMul", ["x", g.weight("w", (C, C))], ["y"], name="mm")
        z = g.bn("bn", y, C, eps=1e-3)
        name, shape, x_shape, kw = g.init("mm_bias", np.arange(C)), [C], [2, C], {}
    else:
        z = g.bn("bn", g.node("Relu", ["x"], ["r"]), C, eps=1e-3)
        name, shape, x_shape, kw = g.init("bn_scale", np.arange(C).reshape(C, 1, 1)), [C, 1, 1], [1, C, 3, 3], \
            {"standalone": "affine"}
    model = g.model([("x", x_shape)], [(z, x_shape), (name, shape)])
    folded = same_either_way(model, monkeypatch, **kw)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    same_function(model, folded, x_feed(x_shape))


def test_a_new_constant_named_like_an_emptied_graph_output_does_not_crash(monkeypatch):
    g = G(np.random.default_rng(22))
    st = random_bn(g.rng, C)
    g.node("Conv", ["x", g.weight("cw", (C, C, 1, 1))], ["cy"], name="conv")
    a = g.node("BatchNormalization", ["cy", g.init("mm_bias", st["gamma"]), g.init("b1", st["beta"]),
                                      g.init("m1", st["mean"]), g.init("v1", st["var"])], ["a"], name="bn1")
    flat = g.node("Flatten", [g.node("GlobalAveragePool", [a], ["gap"])], ["flat"])
    z = g.bn("bn2", g.node("MatMul", [flat, g.weight("w", (C, C))], ["y2"], name="mm"), C, eps=1e-3)
    model = g.model([("x", [2, C, 3, 3])], [(z, [2, C]), ("mm_bias", [C])])
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed([2, C, 3, 3]))


# -- what held ----------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["conv_first", "bn_first"])
def test_a_bn_parameter_that_is_another_convs_bias(order, monkeypatch):
    """`p` is the scale of one BN and the bias of another BN's Conv: whichever folds first, the other must read
    the value it had (an in-place write happens only once its last other reader is gone)."""
    g = G(np.random.default_rng(1))
    p = positive(g, "p")
    q = positive(g, "q")
    st = random_bn(g.rng, C)
    if order == "conv_first":  # the Conv that reads p as its bias comes first
        a = conv_bn(g, "a", "x", b=p)
        params = [q, g.init("s_beta", st["beta"]), g.init("s_mean", st["mean"]), p]  # p as the variance too
        z = conv_bn(g, "s", a, b=g.init("s_b", g.rng.normal(0, 1, C)), params=params)
    else:
        params = [p, g.init("s_beta", st["beta"]), g.init("s_mean", st["mean"]), q]
        a = conv_bn(g, "s", "x", params=params)
        z = conv_bn(g, "a", a, b=p)
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 2
    folded = same_either_way(model, monkeypatch)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    same_function(model, folded, x_feed((1, C, 5, 5)))


def test_a_weight_shared_by_a_planned_and_a_chained_conv(monkeypatch):
    """One weight read by two convs: the first's BN is followed by a second BN (the chain folds from float64
    values), the second's BN is plain; the shared weight is written under a new name first, then in place."""
    g = G(np.random.default_rng(2))
    w = g.weight("shared", (C, C, 3, 3))
    a = conv_bn(g, "a", "x", w=w, b=positive(g, "ab"))
    a = g.bn("a_again", a, C, eps=1e-3)
    z = conv_bn(g, "b", a, w=w)
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 2
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed((1, C, 5, 5)))


def _random_sharing_model(seed: int) -> onnx.ModelProto:
    """Conv->BN blocks whose per-channel vectors (biases, BN parameters) and weights are drawn from pools,
    so one initializer often plays several roles; with BN->BN chains, BNs before convs, Mul/Add after BNs,
    Identity between Conv and BN, conv outputs and BN parameters that are graph outputs."""
    r = random.Random(seed)
    g = G(np.random.default_rng(seed))
    vecs: list[str] = []
    weights: dict[int, list[str]] = {}

    def vec() -> str:
        if vecs and r.random() < 0.4:
            return r.choice(vecs)
        vecs.append(positive(g, f"v{len(vecs)}"))
        return vecs[-1]

    def weight(k: int) -> str:
        pool = weights.setdefault(k, [])
        if pool and r.random() < 0.3:
            return r.choice(pool)
        pool.append(g.weight(f"w{k}_{len(pool)}", (C, C, k, k)))
        return pool[-1]

    x, extra = "x", []
    for i in range(r.randint(2, 6)):
        kind = r.choice(["plain", "plain", "chain", "before", "mul", "add", "fanout", "identity", "param_out"])
        k = r.choice([1, 3])
        if kind == "before":
            x = g.node("BatchNormalization", [x, vec(), vec(), vec(), vec()], [f"pre{i}"], name=f"pre{i}", epsilon=1e-3)
        ins = [x, weight(k)] + ([vec()] if r.random() < 0.7 else [])
        y = g.node("Conv", ins, [f"c{i}"], name=f"conv{i}", pads=[k // 2] * 4)
        if kind == "identity":
            y = g.node("Identity", [y], [f"id{i}"])
        if kind == "fanout":
            extra.append(y)
        z = g.node("BatchNormalization", [y, vec(), vec(), vec(), vec()], [f"bn{i}_out"], name=f"bn{i}",
                   epsilon=r.choice([1e-3, 1e-5, 0.1]))
        if kind == "chain":
            z = g.node("BatchNormalization", [z, vec(), vec(), vec(), vec()], [f"bnb{i}_out"], name=f"bnb{i}",
                       epsilon=1e-3)
        if kind in ("mul", "add"):
            op = "Mul" if kind == "mul" else "Add"
            z = g.node(op, [z, g.init(f"m{i}", g.rng.uniform(0.5, 2, (1, C, 1, 1)))], [f"{op}{i}"])
        if kind == "param_out":
            extra.append(r.choice(vecs))
        x = z
    inits = {t.name for t in g.inits}
    outs = [x] + [o for o in dict.fromkeys(extra) if o != x]
    return g.model([("x", [1, C, 5, 5])], [(o, [C] if o in inits else [1, C, 5, 5]) for o in outs])


@pytest.mark.parametrize("seed", range(24))
def test_random_graphs_sharing_initializers_across_roles(seed, monkeypatch):
    model = _random_sharing_model(seed)
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed((1, C, 5, 5), seed), rel=1e-3)


@pytest.mark.parametrize("rank", [1, 3])
def test_1d_and_3d_convs(rank, monkeypatch):
    g = G(np.random.default_rng(3))
    y = g.node("Conv", ["x", g.weight("w", (C, C) + (3,) * rank), g.init("b", g.rng.normal(0, 1, C))], ["y"],
               name="conv", pads=[1] * (2 * rank))
    z = g.bn("bn", y, C, eps=1e-3)
    shape = [1, C] + [5] * rank
    model = g.model([("x", shape)], [(z, shape)])
    assert taken(model, monkeypatch) == 1
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed(shape))


@pytest.mark.parametrize("variant", ["conv_two_outputs", "bn_empty_outputs", "epsilon_twice", "epsilon_int",
                                     "momentum_int", "momentum_float", "no_epsilon", "overridable_var"])
def test_odd_node_shapes_and_attributes(variant, monkeypatch):
    g = G(np.random.default_rng(4))
    outs = ["y", "y_extra"] if variant == "conv_two_outputs" else ["y"]
    g.nodes.append(helper.make_node("Conv", ["x", g.weight("w", (C, C, 3, 3)), g.init("b", g.rng.normal(0, 1, C))],
                                    outs, name="conv", pads=[1] * 4))
    z = g.bn("bn", "y", C, eps=1e-3)
    bn = g.nodes[-1]
    attrs = {"epsilon_twice": [("epsilon", 0.5), ("epsilon", 1e-3)], "epsilon_int": [("epsilon", 1)],
             "momentum_int": [("epsilon", 1e-3), ("momentum", 1)],
             "momentum_float": [("momentum", 0.9), ("epsilon", 0.25)], "no_epsilon": []}.get(variant)
    if attrs is not None:
        del bn.attribute[:]
        bn.attribute.extend(helper.make_attribute(k, v) for k, v in attrs)
    if variant == "bn_empty_outputs":
        bn.output.extend(["", ""])
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    if variant == "overridable_var":  # IR 4+: the caller may feed another variance
        model.graph.input.append(helper.make_tensor_value_info("bn_var", F, [C]))
    expect = 1 if variant in ("conv_two_outputs", "epsilon_twice", "momentum_float", "no_epsilon") else 0
    assert taken(model, monkeypatch) == expect
    folded = same_either_way(model, monkeypatch)
    assert [n.op_type for n in folded.graph.node] == (["Conv", "BatchNormalization"] if variant == "overridable_var"
                                                      else ["Conv"])
    if variant in ("momentum_float", "no_epsilon", "overridable_var"):  # (onnxruntime refuses the others)
        same_function(model, folded, x_feed((1, C, 5, 5)))


@pytest.mark.parametrize("name,size", [("bn_gamma", 12), ("bn_var", 20), ("w", 4 * C * C * 9 + 4), ("b", 12)])
def test_data_that_does_not_fill_its_dims_is_refused_the_same_way(name, size, monkeypatch):
    g = G(np.random.default_rng(5))
    z = conv_bn(g, "c", "x", b=g.init("b", g.rng.normal(0, 1, C)), w=g.weight("w", (C, C, 3, 3)),
                params=[g.init(f"bn_{q}", v) for q, v in random_bn(g.rng, C).items()])
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    t = next(t for t in model.graph.initializer if t.name == name)
    t.raw_data = (t.raw_data + bytes(64))[:size]
    errors = []
    for on in (True, False):
        monkeypatch.setattr(batched, "ENABLED", on)
        with pytest.raises(bnfold.BnfoldError) as e:
            bnfold.fold(model, verify=False)
        errors.append(str(e.value))
    assert errors[0] == errors[1] and repr(name) in errors[0]


def test_negative_zeros_denormals_and_the_float32_edge(monkeypatch):
    """-0.0 biases and shifts keep their sign bit, denormal results stay denormal, a product that rounds down
    to float32's largest value folds, one that rounds up to infinity is refused (DTYPE_OVERFLOW) either way."""
    top = float(np.finfo(np.float32).max)
    g = G(np.random.default_rng(6))
    st = {"gamma": np.array([1.0, -1.0, 1e-39, 1.0]), "beta": np.array([-0.0, 0.0, -0.0, 1.0]),
          "mean": np.array([0.0, -0.0, 0.0, 0.0]), "var": np.array([1.0, 1.0, 1.0, 1.0])}
    params = [g.init(f"z_{q}", v) for q, v in st.items()]
    bias = g.init("z_b", np.array([-0.0, 0.0, 1e-45, -1e-45]))
    a = conv_bn(g, "z", "x", b=bias, params=params, eps=0.0)
    # fits: var = 1 - 2**-24 makes s = 1 + 2**-25 (float64): top * s lies just below the midpoint between top
    # and 2**128, so it rounds down to top; over: gamma = 1 + 2**-23 puts top * s above it (infinity)
    for name, gamma, var in (("fits", 1.0, 1 - 2.0 ** -24), ("over", 1 + 2.0 ** -23, 1.0)):
        w = np.full((C, C, 1, 1), 0.25)
        w[2, 1] = top
        p = [g.init(f"{name}_gamma", np.full(C, gamma)), g.init(f"{name}_beta", np.zeros(C)),
             g.init(f"{name}_mean", np.zeros(C)), g.init(f"{name}_var", np.full(C, var))]
        a = conv_bn(g, name, a, w=g.init(f"{name}_w", w), k=1, params=p, eps=0.0)
    model = g.model([("x", [1, C, 5, 5])], [(a, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 2  # z and fits; over goes the ordinary way
    folded = same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert {d.bn: d.reason.value for d in res.report.skipped} == {"over_bn": "DTYPE_OVERFLOW"}
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    zb = inits["z_b"]
    assert np.signbit(zb[0]) and not np.signbit(zb[1])  # 1*(-0.0) + (-0.0) = -0.0; -1*0.0 + 0.0 = +0.0
    assert inits["fits_w"][2, 1, 0, 0] == np.float32(top)
    assert 0 < abs(inits["z_w"][2]).max() < np.finfo(np.float32).tiny  # scaled by 1e-39: denormal


def test_non_finite_weights_and_biases_are_refused_the_same_way(monkeypatch):
    g = G(np.random.default_rng(7))
    w = g.rng.normal(0, 0.3, (C, C, 3, 3))
    w[1, 2, 0, 0] = np.nan
    a = conv_bn(g, "nanw", "x", w=g.init("nanw_w", w))
    a = conv_bn(g, "infb", a, b=g.init("infb_b", np.array([0.0, np.inf, 0.0, 0.0])))
    st = random_bn(g.rng, C)
    st["gamma"] = np.array([0.0, 1.0, 1.0, 1.0])
    w = g.rng.normal(0, 0.3, (C, C, 3, 3))
    w[0, 0, 0, 0] = np.inf  # times a zero scale: NaN
    a = conv_bn(g, "zeroinf", a, w=g.init("zeroinf_w", w),
                params=[g.init(f"zeroinf_{q}", st[q]) for q in ("gamma", "beta", "mean", "var")])
    a = conv_bn(g, "fine", a)
    model = g.model([("x", [1, C, 5, 5])], [(a, [1, C, 5, 5])])
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert {d.bn for d in res.report.skipped} == {"nanw_bn", "infb_bn", "zeroinf_bn"}
    assert taken(model, monkeypatch) == 1


def test_weights_at_and_above_the_size_limit(monkeypatch, tmp_path, capsys):
    """1-D convs whose weights hold MAX_ELEMENTS - 1, MAX_ELEMENTS and MAX_ELEMENTS + 1 values: the first two
    fold in the batch when nothing is borrowed (with a small pair beside them); in memory, from a file and through the command line the bytes
    are the same either way."""
    assert batched.MAX_ELEMENTS == 16384  # the shapes below are its factorisations and its neighbours'
    g = G(np.random.default_rng(8))
    ins, outs = [], []
    for name, co, ci, k, n in (("at", 8, 16, 128, 130), ("above", 5, 29, 113, 120), ("below", 3, 43, 127, 130),
                               ("small", 4, 4, 3, 10)):  # (a copy borrows the first three: only small batches)
        y = g.node("Conv", [f"x_{name}", g.weight(f"{name}_w", (co, ci, k), 0.05),
                            g.init(f"{name}_b", g.rng.normal(0, 1, co))], [f"{name}_y"], name=name)
        outs.append((g.bn(f"{name}_bn", y, co, eps=1e-3), [1, co, n - k + 1]))
        ins.append((f"x_{name}", [1, ci, n]))
    model = g.model(ins, outs)
    assert taken(model, monkeypatch) == 3
    folded = same_either_way(model, monkeypatch)
    rng = np.random.default_rng(0)
    same_function(model, folded, {n: rng.normal(0, 1, s).astype(np.float32) for n, s in ins})
    # owned: folded in place, nothing borrowed
    results = []
    for on in (True, False):
        monkeypatch.setattr(batched, "ENABLED", on)
        m = onnx.ModelProto()
        m.CopyFrom(model)
        results.append(fold_with(m, Options(verify=False), owned=True).model.SerializeToString())
    assert results[0] == results[1] == folded.SerializeToString()
    # files: plain and with every tensor in an external data file; --no-verify, verified and --dry-run
    onnx.save(model, str(tmp_path / "plain.onnx"))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    sources = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    takes = []
    real_take = batched.Batch.take

    def counted(self, bn):  # the batch's results really are used on these paths
        p = real_take(self, bn)
        takes.append(p is not None)
        return p
    monkeypatch.setattr(batched.Batch, "take", counted)
    for src in ("plain", "ext"):
        for flags in (["--no-verify"], [], ["--no-verify", "--dry-run"]):
            seen = []
            for on in (True, False):
                monkeypatch.setattr(batched, "ENABLED", on)
                out = tmp_path / f"out_{on}"
                out.mkdir(exist_ok=True)
                for p in out.iterdir():
                    p.unlink()
                takes.clear()
                code = main([str(tmp_path / f"{src}.onnx"), "-o", f"{out}/", "--json", "-q", *flags])
                assert any(takes) == on, (src, flags)
                doc = json.loads(capsys.readouterr().out.replace(str(out), "OUT"))
                doc.pop("timing_s", None)
                files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
                seen.append((code, doc, files))
            assert seen[0][0] == seen[1][0] == 0, (src, flags)
            assert seen[0][1] == seen[1][1], (src, flags)
            assert seen[0][2] == seen[1][2], (src, flags)
            assert bool(seen[0][2]) != ("--dry-run" in flags)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == sources


def _body(rng, name: str, local: bool, shadow: bool, chain: bool) -> onnx.GraphProto:
    """If branch: Conv -> BN (-> BN); weight and bias local initializers or the outer ones, BN parameters
    local under names that shadow the outer BN's or under their own."""
    st = random_bn(rng, C)
    inits = [numpy_helper.from_array(st[q].astype(np.float32), f"p_{q}" if shadow else f"{name}_{q}") for q in st]
    params = [t.name for t in inits]
    if local:
        inits += [numpy_helper.from_array(rng.normal(0, .3, (C, C, 3, 3)).astype(np.float32), "w"),
                  numpy_helper.from_array(rng.normal(0, 1, C).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], [f"{name}_c"], name=f"{name}_conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", [f"{name}_c", *params], [f"{name}_o"], name=f"{name}_bn",
                              epsilon=1e-3)]
    out = f"{name}_o"
    if chain:
        st2 = random_bn(rng, C)
        inits += [numpy_helper.from_array(st2[q].astype(np.float32), f"{name}_2{q}") for q in st2]
        nodes.append(helper.make_node("BatchNormalization", [out, *(f"{name}_2{q}" for q in st2)], [f"{name}_o2"],
                                      name=f"{name}_bn2"))
        out = f"{name}_o2"
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, [1, C, 5, 5])], inits)


@pytest.mark.parametrize("local", [True, False])
@pytest.mark.parametrize("shadow", [True, False])
@pytest.mark.parametrize("chain", [True, False])
def test_bns_in_if_bodies_with_local_and_outer_initializers(local, shadow, chain, monkeypatch):
    rng = np.random.default_rng(9)
    st = random_bn(rng, C)
    outer = [numpy_helper.from_array(rng.normal(0, .3, (C, C, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1, C).astype(np.float32), "b")]
    outer += [numpy_helper.from_array(st[q].astype(np.float32), f"p_{q}") for q in st]
    nodes = [helper.make_node("If", ["cond"], ["y"], name="br", then_branch=_body(rng, "t", local, shadow, chain),
                              else_branch=_body(rng, "e", local, shadow, chain)),
             helper.make_node("Conv", ["x", "w", "b"], ["mc"], name="main_conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["mc", "p_gamma", "p_beta", "p_mean", "p_var"], ["z"],
                              name="main_bn")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", F, [1, C, 5, 5]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [1, C, 5, 5]),
                               helper.make_tensor_value_info("z", F, [1, C, 5, 5])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folded = same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert len(res.report.folded) == (5 if chain else 3) and not res.report.skipped
    for cond in (True, False):
        same_function(model, folded, {**x_feed((1, C, 5, 5)), "cond": np.array(cond)})


def test_a_node_order_that_is_not_topological(monkeypatch):
    """BN before the Conv that feeds it in the node list, and a BN -> Conv -> BN whose second BN is listed
    first: the planned BN folds before the backward fold into the same conv."""
    g = G(np.random.default_rng(10))
    a = conv_bn(g, "a", "x", b=g.init("a_b", g.rng.normal(0, 1, C)))
    pre = g.bn("pre", a, C, eps=1e-3)
    z = conv_bn(g, "c", pre, b=g.init("c_b", g.rng.normal(0, 1, C)))
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    assert taken(model, monkeypatch) == 2
    folded = same_either_way(model, monkeypatch)
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0


def test_duplicate_node_names_and_an_excluded_one(monkeypatch):
    """Three BNs all named "bn" and convs all named "conv": excluding "bn" (a reverted fold) excludes every one
    of them, either way."""
    g = G(np.random.default_rng(11))
    x = "x"
    for i in range(3):
        x = conv_bn(g, f"c{i}", x)
    model = g.model([("x", [1, C, 5, 5])], [(x, [1, C, 5, 5])])
    for n in model.graph.node:
        n.name = "bn" if n.op_type == "BatchNormalization" else "conv"
    folded = same_either_way(model, monkeypatch)  # (onnxruntime refuses repeated node names: no run)
    assert sum(op.op_type == "BatchNormalization" for op in folded.graph.node) == 0
    got = []
    for on in (True, False):
        monkeypatch.setattr(batched, "ENABLED", on)
        res = fold_with(model, Options(verify=False, exclude={"bn": "planted"}))
        got.append((res.model.SerializeToString(), [(d.bn, d.reason.value) for d in res.report.skipped]))
    assert got[0] == got[1]
    assert got[0][1] == [("bn", "VERIFICATION_FAILED")] * 3


@pytest.mark.parametrize("strict", [False, True])
def test_a_wrong_batched_fold_is_caught_and_reverted_alike(strict, monkeypatch):
    """A fold damaged where both paths write (GraphEdits.write_raw: one output channel of one conv's weight
    off by 1e-3): verification catches it with the batch on too, reverts that fold alone and re-runs the pass
    with it excluded; with strict=True it fails instead. Same bytes and reports either way."""
    real = GraphEdits.write_raw

    def wrong(self, t, name, value):
        if name == "c1_w":
            if isinstance(value, bytes):  # (the batch writes its float32 results as raw bytes)
                value = np.frombuffer(value, np.float32).reshape(tuple(t.dims))
            value = value.astype(np.float64)
            value[1] *= 1.001
            value = value.astype(np.float32)
        return real(self, t, name, value)

    monkeypatch.setattr(GraphEdits, "write_raw", wrong)
    g = G(np.random.default_rng(12))
    x = "x"
    for i in range(4):
        x = conv_bn(g, f"c{i}", x, b=g.init(f"c{i}_b", g.rng.normal(0, 1, C)))
    model = g.model([("x", [1, C, 5, 5])], [(x, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 4
    folded = same_either_way(model, monkeypatch, verify=True, strict=strict)
    res = bnfold.fold(model, verify=True, strict=strict)
    if strict:
        assert res.report.verification.verdict == "failed"
    else:
        assert res.report.verification.verdict == "passed"
        assert [(d.bn, d.reason.value) for d in res.report.skipped] == [("c1_bn", "VERIFICATION_FAILED")]
        same_function(model, folded, x_feed((1, C, 5, 5)))


def test_a_bn_whose_output_is_a_graph_output_and_read_by_a_mul(monkeypatch):
    """The Mul after BN a cannot be absorbed (a's output is also a graph output): the batch takes a. BN b is read
    by a Mul by a non-constant: the guard leaves b to the ordinary path, which folds it too."""
    g = G(np.random.default_rng(13))
    a = conv_bn(g, "a", "x")
    m = g.node("Mul", [a, g.init("k", g.rng.uniform(0.5, 2, (1, C, 1, 1)))], ["m"])
    b = conv_bn(g, "b", m)
    n = g.node("Mul", [b, "x"], ["n"])
    model = g.model([("x", [1, C, 5, 5])], [(n, [1, C, 5, 5]), (a, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 1
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed((1, C, 5, 5)))
    assert sum(op.op_type == "BatchNormalization" for op in folded.graph.node) == 0


def test_in_memory_big_parameters_are_borrowed_and_left_to_the_ordinary_path(monkeypatch):
    """A Conv of 8,200 output channels, weight and BN parameters borrowed by bnfold.fold's copy (so the batch
    leaves them alone in memory, though a plain copy batches them), beside small plain pairs."""
    big = 8200
    g = G(np.random.default_rng(14))
    y = g.node("Conv", ["x", g.weight("big_w", (big, 1, 1, 1))], ["big_y"], name="big")
    a = g.bn("big_bn", y, big, eps=1e-3)
    y = g.node("Conv", ["x", g.weight("in_w", (C, 1, 3, 3)), positive(g, "in_b")], ["in_y"], name="in", pads=[1] * 4)
    b = conv_bn(g, "small", g.bn("in_bn", y, C, eps=1e-3))
    model = g.model([("x", [1, 1, 3, 3])], [(a, [1, big, 3, 3]), (b, [1, C, 3, 3])])
    assert taken(model, monkeypatch) == 3
    folded = same_either_way(model, monkeypatch)
    same_function(model, folded, x_feed((1, 1, 3, 3)))
    assert sum(op.op_type == "BatchNormalization" for op in folded.graph.node) == 0


def test_the_input_file_is_left_alone_by_a_folded_in_place_run(monkeypatch, tmp_path, capsys):
    """--no-verify folds the loaded model in place (owned): the batch reads the same bytes the file holds;
    the file is unchanged and the output the same either way."""
    g = G(np.random.default_rng(15))
    x = "x"
    for i in range(5):
        x = conv_bn(g, f"c{i}", x, w=g.weight(f"w{i}", (C, C, 3, 3)) if i < 2 else "w0" if i % 2 == 0 else "w1")
    model = g.model([("x", [1, C, 5, 5])], [(x, [1, C, 5, 5])])
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    before = src.read_bytes()
    outs = []
    for on in (True, False):
        monkeypatch.setattr(batched, "ENABLED", on)
        out = tmp_path / f"o{on}.onnx"
        assert main([str(src), "-o", str(out), "--no-verify", "-q"]) == 0
        capsys.readouterr()
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert src.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    folded = onnx.load(str(tmp_path / "oTrue.onnx"))
    same_function(model, folded, x_feed((1, C, 5, 5)))


def _toposorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes are in an order onnxruntime accepts."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer} | {""}
    todo, done = list(m.graph.node), []
    while todo:
        ready = [n for n in todo if all(i in have for i in n.input)]
        assert ready, "a cycle"
        for n in ready:
            done.append(n)
            have.update(n.output)
        todo = [n for n in todo if all(n is not r for r in ready)]
    nodes = [onnx.NodeProto() for _ in done]
    for dst, src in zip(nodes, done):
        dst.CopyFrom(src)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("order", ["topological", "post_first"])
@pytest.mark.parametrize("k,pads", [(1, 0), (3, 0)])
def test_a_conv_folded_into_from_before_then_from_after(order, k, pads, monkeypatch):
    """Relu -> BN pre -> Conv -> BN post: pre can only fold backward, into the Conv (no zero padding), which
    rewrites the Conv's weight and bias in place before post is reached; post's precomputed result is then
    stale and must not be used (OnnxFolder.written / exact). Listed the other way round, post folds first,
    from the batch, and pre after it from the float64 values it left."""
    g = G(np.random.default_rng(16))
    r = g.node("Relu", ["x"], ["r"])
    a = g.bn("pre", r, C, eps=1e-3)
    y = g.node("Conv", [a, g.weight("w", (C, C, k, k)), g.init("b", g.rng.normal(0, 1, C))], ["y"], name="conv",
               pads=[pads] * 4)
    z = g.bn("post", y, C, eps=1e-3)
    n = 5 - k + 1
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, n, n])])
    if order == "post_first":
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(reversed(nodes))
    assert taken(model, monkeypatch) == (0 if order == "topological" else 1)
    folded = same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert {d.bn: d.direction for d in res.report.folded} == {"pre": "before", "post": "after"}
    same_function(_toposorted(model), _toposorted(folded), x_feed((1, C, 5, 5)))


def test_overflows_at_the_edges_of_many_plans(monkeypatch):
    """Forty pairs of 1 to 7 channels and 1x1 or 3x3 kernels; a dozen of them overflow float32 when folded in
    the first or last weight element, the first or last channel's bias, or a random one: exactly those are
    refused (DTYPE_OVERFLOW), and every other folds from the batch."""
    rng = np.random.default_rng(17)
    r = random.Random(17)
    g = G(rng)
    bad = set(r.sample(range(40), 12))
    outs, ins = [], []
    for i in range(40):
        c, ci, k = r.randint(1, 7), r.randint(1, 3), r.choice([1, 3])
        w = rng.normal(0, 0.3, (c, ci, k, k))
        b = rng.normal(0, 1, c)
        st = random_bn(rng, c)
        st["gamma"], st["var"] = np.sign(st["gamma"]) * 1.5, np.full(c, 0.25)  # |s| = 3: 3e38 overflows
        if i in bad:
            where = r.choice(["w_first", "w_last", "b_first", "b_last", "w_any", "b_any"])
            if where.startswith("w"):
                flat = w.reshape(-1)
                flat[{"w_first": 0, "w_last": flat.size - 1}.get(where, r.randrange(flat.size))] = 3e38
            else:
                b[{"b_first": 0, "b_last": c - 1}.get(where, r.randrange(c))] = 3e38
        y = g.node("Conv", [f"x{i}", g.init(f"w{i}", w), g.init(f"b{i}", b)], [f"y{i}"], name=f"conv{i}",
                   pads=[k // 2] * 4)
        outs.append((g.bn(f"bn{i}", y, c, eps=0.0, stats=st), [1, c, 3, 3]))
        ins.append((f"x{i}", [1, ci, 3, 3]))
    model = g.model(ins, outs)
    assert taken(model, monkeypatch) == 40 - len(bad)
    same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert {d.bn: d.reason.value for d in res.report.skipped} == {f"bn{i}": "DTYPE_OVERFLOW" for i in bad}


@pytest.mark.parametrize("order", ["topological", "post_first"])
def test_a_bn_retried_after_its_neighbour_folded_into_a_planned_conv(order, monkeypatch):
    """Relu -> BN a -> BN b -> 1x1 Conv -> BN post: a is refused in the first round, b folds backward into the
    conv, a follows it in the retry (from the float64 values b left); post, planned, must see that its conv
    changed (or, listed first, folds before both)."""
    g = G(np.random.default_rng(18))
    a = g.bn("a", g.node("Relu", ["x"], ["r"]), C, eps=1e-3)
    b = g.bn("b", a, C, eps=1e-3)
    y = g.node("Conv", [b, g.weight("w", (C, C, 1, 1)), g.init("bias", g.rng.normal(0, 1, C))], ["y"], name="conv")
    z = g.bn("post", y, C, eps=1e-3)
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    if order == "post_first":
        nodes = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend([nodes[-1]] + nodes[:-1])
    assert taken(model, monkeypatch) == (0 if order == "topological" else 1)
    folded = same_either_way(model, monkeypatch)
    res = bnfold.fold(model, verify=False)
    assert {d.bn: d.direction for d in res.report.folded} == {"a": "before", "b": "before", "post": "after"}
    same_function(_toposorted(model), _toposorted(folded), x_feed((1, C, 5, 5)))


def test_bns_in_a_loop_body_with_local_and_outer_weights(monkeypatch):
    """A Loop body: Conv (local weight and bias) -> BN (local parameters) -> Conv (outer weight) -> BN (outer
    parameters, also read by a BN of the main graph whose Conv reads the same outer weight)."""
    rng = np.random.default_rng(19)
    st, st2 = random_bn(rng, C), random_bn(rng, C)
    local = [numpy_helper.from_array(rng.normal(0, .3, (C, C, 3, 3)).astype(np.float32), "bw"),
             numpy_helper.from_array(rng.normal(0, 1, C).astype(np.float32), "bb")]
    local += [numpy_helper.from_array(st[q].astype(np.float32), f"b_{q}") for q in st]
    outer_p = ["p_gamma", "p_beta", "p_mean", "p_var"]
    body = helper.make_graph([
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Conv", ["h", "bw", "bb"], ["c"], name="lconv", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "b_gamma", "b_beta", "b_mean", "b_var"], ["c2"], name="lbn",
                         epsilon=1e-3),
        helper.make_node("Conv", ["c2", "w"], ["c3"], name="lconv2", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c3", *outer_p], ["h_out"], name="lbn2", epsilon=1e-3),
    ], "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h", F, [1, C, 5, 5])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", F, [1, C, 5, 5])], local)
    outer = [numpy_helper.from_array(rng.normal(0, .3, (C, C, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")]
    outer += [numpy_helper.from_array(st2[q].astype(np.float32), n) for q, n in zip(st2, outer_p)]
    nodes = [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body),
             helper.make_node("Conv", ["y", "w"], ["mc"], name="main_conv", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["mc", *outer_p], ["z"], name="main_bn")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", F, [1, C, 5, 5])],
                              [helper.make_tensor_value_info("z", F, [1, C, 5, 5])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert taken(model, monkeypatch) == 1  # main_bn (the main graph's count)
    folded = same_either_way(model, monkeypatch)
    assert len(bnfold.fold(model, verify=False).report.folded) == 3
    same_function(model, folded, x_feed((1, C, 5, 5)), rel=1e-3)


@pytest.mark.parametrize("twice", ["tensor", "initializer"])
def test_a_name_given_twice(twice, monkeypatch):
    """Two Convs writing the same tensor name, or two initializers of one name (different values): invalid
    models, folded alike either way (the index keeps the last of each, on both paths)."""
    g = G(np.random.default_rng(20))
    if twice == "tensor":
        g.node("Conv", ["x", g.weight("w1", (C, C, 3, 3))], ["y"], name="c1", pads=[1] * 4)
        g.node("Conv", ["x", g.weight("w2", (C, C, 3, 3))], ["y"], name="c2", pads=[1] * 4)
        z = g.bn("bn", "y", C, eps=1e-3)
    else:
        st = random_bn(g.rng, C)
        g.node("Conv", ["x", g.weight("w", (C, C, 1, 1))], ["y"], name="c1")
        z = g.node("BatchNormalization", ["y", g.init("p", st["gamma"]), g.init("bt", st["beta"]),
                                          g.init("mn", st["mean"]), g.init("vr", st["var"])], ["z"], name="bn")
        g.init("p", st["gamma"] * 3)
        g.init("w", g.rng.normal(0, 1, (C, C, 1, 1)))
    model = g.model([("x", [1, C, 5, 5])], [(z, [1, C, 5, 5])])
    assert taken(model, monkeypatch) == 1
    same_either_way(model, monkeypatch)


@seed(20261129)
@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=cases(max_blocks=6))
def test_bigger_random_models_fold_the_same_either_way(case, monkeypatch):
    """The fuzz suite's models with more blocks than tests/onnx/test_batched.py draws, from another seed."""
    same_either_way(case.model, monkeypatch)
