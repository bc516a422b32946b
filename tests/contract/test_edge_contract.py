"""The public contract of DESIGN.md and README, held against the CLI process and the library API.

Every failing situation must leave the directory exactly as it was; every report must carry each field
the documented JSON shows; a provider that could not run must never look as if it passed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.core.decisions import Reason
from bnfold.testing import assert_equivalent
from tests.conftest import ROOT
from tests.helpers.cli_tty import run_with_tty_stderr
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
BN_COUNT = 2


def _model(rng: np.random.Generator, out: str = "z") -> onnx.ModelProto:
    """Conv->BN (foldable) and Conv->BN whose conv output also feeds an Add (PRODUCER_FANOUT)."""
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (4, 3, 3, 3)), g.weight("b1", (4,))], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 4, out="y1")
    g.node("Relu", ["y1"], ["r1"], name="relu1")
    g.node("Conv", ["r1", g.weight("w2", (4, 4, 1, 1))], ["c2"], name="conv2")
    g.bn("bn2", "c2", 4, out="y2")
    g.node("Add", ["y2", "c2"], [out], name="add")
    return g.model([("x", ["N", 3, 8, 8])], [(out, ["N", 4, 8, 8])])


@pytest.fixture
def src(tmp_path, rng):
    p = tmp_path / "m.onnx"
    onnx.save(_model(rng), p)
    return p


def _wrong(path, tmp_path) -> str:
    """The model with one output channel of conv1 scaled by 1.5: a different function."""
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name == "w1":
            a = numpy_helper.to_array(t).copy()
            a[0] *= 1.5
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    p = tmp_path / "wrong.onnx"
    onnx.save(m, p)
    return str(p)


def _snap(d) -> dict[str, str]:
    return {p: hashlib.sha256(open(os.path.join(d, p), "rb").read()).hexdigest() for p in sorted(os.listdir(d))}


def _proc(*args: str, cwd=None, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *extra, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ROOT})


def _cli(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    c = capsys.readouterr()
    return code, c.out, c.err


# -- the JSON report ------------------------------------------------------------------------------

def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_verification(v: dict, outputs: list[str], ran_expected: bool) -> None:
    assert {"passed", "tolerance", "providers", "first_divergence"} <= set(v), v
    assert v["passed"] in (True, False, None)
    assert isinstance(v["providers"], dict)
    if not ran_expected:
        assert v["passed"] is None and not any(p["ran"] for p in v["providers"].values())
        return
    assert isinstance(v["tolerance"], dict) and {"atol", "rtol", "how"} <= set(v["tolerance"])
    for name, p in v["providers"].items():
        assert isinstance(p["ran"], bool)
        if p["ran"]:
            assert set(p["outputs"]) == set(outputs), (name, p)
            for st in p["outputs"].values():
                assert all(_is_num(st[k]) for k in ("max_abs", "max_rel", "mean_abs")), st
        else:
            assert isinstance(p["why"], str) and p["why"].strip(), p
            assert p.get("passed") is not True and "outputs" not in p
    assert any(p["ran"] for p in v["providers"].values())
    assert "CPUExecutionProvider" in v["providers"] and "CUDAExecutionProvider" in v["providers"]
    assert v["passed"] is all(p["passed"] for p in v["providers"].values() if p["ran"])


def _check_report(doc: dict, model: onnx.ModelProto, verified: bool) -> None:
    for k, t in (("schema", int), ("model", str), ("framework", str), ("folded", list), ("skipped", list),
                 ("verification", dict), ("timing_s", dict)):
        assert isinstance(doc[k], t), (k, doc.get(k))
    assert doc["schema"] == 1 and doc["framework"] == "onnx" and "output" in doc
    for f in doc["folded"]:
        assert all(isinstance(f[k], str) for k in ("bn", "into", "pattern")) and f["direction"] in ("after", "before")
    for s in doc["skipped"]:
        assert isinstance(s["bn"], str) and isinstance(s["detail"], str) and s["detail"]
        assert s["reason"] in {r.value for r in Reason}, s
    names = [d["bn"] for d in doc["folded"] + doc["skipped"]]
    bns = [n.name for n in model.graph.node if n.op_type == "BatchNormalization"]
    assert sorted(names) == sorted(bns), "every BN exactly once in folded or skipped"
    assert {"load", "fold", "verify"} <= set(doc["timing_s"]) and all(_is_num(v) for v in doc["timing_s"].values())
    _check_verification(doc["verification"], [o.name for o in model.graph.output], verified)


@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--no-verify"], ["--dry-run", "--no-verify"]])
def test_fold_report_has_every_documented_field(src, capsys, mode):
    before = _snap(src.parent)
    code, out, _ = _cli([src, "--json", *mode], capsys)
    assert code == 0
    doc = json.loads(out)
    model = onnx.load(str(src))
    _check_report(doc, model, verified="--no-verify" not in mode)
    assert {d["bn"]: d["reason"] for d in doc["skipped"]} == {"bn2": "PRODUCER_FANOUT"}
    written = src.parent / "m.folded.onnx"
    if "--dry-run" in mode:
        assert doc["output"] is None and _snap(src.parent) == before
        return
    assert doc["output"] == str(written) and "save" in doc["timing_s"]
    folded = onnx.load(str(written))
    assert [n.name for n in folded.graph.node if n.op_type == "BatchNormalization"] == ["bn2"]
    assert_same_function(model, folded)


def test_check_report_has_every_documented_field(src, tmp_path, capsys):
    folded = tmp_path / "f.onnx"
    assert _cli([src, "-o", folded, "-q"], capsys)[0] == 0
    code, out, _ = _cli(["check", src, folded, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["schema"] == 1 and doc["original"] == str(src) and doc["candidate"] == str(folded)
    _check_verification(doc["verification"], ["z"], True)
    code, out, _ = _cli(["check", src, _wrong(src, tmp_path), "--json"], capsys)
    v = json.loads(out)["verification"]
    assert code == 1 and v["passed"] is False and v["first_divergence"]["node"] == "conv1"


# -- reason codes ---------------------------------------------------------------------------------

def test_reason_codes_are_closed_and_documented():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = readme.split("## Reason codes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))
    assert documented == {r.value for r in Reason}
    design = open(os.path.join(os.path.dirname(ROOT), "shared", "DESIGN.md"), encoding="utf-8").read() \
        if os.path.exists(os.path.join(os.path.dirname(ROOT), "shared", "DESIGN.md")) else ""
    start = re.findall(r"`([A-Z_]{6,})`", design.split("Start from:", 1)[1].split("\n\n")[0]) if design else []
    assert (len(start) >= 12 or not design) and set(start) <= documented
    assert all(r.message for r in Reason)


def test_sample_skip_reasons_come_from_the_enum(capsys):
    path = os.path.join(ROOT, "sample_models", "skip_cases.onnx")
    code, out, _ = _cli([path, "--json", "--dry-run", "--no-verify"], capsys)
    doc = json.loads(out)
    assert code == 0 and len(doc["skipped"]) >= 3
    _check_report(doc, onnx.load(path), verified=False)


# -- exit codes, nothing written, one line, pure stdout -------------------------------------------

def _npz(tmp_path, name, **arrays) -> str:
    p = tmp_path / name
    np.savez(p, **arrays)
    return str(p)


def _bad_cases(tmp_path, src):
    (tmp_path / "model.xyz").write_bytes(b"abc")
    (tmp_path / "text.onnx").write_text("not a model\n" * 10)
    huge = G(np.random.default_rng(0))
    huge.node("Relu", ["x"], ["y"], name="relu")
    onnx.save(huge.model([("x", [10 ** 9, 3, 8])], [("y", [10 ** 9, 3, 8])]), tmp_path / "huge.onnx")
    x = np.ones((1, 3, 8, 8), np.float32)
    return {
        "missing file": ([tmp_path / "nope.onnx"], "nope.onnx"),
        "not onnx": ([tmp_path / "text.onnx"], "text.onnx"),
        "unknown extension": ([tmp_path / "model.xyz"], "model.xyz"),
        "output is input": ([src, "-o", src], "m.onnx"),
        "missing output dir": ([src, "-o", tmp_path / "no" / "x.onnx"], "x.onnx"),
        "bad provider": ([src, "--providers", "bogus"], "bogus"),
        "bad atol": ([src, "--atol", "abc"], "--atol"),
        "negative atol": ([src, "--atol=-1"], "--atol"),
        "atol without verify": ([src, "--atol", "1e-3", "--no-verify"], "--atol"),
        "bad input spec": ([src, "--input", "x"], "--input"),
        "unknown input name": ([src, "--input", "q:1x3x8x8"], "q"),
        "input rank": ([src, "--input", "x:1x3"], "rank"),
        "input conflicts": ([src, "--input", "x:1x3x9x8"], "9"),
        "absurd declared dims": ([tmp_path / "huge.onnx"], "--input x:SHAPE"),
        "npz missing name": ([src, "--inputs", _npz(tmp_path, "a.npz", y=x)], "a.npz"),
        "npz wrong shape": ([src, "--inputs", _npz(tmp_path, "b.npz", x=np.ones((1, 5, 8, 8), np.float32))], "x"),
        "npz wrong rank": ([src, "--inputs", _npz(tmp_path, "c.npz", x=np.ones((3, 8, 8), np.float32))], "x"),
        "npz missing": ([src, "--inputs", tmp_path / "none.npz"], "none.npz"),
        "-o with two models": ([src, tmp_path / "text.onnx", "-o", tmp_path / "o.onnx"], "one MODEL"),
        "check missing candidate": (["check", src, tmp_path / "nope.onnx"], "nope.onnx"),
        "check junit in missing dir": (["check", src, src, "--junit", tmp_path / "no" / "j.xml"], "j.xml"),
    }


BAD = ["missing file", "not onnx", "unknown extension", "output is input", "missing output dir", "bad provider",
       "bad atol", "negative atol", "atol without verify", "bad input spec", "unknown input name", "input rank",
       "input conflicts", "absurd declared dims", "npz missing name", "npz wrong shape", "npz wrong rank",
       "npz missing", "-o with two models", "check missing candidate", "check junit in missing dir"]


def _assert_bad(r: subprocess.CompletedProcess, needle: str, before, after) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and needle in lines[0], r.stderr
    if "--json" in r.args:  # one JSON document on stdout, the error (DESIGN: --json always prints one)
        err = json.loads(r.stdout)["error"]
        assert err["code"] == 2 and needle in f"{err['path']}: {err['message']}", r.stdout
    else:
        assert r.stdout == ""
    assert after == before, "nothing written, nothing touched"


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_exit_2_one_line_nothing_written(tmp_path, src, case):
    args, needle = _bad_cases(tmp_path, src)[case]
    before = _snap(tmp_path)
    r = _proc(*map(str, args), "--json")
    _assert_bad(r, needle, before, _snap(tmp_path))


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without a CUDA provider")
@pytest.mark.parametrize("cmd", ["fold", "check", "dry-run"])
def test_explicitly_requested_unavailable_provider_is_exit_2(tmp_path, src, cmd):
    args = {"fold": [src], "check": ["check", src, src], "dry-run": [src, "--dry-run"]}[cmd]
    before = _snap(tmp_path)
    r = _proc(*map(str, args), "--providers", "cpu,cuda", "--json")
    _assert_bad(r, "CUDAExecutionProvider", before, _snap(tmp_path))


def test_failed_verification_is_exit_1_json_only_nothing_written(tmp_path, src):
    """--atol 0 asks for a bit-exact fold, which float rounding does not give here: a real failure."""
    before = _snap(tmp_path)
    r = _proc(str(src), "--json", "--atol", "0", "--strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["verification"]["passed"] is False and doc["verification"]["first_divergence"] is not None
    assert doc["output"] is None
    assert _snap(tmp_path) == before
    # the same proof, asked with the derived tolerance, passes and writes a model computing the same function
    r = _proc(str(src), "-q")
    assert r.returncode == 0 and r.stderr == ""
    assert_same_function(onnx.load(str(src)), onnx.load(str(tmp_path / "m.folded.onnx")))


def test_several_models_each_get_a_full_report(tmp_path, rng, src, capsys):
    other = tmp_path / "n.onnx"
    onnx.save(_model(rng, out="w"), other)
    code, out, _ = _cli([src, other, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and [r["model"] for r in doc["reports"]] == [str(src), str(other)]
    for r, p in zip(doc["reports"], (src, other)):
        _check_report(r, onnx.load(str(p)), verified=True)
        assert_same_function(onnx.load(str(p)), onnx.load(r["output"]))


# -- providers and JUnit --------------------------------------------------------------------------

def test_junit_is_well_formed_one_case_per_output_and_provider(tmp_path, src, capsys):
    folded, junit = tmp_path / "f.onnx", tmp_path / "j.xml"
    assert _cli([src, "-o", folded, "-q"], capsys)[0] == 0
    for cand, want in ((folded, 0), (_wrong(src, tmp_path), 1)):
        code, out, _ = _cli(["check", src, cand, "--junit", junit, "--json"], capsys)
        assert code == want
        provs = json.loads(out)["verification"]["providers"]
        suite = ET.parse(junit).getroot().find("testsuite")
        cases = suite.findall("testcase")
        ran = {(f"bnfold.{p}", o) for p, v in provs.items() if v["ran"] for o in v["outputs"]}
        assert {(c.get("classname"), c.get("name")) for c in cases if c.find("skipped") is None} >= ran
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
        assert (int(suite.get("failures")) > 0) == (want == 1)
        for p, v in provs.items():
            if not v["ran"]:
                mine = [c for c in cases if c.get("classname") == f"bnfold.{p}"]
                assert mine and all(c.find("skipped") is not None for c in mine)


def test_default_providers_report_cuda_as_not_run(src, capsys):
    code, out, _ = _cli([src, "--json", "--dry-run"], capsys)
    cuda = json.loads(out)["verification"]["providers"]["CUDAExecutionProvider"]
    assert code == 0
    if not HAS_CUDA:
        assert cuda["ran"] is False and cuda["why"] and "passed" not in cuda


# -- help, -q, progress, imports ------------------------------------------------------------------

HELP = {
    "fold": ["-o", "--json", "--dry-run", "--no-verify", "--providers", "--atol", "--rtol", "--input", "--inputs",
             "--seed", "--batches", "--standalone", "--trust", "--outputs-only", "-q"],
    "check": ["--junit", "--json", "--providers", "--atol", "--rtol", "--input", "--inputs", "--seed", "--batches",
              "--trust", "--outputs-only", "-q"],
    "export": ["--to", "-o", "--json", "--no-verify", "--providers", "--atol", "--rtol", "--input", "--inputs",
               "--seed", "--trust", "-q"],
}


@pytest.mark.parametrize("cmd", sorted(HELP))
def test_help_of_each_command_lists_its_documented_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(([] if cmd == "fold" else [cmd]) + ["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "exit codes" in out
    missing = [o for o in HELP[cmd] if not re.search(rf"(^|[\s\[,]){re.escape(o)}([\s,=\]]|$)", out, re.M)]
    assert not missing, missing


def test_progress_goes_to_stderr_never_stdout_and_q_silences_it(src):
    code, out, err = run_with_tty_stderr([str(src), "--dry-run"])
    assert code == 0 and "bnfold:" in err and "bnfold:" not in out.replace("bnfold: error", "")
    assert "verification   PASSED" in out
    code, out, err = run_with_tty_stderr([str(src), "--dry-run", "-q"])
    assert code == 0 and err.strip() == "" and "verification   PASSED" in out
    code, out, err = run_with_tty_stderr([str(src), "--dry-run", "--json"])
    assert code == 0 and json.loads(out)["verification"]["passed"] is True


@pytest.mark.parametrize("cmd", ["fold", "check"])
def test_onnx_commands_never_import_torch_or_tensorflow(src, cmd):
    args = [str(src), "-q"] if cmd == "fold" else ["check", str(src), str(src), "-q"]
    r = _proc(*args, extra=("-X", "importtime"))
    assert r.returncode == 0, r.stderr[-2000:]
    mods = {ln.rsplit("|", 1)[-1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    assert "onnxruntime" in {m.split(".")[0] for m in mods}, "importtime must have listed the imports"
    assert not {m.split(".")[0] for m in mods} & {"torch", "tensorflow", "keras"}


# -- the library ----------------------------------------------------------------------------------

def test_library_fold_check_save_load_as_documented(tmp_path, rng):
    model = _model(rng)
    frozen = model.SerializeToString()
    res = bnfold.fold(model)
    assert model.SerializeToString() == frozen, "the input is never mutated"
    assert isinstance(res.model, onnx.ModelProto) and res.report.verification
    assert [d.bn for d in res.report.folded] == ["bn1"] and res.report.skipped[0].reason is Reason.PRODUCER_FANOUT
    _check_report({**res.report.to_dict(), "model": "(memory)"}, model, verified=True)
    out = tmp_path / "lib.folded.onnx"
    bnfold.save(res, str(out))
    assert res.report.output == str(out) and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert_same_function(model, bnfold.load(str(out)))
    ok = bnfold.check(model, str(out))
    assert isinstance(ok, bnfold.Verification) and bool(ok) and ok.passed is True
    assert assert_equivalent(model, res.model)
    wrong = _wrong(tmp_path / "lib.folded.onnx", tmp_path)
    bad = bnfold.check(model, wrong)
    assert not bad and bad.passed is False and bad.first_divergence
    with pytest.raises(AssertionError):
        assert_equivalent(model, wrong)
    off = bnfold.fold(model, verify=False)
    assert not off.report.verification and off.report.to_dict()["verification"]["passed"] is None


def test_library_bad_input_is_bnfold_error(tmp_path, rng):
    model = _model(rng)
    with pytest.raises(bnfold.BnfoldError, match="nope.onnx"):
        bnfold.fold(str(tmp_path / "nope.onnx"))
    with pytest.raises(bnfold.BnfoldError):
        bnfold.fold(42)
    if not HAS_CUDA:
        with pytest.raises(bnfold.BnfoldError, match="CUDAExecutionProvider"):
            bnfold.fold(model, providers=["cuda"])


# -- contract violations found by this file (kept uncommitted until bnfold is fixed) -------------

def test_dry_run_timing_has_every_documented_key(src, capsys):
    """DESIGN's timing_s shows load, fold, verify and save; a consumer should not KeyError on a dry run."""
    code, out, _ = _cli([src, "--json", "--dry-run"], capsys)
    assert code == 0
    assert {"load", "fold", "verify", "save"} <= set(json.loads(out)["timing_s"])


