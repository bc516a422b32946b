"""Keras on each of its backends: bnfold folds, proves, verifies, locates errors and exports with the
backend the user runs (KERAS_BACKEND=tensorflow / torch / jax), with TensorFlow installed or not.

Each case runs in a fresh interpreter (Keras picks its backend once, at import), on a tiny model.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HIDE = r'''
import importlib.machinery, os, sys
hidden = [m for m in os.environ.get("HIDE_MODULES", "").split(",") if m]
class _Hidden(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in hidden):
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [_Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''

SCRIPT = HIDE + r'''
import json, tempfile
import numpy as np
import keras
import bnfold
from bnfold.cli import main

L = keras.layers
def net():
    inp = keras.Input((None, None, 3), name="x")
    y = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(L.Conv2D(6, 3, padding="same", name="c1")(inp)))
    y = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(L.DepthwiseConv2D(3, name="dw")(y)))
    y = L.BatchNormalization(name="bn3")(L.Dense(4, name="d")(y))
    model = keras.Model(inp, y)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c), rng.normal(size=c),
                               rng.normal(0.5, 1, c), rng.uniform(0.5, 3, c)])
    return model

model = net()
doc = {"backend": keras.backend.backend(), "tensorflow": "tensorflow" in sys.modules}
res = bnfold.fold(model)
doc["fold"] = res.report.to_dict()
bad = keras.models.clone_model(res.model)
bad.set_weights(res.model.get_weights())
k, b = bad.get_layer("dw").get_weights()
k[..., 1, 0] *= 1.001
bad.get_layer("dw").set_weights([k, b])
ver = bnfold.check(model, bad)
doc["check_bad"] = {"verdict": ver.verdict, "first_divergence": ver.first_divergence}
if os.environ.get("EXPORT") == "1":
    d = tempfile.mkdtemp()
    model.save(os.path.join(d, "m.keras"))
    sys.stdout = open(os.path.join(d, "out.json"), "w")
    rc = main(["export", os.path.join(d, "m.keras"), "--to", "onnx", "--json", "-o", os.path.join(d, "m.onnx")])
    sys.stdout.close()
    sys.stdout = sys.__stdout__
    text = open(os.path.join(d, "out.json")).read()
    doc["export"] = {"rc": rc, "doc": json.loads(text) if text.strip() else None,
                     "written": os.path.exists(os.path.join(d, "m.onnx"))}
print("RESULT " + json.dumps(doc, default=str))
'''


def _run(backend: str, hide: list[str], script: str = SCRIPT, export: bool = False) -> tuple[subprocess.CompletedProcess, dict | None]:
    if importlib.util.find_spec(backend if backend != "tensorflow" else "tensorflow") is None:
        pytest.fail(f"{backend} is not installed (the test extra installs it): KERAS_BACKEND={backend} cannot run")
    env = dict(os.environ, KERAS_BACKEND=backend, HIDE_MODULES=",".join(hide), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               EXPORT="1" if export else "0")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900,
                          check=False, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return proc, json.loads(line[len("RESULT "):]) if line else None


@pytest.mark.parametrize("backend,hide", [("torch", []), ("jax", []), ("torch", ["tensorflow"]), ("jax", ["tensorflow"]),
                                          ("tensorflow", [])])
def test_fold_prove_verify_and_locate_on_the_backend(backend, hide):
    proc, doc = _run(backend, hide, export=backend == "torch" and not hide)
    assert doc is not None, proc.stderr[-3000:]
    assert doc["backend"] == backend and (not hide or doc["tensorflow"] is False)
    rep = doc["fold"]
    ver = rep["verification"]
    assert [f["bn"] for f in rep["folded"]] == ["bn1", "bn2", "bn3"], rep
    assert ver["verdict"] == "passed" and ver["keras_backend"] == backend, ver
    assert ver["local_proofs"] == {"proven": 3, "failed": 0, "not_run": 0}
    assert ver["inputs"]["x"]["shape"] == [2, 64, 64, 3]
    cpu = ver["providers"]["keras-cpu"]
    assert cpu["ran"] and cpu["backend"] == backend and cpu["intermediates_compared"] >= 5
    gpu = ver["providers"]["keras-gpu"]
    assert gpu["ran"] or ("GPU" in gpu["why"] and (backend == "tensorflow" or "tensorflow" not in gpu["why"].lower()))
    bad = doc["check_bad"]
    assert bad["verdict"] == "failed" and bad["first_divergence"]["layer"] == "dw", bad
    if "export" in doc:
        exp = doc["export"]
        assert exp["rc"] == 0 and exp["written"], exp
        assert exp["doc"]["verification"]["providers"]["CPUExecutionProvider"]["passed"] is True


def test_export_on_jax_without_its_exporter_names_what_to_install():
    script = HIDE + r'''
import os, tempfile, numpy as np, keras
from bnfold.cli import main
L = keras.layers
inp = keras.Input((6, 6, 3), name="x")
model = keras.Model(inp, L.BatchNormalization(name="bn")(L.Conv2D(4, 3, name="c")(inp)))
d = tempfile.mkdtemp()
model.save(os.path.join(d, "m.keras"))
rc = main(["export", os.path.join(d, "m.keras"), "--to", "onnx", "-o", os.path.join(d, "m.onnx")])
print("OUTCOME " + str(rc) + " " + str(sorted(os.listdir(d))).replace(" ", ""))
'''
    proc, _ = _run("jax", ["jax2onnx"], script)  # hidden: the export must name what to install
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("OUTCOME ")), None)
    assert line == "OUTCOME 2 ['m.keras']", (proc.stdout, proc.stderr[-2000:])
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert len(err) == 1 and "jax2onnx" in err[0] and "pip install jax2onnx" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_backend_that_is_not_installed_is_named():
    script = HIDE + r'''
import os, tempfile
from bnfold.cli import main
d = tempfile.mkdtemp()
open(os.path.join(d, "m.keras"), "wb").write(b"PK\x05\x06" + b"\0" * 18)
print("OUTCOME " + str(main([os.path.join(d, "m.keras")])))
'''
    proc, _ = _run("jax", ["jax", "jaxlib"], script)
    assert "OUTCOME 2" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("bnfold: error:")]
    assert len(err) == 1 and "KERAS_BACKEND" in err[0] and "jax" in err[0] and "not installed" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
