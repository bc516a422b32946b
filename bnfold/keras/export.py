"""Fold a Keras model, export it to ONNX with Keras' own exporter, verify the ONNX against the original.

Keras' own exporter (model.export(path, format="onnx")) for the backend in use: tf2onnx on TensorFlow,
torch.onnx on torch, jax2onnx on jax; a missing one is named before any work. The reference is
the original Keras model on CPU; the noise is the same one-ulp weight nudge as for Keras-vs-Keras.
onnxruntime's own kernels move the outputs by about that much (ResNet50: 1.6e-5 against a noise of
2.2e-5), so no wider tolerance is granted for the change of runtime: a broken export cannot hide
behind a noise figure that it produced itself.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.errors import BnfoldError, MissingExtraError
from ..core.files import atomic_write
from ..core.results import FoldResult, ProviderResult, Verification
from ..core.options import Options
from ..verify import compare
from . import backend
from . import verify as kv
from .feeds import Feeds
from .files import model_input_specs

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}


# the package Keras' ONNX exporter needs on each backend, and what to install for it
EXPORTERS = {"tensorflow": ("tf2onnx", "tf2onnx"), "torch": ("onnxscript", "onnxscript"),
             "jax": ("jax2onnx", "jax2onnx")}


def _need_exporter() -> None:
    import importlib.util

    b = backend.name()
    if b not in EXPORTERS:
        raise BnfoldError(f"Keras has no ONNX exporter on its {b} backend; set KERAS_BACKEND to tensorflow, torch or jax")
    module, package = EXPORTERS[b]
    if importlib.util.find_spec(module) is None:
        if b == "tensorflow":
            raise MissingExtraError("tf2onnx (Keras' ONNX exporter on TensorFlow)", "keras")
        raise BnfoldError(f"Keras' ONNX export on the {b} backend needs {package}, which is not installed: "
                          f"pip install {package}")


def _export(model: Any, path: str, feeds: Sequence[np.ndarray]) -> None:
    import logging

    import onnx

    kv.run(model, feeds)  # Keras refuses to export a functional model that was never called
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    try:
        with quiet():
            try:
                model.export(path, format="onnx", verbose=False)
            except Exception:
                if backend.name() != "torch":
                    raise
                _export_torch(model, path, feeds)
        graph = onnx.load(path, load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        if len([i for i in graph.input if i.name not in inits]) > len(feeds) and backend.name() == "tensorflow":
            _export_frozen(model, path)
    except ImportError as e:  # an exporter's own dependency
        raise BnfoldError(f"Keras' ONNX export on the {backend.name()} backend needs {e.name or e}, which is not "
                          f"installed: pip install {(e.name or '').split('.')[0] or 'it'}") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise BnfoldError(f"Keras' ONNX export failed ({type(e).__name__}: {first})") from None


def _export_torch(model: Any, path: str, feeds: Sequence[np.ndarray]) -> None:
    """Keras' torch exporter, traced on the verification feeds: Keras traces with 1 for every unknown
    dimension, which a model with a 3x3 'valid' convolution cannot run on. The unknown dimensions stay
    dynamic in the ONNX file (named as Keras names them)."""
    import torch

    from .files import model_input_specs

    specs = model_input_specs(model)
    names = [n for n, _, _ in specs]
    dynamic = {n: {i: ("batch" if i == 0 else f"dim_{k}_{i}") for i, d in enumerate(shape) if d is None}
               for k, (n, shape, _) in enumerate(specs)}
    struct = getattr(model, "_inputs_struct", None)

    class Flat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *flat: Any) -> Any:
            return self.model(backend.pack_inputs(model, list(flat)) if struct is not None else flat[0],
                              training=False)

    sample = tuple(torch.as_tensor(np.asarray(f)) for f in feeds)
    torch.onnx.export(Flat().eval(), sample, path, input_names=names, dynamo=False, do_constant_folding=True,
                      dynamic_axes={n: d for n, d in dynamic.items() if d})


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


def _ort_run(onnx_model: Any, feeds: Sequence[np.ndarray], provider: str,
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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Exporters print progress and warnings on stdout / stderr: --json keeps stdout for the report."""
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_exportable(model: Any) -> None:
    """Refuse what Keras' ONNX export cannot do, before any work."""
    _need_exporter()
    low = sorted({layer.compute_dtype for layer in model._flatten_layers()} - {"float32"})
    if low:
        raise BnfoldError(f"Keras' ONNX export needs a float32 model; this one computes in {', '.join(low)}")


MAX_HEALING_ROUNDS = 3