def test_several_models_one_failing_verification_writes_nothing(tmp_path, rng, src):
    """Exit 1 means 'nothing written' (README table); with several MODELs a passing one must not be left."""
    other = tmp_path / "n.onnx"
    onnx.save(_model(rng, out="w"), other)
    before = _snap(tmp_path)
    r = _proc(str(src), str(other), "--atol", "z:0", "--json", "--strict")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and [x["verification"]["passed"] for x in doc["reports"]] == [False, True]
    assert _snap(tmp_path) == before


def test_library_save_into_a_missing_directory_is_bnfold_error(tmp_path, rng):
    res = bnfold.fold(_model(rng), verify=False)
    with pytest.raises(bnfold.BnfoldError, match="x.onnx"):
        bnfold.save(res, str(tmp_path / "no" / "x.onnx"))


# -- vacuous or crashing proofs (inputs the verifier must not accept silently) -----------------------

@pytest.mark.parametrize("how", ["--input", "npz"])
def test_empty_inputs_cannot_prove_a_wrong_model_equivalent(tmp_path, src, how):
    """A zero-sized batch compares nothing; 'equivalent' (exit 0) would be a false proof."""
    data = ["--input", "x:0x3x8x8"] if how == "--input" else \
        ["--inputs", _npz(tmp_path, "e.npz", x=np.zeros((0, 3, 8, 8), np.float32))]
    r = _proc("check", str(src), _wrong(src, tmp_path), *data)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout


