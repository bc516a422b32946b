"""Attacks on the one-line error for a core dependency that cannot be imported (core.errors.core_dependency_error,
the CLI and --keep-going batches): every command, the --json contract, packages broken in the ways real installs
break (a compiled part that does not load, an ImportError without a name, a submodule failing in the middle of a
run), and modules whose names only look like a core package's. Real processes: the package is blocked before
bnfold starts, by None in sys.modules (what a missing package looks like to `import`) or by a meta-path finder
that raises the ImportError a broken install raises. Four cases were wrong when these were written (numpy's
nameless re-raise, any google.* taken for protobuf, no JSON document for a non-core ImportError, a multi-line
message); each is fixed and pinned here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_models" / "resnet_block.onnx"
MLP = ROOT / "sample_models" / "mlp.onnx"

# argv[1]: a JSON spec {"none": [module, ...], "raise": [[module, message, name or null, "ImportError" or
# "ModuleNotFoundError"], ...], "modules_to": FILE}; the rest is bnfold's command line
_RUN = """
import json, sys
spec = json.loads(sys.argv[1])
for name in spec.get("none", []):
    sys.modules[name] = None
class Broken:
    def find_spec(self, name, path=None, target=None):
        for module, message, err_name, kind in spec.get("raise", []):
            if name == module:
                raise {"ImportError": ImportError, "ModuleNotFoundError": ModuleNotFoundError}[kind](
                    message, name=err_name)
sys.meta_path.insert(0, Broken())
from bnfold.cli import main
try:
    code = main(sys.argv[2:])
finally:
    if spec.get("modules_to"):
        with open(spec["modules_to"], "w") as f:
            json.dump(sorted(m for m, v in sys.modules.items() if v is not None), f)
sys.exit(code)
"""


def _run(spec: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, json.dumps(spec), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _one_line(r: subprocess.CompletedProcess, package: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith(f"bnfold: error: this needs {package}, which bnfold depends on"), line
    assert line.endswith(f": pip install {package}"), line
    return line


def _one_json(r: subprocess.CompletedProcess, package: str) -> dict:
    doc = json.loads(r.stdout)  # the whole of stdout is one document: anything else fails to parse
    assert doc["error"]["code"] == 2, doc
    assert f"this needs {package}, which bnfold depends on" in doc["error"]["message"], doc
    assert f"pip install {package}" in doc["error"]["message"], doc
    return doc


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def src(tmp_path):
    s = tmp_path / "m.onnx"
    shutil.copy(SAMPLE, s)
    return s


# ---- every command and output, each package the one missing -------------------------------------------------

@pytest.mark.parametrize("blocked, package", [("numpy", "numpy"), ("google", "protobuf"),
                                              ("google.protobuf", "protobuf"), ("onnx", "onnx")])
def test_every_core_package_missing_from_a_fold_is_one_line(blocked, package, src, tmp_path):
    before = src.read_bytes()
    r = _run({"none": [blocked]}, src, "-o", tmp_path / "out.onnx", "--no-verify")
    _one_line(r, package)
    assert r.stdout == ""
    assert _tree(tmp_path) == ["m.onnx"] and src.read_bytes() == before


def test_a_verified_fold_with_every_output_asked_for_writes_nothing(src, tmp_path):
    """--html, --save-inputs and -o DIR/ all asked for; onnxruntime missing: none of them, no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    r = _run({"none": ["onnxruntime"]}, src, "-o", f"{out}/", "--html", tmp_path / "r.html",
             "--save-inputs", tmp_path / "i.npz", "--bench")
    _one_line(r, "onnxruntime")
    assert _tree(tmp_path) == ["m.onnx", "out"]


def test_dry_run_without_onnx_is_one_json_document(src):
    r = _run({"none": ["onnx"]}, src, "--dry-run", "--json")
    _one_line(r, "onnx")
    _one_json(r, "onnx")


@pytest.mark.parametrize("blocked", ["onnxruntime", "onnx"])
def test_check_without_a_core_package_is_one_line_and_writes_no_report(blocked, src, tmp_path):
    r = _run({"none": [blocked]}, "check", src, src, "--json", "--junit", tmp_path / "j.xml",
             "--html", tmp_path / "c.html")
    _one_line(r, blocked)
    _one_json(r, blocked)
    assert _tree(tmp_path) == ["m.onnx"]


