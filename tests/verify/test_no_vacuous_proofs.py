"""Acceptance tests for the issue "no vacuous proofs".

Each case is either a WRONG candidate that bnfold must refuse, or a case where the comparison cannot
prove anything (empty outputs, an all-zero output, a tolerance that swamps the values) and must be
reported as "inconclusive" (exit 1) rather than "passed". A verifier that says PASSED on evidence
that could not have failed is worse than none.

The contract these tests pin down (JSON reports of `bnfold MODEL --json` and `bnfold check --json`):
  * verification.verdict: "passed" | "failed" | "inconclusive" overall, and
    verification.providers[P].outputs[O].verdict per output; exit 0 only for "passed".
  * verification.inputs: the inputs actually used, one entry per model input (a list of objects with
    "name", or an object keyed by input name), each with "shape", "dtype" and how it was chosen
    ("how"); a dynamic batch dim defaults to 2 and no dynamic spatial dim defaults to 1.
  * --save-inputs FILE.npz writes those inputs; --inputs FILE.npz replays them bit for bit.

Only the public API is used, with real onnxruntime, torch, torchvision, keras and jax; BN statistics
are far from the defaults everywhere.
"""
from __future__ import annotations

import sys

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402

import bnfold  # noqa: E402

from tests.verify import acceptance_models as am  # noqa: E402

require, cli, cli_json, why = am.require, am.cli, am.cli_json, am.why
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERDICTS = ("passed", "failed", "inconclusive")


def verification_of(doc: dict) -> dict:
    return doc.get("verification") or {}


def output_entries(doc: dict) -> dict[str, dict]:
    """provider/output -> per-output entry, for every provider that ran."""
    out = {}
    for pname, p in (verification_of(doc).get("providers") or {}).items():
        if p.get("ran"):
            for oname, st in (p.get("outputs") or {}).items():
                out[f"{pname}/{oname}"] = st
    return out


def input_entries(doc: dict) -> list[dict]:
    """verification.inputs as a list of {"name", "shape", "dtype", "how", ...} (list or name-keyed object)."""
    inputs = verification_of(doc).get("inputs")
    assert inputs, f"the report must list the inputs it used under verification.inputs; got keys {sorted(verification_of(doc))}"
    if isinstance(inputs, dict):
        return [{"name": k, **v} for k, v in inputs.items()]
    return list(inputs)