def fold_healed(fold: Callable[[Options], FoldResult], opts: Options) -> FoldResult:
    """`fold(opts)`, then again without the folds a failed proof blamed, as bnfold.fold heals a fold
    (the export is verified on the healed model); --strict keeps the first result and its verdict."""
    res = fold(opts)
    for _ in range(MAX_HEALING_ROUNDS):
        ver = res.report.verification
        if opts.strict or ver is None or not ver.blame:
            break
        exclude = dict(opts.exclude)
        for b in ver.blame:
            exclude.setdefault(b["bn"], b.get("why") or "its proof failed")
        if len(exclude) == len(opts.exclude):
            break  # nothing new to revert: the failure is not a fold's, the verdict stands
        opts = opts.but(exclude=exclude)
        opts.say(f"reverting {len(exclude)} fold(s) that failed their proof, folding and verifying again")
        res = fold(opts)
    if res.report.reverted:
        res.report.info["self_healing"] = (f"{len(res.report.reverted)} fold(s) failed their proof and were "
                                           "reverted; the rest of the model was folded and verified again")
    return res


def write_and_verify(result: FoldResult, original: Any, out_path: str, feeds: Feeds,
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
        keras_ver = report.verification
        merged = Verification(providers={**keras_ver.providers, **onnx_ver.providers}, tolerance=onnx_ver.tolerance,
                              first_divergence=keras_ver.first_divergence or onnx_ver.first_divergence,
                              inputs=keras_ver.inputs, blame=keras_ver.blame, proofs=keras_ver.proofs,
                              notes=keras_ver.notes)
        report.verification = merged
        report.timing_s["verify"] = report.timing_s.get("verify", 0.0) + time.perf_counter() - t1
        if not merged:
            os.unlink(out_path)  # a failed verification writes nothing
            report.output = None
    return result


def verify_onnx(original: Any, onnx_model: Any, feeds: Feeds, opts: Options) -> Verification:
    """Judge an ONNX model (path or ModelProto) on onnxruntime against the original Keras model on CPU."""
    providers, atol, rtol, seed = opts.providers, opts.atol, opts.rtol, opts.seed
    import onnxruntime as ort

    names = kv.output_names(original)
    batches = feeds.batches
    ref = _by_name(names, [kv.run(original, b, "cpu") for b in batches])
    per_batch = [kv.noise_outputs(original, b, "cpu", seed) for b in batches]
    keras_noise = [_by_name(names, [runs[k] for runs in per_batch]) for k in range(len(per_batch[0]))]
    ver = Verification(tolerance={"atol": atol, "rtol": rtol,
                                  "how": "user" if atol is not None or rtol is not None else "auto"},
                       inputs=feeds.doc)
    available = ort.get_available_providers()
    input_names = [n for n, _, _ in model_input_specs(original)]
    for dev in kv.normalise_providers(providers):
        prov = ORT_PROVIDERS[dev]
        if prov not in available:
            ver.providers[prov] = ProviderResult(prov, ran=False, why=f"{prov} is not available in this "
                                                 "onnxruntime (onnxruntime-gpu not installed or no device)")
            continue
        runs = [_ort_run(onnx_model, b, prov, input_names) for b in batches]
        onnx_names = runs[0][0]
        if len(onnx_names) != len(names):
            ver.providers[prov] = ProviderResult(prov, ran=True, passed=False, outputs={
                "_": {"passed": False, "verdict": "failed", "why": f"{len(onnx_names)} outputs, expected {len(names)}"}})
            continue
        if set(onnx_names) == set(names):  # same names: match by name, whatever the order
            order = [onnx_names.index(n) for n in names]
            which = {n: n for n in names}
        else:
            order = list(range(len(names)))
            which = dict(zip(names, onnx_names))
        cand = _by_name(names, [[out[i] for i in order] for _, out in runs])
        ok, per_output = compare.judge(ref, cand, keras_noise, atol=atol, rtol=rtol)
        compare.require_evidence(per_output)
        ver.providers[prov] = ProviderResult(prov, ran=True, passed=ok, outputs=per_output,
                                             notes={"reference": f"original Keras model on CPU (Keras backend "
                                                                 f"{backend.name()})", "onnx_outputs": onnx_names})
        if not ok and ver.first_divergence is None:
            ver.first_divergence = compare.outputs_only_culprit(per_output, which, prov)
    return ver


def _by_name(names: list[str], runs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    if len(runs) == 1:
        return dict(zip(names, runs[0]))
    return {n: np.concatenate([np.asarray(r[i]).reshape(-1) for r in runs]) for i, n in enumerate(names)}
