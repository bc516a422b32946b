"""Adversarial tests for `bnfold export MODEL --to onnx` and `bnfold check FRAMEWORK_MODEL model.onnx`.

Every export ends in an onnxruntime run (optimisations off) of the written file against the original
framework model, and a count of the BatchNormalization nodes left in it. Failures must write nothing,
leave no temporary file and keep a file already at `-o`.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from bnfold.cli import main
from tests.helpers.zoo_torch import set_random_bn


class TwoInputs(nn.Module):
    """A float image and int64 ids, a dict of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.conv, self.bn = nn.Embedding(10, 4), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn1 = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.bn(self.conv(x))
        z = self.bn1(self.fc(y.mean((2, 3)) + self.emb(ids).mean(1)))
        return {"feat": y, "logits": z}


class KeptBN(nn.Module):
    """bn_fan cannot fold (its conv output also feeds the Add); bn2 can."""

    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn_fan, self.c2, self.bn2 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.c(x)
        return self.bn_fan(y) + y, self.bn2(self.c2(x))


class Returns(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.c, self.bn, self.mode = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), mode

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn(self.c(x))
        return (y, y) if self.mode == "dup" else (x, y)


class UnusedFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, unused: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


def _session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _bn_count(path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _leaves(out) -> list[torch.Tensor]:
    return list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_close_to_f64(model: nn.Module, args: tuple, onnx_path, slack: float = 2.0) -> None:
    """The ONNX is no less accurate than the original itself, both against a float64 evaluation."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = _leaves(m64(*[a.double() if a.is_floating_point() else a for a in args]))
        own = _leaves(model(*args))
    sess = _session(onnx_path)
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {n: a.numpy() for n, a in zip(names, args)})
    assert len(got) == len(ref)
    for r, o, g in zip(ref, own, got):
        r = r.numpy()
        assert g.shape == r.shape and g.dtype == o.numpy().dtype
        err_own = np.abs(o.double().numpy() - r).max()
        floor = 8 * np.finfo(g.dtype).eps * np.abs(r).max()
        assert np.abs(g.astype(np.float64) - r).max() <= slack * err_own + floor


def _run(capfd, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capfd.readouterr()
    return code, out, err


def _json(capfd, args: list[str]) -> tuple[int, dict]:
    code, out, _ = _run(capfd, args + ["--json"])
    return code, json.loads(out)  # nothing but the document on stdout, even with the exporters' chatter


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.fixture(scope="module")
def tfiles(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_torch")
    torch.manual_seed(0)
    two = set_random_bn(TwoInputs(), 1)
    x, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(two, (x, ids), dynamic_shapes=({0: batch}, {0: batch})), str(d / "two.pt2"))
    torch.export.save(torch.export.export(two, (x, ids)), str(d / "static.pt2"))
    kept = set_random_bn(KeptBN(), 2)
    torch.export.save(torch.export.export(kept, (x,)), str(d / "kept.pt2"))
    return d, two, kept


@pytest.fixture(scope="module")
def two_onnx(tfiles):
    """One verified export of two.pt2, reused by the check tests."""
    d, _, _ = tfiles
    out = d / "two.onnx"
    assert main(["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(out), "-q"]) == 0
    return out


def test_pt2_two_inputs_int64_dict_outputs_dynamic_batch(tfiles, capfd) -> None:
    d, two, _ = tfiles
    out = d / "two_b4.onnx"
    code, doc = _json(capfd, ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(out),
                              "--input", "x:4x3x8x8", "--input", "ids:4x5:int64"])
    assert code == 0 and doc["output"] == str(out) and doc["verification"]["passed"] is True
    assert len(doc["folded"]) == 2 and not doc["skipped"] and _bn_count(out) == 0
    sess = _session(out)
    assert [i.type for i in sess.get_inputs()] == ["tensor(float)", "tensor(int64)"]
    # the program's batch was dynamic: the ONNX must take a batch it was neither exported nor verified at
    assert not isinstance(sess.get_inputs()[0].shape[0], int)
    _assert_close_to_f64(two, (torch.randn(3, 3, 8, 8), torch.randint(0, 10, (3, 5))), out)


def test_pt2_inputs_given_by_name_in_another_order(tfiles, capfd) -> None:
    """--input names the program's inputs; their order on the command line must not matter."""
    d, two, _ = tfiles
    out = d / "two_rev.onnx"
    code, _, err = _run(capfd, ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(out),
                                "--input", "ids:4x5:int64", "--input", "x:4x3x8x8"])
    assert code == 0, err
    _assert_close_to_f64(two, (torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4, 5))), out)