# ---------------------------------------------------------------------------------------------------
# 1. Dynamic N/H/W: flipped 3x3 kernels must not pass; the report says which inputs were used
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamic_net(tmp_path_factory):
    """A small conv net (3x3 kernels, calibrated BN) exported with dynamic N, H, W; the copy with every
    3x3 kernel flipped; and a static-shape (2x3x24x24) export of the same net."""
    import torch
    am.torch_setup()
    net = am.SmallConvNet.build(seed=0)
    d = tmp_path_factory.mktemp("dynamic")
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    dyn = am.export_onnx(net, (x,), str(d / "dyn.onnx"), output_names=["out"],
                         dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "out": {0: "N", 2: "H", 3: "W"}})
    dims = [dd.dim_param or dd.dim_value for dd in dyn.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"], f"test setup: expected dynamic N/H/W, got {dims}"
    am.assert_far_from_defaults(dyn)
    onnx.save(am.flip_3x3_kernels(dyn), str(d / "dyn_flipped.onnx"))
    static = am.export_onnx(net, (x,), str(d / "static.onnx"), output_names=["out"])
    onnx.save(am.flip_3x3_kernels(static), str(d / "static_flipped.onnx"))
    return d


def test_flipped_kernels_fail_on_a_dynamic_shape_model(dynamic_net):
    d = dynamic_net
    rc, doc, err = cli_json(["check", str(d / "dyn.onnx"), str(d / "dyn_flipped.onnx")])
    assert rc == 1, (f"every 3x3 kernel flipped is a different function; with dynamic H/W set to 1 only the "
                     f"kernel centre is ever seen. bnfold check must exit 1, got {rc}: {why(doc, err)}")


def test_report_lists_the_inputs_used_and_how_they_were_chosen(dynamic_net):
    d = dynamic_net
    _, doc, _ = cli_json(["check", str(d / "dyn.onnx"), str(d / "dyn_flipped.onnx")])
    entries = input_entries(doc)
    assert [e.get("name") for e in entries] == ["input"], entries
    e = entries[0]
    assert isinstance(e.get("shape"), list) and len(e["shape"]) == 4, f"shape must be a list of 4 dims: {e}"
    assert "float32" in str(e.get("dtype")), f"dtype must be reported (float32 here): {e}"
    how = e.get("how") or e.get("source") or e.get("chosen")
    assert isinstance(how, str) and how.strip(), (
        f"the entry must say how the input was chosen (e.g. 'random normal, seed 0; dynamic N=2, H=W=...'): {e}")


def test_default_dynamic_dims_batch_2_and_no_spatial_dim_1(dynamic_net):
    d = dynamic_net
    _, doc, _ = cli_json([str(d / "dyn.onnx"), "-o", str(d / "dyn.folded.onnx")])
    shape = input_entries(doc)[0].get("shape")
    assert shape and shape[0] == 2, f"a dynamic batch dim must default to 2 (a batch of 1 hides batch mixing): {shape}"
    assert shape[1] == 3, shape
    assert all(isinstance(s, int) and s > 1 for s in shape[2:]), (
        f"no dynamic spatial dim may default to 1 (a 1x1 image shows a 3x3 kernel only its centre): {shape}")


def test_verdict_field_failed_and_passed(dynamic_net):
    """The verdict is in the JSON, overall and per output: "failed" for the flipped kernels on a static
    2x3x24x24 model, "passed" for bnfold's own fold of it."""
    d = dynamic_net
    rc, doc, err = cli_json(["check", str(d / "static.onnx"), str(d / "static_flipped.onnx")])
    assert rc == 1, why(doc, err)
    assert verification_of(doc).get("verdict") == "failed", f"overall verdict must be 'failed': {why(doc, err)}"
    per = {k: v.get("verdict") for k, v in output_entries(doc).items()}
    assert per and all(v == "failed" for v in per.values()), f"per-output verdicts must be 'failed': {per}"
    rc, doc, err = cli_json([str(d / "static.onnx"), "-o", str(d / "static.folded.onnx")])
    assert rc == 0, why(doc, err)
    assert verification_of(doc).get("verdict") == "passed", f"overall verdict must be 'passed': {why(doc, err)}"
    per = {k: v.get("verdict") for k, v in output_entries(doc).items()}
    assert per and all(v == "passed" for v in per.values()), f"per-output verdicts must be 'passed': {per}"


# ---------------------------------------------------------------------------------------------------
# 2. --save-inputs then --inputs replays a run bit for bit
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["check", "fold"])
def test_save_inputs_then_replay_is_bit_for_bit(dynamic_net, command, tmp_path):
    d = dynamic_net
    npz = tmp_path / "inputs.npz"
    if command == "check":
        folded = tmp_path / "folded.onnx"
        rc, doc, err = cli_json([str(d / "dyn.onnx"), "-o", str(folded), "--no-verify"])
        assert rc == 0 and folded.exists(), f"test setup: the candidate is bnfold's own fold: {why(doc, err)}"
        first = ["check", str(d / "dyn.onnx"), str(folded)]
        second = list(first)
    else:
        first = [str(d / "dyn.onnx"), "-o", str(tmp_path / "a.onnx")]
        second = [str(d / "dyn.onnx"), "-o", str(tmp_path / "b.onnx")]
    rc1, doc1, err1 = cli_json(first + ["--seed", "7", "--save-inputs", str(npz)])
    assert rc1 in (0, 1), f"--save-inputs FILE.npz must be accepted (exit {rc1}): {why(doc1, err1)}"
    assert npz.exists(), "--save-inputs must write the .npz"
    with np.load(npz) as z:
        saved = {k: z[k] for k in z.files}
    assert "input" in saved, f"the .npz must hold one array per input name: {sorted(saved)}"
    rc2, doc2, err2 = cli_json(second + ["--inputs", str(npz)])
    assert rc2 == rc1, (rc1, rc2, why(doc2, err2))
    s1, s2 = output_entries(doc1), output_entries(doc2)
    assert s1 and s1.keys() == s2.keys(), (s1.keys(), s2.keys())
    for k in s1:
        for stat in ("max_abs", "ref_max_abs"):
            assert s1[k].get(stat) == s2[k].get(stat), (
                f"{k} {stat}: {s1[k].get(stat)!r} (seed 7, saved) vs {s2[k].get(stat)!r} (replayed): not bit for bit")


