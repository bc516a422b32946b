"""Is a Keras candidate the same function as the Keras original? Run both on every device, judge.

Each device (CPU always, the GPU when the Keras backend in use sees one) runs the original, the
candidate and noise models (clones of the original whose float weights were nudged by one ulp,
compare.perturb; mixed-precision models by one ulp of their 16-bit compute dtype, TF32 GPUs by one
TF32 ulp) on the same feeds. The outputs are judged by compare.judge, and so is every layer output
both models compute under the same name (keras/intermediates.py): the first that diverges fails the
verification even when the outputs agree. With the fold's decisions, each fold is also proven on its
own (keras/proofs.py), and a failed proof, or a first divergence at a fold, blames that fold: what
self-healing reverts.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.decisions import Decision
from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import ProviderResult, Verification
from ..verify import compare
from . import backend, intermediates, probes, proofs
from .feeds import Feeds, missing, save

NOISE_RUNS = 2
TF32_EPS = 2.0 ** -11  # unit roundoff of TF32's 10-bit mantissa


def gpu_available() -> bool:
    """Whether the Keras backend in use sees a GPU."""
    return backend.gpu_available()


def tf32_enabled() -> bool:
    """Whether the Keras backend in use may run float32 GPU matmuls/convolutions in TF32."""
    return backend.tf32_enabled()


def output_names(model: Any) -> list[str]:
    """Names of the model's flattened outputs (dict keys, else Keras' output names, else output_i)."""
    import keras

    struct = getattr(model, "_outputs_struct", None)
    if isinstance(struct, dict):
        return sorted(str(k) for k in struct)  # keras.tree flattens a dict in sorted key order
    names = list(getattr(model, "output_names", None) or [])
    n = len(keras.tree.flatten(struct)) if struct is not None else len(names)
    return names if names and len(names) == n else [f"output_{i}" for i in range(max(n, 1))]


def run(model: Any, feeds: Sequence[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """Outputs of `model` (inference mode) on `device`, flattened, as numpy arrays."""
    return backend.Runner(device).run(model, list(feeds))


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


def nudged_models(original: Any, device: str, seed: int, runs: int = NOISE_RUNS) -> Iterator[Any]:
    """`runs` one-ulp-nudged versions of `original`, one at a time: a clone made on `device`, or (a model
    Keras cannot clone) the original itself, nudged in place and restored bit for bit afterwards."""
    import keras

    weights = original.get_weights()
    eps = _noise_eps(original, device)
    try:
        with keras.device(backend.DEVICE_NAMES[device]):
            clone = keras.models.clone_model(original)
            if not clone.built or len(clone.weights) != len(original.weights):
                backend.call(clone, _probe_feeds(original), device)  # builds a clone of a subclassed model
        # a layer shared across nesting levels comes back as two layers: other weights than the original
        own = [tuple(w.shape) for w in clone.weights] == [tuple(w.shape) for w in original.weights]
        if not own:
            raise ValueError("the clone's weights do not match the original's")
    except Exception:
        clone, own = original, False
    try:
        for k in range(runs):
            clone.set_weights(_nudged(weights, np.random.default_rng(seed + 1 + k), eps))
            yield clone
    finally:
        if not own:
            original.set_weights(weights)


def _probe_feeds(model: Any) -> list[np.ndarray]:
    """Small zero inputs of the model's own signature (only to build a clone)."""
    from .files import model_input_specs

    return [np.zeros(tuple(2 if d is None else d for d in shape), dtype="float32" if dt == "bfloat16" else dt)
            for _, shape, dt in model_input_specs(model)]


def noise_outputs(original: Any, feeds: Sequence[np.ndarray], device: str, seed: int,
                  runs: int = NOISE_RUNS) -> list[list[np.ndarray]]:
    """Outputs of `runs` one-ulp-nudged copies of `original` (the original itself is left as it was)."""
    runner = backend.Runner(device)
    return [runner.run(m, list(feeds)) for m in nudged_models(original, device, seed, runs)]


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


