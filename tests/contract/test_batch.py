"""Folders and batches on real files: mixed ONNX / PyTorch / Keras folders, --keep-going, mirrored
outputs, what bnfold wrote recognised by its mark (not its name), incremental re-runs, all-or-nothing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest

from bnfold.batch import plan
from bnfold.cli import main
from tests.conftest import SAMPLES
from tests.helpers.onnx_build import run_ort


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def snapshot(root) -> dict[str, str]:
    """Every file under root with its digest (a SavedModel or folder contributes each of its files)."""
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _torch_program(path, seed: int = 0) -> None:
    import torch

    from tests.helpers.zoo_torch import set_random_bn
    torch.manual_seed(seed)
    m = set_random_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                                          torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1), torch.nn.BatchNorm2d(2)), seed)
    ep = torch.export.export(m, (torch.randn(2, 3, 8, 8),))
    torch.export.save(ep, str(path))


def _keras_model(path, seed: int = 0) -> None:
    from tests.helpers.keras_build import L, keras, randomise
    i = keras.Input((8, 8, 3))
    x = L.BatchNormalization()(L.Conv2D(4, 3, padding="same")(i))
    model = keras.Model(i, L.Dense(3)(L.ReLU()(x)))
    randomise(model, np.random.default_rng(seed))
    model.save(str(path))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """models/: two ONNX files (one in a subfolder), a .pt2 program, a .keras model and a broken .onnx."""
    root = tmp_path_factory.mktemp("mixed") / "models"
    (root / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), root / "a.onnx")
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), root / "sub" / "b.onnx")
    _torch_program(root / "net.pt2")
    _keras_model(root / "net.keras")
    (root / "broken.onnx").write_bytes(b"\x08\x07this is not a protobuf model at all" * 3)
    return root


@pytest.fixture
def models(mixed_folder, tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(mixed_folder, dst)
    return dst


def _same_onnx(src, out) -> None:
    a, b = onnx.load(str(src)), onnx.load(str(out))
    from bnfold.onnx.feeds import make_feeds
    f = make_feeds(a, seed=11)[0]
    for x, y in zip(run_ort(a, f), run_ort(b, f)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(x).max())))


def _same_program(src, out) -> None:
    import torch
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a, b = torch.export.load(str(src)), torch.export.load(str(out))
    assert not any("batch_norm" in str(n.target) for n in b.graph.nodes), "folded means no batch_norm call"
    torch.testing.assert_close(b.module()(x), a.module()(x), rtol=1e-4, atol=1e-5)


def _same_keras(src, out) -> None:
    import keras
    x = np.random.default_rng(5).normal(size=(2, 8, 8, 3)).astype("float32")
    a, b = keras.saving.load_model(str(src)), keras.saving.load_model(str(out))
    assert not any(type(layer).__name__ == "BatchNormalization" for layer in b.layers)
    np.testing.assert_allclose(np.asarray(b(x)), np.asarray(a(x)), rtol=1e-4, atol=1e-5)


def test_mixed_folder_keep_going_mirrors_the_good_reports_the_broken_and_folds_nothing_twice(models, tmp_path,
                                                                                             capsys):
    out = tmp_path / "out"
    inputs = snapshot(models)
    code = main([str(models), "-r", "--keep-going", "-o", f"{out}/", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 2, "the worst: the broken file is a bad input"
    rows = {os.path.relpath(r["model"], models): r for r in doc["summary"]["models"]}
    assert set(rows) == {"a.onnx", "sub/b.onnx", "net.pt2", "net.keras", "broken.onnx"}
    assert rows["broken.onnx"]["exit_code"] == 2 and rows["broken.onnx"]["error"]["path"].endswith("broken.onnx")
    assert [e["path"] for e in doc["errors"]] == [str(models / "broken.onnx")]
    for name in ("a.onnx", "sub/b.onnx", "net.pt2", "net.keras"):
        assert rows[name]["status"] == "written" and rows[name]["exit_code"] == 0, rows[name]
        assert rows[name]["output"] == str(out / name)
        assert rows[name]["folded"] == rows[name]["bn"] > 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == \
        ["a.onnx", "net.keras", "net.pt2", "sub/b.onnx"]
    assert doc["summary"]["exit_code"] == 2 and len(doc["reports"]) == 4
    _same_onnx(models / "a.onnx", out / "a.onnx")
    _same_onnx(models / "sub" / "b.onnx", out / "sub" / "b.onnx")
    _same_program(models / "net.pt2", out / "net.pt2")
    _same_keras(models / "net.keras", out / "net.keras")
    assert snapshot(models) == inputs, "inputs are never touched"
    written = snapshot(out)

    # the second run over the same folder folds nothing twice: every output is up to date
    code = main([str(models), "-r", "--keep-going", "-o", f"{out}/", "--json"])
    doc2 = json.loads(capsys.readouterr().out)
    assert code == 2
    statuses = {os.path.relpath(r["model"], models): r["status"] for r in doc2["summary"]["models"]}
    assert statuses == {"a.onnx": "up to date", "sub/b.onnx": "up to date", "net.pt2": "up to date",
                        "net.keras": "up to date", "broken.onnx": "error"}
    assert doc2["reports"] == [] and snapshot(out) == written and snapshot(models) == inputs

    # --force folds again; a changed input is no longer up to date
    shutil.copy(os.path.join(SAMPLES, "mobilenet_block.onnx"), models / "a.onnx")
    code = main([str(models), "--keep-going", "-o", f"{out}/", "--json", "-q"])
    rows3 = {os.path.relpath(r["model"], models): r["status"] for r in json.loads(capsys.readouterr().out)
             ["summary"]["models"]}
    assert rows3 == {"a.onnx": "written", "net.pt2": "up to date", "net.keras": "up to date", "broken.onnx": "error"}
    _same_onnx(models / "a.onnx", out / "a.onnx")


def test_what_bnfold_wrote_is_recognised_by_its_mark_whatever_its_name(models, tmp_path, capsys):
    out = tmp_path / "out"
    (models / "broken.onnx").unlink()
    assert main([str(models), "-o", f"{out}/", "-q"]) == 0
    capsys.readouterr()
    # the format's own metadata carries the mark, readable with the framework's own API
    meta = {p.key: p.value for p in onnx.load(str(out / "a.onnx")).metadata_props}
    assert json.loads(meta["bnfold"])["source"] == "a.onnx"
    import torch
    extra = {"bnfold.json": ""}
    torch.export.load(str(out / "net.pt2"), extra_files=extra)
    assert json.loads(extra["bnfold.json"])["source_sha256"] == sha(models / "net.pt2")
    import zipfile
    assert json.loads(zipfile.ZipFile(out / "net.keras").read("metadata.json"))["bnfold"]["source"] == "net.keras"
    # renamed into the input folder, they are still left out of a batch
    for src, new in (("a.onnx", "plain.onnx"), ("net.pt2", "innocent.pt2"), ("net.keras", "model2.keras")):
        shutil.copy(out / src, models / new)
    pl = plan([str(models)], None)
    assert sorted(os.path.basename(j.source) for j in pl.jobs) == ["a.onnx", "net.keras", "net.pt2"]
    why = {os.path.basename(i["path"]): i["why"] for i in pl.ignored}
    assert set(why) == {"plain.onnx", "innocent.pt2", "model2.keras"}
    assert all(w.startswith("written by bnfold") for w in why.values())
    # named one by one on the command line they are folded as asked (folding is idempotent)
    assert main([str(models / "plain.onnx"), "-o", str(tmp_path / "again.onnx"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["folded"] == [] and sha(tmp_path / "again.onnx") == sha(out / "a.onnx")


def test_rerun_without_output_folder_leaves_folded_files_out(tmp_path, capsys):
    for n in ("resnet_block", "mlp"):
        shutil.copy(os.path.join(SAMPLES, f"{n}.onnx"), tmp_path)
    assert main([str(tmp_path), "-q"]) == 0
    first = snapshot(tmp_path)
    assert set(first) == {"resnet_block.onnx", "mlp.onnx", "resnet_block.folded.onnx", "mlp.folded.onnx"}
    capsys.readouterr()
    # `bnfold *.onnx` again: the outputs of the previous run are left out, the originals are folded again
    files = sorted(str(p) for p in tmp_path.glob("*.onnx"))
    assert main([*files, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sorted(os.path.basename(i["path"]) for i in doc["summary"]["ignored"]) == \
        ["mlp.folded.onnx", "resnet_block.folded.onnx"]
    assert [os.path.basename(r["model"]) for r in doc["reports"]] == ["mlp.onnx", "resnet_block.onnx"]
    assert snapshot(tmp_path) == first, "the same folds again: byte-identical outputs, no *.folded.folded.*"


def test_output_folder_inside_the_input_folder_is_never_walked(tmp_path, capsys):
    src = tmp_path / "models"
    (src / "deep").mkdir(parents=True)
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), src / "deep" / "m.onnx")
    assert main([str(src), "-r", "-o", str(src / "out") + "/", "-q"]) == 0
    assert (src / "out" / "deep" / "m.onnx").is_file()
    capsys.readouterr()
    assert main([str(src), "-r", "-o", str(src / "out") + "/", "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [os.path.relpath(r["model"], src) for r in doc["summary"]["models"]] == ["deep/m.onnx"]
    assert {"path": str(src / "out"), "why": "the output folder of this run"} in doc["summary"]["ignored"]
    assert not (src / "out" / "out").exists()


def test_without_keep_going_a_bad_input_anywhere_writes_nothing(models, tmp_path, capsys):
    before = snapshot(tmp_path)
    code = main([str(models), "-r", "-o", f"{tmp_path / 'out'}/", "--json"])
    cap = capsys.readouterr()
    assert code == 2 and snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    err = json.loads(cap.out)["error"]
    assert err["path"] == str(models / "broken.onnx") and err["code"] == 2
    # a batch logs one line per model as it goes (stderr is not a terminal here); the error is the last line
    last = cap.err.strip().splitlines()[-1]
    assert last.startswith("bnfold: error: ") and "broken.onnx" in last and "Traceback" not in cap.err
    assert main([str(models), "-r", "-o", f"{tmp_path / 'out'}/", "-q"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1, "-q: the error is the one line"
    assert snapshot(tmp_path) == before


def _two_models(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    shutil.copy(os.path.join(SAMPLES, "resnet_block.onnx"), a)  # output 'logits'
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), b)           # output 'output'
    return a, b


def test_failed_proof_keep_going_writes_the_proven_one_exit_1(tmp_path, capsys):
    a, b = _two_models(tmp_path)
    # a bit-exact tolerance for a's output: float rounding cannot meet it, so a's proof fails
    code = main([str(a), str(b), "--keep-going", "--atol", "logits:0", "--strict", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    rows = {os.path.basename(r["model"]): r for r in doc["summary"]["models"]}
    assert rows["a.onnx"]["exit_code"] == 1 and rows["a.onnx"]["output"] is None
    assert rows["a.onnx"]["status"].startswith("FAILED")
    assert rows["b.onnx"]["status"] == "written" and os.path.exists(tmp_path / "b.folded.onnx")
    assert not os.path.exists(tmp_path / "a.folded.onnx")


def test_failed_proof_without_keep_going_writes_nothing(tmp_path, capsys):
    a, b = _two_models(tmp_path)
    before = snapshot(tmp_path)
    code = main([str(a), str(b), "--atol", "logits:0", "--strict"])
    out = capsys.readouterr().out
    assert code == 1 and snapshot(tmp_path) == before
    assert "another model's verification did not pass" in out and "summary" in out


@pytest.mark.parametrize("args,needle", [
    (["-o", "x.onnx"], "exactly one MODEL"),              # a file name for a batch
    (["--bench", "--dry-run"], "--bench"),
    (["-o", "{tmp}/"], "would overwrite the input"),      # the mirror of the inputs is the inputs
    (["{tmp}/nothing-here"], "no such file"),
])
def test_batch_usage_errors_are_exit_2_one_line(tmp_path, capsys, args, needle):
    a, b = _two_models(tmp_path)
    before = snapshot(tmp_path)
    assert main([str(a), str(b), *(x.replace("{tmp}", str(tmp_path)) for x in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and snapshot(tmp_path) == before


def test_empty_folder_is_a_usage_error_and_a_folder_of_outputs_is_nothing_to_do(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no model files" in capsys.readouterr().err
    d = tmp_path / "done"
    d.mkdir()
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), d / "mlp.folded.onnx")
    assert main([str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["models"] == [] and doc["summary"]["ignored"][0]["why"].startswith("named like")


def test_output_folder_equal_to_the_input_folder_is_refused(tmp_path, capsys):
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), tmp_path)
    before = snapshot(tmp_path)
    assert main([str(tmp_path), "-o", f"{tmp_path}/", "--keep-going"]) == 2
    assert "the input folder itself" in capsys.readouterr().err and snapshot(tmp_path) == before


def test_two_inputs_that_would_write_one_output_are_refused(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    for d in ("x", "y"):
        shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), tmp_path / d / "m.onnx")
    before = snapshot(tmp_path)
    assert main([str(tmp_path / "x" / "m.onnx"), str(tmp_path / "y" / "m.onnx"), "-o", f"{tmp_path / 'o'}/"]) == 2
    assert "both be written" in capsys.readouterr().err and snapshot(tmp_path) == before
