"""Acceptance tests for the issue "zero false alarms".

Every model and candidate here is CORRECT: a real model (or a fold of it made by bnfold or by another
tool) that computes the same function as the original. bnfold must accept each one: fold + verify
exit 0, `bnfold check` exit 0. A verifier that cries wolf on correct folds gets switched off by its
users, so each of these is a bug when it fails.

Only the public API is used (bnfold.fold / bnfold.check / bnfold.cli.main / Reason / report objects and
the JSON reports), with real onnxruntime, torch, torchvision, keras, onnxsim, onnxslim and onnxoptimizer.
Every BatchNorm has statistics far from the defaults (a default BN is a near-identity that would make
any fold look right).
"""
from __future__ import annotations


import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
import pytest  # noqa: E402

import bnfold  # noqa: E402

from tests.verify import acceptance_models as am  # noqa: E402


require, cli, cli_json, why = am.require, am.cli, am.cli_json, am.why


# ---------------------------------------------------------------------------------------------------
# 1. The "light" models shipped inside the onnx wheel (weights are ConstantOfShape outputs)
# ---------------------------------------------------------------------------------------------------

LIGHT_SLOW = {"densenet121"}  # the largest (1746 nodes): 2-8 s and ~1 GB for one fold + verify on a CPU
LIGHT = [pytest.param(n, marks=pytest.mark.slow) if n in LIGHT_SLOW else n for n in am.light_models_with_bn()]


def test_the_onnx_wheel_ships_light_models_with_batchnorm():
    found = am.light_models_with_bn()
    assert {"densenet121", "inception_v2", "resnet50", "shufflenet"} <= set(found), (
        f"expected the onnx wheel's light models with BatchNormalization in {am.light_dir()}, found {found}")