def test_pt2_unknown_input_name_is_exit_2(tfiles, capfd) -> None:
    d, _, _ = tfiles
    before = _listing(d)
    code, _, err = _run(capfd, ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(d / "zz.onnx"),
                                "--input", "zz:4x3x8x8", "--input", "ids:4x5:int64"])
    assert code == 2 and "zz" in err
    assert _listing(d) == before


def test_static_pt2_at_another_batch_is_one_line_exit_2(tfiles, capfd) -> None:
    d, _, _ = tfiles
    before = _listing(d)
    code, out, err = _run(capfd, ["export", str(d / "static.pt2"), "--to", "onnx", "-o", str(d / "s.onnx"),
                                  "--input", "x:4x3x8x8", "--input", "ids:4x5:int64"])
    assert code == 2 and out == "" and _listing(d) == before
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "static.pt2" in lines[0], err[:2000]


def test_kept_bn_stays_in_onnx_and_is_correct(tfiles, capfd) -> None:
    d, _, kept = tfiles
    out = d / "kept.onnx"
    code, doc = _json(capfd, ["export", str(d / "kept.pt2"), "--to", "onnx", "-o", str(out)])
    assert code == 0 and doc["verification"]["passed"] is True
    assert [s["bn"] for s in doc["skipped"]] == ["bn_fan"] and len(doc["folded"]) == 1
    assert _bn_count(out) == 1
    _assert_close_to_f64(kept, (torch.randn(2, 3, 8, 8),), out)


def test_fp16_module_export(tmp_path, capfd) -> None:
    model = set_random_bn(KeptBN(), 3).half()
    src = tmp_path / "half.pt"
    torch.save(model, str(src))
    out = tmp_path / "half.onnx"
    code, doc = _json(capfd, ["export", str(src), "--trust", "--to", "onnx", "-o", str(out),
                              "--input", "x:2x3x8x8:float16"])
    assert code == 0 and doc["verification"]["passed"] is True and _bn_count(out) == 1
    x = torch.randn(2, 3, 8, 8).half()
    sess = _session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        own = model(x)
    for g, r, o in zip(got, ref, own):
        assert g.dtype == np.float16
        err_own = (o.double() - r).abs().max().item()
        assert np.abs(g.astype(np.float64) - r.numpy()).max() <= 2 * err_own + 8 * 2 ** -10 * r.abs().max().item()


@pytest.mark.parametrize("mode", ["dup", "passthrough"])
def test_outputs_that_repeat_a_tensor_or_an_input(tmp_path, capfd, mode) -> None:
    model = set_random_bn(Returns(mode), 4)
    x = torch.randn(2, 3, 8, 8)
    src = tmp_path / "r.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    out = tmp_path / "r.onnx"
    code, _, err = _run(capfd, ["export", str(src), "--to", "onnx", "-o", str(out)])
    assert code == 0, err
    assert _bn_count(out) == 0
    _assert_close_to_f64(model, (x,), out)


