"""The command line on Keras files: fold and write, check, --trust, --dry-run, bad input exit codes."""
from __future__ import annotations

import hashlib
import json

import numpy as np

from tests.helpers.keras_build import L, assert_same_function, keras, randomise

from bnfold.cli import main
from tests.helpers.frameworks import keras_pass


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _write(tmp_path, rng, ext=".keras", lam=False):
    inp = keras.Input((6, 6, 3), name="img")
    x = L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp))
    x = L.BatchNormalization(name="bn_add")(L.Add()([x, L.ReLU()(x)]))
    if lam:
        x = L.Lambda(lambda t: t * 0.5, name="half")(x)
    model = keras.Model(inp, x)
    randomise(model, rng)
    path = tmp_path / f"net{ext}"
    keras_pass.save(model, str(path))
    return model, path


def test_fold_writes_folded_file_and_json(tmp_path, rng, capsys):
    model, src = _write(tmp_path, rng)
    before = _sha(src)
    assert main([str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out = tmp_path / "net.folded.keras"
    assert doc["output"] == str(out) and doc["framework"] == "keras" and _sha(src) == before
    assert [d["bn"] for d in doc["folded"]] == ["bn"] and [d["bn"] for d in doc["skipped"]] == ["bn_add"]
    assert doc["verification"]["passed"] is True
    assert_same_function(model, keras_pass.load(str(out)), [rng.standard_normal((2, 6, 6, 3)).astype("float32")])
    assert main(["check", str(src), str(out)]) == 0


def test_h5_output_dry_run_and_check_of_a_different_model(tmp_path, rng, capsys):
    _, src = _write(tmp_path, rng, ext=".h5")
    assert main([str(src), "--dry-run"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.h5"]
    assert main([str(src), "-o", str(tmp_path / "out.h5")]) == 0
    other, other_path = _write(tmp_path / "..", np.random.default_rng(99), ext=".keras")
    capsys.readouterr()
    assert main(["check", str(src), str(other_path)]) == 1


def test_lambda_needs_trust_on_the_command_line(tmp_path, rng, capsys):
    _, src = _write(tmp_path, rng, lam=True)
    assert main([str(src)]) == 2
    err = capsys.readouterr().err
    assert "--trust" in err and str(src) in err and len(err.strip().splitlines()) == 1
    assert main([str(src), "--trust"]) == 0
    assert (tmp_path / "net.folded.keras").exists()


def test_bad_keras_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"\x00" * 64)
    assert main([str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.keras"]


def test_check_against_a_model_with_other_inputs_is_not_equivalent(tmp_path, rng, capsys):
    _, src = _write(tmp_path, rng)
    inp = keras.Input((5,))
    other = tmp_path / "other.keras"
    keras_pass.save(keras.Model(inp, L.Dense(3)(inp)), str(other))
    assert main(["check", str(src), str(other), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verification"]["passed"] is False


def test_export_keras_to_onnx_and_check_it(tmp_path, rng, capsys):
    import onnx

    _, src = _write(tmp_path, rng)
    out = tmp_path / "net.onnx"
    assert main(["export", str(src), "--to", "onnx", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["framework"] == "keras" and doc["verification"]["passed"] is True
    assert doc["verification"]["providers"]["CPUExecutionProvider"]["ran"] is True
    m = onnx.load(str(out))
    onnx.checker.check_model(m)
    # the folded BN is gone from the exported graph; the one after Add stays
    assert sum(n.op_type == "BatchNormalization" for n in m.graph.node) <= 1
    # the exported ONNX is the same function as the original Keras model
    assert main(["check", str(src), str(out)]) == 0


def test_explicit_gpu_without_one_is_exit_2(tmp_path, rng, capsys):
    from bnfold.keras.verify import gpu_available

    _, src = _write(tmp_path, rng)
    code = main([str(src), "--providers", "cuda", "--dry-run", "--json"])
    out = capsys.readouterr()
    if gpu_available():
        assert code == 0 and json.loads(out.out)["verification"]["providers"]["keras-gpu"]["ran"] is True
    else:
        assert code == 2 and "no GPU" in out.err
