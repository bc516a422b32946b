"""Run Keras models on CPU / GPU and judge a candidate against the original.

The noise of the original is measured by running clones of it whose float weights were nudged by
one ulp (compare.perturb) on the same device; mixed-precision models are nudged by one ulp of their
16-bit compute dtype, since that is where their rounding happens.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..verify import compare
from ..core.errors import BnfoldError
from ..core.options import Options
from .files import before_tensorflow
from ..core.results import ProviderResult, Verification

NOISE_RUNS = 2
TF32_EPS = 2.0 ** -11  # unit roundoff of TF32's 10-bit mantissa
DEVICES = {"cpu": "/CPU:0", "gpu": "/GPU:0", "cuda": "/GPU:0"}


def _tf() -> Any:
    before_tensorflow()
    import tensorflow as tf

    return tf


def gpu_available() -> bool:
    """Whether TensorFlow sees a GPU."""
    return bool(_tf().config.list_physical_devices("GPU"))


def tf32_enabled() -> bool:
    """Whether TensorFlow may run float32 matmuls/convolutions in TF32 on the GPU (its default)."""
    return bool(_tf().config.experimental.tensor_float_32_execution_enabled())


def output_names(model: Any) -> list[str]:
    """Names of the model's flattened outputs (dict keys, else Keras' output names, else output_i)."""
    import keras

    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return sorted(str(k) for k in struct)  # keras.tree flattens a dict in sorted key order
    names = list(getattr(model, "output_names", None) or [])
    n = len(keras.tree.flatten(struct)) if struct is not None else len(names)
    return names if names and len(names) == n else [f"output_{i}" for i in range(max(n, 1))]


def pack_inputs(model: Any, feeds: Sequence[np.ndarray]) -> Any:
    """Feeds in the structure the model's call expects."""
    import keras

    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, list(feeds))
    return feeds[0] if len(feeds) == 1 else list(feeds)


