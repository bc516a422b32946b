"""The verification engine: derived tolerances, planted errors, the culprit layer, inputs, CI outputs."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.core.errors import BnfoldError, VerificationFailed
from bnfold.testing import assert_equivalent
from bnfold.verify.inputs import parse_input_spec
from tests.helpers.onnx_build import G
from tests.helpers.zoo_deep import build_deep, export_onnx, ort_fused


@pytest.fixture(scope="module")
def resnet18():
    model, x = build_deep("resnet18", seed=0)
    original = export_onnx(model, x)
    folded = bnfold.fold(original, verify=False).model
    return original, folded


def edit(model: onnx.ModelProto, conv_index: int, how: str, channel: int = 3) -> tuple[onnx.ModelProto, str]:
    """A copy with one conv's weight channel scaled by 1.002 ("scale") or one bias entry +1.0 ("bias")."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    node = [n for n in m.graph.node if n.op_type == "Conv"][conv_index]
    t = inits[node.input[1] if how == "scale" else node.input[2]]
    a = numpy_helper.to_array(t).copy()
    if how == "scale":
        a[channel] = (a[channel].astype(np.float64) * 1.002).astype(a.dtype)
    else:
        a[channel] += 1.0
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    return m, node.name


def ulp_noise(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """Every float weight moved by one float32 rounding step (relative 2^-23) up or down."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.size > 1:
            b = (a.astype(np.float64) * (1 + rng.choice([-1.0, 1.0], a.shape) * 2.0 ** -23)).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(b, t.name))
    return m


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "inception_v3"])
def test_correct_fold_by_another_tool_passes(name):
    """onnxruntime's own Conv+BN fusion is a correct fold made by another tool."""
    model, x = build_deep(name, seed=1)
    original = export_onnx(model, x)
    candidate = ort_fused(original)
    assert not any(n.op_type == "BatchNormalization" for n in candidate.graph.node)
    ver = bnfold.check(original, candidate)
    assert ver, ver.to_dict()
    out = ver.providers["CPUExecutionProvider"].outputs["logits"]
    assert 0 < out["max_abs"] <= out["atol"]


def test_rounding_noise_candidate_passes(resnet18):
    original, folded = resnet18
    assert bnfold.check(original, ulp_noise(folded))


@pytest.mark.parametrize("conv_index", [1, 8, 15])
@pytest.mark.parametrize("how", ["scale", "bias"])
def test_planted_error_fails_and_names_the_layer(resnet18, conv_index, how):
    original, folded = resnet18
    bad, layer = edit(folded, conv_index, how)
    ver = bnfold.check(original, bad)
    assert ver.passed is False
    assert ver.first_divergence["node"] == layer
    assert ver.first_divergence["max_abs"] > ver.first_divergence["atol"]


def test_check_cli_exit_codes_json_and_junit(resnet18, tmp_path, capsys):
    original, folded = resnet18
    bad, layer = edit(folded, 8, "scale")
    for name, m in (("o.onnx", original), ("good.onnx", folded), ("bad.onnx", bad)):
        onnx.save(m, str(tmp_path / name))
    assert main(["check", str(tmp_path / "o.onnx"), str(tmp_path / "good.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verification"]["passed"] is True
    junit = tmp_path / "report.xml"
    code = main(["check", str(tmp_path / "o.onnx"), str(tmp_path / "bad.onnx"), "--json", "--junit", str(junit)])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1 and doc["verification"]["first_divergence"]["node"] == layer
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1
    cases = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase")}
    assert ("bnfold.CPUExecutionProvider", "logits") in cases
    assert any(c[0] == "bnfold.CUDAExecutionProvider" for c in cases)  # listed, as skipped or run
    code = main(["check", str(tmp_path / "o.onnx"), str(tmp_path / "bad.onnx")])
    text = capsys.readouterr().out
    assert code == 1 and "first divergence" in text and layer in text


def test_masked_error_is_caught_through_intermediates(rng):
    """A channel that a ReLU always cuts on the test inputs still counts: the conv output differs."""
    g = G(rng)
    w = rng.normal(0, 0.3, (4, 3, 1, 1))
    g.node("Conv", ["x", g.init("w", w), g.init("b", np.array([0, 0, 0, -100.0]))], ["c"], name="conv")
    g.node("Relu", ["c"], ["y"], name="relu")
    m = g.model([("x", [1, 3, 4, 4])], [("y", [1, 4, 4, 4])])
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bw = next(t for t in bad.graph.initializer if t.name == "w")
    a = numpy_helper.to_array(bw).copy()
    a[3] *= 1.002
    bw.CopyFrom(numpy_helper.from_array(a, "w"))
    ver = bnfold.check(m, bad)
    assert ver.passed is False
    assert ver.providers["CPUExecutionProvider"].outputs["y"]["passed"] is True
    assert ver.first_divergence["tensor"] == "c" and "masked_divergence" in ver.providers["CPUExecutionProvider"].notes
    # only the outputs decide when asked; the divergence is still reported
    ver = bnfold.check(m, bad, outputs_only=True)
    assert ver.passed is True
    assert ver.providers["CPUExecutionProvider"].notes["ignored_divergence"]["tensor"] == "c"


def test_non_finite_candidate_fails(rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (2, 3, 1, 1))], ["y"], name="conv")
    m = g.model([("x", [1, 3, 2, 2])], [("y", [1, 2, 2, 2])])
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    a = numpy_helper.to_array(bad.graph.initializer[0]).copy()
    a[0, 0] = np.inf
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(a, "w"))
    ver = bnfold.check(m, bad)
    assert ver.passed is False
    assert ver.providers["CPUExecutionProvider"].outputs["y"]["non_finite"] > 0