@pytest.mark.parametrize("name", LIGHT)
def test_light_model_folds_and_verifies(name, tmp_path):
    src = tmp_path / f"light_{name}.onnx"
    shutil.copy(os.path.join(am.light_dir(), f"light_{name}.onnx"), src)
    rc, doc, err = cli_json([str(src), "-o", str(tmp_path / "out.onnx")])
    assert rc == 0, f"bnfold light_{name}.onnx must fold and verify (exit 0), got exit {rc}: {why(doc, err)}"
    assert doc["folded"], f"light_{name}: nothing folded: {why(doc, err)}"
    assert (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------------------------------------------
# 2. Cast -> Gemm(transB=1) -> BatchNormalization in float64 / float16 / bfloat16
# ---------------------------------------------------------------------------------------------------

def _ort_can_run(model: onnx.ModelProto) -> str:
    """'' when onnxruntime (CPU, optimisations off) runs the model, else why not."""
    try:
        am.ort_session(model).run(None, {"x": np.zeros((4, 16), np.float32)})
    except Exception as e:  # noqa: BLE001 - any onnxruntime refusal
        return str(e).strip().splitlines()[0][:200]
    return ""


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cast_gemm_bn_folds_and_verifies(dtype, seed, tmp_path):
    model = am.cast_gemm_bn(dtype if dtype == "bfloat16" else np.dtype(dtype), seed=seed)
    cannot = _ort_can_run(model)
    path = tmp_path / f"cast_gemm_bn_{dtype}.onnx"
    onnx.save(model, path)
    if cannot:
        # onnxruntime has no CPU kernel for this dtype (bfloat16 Gemm): no reference can be run, so no
        # proof can be made. The honest outcome: refused with one line naming onnxruntime's refusal,
        # nothing written; with --no-verify the fold is made, and it is checked here in float64.
        out = tmp_path / "out.onnx"
        rc, doc, err = cli_json([str(path), "-o", str(out)])
        assert rc == 2 and not out.exists(), (rc, doc, err)
        assert "onnxruntime" in err and str(path) in err and len(err.strip().splitlines()) == 1, err
        rc, doc, err = cli_json([str(path), "-o", str(out), "--no-verify"])
        assert rc == 0 and [d["bn"] for d in doc["folded"]] == ["bn"], why(doc, err)
        _gemm_bn_close_in_float64(model, onnx.load(out))
        return
    rc, doc, err = cli_json([str(path), "-o", str(tmp_path / "out.onnx")])
    assert rc == 0, f"{dtype} Cast->Gemm->BN must fold and verify (exit 0), got {rc}: {why(doc, err)}"
    assert [d["bn"] for d in doc["folded"]] == ["bn"], f"the BN must be folded into the Gemm: {why(doc, err)}"


def _gemm_bn_close_in_float64(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    """Gemm(transB=1) -> BN of `original` against the folded Gemm, both evaluated in float64 from the
    stored (low-precision) values: equal within the dtype's rounding of the folded weights."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    f = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    assert [n.op_type for n in folded.graph.node] == ["Cast", "Gemm"], [n.op_type for n in folded.graph.node]
    gemm = folded.graph.node[1]
    x = np.random.default_rng(3).standard_normal((4, w["W"].shape[1]))
    s = w["gamma"] / np.sqrt(w["var"] + 1e-5)
    ref = ((x @ w["W"].T + w["B"]) - w["mean"]) * s + w["beta"]
    got = x @ f[gemm.input[1]].T + f[gemm.input[2]]
    bound = 2.0 ** -7 * (np.abs(x) @ np.abs(w["W"] * s[:, None]).T + np.abs(w["B"] * s) + np.abs(w["mean"] * s)
                         + np.abs(w["beta"]))
    assert np.all(np.abs(got - ref) <= bound), np.abs(got - ref).max()


# ---------------------------------------------------------------------------------------------------
# 3. torchvision resnet18 folded by other tools: `bnfold check orig candidate` must exit 0
# ---------------------------------------------------------------------------------------------------

MASKED_CONV = "/layer2/layer2.0/conv1/Conv"  # its output channel MASKED_CHANNEL is dead (ReLU zeroes it)
MASKED_CHANNEL = 5


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    """resnet18 (random weights, calibrated BN) exported keeping every BatchNormalization, input 1x3x64x64.

    One BN channel (layer2.0.bn1, channel MASKED_CHANNEL) is made dead (gamma 0.5, beta -8): the
    following ReLU zeroes it on any input of normal scale. Correct folds are unaffected; the negative
    test edits exactly that channel."""
    require("torchvision")
    import torch
    am.torch_setup()
    model, x = am.resnet18(seed=0, size=64)
    with torch.no_grad():
        model.layer2[0].bn1.weight[MASKED_CHANNEL] = 0.5
        model.layer2[0].bn1.bias[MASKED_CHANNEL] = -8.0
    d = tmp_path_factory.mktemp("resnet18")
    path = str(d / "resnet18.onnx")
    m = am.export_onnx(model, (x,), path, output_names=["logits"])
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 20, "test setup: BNs must be kept"
    am.assert_far_from_defaults(m)
    return d, path


def _make_candidate(tool: str, src: str, dst: str) -> None:
    if tool == "onnxsim":
        onnxsim = require("onnxsim")
        model, ok = onnxsim.simplify(onnx.load(src))
        assert ok, "onnxsim could not validate its own output"
        onnx.save(model, dst)
    elif tool == "onnxslim":
        onnxslim = require("onnxslim")
        onnx.save(onnxslim.slim(onnx.load(src)), dst)
    elif tool == "onnxoptimizer":
        onnxoptimizer = require("onnxoptimizer")
        onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)
    elif tool.startswith("ort_"):
        am.ort_session(src, tool[len("ort_"):], optimized_path=dst)
    else:
        raise ValueError(tool)


@pytest.mark.parametrize("tool", ["onnxsim", "onnxslim", "onnxoptimizer", "ort_basic", "ort_extended"])
def test_resnet18_folded_by_another_tool_passes_check(resnet18_onnx, tool):
    d, orig = resnet18_onnx
    cand = str(d / f"resnet18.{tool}.onnx")
    _make_candidate(tool, orig, cand)
    c = onnx.load(cand)
    assert sum(n.op_type == "BatchNormalization" for n in c.graph.node) == 0, f"test setup: {tool} kept a BN"
    rc, doc, err = cli_json(["check", orig, cand])
    assert rc == 0, (f"{tool}'s BN fusion of resnet18 is a correct fold; bnfold check must exit 0, got {rc}: "
                     f"{why(doc, err)}")


def _edited_masked_candidate(d, orig: str) -> tuple[str, onnx.ModelProto, onnx.ModelProto]:
    """onnxsim's (correct) fold with MASKED_CONV's weight scaled by 1.001 on channel MASKED_CHANNEL."""
    sim_path = str(d / "resnet18.onnxsim.onnx")
    if not os.path.exists(sim_path):
        _make_candidate("onnxsim", orig, sim_path)
    sim = onnx.load(sim_path)
    conv = next((n for n in sim.graph.node if n.name == MASKED_CONV), None)
    assert conv is not None, f"test setup: onnxsim renamed {MASKED_CONV}: {[n.name for n in sim.graph.node][:20]}"
    edited = am.scale_initializer(sim, conv.input[1], 1.001, index=MASKED_CHANNEL)
    path = str(d / "resnet18.onnxsim.edited.onnx")
    onnx.save(edited, path)
    return path, sim, edited


def _assert_masked_on_normal_inputs(sim: onnx.ModelProto, edited: onnx.ModelProto) -> None:
    """Precondition: the edit is invisible in the ReLU after the conv and in the logits on random
    normal inputs (the model's static 1x3x64x64, several seeds), i.e. only intermediate comparison can see it."""
    conv = next(n for n in sim.graph.node if n.name == MASKED_CONV)
    relu = next(n for n in sim.graph.node if n.op_type == "Relu" and conv.output[0] in n.input)
    for seed in range(5):
        x = np.random.default_rng(seed).standard_normal((1, 3, 64, 64)).astype(np.float32)
        for feed in (x, -x):
            a = am.ort_intermediates(sim, {"input": feed})
            b = am.ort_intermediates(edited, {"input": feed})
            assert not np.any(a[relu.output[0]][:, MASKED_CHANNEL]), "test setup: the channel is not dead"
            assert np.array_equal(a["logits"], b["logits"]), "test setup: the edit is not masked on these inputs"
            assert not np.array_equal(a[conv.output[0]], b[conv.output[0]]), "test setup: the edit changed nothing"


def test_negative_masked_edit_of_onnxsim_output_fails_check(resnet18_onnx):
    """The same spirit, wrong candidate: onnxsim's fold with one conv output channel scaled by 1.001
    where the next ReLU zeroes it on the inputs. Equal outputs must not be enough: exit 1."""
    require("onnxsim")
    d, orig = resnet18_onnx
    path, sim, edited = _edited_masked_candidate(d, orig)
    _assert_masked_on_normal_inputs(sim, edited)
    rc, doc, err = cli_json(["check", orig, path])
    assert rc == 1, f"a conv channel scaled by 1.001 (masked by a ReLU) must fail bnfold check (exit 1), got {rc}: {why(doc, err)}"


def test_negative_masked_edit_is_located_at_the_edited_conv(resnet18_onnx):
    """...and the report's first divergence is the edited conv (not a false alarm at another layer
    whose output name onnxsim kept for a changed value)."""
    require("onnxsim")
    d, orig = resnet18_onnx
    path, _, _ = _edited_masked_candidate(d, orig)
    rc, doc, err = cli_json(["check", orig, path])
    fd = doc.get("verification", {}).get("first_divergence")
    assert rc == 1 and fd, f"expected a failed check with a first divergence, got exit {rc}: {why(doc, err)}"
    located = MASKED_CONV in json.dumps(fd) or "/layer2/layer2.0/bn1/" in json.dumps(fd)
    assert located, f"the first divergence must be the edited conv {MASKED_CONV} (or its BN's value), got {fd}"


# ---------------------------------------------------------------------------------------------------
# 4. torchvision SSDlite320 (TopK / NMS outputs) folds and verifies; the report never contradicts itself
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssdlite_onnx(tmp_path_factory):
    """ssdlite320_mobilenet_v3_large, random weights, calibrated BN, exported at opset 17 keeping BN
    (TorchScript exporter: about 3 s on a CPU; 70 BatchNormalization nodes, 300 detections)."""
    require("torchvision")
    am.torch_setup()
    model, x = am.ssdlite(seed=0)
    d = tmp_path_factory.mktemp("ssdlite")
    path = str(d / "ssdlite.onnx")
    m = am.export_onnx(model, ([x],), path, opset=17, input_names=["images"],
                       output_names=["boxes", "scores", "labels"])
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) >= 60, "test setup: BNs must be kept"
    am.assert_far_from_defaults(m)
    return d, path


def test_ssdlite_folds_and_verifies(ssdlite_onnx):
    d, path = ssdlite_onnx
    rc, doc, err = cli_json([path, "-o", str(d / "out.onnx")])
    assert rc == 0, (f"SSDlite folded by bnfold is correct (NMS/TopK order may flip between equal-within-noise "
                     f"scores); expected exit 0, got {rc}: {why(doc, err)}")
    assert len(doc["folded"]) >= 60, why(doc, err)


def _contradictions(node, path: str = "") -> list[str]:
    """Places in a JSON report that call something a failure/divergence while its max_abs <= atol."""
    found = []
    if isinstance(node, dict):
        ma, at = node.get("max_abs"), node.get("atol")
        numeric = isinstance(ma, (int, float)) and isinstance(at, (int, float))
        divergence = re.search(r"divergence$", path.split("/")[-1] if path else "") is not None
        if numeric and (node.get("passed") is False or divergence) and not ma > at:
            found.append(f"{path}: max_abs {ma} vs atol {at} reported as {'divergence' if divergence else 'failed'}")
        for k, v in node.items():
            found += _contradictions(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _contradictions(v, f"{path}[{i}]")
    return found


def test_ssdlite_report_does_not_contradict_itself(ssdlite_onnx):
    d, path = ssdlite_onnx
    _, doc, _ = cli_json([path, "-o", str(d / "out2.onnx")])
    bad = _contradictions(doc)
    assert not bad, f"the JSON report calls values within tolerance failures: {bad}"
    _, text, _ = cli([path, "-o", str(d / "out3.onnx")])
    for x, y in re.findall(r"max abs ([0-9.eE+-]+|inf|nan) > atol ([0-9.eE+-]+|inf|nan)", text):
        assert float(x) > float(y), f"the text report says 'max abs {x} > atol {y}':\n{text}"


# ---------------------------------------------------------------------------------------------------
# 5. Opset 9 BatchNormalization with all five outputs (training-mode signature) after a Conv
# ---------------------------------------------------------------------------------------------------

def test_opset9_bn_with_training_outputs_is_kept_and_the_rest_folds(tmp_path):
    path = tmp_path / "opset9_bn5.onnx"
    onnx.save(am.opset9_training_outputs_bn(), path)
    rc, doc, err = cli_json([str(path), "-o", str(tmp_path / "out.onnx")])
    skipped = {s["bn"]: s.get("reason") for s in doc.get("skipped", [])}
    folded = {f["bn"] for f in doc.get("folded", [])}
    assert skipped.get("bn1") == "TRAINING_MODE", (
        f"bn1 has all five (training) outputs in opset 9: it must be kept with TRAINING_MODE: {why(doc, err)}")
    assert "bn2" in folded, f"the plain BN after conv2 must still fold: {why(doc, err)}"
    assert rc == 0, f"keeping bn1 must not make the model fail or be refused: exit {rc}: {why(doc, err)}"


def test_opset9_bn_with_training_outputs_library_reason():
    res = bnfold.fold(am.opset9_training_outputs_bn())
    reasons = {d.bn: d.reason for d in res.report.skipped}
    folded = {d.bn for d in res.report.folded}
    assert reasons.get("bn1") is bnfold.Reason.TRAINING_MODE, (
        f"bn1 (opset 9, five outputs) must be skipped with Reason.TRAINING_MODE; skipped {reasons}, folded {folded}")
    assert "bn2" in folded, f"bn2 must fold; skipped {reasons}, folded {folded}"
    assert res.report.verification and res.report.verification.passed is True, res.report.verification.to_dict()


# ---------------------------------------------------------------------------------------------------
# 6. 0-dim float parameters (ReZero-style scalar gates) in PyTorch and Keras
# ---------------------------------------------------------------------------------------------------

def test_torch_model_with_0dim_parameter_folds_and_verifies():
    import torch
    am.torch_setup()
    net = am.torch_rezero_net(seed=0)
    assert net.alpha.dim() == 0
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    try:
        res = bnfold.fold(net, example_inputs=(x,))
    except Exception as e:  # noqa: BLE001 - the assertion message is the point
        pytest.fail(f"bnfold.fold raised on a model with a 0-dim nn.Parameter: {type(e).__name__}: {e}")
    assert len(res.report.folded) == 2, res.report.to_dict()
    ver = res.report.verification
    assert ver is not None and ver.passed is True, ver.to_dict() if ver else None


def test_keras_model_with_0dim_weight_folds_and_verifies():
    net = am.keras_rezero_net(seed=0)
    try:
        res = bnfold.fold(net)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"bnfold.fold raised on a Keras model with a 0-dim weight: {type(e).__name__}: {e}")
    assert len(res.report.folded) == 2, res.report.to_dict()
    ver = res.report.verification
    assert ver is not None and ver.passed is True, ver.to_dict() if ver else None