def test_all_nan_inputs_cannot_prove_a_wrong_model_equivalent(tmp_path, src):
    npz = _npz(tmp_path, "nan.npz", x=np.full((1, 3, 8, 8), np.nan, np.float32))
    r = _proc("check", str(src), _wrong(src, tmp_path), "--inputs", npz)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout


@pytest.mark.parametrize("case", ["npz of strings", "dims overflow int64", "dim beyond int64", "declared overflow"])
def test_inputs_that_crash_are_exit_2_one_line(tmp_path, src, case):
    g = G(np.random.default_rng(0))
    g.node("Relu", ["x"], ["y"], name="relu")
    onnx.save(g.model([("x", ["A", "B", 4])], [("y", ["A", "B", 4])]), tmp_path / "dyn.onnx")
    if case == "declared overflow":
        g.inits.clear()
        onnx.save(g.model([("x", [2 ** 32, 2 ** 32, 4])], [("y", [2 ** 32, 2 ** 32, 4])]), tmp_path / "big.onnx")
        args, needle = [str(tmp_path / "big.onnx")], "big.onnx"
    else:
        args, needle = {
            "npz of strings": ([str(src), "--inputs", _npz(tmp_path, "s.npz", x=np.array(["a", "b"]))], "s.npz"),
            "dims overflow int64": ([str(tmp_path / "dyn.onnx"), "--input", "x:4294967296x4294967296x4"], "x"),
            "dim beyond int64": ([str(src), "--input", "x:99999999999999999999x3x8x8"], "x"),
        }[case]
    before = _snap(tmp_path)
    r = _proc(*args, "--json")
    _assert_bad(r, needle, before, _snap(tmp_path))