def run(model: Any, feeds: Sequence[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """Outputs of `model` (inference mode) on `device`, flattened, as numpy arrays."""
    import keras

    tf = _tf()
    with tf.device(DEVICES[device]):
        out = model(pack_inputs(model, feeds), training=False)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in keras.tree.flatten(out)]


def _perturb_eps(model: Any) -> float | None:
    """One ulp of the lowest-precision compute dtype when the model computes in 16 bits."""
    low = {layer.compute_dtype for layer in model._flatten_layers()
           if getattr(layer, "compute_dtype", "float32") in ("float16", "bfloat16")}
    if not low:
        return None
    return 2.0 ** -7 if "bfloat16" in low else compare.unit_roundoff(np.float16)


def _noise_eps(model: Any, device: str) -> float | None:
    eps = _perturb_eps(model)
    if device == "gpu" and eps is None and tf32_enabled():
        # TF32 rounds float32 operands to a 10-bit mantissa on the GPU: a nudge of that size is the
        # noise the device itself adds (a one-ulp float32 nudge would mostly vanish in that rounding).
        return TF32_EPS
    return eps


def _nudged(weights: list[np.ndarray], rng: np.random.Generator, eps: float | None) -> list[np.ndarray]:
    out = []
    for w in weights:
        w = np.asarray(w)
        is_float = w.dtype.kind == "f" or w.dtype.name == "bfloat16"
        out.append(compare.perturb(w, rng, eps) if is_float and w.size else w)
    return out


def noise_outputs(original: Any, feeds: Sequence[np.ndarray], device: str, seed: int,
                  runs: int = NOISE_RUNS) -> list[list[np.ndarray]]:
    """Outputs of `runs` one-ulp-nudged copies of `original` (the original itself is left as it was)."""
    import keras

    weights = original.get_weights()
    eps = _noise_eps(original, device)
    try:
        clone = keras.models.clone_model(original)
        run(clone, feeds, device)  # builds a clone of a subclassed model
        # a layer shared across nesting levels comes back as two layers: other weights than the original
        own = [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in original.weights]
        if not own:
            raise ValueError("the clone's weights do not match the original's")
    except Exception:
        # Models that cannot be cloned are nudged in place and restored bit for bit afterwards.
        clone, own = original, False
    results = []
    try:
        for k in range(runs):
            clone.set_weights(_nudged(weights, np.random.default_rng(seed + 1 + k), eps))
            results.append(run(clone, feeds, device))
    finally:
        if not own:
            original.set_weights(weights)
    return results


def normalise_providers(providers: Sequence[str] | None) -> list[str]:
    """['cpu', 'gpu'] by default; 'cuda' is accepted as another name for 'gpu'."""
    if providers is None:
        return ["cpu", "gpu"]
    out = []
    for p in providers:
        key = str(p).strip().lower()
        key = {"cuda": "gpu", "cpuexecutionprovider": "cpu", "cudaexecutionprovider": "gpu"}.get(key, key)
        if key not in ("cpu", "gpu"):
            raise BnfoldError(f"unknown provider {p!r} for a Keras model; use cpu or gpu")
        if key not in out:
            out.append(key)
    return out


def verify_keras(original: Any, candidate: Any, feeds: Sequence[np.ndarray], opts: Options) -> Verification:
    """Run original and candidate on each device and judge the candidate with compare.judge."""
    providers, atol, rtol, seed = opts.providers, opts.atol, opts.rtol, opts.seed
    names = output_names(original)
    ver = Verification(tolerance={"atol": atol, "rtol": rtol,
                                  "how": "user" if atol is not None or rtol is not None else "auto"})
    for dev in normalise_providers(providers):
        key = f"keras-{dev}"
        if dev == "gpu" and not gpu_available():
            if providers is not None:
                # asked for by name: a GPU that cannot run is the user's problem to hear about (exit 2)
                raise BnfoldError("provider gpu was requested but TensorFlow sees no GPU")
            ver.providers[key] = ProviderResult(key, ran=False, why="TensorFlow sees no GPU")
            continue
        try:
            ref = dict(zip(names, run(original, feeds, dev)))
        except Exception as e:  # the model itself rejects the inputs: a usage problem, not a verdict
            first = (str(e).strip().splitlines() or [""])[0][:160]
            shapes = ", ".join("x".join(str(d) for d in np.shape(f)) for f in feeds)
            raise BnfoldError(f"the model cannot run on inputs of shape {shapes} ({type(e).__name__}: {first}); "
                              "give the input shapes with --input NAME:SHAPE or real data with --inputs") from None
        try:
            cand_out = run(candidate, feeds, dev)
        except Exception as e:  # a candidate that cannot even take the original's inputs is not equivalent
            first = (str(e).strip().splitlines() or [""])[0][:200]
            ver.providers[key] = ProviderResult(key, ran=True, passed=False, outputs={
                "_": {"passed": False, "why": f"the candidate fails on the inputs ({type(e).__name__}: {first})"}})
            continue
        if len(cand_out) != len(names):
            ver.providers[key] = ProviderResult(key, ran=True, passed=False, outputs={
                "_": {"passed": False, "why": f"{len(cand_out)} outputs, expected {len(names)}"}})
            continue
        cand = dict(zip(names, cand_out))
        noise = [dict(zip(names, o)) for o in noise_outputs(original, feeds, dev, seed)]
        ok, per_output = compare.judge(ref, cand, noise, atol=atol, rtol=rtol)
        notes = {"tf32": True} if dev == "gpu" and tf32_enabled() else {}
        ver.providers[key] = ProviderResult(key, ran=True, passed=ok, outputs=per_output, notes=notes)
        if not ok and ver.first_divergence is None:
            try:
                ver.first_divergence = first_divergence(original, candidate, feeds, dev, seed)
            except Exception as e:  # locating the layer is a diagnosis; it must not hide the verdict
                ver.first_divergence = {"layer": None, "why": f"could not be located ({type(e).__name__}: {e})"}
    return ver


def _probe_tensors(functional: Any, names: set[str]) -> dict[str, Any]:
    """Output tensor of every single-call layer named in `names`. Where the layer's only reader is a
    BatchNorm missing from `names` (folded away), the BN's output stands for it: that is the value
    the folded layer now computes."""
    from .graph import GraphView

    view = GraphView(functional)
    out: dict[str, Any] = {}
    for node in view.nodes:
        name = node.operation.name
        if name not in names or view.calls[id(node.operation)] > 1 or len(node.outputs) != 1:
            continue
        t = node.outputs[0]
        while True:
            readers = view.consumers.get(id(t), [])
            if len(readers) != 1 or readers[0].operation.name in names or id(t) in view.output_ids:
                break
            if type(readers[0].operation).__name__ != "BatchNormalization":
                break
            t = readers[0].outputs[0]
        out[name] = t
    return out


def first_divergence(original: Any, candidate: Any, feeds: Sequence[np.ndarray], device: str = "cpu",
                     seed: int = 0) -> dict[str, Any] | None:
    """The earliest layer of `candidate` whose output differs from the original's beyond its noise."""
    import keras

    from .plan import functional_of, is_graph_model

    if not (is_graph_model(original) and is_graph_model(candidate)):
        return None
    fo, fc = functional_of(original), functional_of(candidate)
    from .graph import GraphView

    order = [n.operation.name for n in GraphView(fc).nodes]
    cand_t = _probe_tensors(fc, set(order))
    orig_t = _probe_tensors(fo, set(order))
    common = [n for n in order if n in cand_t and n in orig_t and cand_t[n].shape == orig_t[n].shape]
    if not common:
        return None
    clone = keras.models.clone_model(original)
    clone.set_weights(_nudged(original.get_weights(), np.random.default_rng(seed + 1),
                               _noise_eps(original, device)))
    noise_t = _probe_tensors(functional_of(clone), set(common))
    common = [n for n in common if n in noise_t]

    def probe(fn: Any, tensors: dict[str, Any]) -> dict[str, np.ndarray]:
        m = keras.Model(fn.inputs, [tensors[n] for n in common])
        return dict(zip(common, run(m, feeds, device)))

    ref, cand = probe(fo, orig_t), probe(fc, cand_t)
    noise = probe(functional_of(clone), noise_t)
    _, per = compare.judge(ref, cand, [noise])
    for name in common:
        if not per[name]["passed"]:
            s = per[name]
            return {"layer": name, "device": device, "max_abs": s["max_abs"], "atol": s["atol"]}
    return None