def _by_name(names: list[str], runs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Outputs of several batches, per output name (flattened and concatenated when more than one)."""
    if len(runs) == 1:
        return dict(zip(names, runs[0]))
    return {n: np.concatenate([np.asarray(r[i]).reshape(-1) for r in runs]) for i, n in enumerate(names)}


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


class _Check:
    """One verification of `candidate` against `original`: every device, then proofs and blame."""

    def __init__(self, original: Any, candidate: Any, feeds: Feeds, opts: Options,
                 decisions: list[Decision] | None) -> None:
        self.original, self.candidate, self.feeds, self.opts = original, candidate, feeds, opts
        self.decisions = decisions
        self.names = output_names(original)
        self.layers = probes.can_capture(original) and probes.can_capture(candidate)
        self.tensors: dict[int, np.ndarray] | None = None  # the original's first batch, for the proofs

    def provider(self, dev: str, ver: Verification) -> ProviderResult:
        key = f"keras-{dev}"
        runner = backend.Runner(dev)
        batches = self.feeds.batches
        try:
            ref_runs = [runner.run(self.original, b) for b in batches]
        except ImportError as e:
            raise missing(e) from None
        except BnfoldError:
            raise
        except Exception as e:  # the model itself rejects the inputs: a usage problem, not a verdict
            shapes = ", ".join("x".join(str(d) for d in np.shape(f)) for f in batches[0])
            raise BnfoldError(f"the model cannot run on inputs of shape {shapes} on {dev} ({_first_line(e)}); give "
                              "the input shapes with --input NAME:SHAPE or real data with --inputs") from None
        try:
            cand_runs = [runner.run(self.candidate, b) for b in batches]
        except Exception as e:  # a candidate that cannot even take the original's inputs is not equivalent
            return ProviderResult(key, ran=True, passed=False, outputs={
                "_": {"passed": False, "verdict": "failed", "why": f"the candidate fails on the inputs ({_first_line(e)})"}})
        if any(len(c) != len(self.names) for c in cand_runs):
            return ProviderResult(key, ran=True, passed=False, outputs={
                "_": {"passed": False, "verdict": "failed",
                      "why": f"{len(cand_runs[0])} outputs, expected {len(self.names)}"}})
        notes: dict[str, Any] = {"backend": backend.name()}
        if dev == "gpu" and tf32_enabled():
            notes["tf32"] = True
        caps = self._captures(runner, notes)
        noise, noise_caps = [], []
        ref, cand = _by_name(self.names, ref_runs), _by_name(self.names, cand_runs)
        # a node-by-node run that gives the original's own outputs bit for bit gives the noise models' too
        same = caps is not None and len(caps[0].outputs) == len(self.names) and all(
            np.array_equal(a, ref[n], equal_nan=True) for n, a in zip(self.names, caps[0].outputs))
        nudged = nudged_models(self.original, dev, self.opts.seed)
        try:
            for m in nudged:
                if caps is not None:
                    try:
                        noise_caps.append(probes.concat([probes.capture(runner.here(m), b, dev) for b in batches]))
                    except Exception as e:  # noqa: BLE001 - without the noise's layers, the outputs decide alone
                        notes["intermediates"] = f"not compared: a noise model's layers could not be run ({_first_line(e)})"
                        caps, same, noise_caps = None, False, []
                if same:
                    noise.append(dict(zip(self.names, noise_caps[-1].outputs)))
                else:
                    noise.append(_by_name(self.names, [runner.run(m, b) for b in batches]))
        finally:
            nudged.close()  # an original nudged in place gets its own weights back even when a run fails
        passed, outs = compare.judge(ref, cand, noise, atol=self.opts.atol, rtol=self.opts.rtol,
                                     roundoff=_perturb_eps(self.original))
        compare.require_evidence(outs)
        div = None
        if caps is not None:
            if not self._faithful(caps, ref, cand, noise):
                notes["intermediates"] = ("not compared: running the layer graph node by node did not reproduce "
                                          "the models' own outputs")
            else:
                after = intermediates.folded_after(self.decisions)
                div, more = intermediates.first_divergence(caps[0], caps[1], noise_caps, self.opts.atol,
                                                           self.opts.rtol, after, dev)
                notes.update(more)
        if div is not None and self.opts.outputs_only:
            notes["ignored_divergence"] = div  # reported, not decisive, as asked
            div = None
        if div is not None:
            if passed:
                notes["masked_divergence"] = (
                    "the outputs agree on these inputs, but a layer's output diverges: the error is masked "
                    "downstream (e.g. a ReLU cut the damaged channel) and shows on other inputs")
            passed = False
            if ver.first_divergence is None:
                ver.first_divergence = div
        if not passed and ver.first_divergence is None:
            worst = max((k for k in outs if outs[k].get("verdict") == "failed"),
                        key=lambda k: outs[k].get("max_abs", 0) / (outs[k].get("atol") or 1e-300))
            ver.first_divergence = {"layer": worst, "module": "model output", "device": dev,
                                    "max_abs": outs[worst].get("max_abs"), "atol": outs[worst].get("atol")}
        return ProviderResult(key, ran=True, passed=passed, outputs=outs, notes=notes)

    def _captures(self, runner: backend.Runner, notes: dict[str, Any]) -> tuple[probes.Capture, probes.Capture] | None:
        if not self.layers:
            notes["intermediates"] = "not compared: the models have no recorded layer graph (subclassed)"
            return None
        try:
            here = runner.here(self.original)
            ref = [probes.capture(here, b, runner.device) for b in self.feeds.batches]
            cand = [probes.capture(runner.here(self.candidate), b, runner.device) for b in self.feeds.batches]
        except Exception as e:  # noqa: BLE001 - the outputs still decide; say why the layers could not
            notes["intermediates"] = f"not compared: the layer graph could not be run node by node ({_first_line(e)})"
            return None
        if self.tensors is None and here is self.original:
            self.tensors = ref[0].tensors
        return probes.concat(ref), probes.concat(cand)

    def _faithful(self, caps: tuple[probes.Capture, probes.Capture], ref: dict, cand: dict, noise: list) -> bool:
        """Whether the node-by-node runs reproduce the models' own outputs (within the outputs' noise)."""
        for cap, own in zip(caps, (ref, cand)):
            if len(cap.outputs) != len(self.names):
                return False
            ok, _ = compare.judge(own, dict(zip(self.names, cap.outputs)), noise)
            if not ok:
                return False
        return True

    def prove(self, ver: Verification, built: dict[int, Any], graph: Any) -> None:
        """The per-fold proofs, then the blame: failed proofs, and a first divergence at a fold."""
        if self.tensors is None and graph is not None:
            try:
                self.tensors = probes.capture(graph, self.feeds.batches[0], backend.home(self.original)).tensors
            except Exception:  # noqa: BLE001 - the proofs say they could not run
                self.tensors = None
        counts, blame = proofs.prove(self.decisions or [], built, self.tensors)
        ver.proofs, ver.blame = counts, blame
        fd = ver.first_divergence or {}
        at = str(fd.get("layer") or "")
        path = re.sub(r"#\d+", "", at).split(":")[0]  # fold sites are named by layer path, without call numbers
        there = [d for d in self.decisions or [] if d.is_folded and path and path in (d.producer, d.bn)]
        # a fold proven on its own is not what diverges, unless every fold there is proven (then it is their sum)
        suspects = [d for d in there if not (d.proof and d.proof.get("passed"))] or there
        named = {b["bn"] for b in blame}
        for d in suspects:
            if d.bn not in named:
                ver.blame.append({"bn": d.bn, "why": f"the end-to-end check diverges at {at!r} ({fd.get('device')}): "
                                                     f"max abs {fd.get('max_abs'):.3g} > atol {fd.get('atol'):.3g}",
                                  "max_abs": fd.get("max_abs"), "bound": fd.get("atol"), "layer": at})


def verify_keras(original: Any, candidate: Any, feeds: Feeds, opts: Options, decisions: list[Decision] | None = None,
                 built: dict[int, Any] | None = None, graph: Any = None) -> Verification:
    """Run original and candidate on each device and judge the candidate: outputs, every same-named layer
    output and, given the fold's decisions (with `built`, id(original layer) -> folded layer, and `graph`,
    the original's graph the plan read), every fold's own proof."""
    atol, rtol = opts.atol, opts.rtol
    ver = Verification(tolerance={"atol": atol, "rtol": rtol,
                                  "how": "user" if atol is not None or rtol is not None else "auto"})
    check = _Check(original, candidate, feeds, opts, decisions)
    for dev in normalise_providers(opts.providers):
        key = f"keras-{dev}"
        if dev == "gpu" and not gpu_available():
            if opts.providers is not None:
                # asked for by name: a GPU that cannot run is the user's problem to hear about (exit 2)
                raise BnfoldError(f"provider gpu was requested but {backend.no_gpu_why()}")
            ver.providers[key] = ProviderResult(key, ran=False, why=backend.no_gpu_why())
            continue
        opts.say(f"verifying on {dev} (Keras backend {backend.name()})")
        ver.providers[key] = check.provider(dev, ver)
    ver.inputs = feeds.doc
    ver.notes["keras_backend"] = backend.name()
    if decisions is not None:
        check.prove(ver, built or {}, graph)
    if opts.save_inputs:
        save(feeds, opts.save_inputs)
    return ver
