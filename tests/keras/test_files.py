"""Keras files: .keras / .h5 round trips, safe_mode and --trust, SavedModel, bad files, inputs, ONNX export."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers.keras_build import L, assert_same_function, keras, outputs, randomise

from bnfold.core.errors import BnfoldError, MissingExtraError
from tests.helpers.frameworks import keras_pass


def _model(rng):
    inp = keras.Input((6, 6, 3), name="img")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, use_bias=False, name="c")(inp))
    model = keras.Model(inp, L.Dense(2, name="d")(L.GlobalAveragePooling2D()(L.ReLU()(x))), name="net")
    randomise(model, rng)
    return model


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_folded_model_saves_atomically_and_reloads(ext, tmp_path, rng):
    model = _model(rng)
    src = str(tmp_path / f"net{ext}")
    keras_pass.save(model, src)
    loaded = keras_pass.load(src)
    feeds = [rng.standard_normal((2, 6, 6, 3)).astype("float32")]
    assert_same_function(model, loaded, feeds, rel=0.0)
    result = keras_pass.fold(loaded, example_inputs=feeds)
    assert result.report.verification.passed is True and len(result.report.folded) == 1
    out = str(tmp_path / f"net.folded{ext}")
    keras_pass.save(result.model, out)
    assert sorted(os.listdir(tmp_path)) == sorted([f"net{ext}", f"net.folded{ext}"])  # no temp files left
    again = keras_pass.load(out)
    assert [la.name for la in again.layers] == [la.name for la in result.model.layers]
    assert_same_function(result.model, again, feeds, rel=0.0)
    assert_same_function(model, again, feeds)


@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_lambda_layer_needs_trust(ext, tmp_path, rng):
    inp = keras.Input((4,))
    model = keras.Model(inp, L.Lambda(lambda x: x * 2.0, name="times2")(L.Dense(3)(inp)))
    path = str(tmp_path / f"lam{ext}")
    keras_pass.save(model, path)
    with pytest.raises(BnfoldError, match="--trust") as err:
        keras_pass.load(path)
    assert path in str(err.value) and "\n" not in str(err.value)
    trusted = keras_pass.load(path, trust=True)
    x = rng.standard_normal((2, 4)).astype("float32")
    assert np.array_equal(outputs(trusted, [x])[0], outputs(model, [x])[0])


def test_savedmodel_directory_is_written_and_explained_on_load(tmp_path, rng):
    model = _model(rng)
    folded = keras_pass.fold(model, verify=False).model
    target = tmp_path / "exported"
    keras_pass.save(folded, str(target))
    assert (target / "saved_model.pb").exists()
    assert sorted(os.listdir(tmp_path)) == ["exported"]
    import tensorflow as tf

    x = rng.standard_normal((1, 6, 6, 3)).astype("float32")
    loaded = tf.saved_model.load(str(target))  # kept alive: serve() reads its variables
    served = loaded.serve(x).numpy()
    assert_same_function(model, folded, [x])
    assert np.allclose(served, outputs(folded, [x])[0], rtol=0, atol=1e-6)
    with pytest.raises(BnfoldError, match="SavedModel") as err:
        keras_pass.load(str(target))
    assert str(target) in str(err.value)
    keras_pass.save(folded, str(target))  # an existing SavedModel is replaced
    assert sorted(os.listdir(tmp_path)) == ["exported"] and (target / "saved_model.pb").exists()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BnfoldError, match="not a SavedModel"):
        keras_pass.save(folded, str(other))
    assert os.listdir(other) == ["keep.txt"]


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04truncated"])
@pytest.mark.parametrize("ext", [".keras", ".h5"])
def test_bad_files_name_the_file(content, ext, tmp_path):
    path = tmp_path / f"bad{ext}"
    path.write_bytes(content)
    with pytest.raises(BnfoldError) as err:
        keras_pass.load(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(BnfoldError, match="no such file"):
        keras_pass.load(str(tmp_path / "nope.keras"))
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(BnfoldError, match="not a Keras model file"):
        keras_pass.load(str(tmp_path / "model.txt"))
    with pytest.raises(BnfoldError, match=".onnx"):
        keras_pass.save(keras.Sequential([keras.Input((2,)), L.Dense(1)]), str(tmp_path / "m.onnx"))


def test_example_inputs_from_shapes_and_npz(tmp_path):
    a, b = keras.Input((None, 3), name="seq"), keras.Input((4,), name="ids", dtype="int32")
    model = keras.Model([a, b], L.Dense(2)(L.GlobalAveragePooling1D()(a)) + keras.ops.cast(b[:, :2], "float32"))
    feeds = keras_pass.example_inputs_for(model)
    assert [f.shape for f in feeds] == [(2, 64, 3), (2, 4)] and feeds[1].dtype == np.int32  # batch 2, others 64
    feeds = keras_pass.example_inputs_for(model, input_specs=[("seq", (2, 7, 3), "float32")], seed=3)
    assert feeds[0].shape == (2, 7, 3) and feeds[1].min() >= 0
    assert np.array_equal(feeds[0], keras_pass.example_inputs_for(
        model, input_specs=[("seq", (2, 7, 3), "float32")], seed=3)[0])
    with pytest.raises(BnfoldError, match="does not match"):
        keras_pass.example_inputs_for(model, input_specs=[("seq", (2, 7, 5), "float32")])
    npz = tmp_path / "in.npz"
    np.savez(npz, ids=np.arange(8, dtype=np.int32).reshape(2, 4), seq=np.ones((2, 5, 3), np.float32))
    got = keras_pass.example_inputs_for(model, inputs_npz=str(npz))
    assert got[0].shape == (2, 5, 3) and got[1][1, 3] == 7
    np.savez(tmp_path / "wrong.npz", x=np.ones((2, 5, 3), np.float32))
    with pytest.raises(BnfoldError, match="wrong.npz"):
        keras_pass.example_inputs_for(model, inputs_npz=str(tmp_path / "wrong.npz"))


def test_verification_off_and_dry_run(rng):
    model = _model(rng)
    off = keras_pass.fold(model, verify=False)
    assert off.report.verification.skipped_reason == "verification off" and off.report.folded
    dry = keras_pass.fold(model, dry_run=True)
    assert dry.model is model and len(dry.report.folded) == 1 and dry.report.verification.passed is True
    assert off.report.to_dict()["framework"] == "keras"


def test_export_onnx_is_verified_on_onnxruntime(tmp_path, rng):
    inp = keras.Input((6, 6, 3), name="img")
    # Normalization keeps its statistics as plain tensors, which a bare tf2onnx export turns into inputs.
    x = L.Normalization(mean=[0.5, -1.0, 2.0], variance=[4.0, 0.25, 1.0], name="norm")(inp)
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, use_bias=False, name="c")(x))
    model = keras.Model(inp, L.Dense(2, name="d")(L.GlobalAveragePooling2D()(L.ReLU()(x))), name="net")
    randomise(model, rng)
    out = tmp_path / "net.onnx"
    try:
        import tf2onnx  # noqa: F401
    except ImportError:
        # Keras exports to ONNX through tf2onnx on TensorFlow; without it the error names the extra.
        with pytest.raises(MissingExtraError, match="tf2onnx"):
            keras_pass.export_onnx(model, str(out))
        assert not out.exists()
        return
    import onnxruntime as ort

    result = keras_pass.export_onnx(model, str(out))
    ver = result.report.verification
    assert ver.passed is True and ver.providers["CPUExecutionProvider"].ran and out.exists()
    assert len(result.report.folded) == 1
    x = rng.standard_normal((1, 6, 6, 3)).astype("float32")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert len(sess.get_inputs()) == 1
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    ref = outputs(model, [x])[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def _dense_as_onnx(kernel: np.ndarray, bias: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, kernel.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, kernel.shape[1]])],
        [numpy_helper.from_array(kernel, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_check_keras_original_against_an_onnx_candidate(rng):
    inp = keras.Input((6,))
    model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Dense(4, name="d")(inp)))
    randomise(model, rng)
    folded = keras_pass.fold(model, verify=False).model
    kernel_, bias = folded.get_layer("d").get_weights()
    feeds = [rng.standard_normal((3, 6)).astype("float32")]
    ver = keras_pass.check(model, _dense_as_onnx(kernel_, bias), example_inputs=feeds)
    assert ver.passed is True and ver.providers["CPUExecutionProvider"].ran
    kernel_[:, 1] *= np.float32(1.002)
    assert keras_pass.check(model, _dense_as_onnx(kernel_, bias), example_inputs=feeds).passed is False