# ---------------------------------------------------------------------------------------------------
# 3. A bias change on a ReLU-masked channel must not pass (PyTorch and Keras): intermediates compared
# ---------------------------------------------------------------------------------------------------

MASKED = 3  # the dead channel of the helpers' masked nets


def test_torch_bias_change_on_a_relu_masked_channel_fails():
    import torch
    am.torch_setup()
    original = am.torch_masked_net(seed=0, channel=MASKED)
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        candidate.stem[0].bias[MASKED] += 0.5 * float(original.stem[1].running_var[MASKED].sqrt())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(11))
    # precondition: the ReLU zeroes the channel, so outputs agree exactly on the inputs and their variants
    for feed in (x, -x, torch.randn(2, 3, 16, 16)):
        with torch.no_grad():
            assert not original.stem(feed)[:, MASKED].any() and not candidate.stem(feed)[:, MASKED].any()
            assert torch.equal(original(feed), candidate(feed)), "test setup: the change must be masked"
            assert not torch.equal(original.stem[0](feed), candidate.stem[0](feed))
    ver = bnfold.check(original, candidate, example_inputs=(x,))
    assert ver.passed is not True, (f"conv bias changed on a ReLU-masked channel: equal outputs are not a proof, "
                                    f"the intermediates differ; check must not pass: {ver.to_dict()}")
    fd = ver.first_divergence or {}
    assert fd.get("layer") in ("stem.0", "stem.1"), f"the first divergence must name the module path stem.0: {fd}"


def test_keras_bias_change_on_a_relu_masked_channel_fails():
    import keras
    original = am.keras_masked_net(seed=0, channel=MASKED)
    candidate = keras.models.clone_model(original)
    candidate.set_weights(original.get_weights())
    conv = candidate.get_layer("conv_a")
    kernel, bias = (np.array(w) for w in conv.get_weights())
    bias[MASKED] += 1.0
    conv.set_weights([kernel, bias])
    probe = lambda m: keras.Model(m.inputs, [m.get_layer("conv_a").output, m.get_layer("relu_a").output,  # noqa: E731
                                             m.outputs[0]])
    po, pc = probe(original), probe(candidate)
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((2, 16, 16, 3)).astype(np.float32)
        for feed in (x, -x):
            (co, ro, yo), (cc, rc_, yc) = (
                [np.asarray(keras.ops.convert_to_numpy(t)) for t in p([feed], training=False)] for p in (po, pc))
            assert not ro[..., MASKED].any() and not rc_[..., MASKED].any(), "test setup: the channel must be dead"
            assert np.array_equal(yo, yc), "test setup: the change must be masked in the output"
            assert not np.array_equal(co, cc)
    ver = bnfold.check(original, candidate)
    assert ver.passed is not True, (f"Conv2D bias changed on a ReLU-masked channel: equal outputs are not a proof; "
                                    f"check must not pass: {ver.to_dict()}")
    fd = ver.first_divergence or {}
    assert fd.get("layer") in ("conv_a", "bn_a"), f"the first divergence must name layer conv_a: {fd}"


# ---------------------------------------------------------------------------------------------------
# 4. Nothing to compare: no detections, an all-zero output
# ---------------------------------------------------------------------------------------------------

NOTHING_RE = re.compile(r"no detections?|nothing (to|was|could be) compared?|no (values?|elements?) to compare|empty",
                        re.IGNORECASE)


