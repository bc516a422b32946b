"""Faults around a run, on real files, with the real `bnfold` command: killed mid-save, a read-only output
folder, a full disk, two runs writing one output, the input replaced mid-run. Each ends in a correct result
or in one error line and exit 2; never a traceback, a half-written file, a touched input or a stray
temporary file (one a killed run could not remove is removed by the next run into that folder)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from .conftest import (ENV, assert_one_line_error, bnfold, copy_model, file_size_limit, folded_bytes, inputs_of,
                       killed_run, snapshot, start, strays, without_dac_override)

# -- killed in the middle of a save -------------------------------------------------------------------

@pytest.mark.parametrize("key", ["a", "ext"], ids=["onnx", "onnx-external-data"])
def test_sigkill_mid_save_onnx_leaves_no_partial_output_and_the_rerun_cleans_up(key, onnx_models, tmp_path):
    src = copy_model(onnx_models[key], tmp_path / "m")
    out = src.with_name("model.folded.onnx")
    want, inputs = folded_bytes(onnx_models[key]), inputs_of(src.parent)
    rnd = random.Random(16)
    for i, delay in enumerate([0.0, rnd.uniform(0.0, 0.03)]):
        # the 2nd opening of a temporary file is onnx.save_model's: the file exists, nothing is in it yet
        code = killed_run(2, delay, "-q", src)
        if i == 0:
            assert code == -signal.SIGKILL and strays(src.parent) and not out.exists()
        assert not out.exists() or out.read_bytes() == want  # the old state, or the whole new file
        assert inputs_of(src.parent) == inputs
    r = bnfold("-q", src)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == want and inputs_of(src.parent) == inputs
    assert strays(src.parent) == []  # the killed runs' temporary files are gone too


_SAVE_EXTERNAL = """
import sys
from bnfold.onnx.io import load_onnx, save_onnx
save_onnx(load_onnx(sys.argv[1]), sys.argv[2], external_data=True)
"""


def test_sigkill_mid_external_data_save_and_a_full_disk(onnx_models, tmp_path):
    """The writer of models with external data (over 2 GB in real life) through the library."""
    src = onnx_models["ext"]
    out = tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    cmd = [sys.executable, "-c", _SAVE_EXTERNAL, str(src), str(out)]
    # opened 1: the data file's temporary name, 2: writing the weights into it
    assert killed_run(2, 0.0, src, out, script=_SAVE_EXTERNAL) == -signal.SIGKILL
    assert strays(out.parent) and not out.exists()  # data files are renamed in before the model file
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, preexec_fn=file_size_limit(1 << 20))
    assert r.returncode == 1 and "cannot write the output" in r.stderr and "file size limit" in r.stderr
    assert not out.exists()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert strays(out.parent) == [] and sorted(os.listdir(out.parent)) == ["big.onnx", "big.onnx.data"]
    import onnx
    from onnx import numpy_helper
    a, b = onnx.load(str(src)), onnx.load(str(out))
    for t, u in zip(a.graph.initializer, b.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))


# -- an output folder that cannot be written ---------------------------------------------------------

@pytest.mark.parametrize("which", ["onnx", "pt2"])
def test_read_only_output_folder(which, onnx_models, request, tmp_path):
    src = copy_model(onnx_models["a"] if which == "onnx" else request.getfixturevalue("pt2_model"), tmp_path / "m")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    inputs = inputs_of(src.parent)
    try:
        r = bnfold("-q", src, "-o", ro / src.name.replace("model", "out"), preexec_fn=without_dac_override)
    finally:
        ro.chmod(0o755)
    assert_one_line_error(r, ro / src.name.replace("model", "out"), "not writable")
    assert os.listdir(ro) == [] and inputs_of(src.parent) == inputs and strays(src.parent) == []


def test_output_folder_made_read_only_mid_run(onnx_models, tmp_path):
    """Writable when the run starts (so the early check passes), read-only by the time it writes."""
    a = copy_model(onnx_models["a"], tmp_path / "in" / "a")
    b = copy_model(onnx_models["b"], tmp_path / "in" / "b")
    b = b.rename(b.with_name("other.onnx"))  # a mirrored output folder holds each name once
    out = tmp_path / "out"
    out.mkdir()
    p = start(a, b, "-o", f"{out}/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
              preexec_fn=without_dac_override)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith("bnfold: [1/2]") and "verifying" in line:
            out.chmod(0o555)
    p.wait(timeout=240)
    out.chmod(0o755)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", "".join(lines))
    line = assert_one_line_error(r, out, "not writable")
    assert "cannot write the output" in line or "is not writable" in line
    assert snapshot(out) == {} and strays(tmp_path / "in") == []


# -- a full disk ------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["a", "ext", "pt2"], ids=["onnx", "onnx-external-data", "pt2"])
def test_disk_full_while_writing(which, onnx_models, early, tmp_path):
    if which == "pt2":  # run with the session (early.py: disk_full)
        r, src, inputs = early.get("pt2-disk-full")
    else:
        src = copy_model(onnx_models[which], tmp_path / "m")
        inputs = inputs_of(src.parent)
        r = bnfold("-q", src, preexec_fn=file_size_limit(1 << 20))  # the 5 MB output cannot fit
    out = src.with_name(f"model.folded{src.suffix}")
    assert_one_line_error(r, out, "cannot write the output", "file size limit", "nothing written")
    assert not out.exists() and strays(src.parent) == [] and inputs_of(src.parent) == inputs


# -- two runs writing one output ----------------------------------------------------------------------

def test_two_runs_writing_the_same_output_at_once(onnx_models, tmp_path):
    a = copy_model(onnx_models["a"], tmp_path / "x")
    b = copy_model(onnx_models["b"], tmp_path / "y")
    whole = {folded_bytes(onnx_models["a"]), folded_bytes(onnx_models["b"])}
    out = tmp_path / "out" / "model.folded.onnx"
    out.parent.mkdir()
    ps = [start("-q", s, "-o", out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for s in (a, b)]
    for p in ps:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    assert out.read_bytes() in whole  # one whole fold or the other, never a mix
    assert sorted(os.listdir(out.parent)) == ["model.folded.onnx"]


# -- the input replaced while bnfold runs ----------------------------------------------------------------

@pytest.mark.parametrize("key", ["a", "ext"], ids=["onnx", "onnx-external-data"])
def test_input_replaced_mid_run_is_not_written(key, onnx_models, tmp_path):
    """Replaced after it was loaded: its fold would carry the mark of a file it was not made from."""
    src = copy_model(onnx_models[key], tmp_path / "in" / "m")
    other = copy_model(onnx_models["b"], tmp_path / "in" / "n")
    other = other.rename(other.with_name("other.onnx"))
    victim = src.with_name(src.name + ".data") if key == "ext" else src
    spare = tmp_path / "spare"
    spare.write_bytes(victim.read_bytes()[::-1] if key == "ext" else (onnx_models["b"]).read_bytes())
    out = tmp_path / "out"
    p = start(src, other, "-o", f"{out}/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith("bnfold: [1/2]") and "verifying" in line:
            os.replace(spare, victim)  # atomically, as a download or a build would
    p.wait(timeout=240)
    assert not spare.exists(), "".join(lines)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", "".join(lines))
    assert_one_line_error(r, src, "changed while bnfold was running")
    assert not out.exists() or snapshot(out) == {}
    assert strays(tmp_path / "in") == []


# -- killed mid-save: PyTorch and Keras (last: their killed runs start with the session, see early.py) --

def _complete_archive(path: Path) -> None:
    """A whole zip (every member's CRC checks) that carries bnfold's mark: what a finished save leaves."""
    from bnfold import marks
    assert zipfile.ZipFile(path).testzip() is None and marks.read(str(path)) is not None


@pytest.mark.parametrize("framework", ["pt2", "keras"])
def test_sigkill_mid_save_torch_and_keras(framework, early):
    """bnfold writes these through a temporary file of its own, then marks it, then renames it. The
    killed run was started with the session (early.py: killed_mid_save)."""
    code, src, inputs = early.get(f"{framework}-killed")
    out = src.with_name(f"model.folded{src.suffix}")
    assert code == -signal.SIGKILL and strays(src.parent) and not out.exists()
    assert inputs_of(src.parent) == inputs
    r = bnfold("-q", src)
    assert r.returncode == 0, r.stderr
    assert strays(src.parent) == [] and inputs_of(src.parent) == inputs
    _complete_archive(out)