def test_npz_shape_error_names_the_npz_file(tmp_path, src):
    """README: bad input gives one line naming the file and the problem."""
    npz = _npz(tmp_path, "shape.npz", x=np.ones((1, 5, 8, 8), np.float32))
    before = _snap(tmp_path)
    r = _proc(str(src), "--inputs", npz)
    _assert_bad(r, "shape.npz", before, _snap(tmp_path))


def test_per_output_atol_for_an_unknown_output_is_exit_2(tmp_path, src):
    """Like --input with an unknown name: a typo must not silently fall back to the derived tolerance."""
    before = _snap(tmp_path)
    r = _proc(str(src), "--atol", "logits:1e-3", "--json")
    _assert_bad(r, "logits", before, _snap(tmp_path))


def test_library_save_refuses_to_overwrite_the_model_it_folded(tmp_path, rng):
    """As on the command line: the input is never overwritten, by bnfold.save either."""
    src = tmp_path / "m.onnx"
    onnx.save(_model(rng), src)
    before = src.read_bytes()
    res = bnfold.fold(str(src))
    with pytest.raises(bnfold.BnfoldError, match="same as the input"):
        bnfold.save(res, str(src))
    assert src.read_bytes() == before
    bnfold.save(res, str(tmp_path / "f.onnx"))
    assert (tmp_path / "f.onnx").exists()