def _two_model_folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(SAMPLE, d / "a.onnx")
    shutil.copy(MLP, d / "b.onnx")
    return d


def test_a_folder_without_keep_going_stops_at_the_first_model_and_writes_nothing(tmp_path):
    d = _two_model_folder(tmp_path)
    r = _run({"none": ["onnxruntime"]}, d, "-o", tmp_path / "out", "--json")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "this needs onnxruntime" in errors[0], r.stderr
    _one_json(r, "onnxruntime")
    assert _tree(tmp_path) == ["in", "in/a.onnx", "in/b.onnx"]


def test_keep_going_without_json_names_the_package_once_per_model(tmp_path):
    d = _two_model_folder(tmp_path)
    r = _run({"none": ["numpy"]}, d, "-o", tmp_path / "out", "--keep-going")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("this needs numpy, which bnfold depends on") == 2, r.stderr
    assert "internal error" not in r.stdout + r.stderr
    assert not any(p.suffix == ".onnx" for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() \
        else True


@pytest.fixture(scope="module")
def pt2(tmp_path_factory):
    torch = pytest.importorskip("torch")
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(4, 3, 8, 8) * 2 + 1)
    m.eval()
    p = tmp_path_factory.mktemp("pt2") / "m.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(1, 3, 8, 8),)), str(p))
    return p


def test_export_without_onnx_is_one_line(pt2, tmp_path):
    before = pt2.read_bytes()
    r = _run({"none": ["onnx"]}, "export", pt2, "--to", "onnx", "-o", tmp_path / "o.onnx", "--json")
    _one_line(r, "onnx")
    _one_json(r, "onnx")
    assert _tree(tmp_path) == [] and pt2.read_bytes() == before


def test_no_verify_without_onnxruntime_folds_and_imports_no_framework(src, tmp_path):
    mods = tmp_path / "modules.json"
    out = tmp_path / "o.onnx"
    r = _run({"none": ["onnxruntime"], "modules_to": str(mods)}, src, "-o", out, "--no-verify")
    assert r.returncode == 0 and out.exists(), r.stderr
    loaded = set(json.loads(mods.read_text()))
    assert not {"torch", "tensorflow", "keras", "onnxruntime"} & loaded, sorted(loaded)


# ---- installed but broken ----------------------------------------------------------------------------------

def test_a_broken_onnxruntime_extension_is_one_line(src, tmp_path):
    """onnxruntime imports its compiled part inside a try and re-raises the saved ImportError afterwards."""
    ext = "onnxruntime.capi.onnxruntime_pybind11_state"
    r = _run({"raise": [[ext, "DLL load failed while importing onnxruntime_pybind11_state", ext, "ImportError"]]},
             src, "-o", tmp_path / "o.onnx", "--json")
    assert "DLL load failed" in _one_line(r, "onnxruntime")
    _one_json(r, "onnxruntime")
    assert _tree(tmp_path) == ["m.onnx"]


def test_numpy_with_a_broken_compiled_part_is_one_line(src, tmp_path):
    """numpy re-raises its compiled part's failure as ImportError(advice) with no name, from the error that
    names the module: the cause names the package."""
    ext = "numpy._core._multiarray_umath"
    r = _run({"raise": [[ext, "undefined symbol: PyFoo", ext, "ImportError"]]}, src, "-o", tmp_path / "o.onnx")
    _one_line(r, "numpy")
    assert _tree(tmp_path) == ["m.onnx"]


def test_a_submodule_failing_in_the_middle_of_a_fold_is_one_line(src, tmp_path):
    """onnx itself imports; onnx.numpy_helper (imported by bnfold's fold later) is missing from the install."""
    r = _run({"raise": [["onnx.numpy_helper", "No module named 'onnx.numpy_helper'", "onnx.numpy_helper",
                         "ModuleNotFoundError"]]}, src, "-o", tmp_path / "o.onnx")
    _one_line(r, "onnx")
    assert _tree(tmp_path) == ["m.onnx"]


def test_the_reference_evaluator_missing_leaves_the_proofs_not_run_and_says_why(src, tmp_path):
    """onnx.reference is only the local proofs' tool: verification on onnxruntime still decides, and each fold's
    proof says it was not run and why (not a silent 'proven')."""
    out = tmp_path / "o.onnx"
    r = _run({"raise": [["onnx.reference", "broken onnx.reference", "onnx.reference", "ImportError"]]},
             src, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["folded"] and all("broken onnx.reference" in f["proof"]["not_run"] for f in doc["folded"]), doc
    assert out.exists()


# ---- not a core package: still a bug -----------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["onnxscript", "numpy_extra", "googleapis", "onnxruntime_extensions",
                                     "ml_dtypes_x", "onnx_tool"])