def test_faster_rcnn_with_no_detections_is_inconclusive():
    """Random weights: no detection clears the score threshold, so boxes/labels/scores are empty and
    match any candidate, even one with every conv weight x3. That is not a proof."""
    require("torchvision")
    import torch
    am.torch_setup()
    original, img = am.fasterrcnn(seed=0, size=128)
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        for m in candidate.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(3.0)
    with torch.no_grad():
        for feed in (img, torch.rand(3, 128, 128)):
            for model in (original, candidate):
                out = model([feed])[0]
                assert all(v.numel() == 0 for v in out.values()), f"test setup: expected no detections: {out}"
    ver = bnfold.check(original, candidate, example_inputs=([img],))
    doc = ver.to_dict()
    assert ver.passed is not True and not ver, f"no detections on either side is not a pass: {doc}"
    # "failed" is acceptable only with evidence (an intermediate that diverges); otherwise "inconclusive"
    verdict = doc.get("verdict")
    assert verdict == "inconclusive" or (verdict == "failed" and doc.get("first_divergence")), (
        f"verdict must be 'inconclusive' (or 'failed' naming a diverging intermediate), got {verdict!r}: {doc}")
    per = {k: v.get("verdict") for k, v in output_entries({"verification": doc}).items()}
    assert per and all(v == "inconclusive" for v in per.values()), f"every empty output is 'inconclusive': {per}"
    assert NOTHING_RE.search(json.dumps(doc)), f"the report must say there were no detections / nothing to compare: {doc}"


def test_all_zero_output_is_inconclusive(tmp_path):
    """The original's only output is all zeros (ReLU after a -1000 bias). A candidate with conv weights
    x3 (and no tensor names in common, so only the output can be compared) must not pass."""
    original = am.all_zero_output_model(seed=0)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    assert not np.any(am.ort_session(original).run(None, feeds)[0]), "test setup: the output must be all zero"
    candidate = am.rename_intermediates(am.scale_initializer(original, "w", 3.0))
    onnx.save(original, tmp_path / "orig.onnx")
    onnx.save(candidate, tmp_path / "cand.onnx")
    rc, doc, err = cli_json(["check", str(tmp_path / "orig.onnx"), str(tmp_path / "cand.onnx")])
    assert rc == 1, f"an all-zero output proves nothing: exit 1 expected, got {rc}: {why(doc, err)}"
    ver = verification_of(doc)
    assert ver.get("verdict") == "inconclusive", f"verdict must be 'inconclusive': {why(doc, err)}"
    per = {k: v.get("verdict") for k, v in output_entries(doc).items()}
    assert per and all(v == "inconclusive" for v in per.values()), per
    assert re.search(r"zero|nothing (to|was|could be) compared?", json.dumps(ver), re.IGNORECASE), (
        f"the report must say the output is all zero / there is nothing to compare: {why(doc, err)}")


# ---------------------------------------------------------------------------------------------------
# 5. A tolerance that swamps the values proves nothing
# ---------------------------------------------------------------------------------------------------

def test_user_atol_swamping_the_output_is_inconclusive(dynamic_net):
    d = dynamic_net
    orig, folded = str(d / "static.onnx"), str(d / "static.folded2.onnx")
    rc, doc, err = cli_json([orig, "-o", folded])
    assert os.path.exists(folded), why(doc, err)
    ref_max = max(v["ref_max_abs"] for v in output_entries(doc).values())
    assert ref_max > 0
    # --atol at half of max |reference|: any candidate within half the output's range would "pass"
    rc, doc, err = cli_json(["check", orig, folded, "--atol", repr(0.5 * ref_max)])
    assert rc == 1, f"--atol {0.5 * ref_max:.3g} >= 1% of max|ref| {ref_max:.3g}: exit 1 expected, got {rc}: {why(doc, err)}"
    assert verification_of(doc).get("verdict") == "inconclusive", why(doc, err)
    per = {k: v.get("verdict") for k, v in output_entries(doc).items()}
    assert per and all(v == "inconclusive" for v in per.values()), per
    # the same candidate with a meaningful --atol (1e-4 of the range) is a pass
    rc, doc, err = cli_json(["check", orig, folded, "--atol", repr(1e-4 * ref_max)])
    assert rc == 0 and verification_of(doc).get("verdict") == "passed", why(doc, err)


