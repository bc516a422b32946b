"""bnfold's mark in each format's own metadata: written into real files made by each framework's own
saver, read back without loading the model, readable with the framework's own API, and the file still
loads and runs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile

import numpy as np
import onnx
import pytest

from bnfold import marks
from bnfold.cli import main
from tests.conftest import SAMPLES

MARK = marks.make("model.onnx", "ab" * 32, "opts", "passed")


def test_plain_file_digest_is_its_sha256(tmp_path):
    p = tmp_path / "m.onnx"
    shutil.copy(os.path.join(SAMPLES, "mlp.onnx"), p)
    assert marks.digest(str(p)) == hashlib.sha256(p.read_bytes()).hexdigest()
    data = tmp_path / "w.data"
    data.write_bytes(b"weights")
    assert marks.digest(str(p), [str(data)]) != marks.digest(str(p))


def test_onnx_mark_is_read_without_parsing_the_graph_and_keeps_other_metadata(tmp_path):
    m = onnx.load(os.path.join(SAMPLES, "resnet_block.onnx"))
    entry = m.metadata_props.add()
    entry.key, entry.value = "author", "someone"
    p = tmp_path / "m.onnx"
    marks.stamp_onnx(m, MARK)
    marks.stamp_onnx(m, {**MARK, "source": "other"})  # an existing mark is kept: re-folds are byte-identical
    onnx.save(m, p)
    assert marks.read(str(p)) == MARK
    back = {e.key: e.value for e in onnx.load(str(p)).metadata_props}
    assert back["author"] == "someone" and json.loads(back["bnfold"]) == MARK
    assert marks.read(os.path.join(SAMPLES, "resnet_block.onnx")) is None
    for junk in (p.read_bytes()[:100], b"\xff" * 50, b""):  # truncated or foreign: no mark, no crash
        q = tmp_path / "junk.onnx"
        q.write_bytes(junk)
        assert marks.read(str(q)) is None


def test_onnx_file_with_external_data_is_stamped_in_place(tmp_path):
    m = onnx.load(os.path.join(SAMPLES, "resnet_block.onnx"))
    p = tmp_path / "ext.onnx"
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    marks.stamp(str(p), MARK)
    assert marks.read(str(p)) == MARK
    import onnxruntime as ort
    sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    fresh = onnx.load(os.path.join(SAMPLES, "resnet_block.onnx"))  # onnx.save moved m's weights out
    ref = ort.InferenceSession(fresh.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(sess.run(None, {"input": x})[0], ref.run(None, {"input": x})[0])


def _torch_module():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()


def test_torchscript_and_pickled_archives(tmp_path):
    import torch
    m, x = _torch_module(), torch.randn(1, 3, 8, 8)
    ts, pk = tmp_path / "m.pt", tmp_path / "whole.pt"
    torch.jit.save(torch.jit.script(m), str(ts))
    torch.save(m, str(pk))
    for p in (ts, pk):
        assert marks.read(str(p)) is None
        marks.stamp(str(p), MARK)
        assert marks.read(str(p)) == MARK
    extra = {"bnfold.json": ""}
    loaded = torch.jit.load(str(ts), _extra_files=extra)
    assert json.loads(extra["bnfold.json"]) == MARK
    torch.testing.assert_close(loaded(x), m(x))
    torch.testing.assert_close(torch.load(str(pk), weights_only=False)(x), m(x))


def _keras_model():
    from tests.helpers.keras_build import L, keras, randomise
    i = keras.Input((6, 6, 3))
    model = keras.Model(i, L.BatchNormalization()(L.Conv2D(4, 3)(i)))
    randomise(model, np.random.default_rng(1))
    return model


def test_keras_archive_h5_and_savedmodel(tmp_path):
    import keras
    model = _keras_model()
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 3)).astype("float32")
    k, h = tmp_path / "m.keras", tmp_path / "m.h5"
    model.save(str(k))
    model.save(str(h))
    for p in (k, h):
        assert marks.read(str(p)) is None
        marks.stamp(str(p), MARK)
        assert marks.read(str(p)) == MARK
        np.testing.assert_allclose(np.asarray(keras.saving.load_model(str(p))(x)), np.asarray(model(x)), rtol=1e-6)
    meta = json.loads(zipfile.ZipFile(k).read("metadata.json"))
    assert meta["bnfold"] == MARK and "keras_version" in meta, "Keras' own metadata is kept"
    import h5py
    with h5py.File(h, "r") as f:
        assert json.loads(f.attrs["bnfold"]) == MARK
    sm = tmp_path / "saved"
    model.export(str(sm), format="tf_saved_model", verbose=False)
    marks.stamp(str(sm), MARK)
    assert marks.read(str(sm)) == MARK and (sm / "assets.extra" / "bnfold.json").is_file()
    import tensorflow as tf
    loaded = tf.saved_model.load(str(sm))  # held: its functions need it alive
    out = loaded.serve(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(x)), rtol=1e-5)


def test_cli_marks_an_h5_output_and_a_batch_leaves_it_out(tmp_path, capsys):
    src = tmp_path / "m.h5"
    _keras_model().save(str(src))
    assert main([str(src), "-q"]) == 0
    out = tmp_path / "m.folded.h5"
    mark = marks.read(str(out))
    assert mark is not None and mark["source"] == "m.h5" and mark["source_sha256"] == marks.digest(str(src))
    shutil.move(out, tmp_path / "renamed.h5")
    capsys.readouterr()
    assert main([str(tmp_path), "--dry-run", "--json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [os.path.basename(r["model"]) for r in doc["summary"]["models"]] == ["m.h5"]
    assert [os.path.basename(i["path"]) for i in doc["summary"]["ignored"]] == ["renamed.h5"]


@pytest.mark.parametrize("fmt", ["pt2"])
def test_export_output_is_marked(tmp_path, fmt, capsys):
    from tests.contract.test_batch import _torch_program
    src = tmp_path / f"net.{fmt}"
    _torch_program(src)
    assert main(["export", str(src), "--to", "onnx", "-q"]) == 0
    mark = marks.read(str(tmp_path / "net.folded.onnx"))
    assert mark is not None and mark["source"] == "net.pt2"