def test_a_name_that_only_starts_like_a_core_package_is_a_bug(missing, src, tmp_path):
    """bnfold's own module failing on `import <missing>`: a traceback and exit 1, not 'pip install <core>'."""
    r = _run({"raise": [["bnfold.onnx.sweep", f"No module named '{missing}'", missing, "ModuleNotFoundError"]]},
             src, "-o", tmp_path / "o.onnx", "--no-verify")
    assert r.returncode == 1 and "Traceback" in r.stderr and missing in r.stderr, r.stderr
    assert "which bnfold depends on" not in r.stderr
    assert _tree(tmp_path) == ["m.onnx"]


def test_a_google_module_that_is_not_protobuf_is_a_bug(src, tmp_path):
    """google is a namespace many distributions share: only google.protobuf (and google._upb) are protobuf's."""
    r = _run({"raise": [["bnfold.onnx.sweep", "No module named 'google.cloud'", "google.cloud",
                         "ModuleNotFoundError"]]}, src, "-o", tmp_path / "o.onnx", "--no-verify")
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
    assert "pip install protobuf" not in r.stderr


def test_a_missing_module_that_is_a_bug_still_gets_its_json_document(src, tmp_path):
    r = _run({"none": ["bnfold.onnx.sweep"]}, src, "-o", tmp_path / "o.onnx", "--no-verify", "--json")
    assert r.returncode == 1 and "Traceback" in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    assert doc["error"]["code"] == 1 and doc["error"].get("internal") is True, doc


def test_keep_going_reports_a_missing_module_that_is_a_bug_as_internal(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(SAMPLE, d / "a.onnx")
    r = _run({"raise": [["bnfold.onnx.sweep", "No module named 'onnxscript'", "onnxscript", "ModuleNotFoundError"]]},
             d, "-o", tmp_path / "out", "--keep-going", "--no-verify", "--json")
    assert r.returncode == 2 and "Traceback" in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    (m,) = doc["summary"]["models"]
    assert m["error"].get("internal") is True and "onnxscript" in m["error"]["message"], m


# ---- the library API ---------------------------------------------------------------------------------------

_LIB = """
import sys
sys.modules["onnxruntime"] = None
import bnfold
for call in (lambda: bnfold.fold(sys.argv[1]), lambda: bnfold.check(sys.argv[1], sys.argv[1])):
    try:
        r = call()
        print("RESULT", type(r).__name__)
    except ImportError as e:
        print("RAISED", type(e).__name__, e.name)
r = bnfold.fold(sys.argv[1], verify=False)
print("NOVERIFY", len(r.report.folded))
"""


def test_the_library_raises_the_import_error_itself_and_never_returns_a_result(src):
    """bnfold.fold / bnfold.check without onnxruntime: the caller gets the ModuleNotFoundError (naming
    onnxruntime), not a result that looks verified; fold(verify=False) still works."""
    r = subprocess.run([sys.executable, "-c", _LIB, str(src)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["RAISED ModuleNotFoundError onnxruntime"] * 2 + ["NOVERIFY 3"], r.stdout


def test_a_multi_line_import_error_is_still_one_line(src, tmp_path):
    ext = "onnxruntime.capi.onnxruntime_pybind11_state"
    r = _run({"raise": [[ext, "libcudart.so.12: cannot open shared object file\nPlease install CUDA 12", ext,
                         "ImportError"]]}, src, "-o", tmp_path / "o.onnx")
    assert "libcudart.so.12" in _one_line(r, "onnxruntime")


def test_the_real_entry_point_with_a_broken_onnxruntime_on_the_path(src, tmp_path):
    """`python -m bnfold`, no test harness in the process: an onnxruntime package earlier on sys.path whose
    compiled part is absent (a half-removed install) is the one line too."""
    shadow = tmp_path / "shadow" / "onnxruntime"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("from . import _pybind_state_absent\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "bnfold", str(src), "-o", str(tmp_path / "o.onnx")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert "_pybind_state_absent" in _one_line(r, "onnxruntime")
    assert not (tmp_path / "o.onnx").exists()
