"""Fold a Keras model, export it to ONNX with Keras' own exporter, verify the ONNX against the original.

Keras 3 on TensorFlow exports through tf2onnx (model.export(path, format="onnx")). The reference is
the original Keras model on CPU; the noise is the same one-ulp weight nudge as for Keras-vs-Keras.
onnxruntime's own kernels move the outputs by about that much (ResNet50: 1.6e-5 against a noise of
2.2e-5), so no wider tolerance is granted for the change of runtime: a broken export cannot hide
behind a noise figure that it produced itself.
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ..core.errors import BnfoldError, MissingExtraError
from ..core.files import atomic_write
from ..core.results import FoldResult, ProviderResult, Verification
from ..core.options import Options
from ..verify import compare
from . import verify as kv
from .files import model_input_specs

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}


def _need_tf2onnx() -> None:
    try:
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise MissingExtraError("tf2onnx (Keras' ONNX exporter on TensorFlow)", "keras") from e


def _export(model: Any, path: str, feeds: list[np.ndarray]) -> None:
    import logging

    import onnx

    kv.run(model, feeds)  # Keras refuses to export a functional model that was never called
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        model.export(path, format="onnx", verbose=False)
        graph = onnx.load(path, load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        if len([i for i in graph.input if i.name not in inits]) > len(feeds):
            _export_frozen(model, path)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise BnfoldError(f"Keras' ONNX export failed ({type(e).__name__}: {first})") from None


def _export_frozen(model: Any, path: str) -> None:
    """Keras' export hands tf2onnx a function whose captured constant tensors (e.g. a Normalization
    layer's mean and variance) become extra graph inputs. Freezing the same concrete function first
    turns them into constants, so the ONNX file runs on its own."""
    import tensorflow as tf
    import tf2onnx
    from keras.src.export.export_utils import get_input_signature, make_tf_tensor_spec
    from keras.src.export.onnx import get_concrete_fn
    from keras.src.export.tf2onnx_lib import patch_tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    import keras

    sig = keras.tree.map_structure(make_tf_tensor_spec, get_input_signature(model))
    fn = get_concrete_fn(model, sig)
    if not hasattr(fn, "inputs"):
        fn = fn.get_concrete_function(*sig)
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")
    try:
        frozen = convert_variables_to_constants_v2(fn)
        patch_tf2onnx()  # Keras' own numpy 2 fixes for tf2onnx
        tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(), input_names=[t.name for t in frozen.inputs],
                                       output_names=[t.name for t in frozen.outputs], output_path=path)
    finally:
        tf.get_logger().setLevel(level)


def _ort_run(onnx_model: Any, feeds: list[np.ndarray], provider: str,
             feed_names: list[str] = ()) -> tuple[list[str], list[np.ndarray]]:
    """Run an ONNX file path or ModelProto: (output names, outputs). Inputs are matched to the Keras
    feeds by name when the names agree, else by position."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = onnx_model if isinstance(onnx_model, str) else onnx_model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=[provider])
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(feeds):
        raise BnfoldError(f"the ONNX model has {len(names)} inputs, the Keras model {len(feeds)}")
    if feed_names and set(feed_names) == set(names):
        given = dict(zip(feed_names, feeds))
    else:
        given = dict(zip(names, feeds))
    return [o.name for o in sess.get_outputs()], [np.asarray(o) for o in sess.run(None, given)]


def check_exportable(model: Any) -> None:
    """Refuse what Keras' ONNX export cannot do, before any work."""
    _need_tf2onnx()
    low = sorted({layer.compute_dtype for layer in model._flatten_layers()} - {"float32"})
    if low:
        raise BnfoldError(f"Keras' ONNX export needs a float32 model; this one computes in {', '.join(low)}")


def write_and_verify(result: FoldResult, original: Any, out_path: str, feeds: list[np.ndarray],
                     opts: Options) -> FoldResult:
    """Export the folded model of `result` to ONNX at `out_path` and verify it against `original`."""
    report = result.report
    if opts.verify and not report.verification:
        return result  # the Keras fold itself failed: nothing is written
    t0 = time.perf_counter()
    atomic_write(out_path, lambda tmp: _export(result.model, tmp, feeds), suffix=".onnx")
    report.output = out_path
    report.timing_s["save"] = time.perf_counter() - t0
    if opts.verify:
        t1 = time.perf_counter()
        try:
            onnx_ver = verify_onnx(original, out_path, feeds, opts)
        except BaseException:
            os.unlink(out_path)
            raise
        merged = Verification(providers={**report.verification.providers, **onnx_ver.providers},
                              tolerance=onnx_ver.tolerance)
        report.verification = merged
        report.timing_s["verify"] = report.timing_s.get("verify", 0.0) + time.perf_counter() - t1
        if not merged:
            os.unlink(out_path)  # a failed verification writes nothing
            report.output = None
    return result


def verify_onnx(original: Any, onnx_model: Any, feeds: list[np.ndarray], opts: Options) -> Verification:
    """Judge an ONNX model (path or ModelProto) on onnxruntime against the original Keras model on CPU."""
    providers, atol, rtol, seed = opts.providers, opts.atol, opts.rtol, opts.seed
    import onnxruntime as ort

    names = kv.output_names(original)
    ref = dict(zip(names, kv.run(original, feeds, "cpu")))
    keras_noise = [dict(zip(names, o)) for o in kv.noise_outputs(original, feeds, "cpu", seed)]
    ver = Verification(tolerance={"atol": atol, "rtol": rtol,
                                  "how": "user" if atol is not None or rtol is not None else "auto"})
    available = ort.get_available_providers()
    for dev in kv.normalise_providers(providers):
        prov = ORT_PROVIDERS[dev]
        if prov not in available:
            ver.providers[prov] = ProviderResult(prov, ran=False, why=f"{prov} is not available in this "
                                                 "onnxruntime (onnxruntime-gpu not installed or no device)")
            continue
        onnx_names, cand_out = _ort_run(onnx_model, feeds, prov, [n for n, _, _ in model_input_specs(original)])
        if len(cand_out) != len(names):
            ver.providers[prov] = ProviderResult(prov, ran=True, passed=False, outputs={
                "_": {"passed": False, "why": f"{len(cand_out)} outputs, expected {len(names)}"}})
            continue
        if set(onnx_names) == set(names):  # same names: match by name, whatever the order
            by_name = dict(zip(onnx_names, cand_out))
            cand, which = {n: by_name[n] for n in names}, {n: n for n in names}
        else:
            cand, which = dict(zip(names, cand_out)), dict(zip(names, onnx_names))
        ok, per_output = compare.judge(ref, cand, keras_noise, atol=atol, rtol=rtol)
        ver.providers[prov] = ProviderResult(prov, ran=True, passed=ok, outputs=per_output,
                                             notes={"reference": "original Keras model on CPU",
                                                    "onnx_outputs": onnx_names})
        if not ok and ver.first_divergence is None:
            ver.first_divergence = compare.outputs_only_culprit(per_output, which, prov)
    return ver
