"""External data: models stored with external weights load, fold and save (atomically, with onnx's
layout options) without touching the in-memory result; a missing data file is a clear exit-2 error.
The > 2 GB round trip itself is measured by benchmarks/bench_onnx_external.py (disk- and time-heavy);
here the same code path runs on small models, with the 2 GB limit lowered where the choice depends on it."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold.onnx import ondisk as onnx_io
from bnfold.cli import main
from bnfold.onnx.io import load_onnx, save_onnx
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function, ort_session


def conv_net(rng) -> onnx.ModelProto:
    g = G(rng)
    x = "x"
    for i in range(3):
        x = g.node("Conv", [x, g.weight(f"w{i}", (8, 8 if i else 3, 3, 3)), g.weight(f"b{i}", (8,))], [f"c{i}"],
                   name=f"conv{i}", pads=[1] * 4)
        x = g.bn(f"bn{i}", x, 8)
        x = g.node("Relu", [x], [f"r{i}"], name=f"relu{i}")
    g.node("Identity", [x], ["y"], name="out")
    return g.model([("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])])


def save_external_with_onnx(model: onnx.ModelProto, path) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(model)  # onnx.save_model strips the data out of the model it is given
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".weights", size_threshold=64)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_cli_folds_a_model_stored_with_external_data(rng, tmp_path):
    model = conv_net(rng)
    src = tmp_path / "net.onnx"
    save_external_with_onnx(model, src)
    assert main([str(src), "-q"]) == 0
    out = tmp_path / "net.folded.onnx"
    folded = load_onnx(str(out))
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 0
    assert_same_function(model, folded)


def test_library_result_is_not_mutated_by_saving_external(rng, tmp_path):
    res = bnfold.fold(conv_net(rng))
    before = res.model.SerializeToString()
    out = tmp_path / "f.onnx"
    save_onnx(res.model, str(out), external_data=True, size_threshold=64)
    assert res.model.SerializeToString() == before
    assert listing(tmp_path) == ["f.onnx", "f.onnx.data"]  # no temporary files left behind
    proto = onnx.load(str(out), load_external_data=False)
    big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(t.raw_data == b"" for t in big)
    # onnxruntime reads the file (and its data) itself
    feeds = {"x": np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(ort_session(str(out)).run(None, feeds)[0], ort_session(res.model).run(None, feeds)[0],
                               rtol=0, atol=0)
    assert_same_function(res.model, load_onnx(str(out)))


def test_one_file_per_tensor_and_custom_location(rng, tmp_path):
    res = bnfold.fold(conv_net(rng))
    out = tmp_path / "m.onnx"
    save_onnx(res.model, str(out), external_data=True, location="weights.bin", size_threshold=64,
              all_tensors_to_one_file=False)
    files = listing(tmp_path)
    assert "m.onnx" in files and len([f for f in files if f.startswith("weights.bin")]) >= 3
    assert_same_function(res.model, load_onnx(str(out)))


def test_missing_external_data_is_exit_2_naming_the_file(rng, tmp_path, capsys):
    src = tmp_path / "net.onnx"
    save_external_with_onnx(conv_net(rng), src)
    os.unlink(tmp_path / "net.onnx.weights")
    assert main([str(src), "-q"]) == 2
    err = capsys.readouterr().err
    assert "net.onnx.weights" in err and "missing" in err and str(src) in err
    assert listing(tmp_path) == ["net.onnx"]


def test_failed_save_leaves_nothing_and_keeps_the_old_file(rng, tmp_path, monkeypatch):
    res = bnfold.fold(conv_net(rng))
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    calls = {"n": 0}
    real = onnx_io._raw

    def flaky(t):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(t)

    monkeypatch.setattr(onnx_io, "_raw", flaky)
    with pytest.raises(OSError):
        save_onnx(res.model, str(out), external_data=True, size_threshold=64)
    assert listing(tmp_path) == ["m.onnx"] and out.read_bytes() == b"old"


def test_models_over_the_protobuf_limit_go_external_automatically(rng, tmp_path, monkeypatch):
    model = conv_net(rng)
    size = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    monkeypatch.setattr(onnx_io, "TWO_GB", size // 2)  # pretend the limit is half this model
    res = bnfold.fold(model, verify=False)
    out = tmp_path / "auto.onnx"
    save_onnx(res.model, str(out))
    assert listing(tmp_path) == ["auto.onnx", "auto.onnx.data"]
    assert_same_function(model, load_onnx(str(out)))
    # onnxruntime cannot take such a model from memory: it is verified from temporary files instead
    ver = bnfold.fold(model).report.verification
    assert ver.passed is True, ver.to_dict()
    assert "over 2 GB" in ver.providers["CPUExecutionProvider"].notes["note"]
    # and that route still catches a wrong fold
    bad = onnx.ModelProto()
    bad.CopyFrom(res.model)
    w = next(t for t in bad.graph.initializer if numpy_helper.to_array(t).ndim == 4)
    a = numpy_helper.to_array(w).copy()
    a[0] *= 1.01
    w.CopyFrom(numpy_helper.from_array(a, w.name))
    assert bnfold.check(model, bad).passed is False


def test_small_model_is_saved_inline(rng, tmp_path):
    res = bnfold.fold(conv_net(rng))
    save_onnx(res.model, str(tmp_path / "s.onnx"))
    assert listing(tmp_path) == ["s.onnx"]