def test_user_tolerances_global_and_per_output(resnet18, tmp_path, capsys):
    original, folded = resnet18
    bad, _ = edit(folded, 15, "scale")
    onnx.save(original, str(tmp_path / "o.onnx"))
    onnx.save(bad, str(tmp_path / "b.onnx"))
    args = ["check", str(tmp_path / "o.onnx"), str(tmp_path / "b.onnx"), "--json", "--outputs-only"]
    assert main(args + ["--atol", "1e-3"]) == 0  # above the 4e-5 damage, far below the logits' size (~5)
    doc = json.loads(capsys.readouterr().out)
    out = doc["verification"]["providers"]["CPUExecutionProvider"]["outputs"]["logits"]
    assert out["how"] == "user" and out["atol"] == 1e-3 and doc["verification"]["tolerance"]["how"] == "user"
    assert main(args + ["--atol", "logits:1e-12"]) == 1
    capsys.readouterr()
    assert main(args + ["--atol", "1e-12", "--atol", "logits:1e-3"]) == 0
    capsys.readouterr()
    # a tolerance as large as the values proves nothing: inconclusive, exit 1, never "passed"
    assert main(args + ["--atol", "1.0"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verification"]["verdict"] == "inconclusive" and doc["verification"]["passed"] is False


def test_assert_equivalent(resnet18):
    original, folded = resnet18
    assert assert_equivalent(original, folded)
    bad, layer = edit(folded, 1, "bias")
    with pytest.raises(VerificationFailed, match=layer):
        assert_equivalent(original, bad)
    with pytest.raises(AssertionError):
        assert_equivalent(original, bad)


# -- inputs ------------------------------------------------------------------------------------

def multi_io_model(rng) -> onnx.ModelProto:
    """Float image with a dynamic batch, an int64 index input and a bool mask; two outputs."""
    g = G(rng)
    g.node("Conv", ["img", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="f")
    g.node("Gather", ["f", "idx"], ["picked"], name="gather", axis=1)
    g.node("Cast", ["mask"], ["maskf"], name="cast", to=onnx.TensorProto.FLOAT)
    g.node("Mul", ["picked", "maskf"], ["masked"], name="mul")
    m = g.model([("img", ["N", 3, 5, 5]), ("idx", [2]), ("mask", [1, 2, 5, 5])],
                [("f", ["N", 4, 5, 5]), ("masked", ["N", 2, 5, 5])])
    m.graph.input[1].type.tensor_type.elem_type = onnx.TensorProto.INT64
    m.graph.input[2].type.tensor_type.elem_type = onnx.TensorProto.BOOL
    return m


def test_int_bool_and_dynamic_inputs_with_several_outputs(rng, tmp_path, capsys):
    m = multi_io_model(rng)
    onnx.checker.check_model(m)
    path = str(tmp_path / "multi.onnx")
    onnx.save(m, path)
    code = main([path, "--json", "--input", "img:3x3x5x5", "--batches", "2", "--dry-run"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0, doc
    outs = doc["verification"]["providers"]["CPUExecutionProvider"]["outputs"]
    assert set(outs) == {"f", "masked"} and len(doc["folded"]) == 1


def test_npz_inputs(rng, tmp_path, capsys):
    m = multi_io_model(rng)
    path = str(tmp_path / "multi.onnx")
    onnx.save(m, path)
    npz = str(tmp_path / "data.npz")
    np.savez(npz, img=rng.normal(size=(2, 3, 5, 5)).astype(np.float32), idx=np.array([0, 3]),
             mask=np.ones((1, 2, 5, 5), bool))
    assert main([path, "--inputs", npz, "--json", "--dry-run"]) == 0
    capsys.readouterr()
    np.savez(npz, img=np.zeros((1, 3, 5, 5), np.float32))
    assert main([path, "--inputs", npz, "--dry-run"]) == 2
    assert "no data for inputs" in capsys.readouterr().err


def test_absurd_declared_size_is_refused(rng, tmp_path, capsys):
    g = G(rng)
    g.node("Relu", ["x"], ["y"], name="relu")
    m = g.model([("x", [1000000000, 3])], [("y", [1000000000, 3])])
    path = str(tmp_path / "huge.onnx")
    onnx.save(m, path)
    assert main([path, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--input x:SHAPE" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text,expect", [
    ("x:1x3x224x224", ("x", (1, 3, 224, 224), None)),
    ("images:[1,3,8,8]:float16", ("images", (1, 3, 8, 8), "float16")),
    ("a:b:2x2", ("a:b", (2, 2), None)),
])
def test_input_spec_parsing(text, expect):
    s = parse_input_spec(text)
    assert (s.name, s.shape, s.dtype) == expect


def test_different_signatures_are_bad_input(rng):
    g = G(rng)
    g.node("Relu", ["x"], ["y"], name="relu")
    a = g.model([("x", [1, 3])], [("y", [1, 3])])
    g2 = G(rng)
    g2.node("Relu", ["z"], ["y"], name="relu")
    b = g2.model([("z", [1, 3])], [("y", [1, 3])])
    with pytest.raises(BnfoldError, match="different inputs"):
        bnfold.check(a, b)


# -- CUDA (runs only where onnxruntime-gpu and a GPU exist) ---------------------------------------

def _cuda_ok() -> bool:
    from bnfold.onnx.runtime import availability
    return availability("CUDAExecutionProvider")[0]


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda_ok(), reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_gives_the_same_verdicts(resnet18):
    original, folded = resnet18
    ver = bnfold.check(original, folded, providers=["cpu", "cuda"])
    cuda = ver.providers["CUDAExecutionProvider"]
    assert cuda.ran and cuda.notes.get("tf32") is True
    assert ver, ver.to_dict()
    bad, layer = edit(folded, 15, "bias")
    ver = bnfold.check(original, bad, providers=["cuda"])
    assert ver.passed is False and ver.first_divergence["node"] == layer


def test_quick_pass_only_ever_clears_sure_passes():
    from bnfold.verify import compare
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 8)).astype(np.float32)
    noise = [ref + np.float32(1e-6)]
    assert compare.quick_pass(ref, ref.copy(), noise)
    off = ref.copy()
    off[3, 3] += 1e-3
    assert not compare.quick_pass(ref, off, noise)
    assert not compare.judge({"t": ref}, {"t": off}, [{"t": noise[0]}])[0]
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare.quick_pass(ref, nan, noise)
    assert not compare.quick_pass(ref, ref.astype(np.float64), noise)  # dtype change: look closer