def test_flipped_kernels_with_swamping_atol_never_pass(dynamic_net):
    d = dynamic_net
    rc, doc, err = cli_json(["check", str(d / "static.onnx"), str(d / "static_flipped.onnx"), "--atol", "1e6"])
    assert rc == 1, f"--atol 1e6 swamps every output: exit 1 expected, got {rc}: {why(doc, err)}"
    assert verification_of(doc).get("verdict") in ("inconclusive", "failed"), why(doc, err)


def test_derived_atol_swamping_the_output_is_inconclusive(tmp_path):
    """y = BN(Gemm(x, W)) - BN(Gemm(x, W(1 + 3e-6))): the one-ulp noise is about half of max |y|,
    so the derived tolerance (10 x noise) is larger than the values themselves."""
    path = tmp_path / "swamped.onnx"
    onnx.save(am.swamped_difference_model(seed=0), path)
    rc, doc, err = cli_json([str(path), "-o", str(tmp_path / "out.onnx")])
    entries = output_entries(doc)
    assert rc == 1, f"derived atol >= 1% of max|ref| proves nothing: exit 1 expected, got {rc}: {why(doc, err)}"
    assert verification_of(doc).get("verdict") == "inconclusive", why(doc, err)
    assert entries and all(v.get("verdict") == "inconclusive" for v in entries.values()), entries
    assert not (tmp_path / "out.onnx").exists(), "an inconclusive fold must write nothing"


# ---------------------------------------------------------------------------------------------------
# 6. Keras on the torch and jax backends: MobileNetV2 folds 52/52 and verifies
# ---------------------------------------------------------------------------------------------------

def _keras_backend_run(backend: str, hide_tensorflow: bool) -> dict:
    require(backend)  # jax and torch are in the test extra: a missing one is a setup failure, not a skip
    env = dict(os.environ, KERAS_BACKEND=backend, BNFOLD_TEST_HELPERS=os.path.dirname(os.path.abspath(__file__)),
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               TF_CPP_MIN_LOG_LEVEL="2", BNFOLD_TEST_HIDE_TENSORFLOW="1" if hide_tensorflow else "0")
    proc = subprocess.run([sys.executable, "-c", am.KERAS_BACKEND_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BNFOLD_RESULT ")), None)
    assert proc.returncode == 0 and line, (f"KERAS_BACKEND={backend} subprocess exit {proc.returncode}\n"
                                           f"stdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}")
    doc = json.loads(line[len("BNFOLD_RESULT "):])
    assert doc["backend"] == backend, doc
    return doc


def _assert_mobilenetv2_folded_and_verified(doc: dict) -> None:
    assert "error" not in doc, f"bnfold.fold raised on KERAS_BACKEND={doc['backend']}: {doc['error']}"
    rep = doc["report"]
    assert doc["n_bn"] == 52 and len(rep["folded"]) == 52, (
        f"MobileNetV2 has 52 BatchNormalization layers, all after a conv: folded {len(rep['folded'])}/{doc['n_bn']}; "
        f"skipped {[(s['bn'], s['reason']) for s in rep['skipped']]}")
    ver = rep["verification"]
    assert ver.get("passed") is True, f"verification on KERAS_BACKEND={doc['backend']}: {ver}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras_mobilenetv2_on_another_backend_folds_and_verifies(backend):
    """KERAS_BACKEND set, tensorflow still installed."""
    _assert_mobilenetv2_folded_and_verified(_keras_backend_run(backend, hide_tensorflow=False))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_keras_mobilenetv2_on_another_backend_without_tensorflow(backend):
    """KERAS_BACKEND set and tensorflow not importable (as where only keras + torch/jax are installed):
    verification must not need tensorflow."""
    doc = _keras_backend_run(backend, hide_tensorflow=True)
    assert doc["tensorflow_loaded"] is False, "test setup: tensorflow was imported although hidden"
    _assert_mobilenetv2_folded_and_verified(doc)