def test_torchscript_with_an_unused_first_input(tmp_path, capfd) -> None:
    """The TorchScript exporter drops unused inputs; feeding the rest by position shifts them."""
    model = set_random_bn(UnusedFirst(), 5)
    src = tmp_path / "u.pt"
    torch.jit.save(torch.jit.script(model), str(src))
    out = tmp_path / "u.onnx"
    code, _, err = _run(capfd, ["export", str(src), "--to", "onnx", "-o", str(out),
                                "--input", "unused:2x3x8x8", "--input", "x:2x3x8x8"])
    assert code == 0, err
    x = torch.randn(2, 3, 8, 8)
    sess = _session(out)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(torch.zeros(1), x.double()).numpy()
    feeds = {i.name: x.numpy() for i in sess.get_inputs()}
    assert np.abs(sess.run(None, feeds)[0] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_existing_output_is_replaced_only_when_verified(tfiles, capfd) -> None:
    d, two, _ = tfiles
    out = d / "existing.onnx"
    out.write_bytes(b"keep me")
    before = _listing(d)
    # a zero tolerance cannot be met by a folded model (rounding moves some output)
    code, doc = _json(capfd, ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(out), "--atol", "0"])
    assert code == 1 and doc["verification"]["passed"] is False and doc["output"] is None
    assert out.read_bytes() == b"keep me" and _listing(d) == before
    code, doc = _json(capfd, ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(out), "--no-verify"])
    assert code == 0 and doc["output"] == str(out) and doc["verification"]["passed"] is not True
    assert _listing(d) == before and _bn_count(out) == 0
    _assert_close_to_f64(two, (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))), out)


def test_export_refusals_write_nothing(tfiles, capfd, tmp_path) -> None:
    d, _, _ = tfiles
    before = _listing(d)
    cases = [
        ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(d / "x.pt")],  # not an ONNX extension
        ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(d / "missing" / "x.onnx")],
        ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(d / "two.pt2")],
        ["export", str(d / "nope.pt2"), "--to", "onnx"],
        ["export", str(d / "two.pt2"), "--to", "onnx", "-o", str(d / "y.onnx"), "--input", "x:2x3x8x8:complex64"],
    ]
    for args in cases:
        code, out, err = _run(capfd, args)
        assert code == 2 and out == "" and err.startswith("bnfold: error:"), (args, err)
        assert _listing(d) == before, args


# ---------------------------------------------------------------- check: PyTorch original vs ONNX

def _perturbed(src, dst, pick=lambda t: len(t.dims) == 4) -> str:
    """`src` with one output channel of one conv weight scaled by 1.01."""
    p = onnx.load(str(src))
    w = next(t for t in p.graph.initializer if pick(t))
    a = numpy_helper.to_array(w).copy()
    a[1] *= 1.01
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    onnx.save(p, str(dst))
    return w.name


def test_check_pt2_against_its_export(tfiles, two_onnx, capfd) -> None:
    d, _, _ = tfiles
    code, doc = _json(capfd, ["check", str(d / "two.pt2"), str(two_onnx)])
    assert code == 0 and doc["verification"]["passed"] is True
    bad = d / "two_bad.onnx"
    _perturbed(two_onnx, bad)
    code, doc = _json(capfd, ["check", str(d / "two.pt2"), str(bad)])
    outs = doc["verification"]["providers"]["CPUExecutionProvider"]["outputs"]
    assert code == 1 and doc["verification"]["passed"] is False
    assert outs["output.0"]["passed"] is False and outs["output.0"]["max_abs"] > outs["output.0"]["atol"] > 0


def test_check_pt2_names_the_diverging_layer(tfiles, two_onnx, capfd) -> None:
    d, _, _ = tfiles
    bad = d / "two_bad_div.onnx"
    _perturbed(two_onnx, bad)
    code, doc = _json(capfd, ["check", str(d / "two.pt2"), str(bad)])
    assert code == 1 and doc["verification"]["first_divergence"] is not None


def _with_identity_renames(src, dst, outputs: bool = True, inputs: bool = False) -> None:
    p = onnx.load(str(src))
    if outputs:
        for o in p.graph.output:
            p.graph.node.append(onnx.helper.make_node("Identity", [o.name], ["renamed_" + o.name]))
            o.name = "renamed_" + o.name
    if inputs:
        for i in p.graph.input:
            old, i.name = i.name, "renamed_" + i.name
            for n in p.graph.node:
                n.input[:] = [i.name if v == old else v for v in n.input]
    onnx.checker.check_model(p)
    onnx.save(p, str(dst))


