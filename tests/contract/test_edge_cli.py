"""Adversarial command-line cases: odd paths, broken files, check on reordered/extra outputs, JSON purity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.cli import main
from tests.conftest import ROOT
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function


def _model(rng: np.random.Generator) -> onnx.ModelProto:
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y")
    g.node("Relu", ["y"], ["z"])
    return onnx.shape_inference.infer_shapes(g.model([("x", [1, 3, 8, 8])], [("y", None), ("z", None)]))


@pytest.fixture
def model(rng):
    return _model(rng)


@pytest.fixture
def path(tmp_path, model):
    p = tmp_path / "m.onnx"
    onnx.save(model, p)
    return p


def _one_line_error(err: str, name: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnfold: error:") and name in lines[0], err


def _folded_ok(src, out) -> None:
    """The written file is a checked ONNX model computing what the input computes, without BN."""
    orig, folded = onnx.load(str(src)), onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert_same_function(orig, folded)


def test_path_with_spaces(tmp_path, model, capsys):
    d = tmp_path / "my models"
    d.mkdir()
    src = d / "a model.onnx"
    onnx.save(model, src)
    assert main([str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"] == str(d / "a model.folded.onnx")
    _folded_ok(src, doc["output"])


def test_symlink_input_folds_and_output_onto_it_is_refused(tmp_path, path, capsys):
    link = tmp_path / "link.onnx"
    link.symlink_to(path)
    assert main([str(link), "-q"]) == 0
    _folded_ok(path, tmp_path / "link.folded.onnx")
    capsys.readouterr()
    before = path.read_bytes()
    assert main([str(path), "-o", str(link)]) == 2
    _one_line_error(capsys.readouterr().err, "link.onnx")
    assert path.read_bytes() == before


def test_dangling_symlink(tmp_path, capsys):
    link = tmp_path / "gone.onnx"
    link.symlink_to(tmp_path / "nowhere.onnx")
    assert main([str(link)]) == 2
    _one_line_error(capsys.readouterr().err, "gone.onnx")


def test_directory_as_model(tmp_path, capsys):
    d = tmp_path / "dir.onnx"
    d.mkdir()
    assert main([str(d)]) == 2
    _one_line_error(capsys.readouterr().err, "dir.onnx")


def test_zip_renamed_to_onnx(tmp_path, path, capsys):
    z = tmp_path / "z.onnx"
    with zipfile.ZipFile(z, "w") as f:
        f.write(path, "m.onnx")
    assert main([str(z)]) == 2
    _one_line_error(capsys.readouterr().err, "z.onnx")
    assert not (tmp_path / "z.folded.onnx").exists()


def test_missing_external_data(tmp_path, model, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, location="ext.bin", size_threshold=0)
    os.unlink(tmp_path / "ext.bin")
    assert main([str(src)]) == 2
    err = capsys.readouterr().err
    _one_line_error(err, "ext.onnx")
    assert "ext.bin" in err


def test_external_data_model_folds(tmp_path, model, capsys):
    src = tmp_path / "ext.onnx"
    onnx.save(model, src, save_as_external_data=True, location="ext.bin", size_threshold=0)
    data = (tmp_path / "ext.bin").read_bytes()
    assert main([str(src), "-q"]) == 0
    assert (tmp_path / "ext.bin").read_bytes() == data
    _folded_ok(src, tmp_path / "ext.folded.onnx")


def test_uppercase_extension(tmp_path, model):
    src = tmp_path / "M.ONNX"
    onnx.save(model, src)
    assert main([str(src), "-q"]) == 0
    _folded_ok(src, tmp_path / "M.folded.ONNX")


def test_unreadable_file(tmp_path, path, capsys):
    os.chmod(path, 0)
    try:
        readable = os.access(path, os.R_OK)  # root reads anything: then it simply folds
        code = main([str(path), "-q"])
        err = capsys.readouterr().err
        if readable:
            assert code == 0
            os.chmod(path, 0o644)
            _folded_ok(path, path.with_name("m.folded.onnx"))
        else:
            assert code == 2
            _one_line_error(err, "m.onnx")
    finally:
        os.chmod(path, 0o644)


def _variant(model: onnx.ModelProto, tmp_path, name: str, edit) -> str:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    edit(m)
    p = tmp_path / name
    onnx.save(m, p)
    return str(p)


def test_check_matches_outputs_by_name(tmp_path, model, path, capsys):
    def reverse(m):
        outs = list(m.graph.output)
        del m.graph.output[:]
        m.graph.output.extend(outs[::-1])
    rev = _variant(model, tmp_path, "rev.onnx", reverse)
    assert main(["check", str(path), rev, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["verification"]["providers"]["CPUExecutionProvider"]["outputs"]) == {"y", "z"}


def test_check_candidate_with_extra_outputs_and_with_fewer(tmp_path, model, path, capsys):
    extra = _variant(model, tmp_path, "extra.onnx",
                     lambda m: m.graph.output.append(helper.make_tensor_value_info("c", 1, [1, 4, 8, 8])))
    assert main(["check", str(path), extra]) == 0
    capsys.readouterr()
    assert main(["check", extra, str(path)]) == 2  # the candidate cannot answer for output 'c'
    err = capsys.readouterr().err
    _one_line_error(err, "'c'")


def test_check_detects_a_one_channel_change(tmp_path, model, path, capsys):
    def nudge(m):
        w = next(t for t in m.graph.initializer if t.name == "w")
        a = numpy_helper.to_array(w).copy()
        a[2] *= 1.01
        w.CopyFrom(numpy_helper.from_array(a, "w"))
    bad = _variant(model, tmp_path, "bad.onnx", nudge)
    assert main(["check", str(path), bad, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verification"]["passed"] is False
    assert doc["verification"]["first_divergence"] is not None


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_json_stdout_is_pure_for_ok_fail_and_error(tmp_path, model, path):
    ok = _cli(str(path), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["folded"][0]["bn"] == "bn"
    _folded_ok(path, tmp_path / "m.folded.onnx")

    other = tmp_path / "o.onnx"
    m = onnx.ModelProto()
    m.CopyFrom(model)
    beta = next(t for t in m.graph.initializer if t.name == "bn_beta")
    beta.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(beta) + 1, "bn_beta"))
    onnx.save(m, other)
    diff = _cli("check", str(path), str(other), "--json")
    assert diff.returncode == 1 and json.loads(diff.stdout)["verification"]["passed"] is False

    err = _cli(str(tmp_path / "missing.onnx"), "--json")
    # --json prints one document on errors too: the error, naming the file (DESIGN, issue 14)
    assert err.returncode == 2 and json.loads(err.stdout) == {
        "schema": 1, "error": {"message": "no such file", "path": str(tmp_path / "missing.onnx"), "code": 2}}
    _one_line_error(err.stderr, "missing.onnx")


def test_several_models_json_lists_each(tmp_path, model, path, capsys):
    second = tmp_path / "second.onnx"
    onnx.save(_model(np.random.default_rng(7)), second)
    assert main([str(path), str(second), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in doc["reports"]] == [str(path), str(second)]
    for src in (path, second):
        _folded_ok(src, src.with_name(src.stem + ".folded.onnx"))


@pytest.mark.parametrize("args,needle", [(["--input", "nosuch:1x3x8x8"], "nosuch"),
                                         (["--input", "x:1x4x8x8"], "x"),
                                         (["-o", "."], "."),
                                         (["--batches", "0"], "--batches")])
def test_bad_options_are_exit_2_one_line(path, capsys, args, needle):
    assert main([str(path), *args]) == 2
    _one_line_error(capsys.readouterr().err, needle)
    assert not path.with_name("m.folded.onnx").exists()
