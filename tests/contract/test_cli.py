"""End-to-end CLI: exit codes, JSON report, written files, bad input, atomicity, idempotence."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bnfold.cli import main
from tests.conftest import SAMPLES
from tests.helpers.onnx_build import count_ops, run_ort

SAMPLE_NAMES = ["resnet_block", "mobilenet_block", "decoder", "mlp", "fp16", "skip_cases"]


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(SAMPLES)})


@pytest.fixture
def work(tmp_path):
    for n in SAMPLE_NAMES:
        shutil.copy(os.path.join(SAMPLES, f"{n}.onnx"), tmp_path)
    return tmp_path


def feeds_for(model: onnx.ModelProto, seed: int = 3):
    from bnfold.onnx.feeds import make_feeds
    return make_feeds(model, seed=seed)[0]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_fold_sample_writes_equivalent_model(work, name, capsys):
    src = str(work / f"{name}.onnx")
    before = sha(src)
    code = main([src, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    out = str(work / f"{name}.folded.onnx")
    assert doc["output"] == out and os.path.exists(out)
    assert sha(src) == before, "input must never be touched"
    orig, folded = onnx.load(src), onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    # every BN is accounted for exactly once
    assert len(doc["folded"]) + len(doc["skipped"]) == count_ops(orig, "BatchNormalization")
    assert count_ops(folded, "BatchNormalization") == len(doc["skipped"])
    # graph interface, opset and metadata unchanged
    assert [o.name for o in folded.graph.output] == [o.name for o in orig.graph.output]
    assert [i.name for i in folded.graph.input] == [i.name for i in orig.graph.input]
    assert list(folded.opset_import) == list(orig.opset_import)
    assert folded.producer_name == orig.producer_name and folded.doc_string == orig.doc_string
    # an independent check with onnxruntime on new data
    f = feeds_for(orig)
    for a, b in zip(run_ort(orig, f), run_ort(folded, f)):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        tol = (5e-3 if a.dtype == np.float16 else 1e-5) * max(1.0, np.abs(a64).max())
        assert np.abs(a64 - b64).max() <= tol
    ver = doc["verification"]
    assert ver["passed"] is True
    assert ver["providers"]["CPUExecutionProvider"]["ran"] is True
    assert set(doc) >= {"schema", "model", "output", "framework", "folded", "skipped", "verification", "timing_s"}
    assert doc["schema"] == 1 and doc["framework"] == "onnx"


def test_second_run_is_a_no_op(work, capsys):
    src = str(work / "resnet_block.onnx")
    assert main([src, "-o", str(work / "a.onnx"), "--no-verify", "-q"]) == 0
    capsys.readouterr()
    assert main([str(work / "a.onnx"), "-o", str(work / "b.onnx"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["folded"] == [] and doc["skipped"] == []
    a, b = onnx.load(str(work / "a.onnx")), onnx.load(str(work / "b.onnx"))
    assert a.SerializeToString() == b.SerializeToString()


def test_text_output_is_a_short_table(work):
    r = run_cli(str(work / "skip_cases.onnx"), "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "BatchNorm      5 found" in out and "folded         1" in out
    assert "PRODUCER_FANOUT" in out and "NO_PRODUCER" in out and "PASSED" in out
    assert "CUDAExecutionProvider" in out  # unavailable providers are listed as not run
    assert not os.path.exists(work / "skip_cases.folded.onnx"), "--dry-run writes nothing"


def test_json_is_the_only_stdout(work):
    r = run_cli(str(work / "mlp.onnx"), "--json")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert [d["pattern"] for d in doc["folded"]].count("Gemm->BN") == 2


def test_cuda_is_reported_not_run_never_passed(work, capsys):
    import onnxruntime as ort
    main([str(work / "resnet_block.onnx"), "--json", "--dry-run"])
    prov = json.loads(capsys.readouterr().out)["verification"]["providers"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert prov["CUDAExecutionProvider"]["ran"] is False and prov["CUDAExecutionProvider"]["why"]
        assert "passed" not in prov["CUDAExecutionProvider"]


def test_explicit_unavailable_provider_is_exit_2(work, capsys):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider present: this case needs a machine without one (GPU runs are covered by cuda tests)")
    code = main([str(work / "resnet_block.onnx"), "--providers", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "CUDAExecutionProvider" in err
    assert not os.path.exists(work / "resnet_block.folded.onnx")


def test_failed_verification_exits_1_and_writes_nothing(work, monkeypatch, capsys):
    """Plant a wrong fold (one output channel off by 0.2 %): verification must catch it."""
    from bnfold.core import kernel
    real = kernel.fold_after

    def wrong(*a, **k):
        f = real(*a, **k)
        f.weight = f.weight.copy()
        f.weight[0] = (f.weight[0].astype(np.float64) * 1.002).astype(f.weight.dtype)
        return f

    monkeypatch.setattr(kernel, "fold_after", wrong)
    code = main([str(work / "resnet_block.onnx"), "--json", "--strict"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["verification"]["passed"] is False
    assert doc["verification"]["first_divergence"]["node"] is not None
    assert not os.path.exists(work / "resnet_block.folded.onnx")
    assert not [p for p in os.listdir(work) if p.startswith(".")], "no temp files left behind"


# -- bad input: one line, exit 2, nothing written, input untouched ---------------------------------

def _bad(work, args, expect):
    before = {p: sha(str(work / p)) for p in os.listdir(work)}
    r = run_cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    for e in expect:
        assert e in err, err
    after = {p: sha(str(work / p)) for p in os.listdir(work)}
    assert after == before, "bad input must write nothing and touch nothing"


def test_missing_file(work):
    _bad(work, [str(work / "nope.onnx")], ["nope.onnx", "no such file"])


def test_empty_file(work):
    (work / "empty.onnx").write_bytes(b"")
    _bad(work, [str(work / "empty.onnx")], ["empty.onnx", "empty"])


def test_truncated_file(work):
    data = (work / "resnet_block.onnx").read_bytes()
    (work / "trunc.onnx").write_bytes(data[: len(data) // 2])
    _bad(work, [str(work / "trunc.onnx")], ["trunc.onnx"])


def test_not_onnx(work):
    (work / "text.onnx").write_text("this is not a model\n" * 20)
    _bad(work, [str(work / "text.onnx")], ["text.onnx", "not a valid ONNX model"])


def test_unknown_extension(work):
    (work / "model.xyz").write_bytes(b"abc")
    _bad(work, [str(work / "model.xyz")], ["model.xyz", "unknown model format"])


def test_output_equal_to_input(work):
    _bad(work, [str(work / "mlp.onnx"), "-o", str(work / "mlp.onnx")], ["same as the input"])


def test_output_in_missing_directory(work):
    _bad(work, [str(work / "mlp.onnx"), "-o", str(work / "no" / "dir" / "x.onnx")], ["does not exist"])


def test_bad_input_spec(work):
    _bad(work, [str(work / "mlp.onnx"), "--input", "nonsense"], ["--input"])


def test_usage_error_is_exit_2(work):
    r = run_cli()
    assert r.returncode == 2 and "usage" in r.stderr


def test_help_lists_commands_and_exit_codes():
    r = run_cli("--help")
    assert r.returncode == 0
    for word in ("bnfold check", "bnfold export", "exit codes", "--providers", "--standalone", "--dry-run"):
        assert word in r.stdout


def test_onnx_cli_does_not_import_frameworks(work):
    code = ("import sys, bnfold.cli as c; rc = c.main([sys.argv[1], '--no-verify', '--dry-run', '-q']);"
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; print(bad); sys.exit(rc or bool(bad))")
    r = subprocess.run([sys.executable, "-c", code, str(work / "resnet_block.onnx")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(SAMPLES)})
    assert r.returncode == 0, r.stdout + r.stderr


def test_several_models_in_one_call(work, capsys):
    a, b = str(work / "mlp.onnx"), str(work / "decoder.onnx")
    assert main([a, b, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in doc["reports"]] == [a, b]
    assert os.path.exists(work / "mlp.folded.onnx") and os.path.exists(work / "decoder.folded.onnx")
    assert main([a, b, "-o", str(work / "x.onnx")]) == 2
    assert "exactly one MODEL" in capsys.readouterr().err


def test_written_files_get_the_usual_permissions(work):
    umask = os.umask(0o022)
    try:
        assert main([str(work / "mlp.onnx"), "--no-verify", "-q"]) == 0
    finally:
        os.umask(umask)
    assert os.stat(work / "mlp.folded.onnx").st_mode & 0o777 == 0o644