def test_check_pt2_against_renamed_inputs_and_outputs(tfiles, two_onnx, capfd) -> None:
    """Framework models have no ONNX names: an export is matched by position."""
    d, _, _ = tfiles
    ren = d / "two_ren.onnx"
    _with_identity_renames(two_onnx, ren, inputs=True)
    code, doc = _json(capfd, ["check", str(d / "two.pt2"), str(ren)])
    assert code == 0 and doc["verification"]["passed"] is True


def test_check_pt2_against_a_candidate_missing_an_output(tfiles, two_onnx, capfd) -> None:
    """A candidate without one of the outputs is not the same function: exit 1, like ONNX vs ONNX."""
    d, _, _ = tfiles
    p = onnx.load(str(two_onnx))
    p.graph.output.pop()
    onnx.save(p, str(d / "two_missing.onnx"))
    code, out, err = _run(capfd, ["check", str(d / "two.pt2"), str(d / "two_missing.onnx"), "--json"])
    assert code == 1, err
    assert json.loads(out)["verification"]["passed"] is False


# ---------------------------------------------------------------- Keras

@pytest.fixture(scope="module")
def kfiles(tmp_path_factory):
    from tests.helpers.keras_build import L, keras, randomise
    from tests.helpers.frameworks import keras_pass
    d = tmp_path_factory.mktemp("export_keras")
    rng = np.random.default_rng(7)
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, L.BatchNormalization(name="ibn")(L.Conv2D(5, 1, name="ic")(inner_in)), name="inner")
    img, ids = keras.Input((8, 8, 3), name="zimg"), keras.Input((5,), dtype="int32", name="aids")
    f = L.GlobalAveragePooling2D()(inner(L.BatchNormalization(name="bn1")(L.Conv2D(4, 3, name="c1")(img))))
    e = L.GlobalAveragePooling1D()(L.Embedding(10, 5, name="emb")(ids))
    logits = L.BatchNormalization(name="bn2")(L.Dense(6, name="d")(L.Concatenate()([f, e])))
    model = keras.Model({"zimg": img, "aids": ids}, {"zz": logits, "aa": L.Dense(3, name="aa_d")(f)})
    randomise(model, rng)
    keras_pass.save(model, str(d / "kd.keras"))
    out = d / "kd.onnx"
    assert main(["export", str(d / "kd.keras"), "--to", "onnx", "-o", str(out), "-q"]) == 0
    feeds = {"zimg": rng.standard_normal((3, 8, 8, 3)).astype("float32"),
             "aids": rng.integers(0, 10, (3, 5)).astype("int32")}
    return d, model, out, feeds


def _keras_vs_onnx(model, path, feeds: dict, rel: float = 1e-5) -> None:
    import keras
    ref = {k: keras.ops.convert_to_numpy(v) for k, v in model(feeds, training=False).items()}
    sess = _session(path)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})))
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert got[k].shape == r.shape
        assert np.abs(got[k].astype(np.float64) - r).max() <= rel * np.abs(r).max(), k


def test_keras_dict_inputs_int_ids_nested_model(kfiles, capfd) -> None:
    d, model, _, feeds = kfiles
    out = d / "kd_json.onnx"
    code, doc = _json(capfd, ["export", str(d / "kd.keras"), "--to", "onnx", "-o", str(out)])
    assert code == 0 and doc["framework"] == "keras" and doc["verification"]["passed"] is True
    assert len(doc["folded"]) == 3 and not doc["skipped"] and _bn_count(out) == 0
    assert doc["verification"]["providers"]["CPUExecutionProvider"]["ran"] is True
    _keras_vs_onnx(model, out, feeds)


def test_keras_check_against_its_export_and_a_perturbed_one(kfiles, capfd) -> None:
    d, _, out, _ = kfiles
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(out)])
    assert code == 0 and doc["verification"]["passed"] is True
    bad = d / "kd_bad.onnx"
    _perturbed(out, bad, pick=lambda t: list(t.dims) == [4, 3, 3, 3])  # c1, read by every output
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(bad)])
    outs = doc["verification"]["providers"]["CPUExecutionProvider"]["outputs"]
    assert code == 1 and not any(o["passed"] for o in outs.values())


def test_keras_check_names_the_diverging_layer(kfiles, capfd) -> None:
    d, _, out, _ = kfiles
    bad = d / "kd_bad_div.onnx"
    _perturbed(out, bad, pick=lambda t: list(t.dims) == [4, 3, 3, 3])
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(bad)])
    assert code == 1 and doc["verification"]["first_divergence"] is not None


def test_keras_check_missing_and_renamed_outputs(kfiles, capfd) -> None:
    d, _, out, _ = kfiles
    p = onnx.load(str(out))
    p.graph.output.pop(0)
    onnx.save(p, str(d / "kd_missing.onnx"))
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(d / "kd_missing.onnx")])
    assert code == 1 and doc["verification"]["passed"] is False
    _with_identity_renames(out, d / "kd_ren.onnx", inputs=True)
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(d / "kd_ren.onnx")])
    assert code == 0 and doc["verification"]["passed"] is True


def test_keras_check_matches_named_outputs_by_name(kfiles, capfd) -> None:
    """Both sides name their outputs ('aa', 'zz'): a candidate listing them in another order is the same
    function, as it is for ONNX vs ONNX."""
    d, _, out, _ = kfiles
    p = onnx.load(str(out))
    outs = list(p.graph.output)
    del p.graph.output[:]
    p.graph.output.extend(outs[::-1])
    onnx.save(p, str(d / "kd_swap.onnx"))
    code, doc = _json(capfd, ["check", str(d / "kd.keras"), str(d / "kd_swap.onnx")])
    assert code == 0, doc["verification"]


def test_keras_kept_bn_and_existing_output(tmp_path, capfd) -> None:
    from tests.helpers.keras_build import L, keras, randomise
    from tests.helpers.frameworks import keras_pass
    i = keras.Input((6, 6, 3), name="img")
    c = L.Conv2D(4, 3, name="c")(i)
    model = keras.Model(i, {"y": L.Add()([L.BatchNormalization(name="bn_fan")(c), L.Conv2D(4, 1, name="c2")(c)])})
    randomise(model, np.random.default_rng(8))
    src, out = tmp_path / "kk.keras", tmp_path / "kk.onnx"
    keras_pass.save(model, str(src))
    out.write_bytes(b"keep me")
    code, doc = _json(capfd, ["export", str(src), "--to", "onnx", "-o", str(out), "--atol", "0"])
    assert code == 1 and doc["output"] is None and out.read_bytes() == b"keep me"
    assert _listing(tmp_path) == ["kk.keras", "kk.onnx"]
    code, doc = _json(capfd, ["export", str(src), "--to", "onnx", "-o", str(out)])
    assert code == 0 and [s["bn"] for s in doc["skipped"]] == ["bn_fan"] and not doc["folded"]
    assert _listing(tmp_path) == ["kk.keras", "kk.onnx"]
    _keras_vs_onnx(model, out, {"img": np.random.default_rng(9).standard_normal((2, 6, 6, 3)).astype("float32")})


def test_keras_mixed_precision_export_is_refused(tmp_path, capfd) -> None:
    from tests.helpers.keras_build import L, keras
    from tests.helpers.frameworks import keras_pass
    i = keras.Input((6, 6, 3))
    model = keras.Model(i, L.BatchNormalization(dtype="mixed_float16")(L.Conv2D(4, 3, dtype="mixed_float16")(i)))
    src = tmp_path / "mp.keras"
    keras_pass.save(model, str(src))
    code, out, err = _run(capfd, ["export", str(src), "--to", "onnx", "-o", str(tmp_path / "mp.onnx")])
    assert code == 2 and out == "" and "float32" in err
    assert _listing(tmp_path) == ["mp.keras"]
