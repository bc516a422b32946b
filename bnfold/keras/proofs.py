"""Per-fold local proofs for Keras: each folded layer, original against folded, replayed in float64 on
the data the original saw.

A fold replaces a region (the layer and the BatchNorm after it, or the BatchNorm and the layer after
it) by the one layer with new weights. The region's data input x is captured from the original's run on
the first verification batch. Then, in float64, with the backend's own layer implementation (the layer
re-made from its config with a float64 dtype, so padding, strides, groups and data formats are Keras'
own):

    ref = the original region: the layer with the weights it had before this fold, the BN's affine map
          from its own moving_mean / moving_variance / gamma / beta / epsilon,
    new = the layer with the weights after this fold (for the last fold into a layer: as stored in the
          folded model, which must be those),
    M   = the folded layer on |x| with every weight |w| (the magnitudes the weights' rounding scales),

and the fold is proven when |new - ref| <= (2u + 2^-36) M elementwise, u the unit roundoff of the
folded weights' dtype (2^-36 covers float64's own rounding over sums of up to 2^16 terms). A weight off
by one part in 1e4, a shifted bias, a wrong channel axis or a swapped group exceed it by orders of
magnitude; rounding cannot. The float64 replay of the original region must match Keras' own run of it
(the region's output captured from the original) within 1e-3 (M + |ref|) (8 ulp of a 16-bit compute
dtype), else there is no proof rather than a false accusation.

Several BNs folded into one layer (BN -> Dense -> BN, conv -> BN -> BN) are proven one step at a time,
each against the weights the previous step left: a wrong step is named alone, and the steps together
prove the whole.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.decisions import Decision
from ..verify import compare
from .backend import DEVICE_NAMES, float64, no_grad, to_numpy

SLACK = 2.0
F64_TERM = 2.0 ** -36
FAITHFUL = 1e-3
FAITHFUL_ULPS = 8.0
COMPUTE_EPS = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -23, "float64": 2.0 ** -52}
HOW = "float64 replay of the folded layer and the original layer + BatchNorm(s) on captured data; bound 2 u M"


def prove(decisions: list[Decision], built: dict[int, Any],
          tensors: dict[int, np.ndarray] | None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Set `proof` on every folded decision; returns (counts, blame for the folds whose proof failed).

    `built` maps id(original layer) -> its layer in the folded model; `tensors` maps id(KerasTensor) of
    the original's graphs -> its value on the first batch (None: nothing could be captured)."""
    counts = {"proven": 0, "failed": 0, "not_run": 0}
    blame: list[dict[str, Any]] = []
    folded = [d for d in decisions if d.is_folded]
    last = {id(d.site.layer): d for d in folded if d.site is not None}  # whose weights the model stores
    for d in folded:
        if d.site is None:
            d.proof = {"not_run": "the fold's place in the graph is unknown"}
        elif tensors is None:
            d.proof = {"not_run": "the original's layer outputs could not be captured (no recorded layer graph)"}
        else:
            try:
                d.proof = _prove_one(d.site, built.get(id(d.site.layer)), last[id(d.site.layer)] is d, tensors)
            except Exception as e:  # noqa: BLE001 - a layer Keras cannot re-make in float64: no proof, said so
                d.proof = {"not_run": f"the region could not be replayed in float64 ({type(e).__name__}: "
                                      f"{(str(e).splitlines() or [''])[0][:160]})"}
        if "not_run" in d.proof:
            counts["not_run"] += 1
        elif d.proof["passed"]:
            counts["proven"] += 1
        else:
            counts["failed"] += 1
            why = d.proof.get("why") or f"max abs {d.proof['max_abs']:.3g} > bound {d.proof['bound']:.3g}"
            blame.append({"bn": d.bn, "why": f"its local proof failed: {why} at {d.producer!r}",
                          "max_abs": d.proof["max_abs"], "bound": d.proof["bound"], "layer": d.producer})
    return counts, blame


def _prove_one(site: Any, folded: Any, is_last: bool, tensors: dict[int, np.ndarray]) -> dict[str, Any]:
    """One fold: the layer with the weights it had before this BN went in (the original's, or after the
    folds made into it before this one), composed with the BN, against the layer with the weights after.
    The last fold into a layer is checked with the weights the folded model stores, and those must be the
    fold's own."""
    layer = site.layer
    if folded is None:
        return {"not_run": f"{layer.name} has no counterpart in the folded model"}
    if id(site.x) not in tensors or id(site.y) not in tensors:
        return {"not_run": f"the data around {layer.name} was not captured (a graph branch the inputs do not reach)"}
    new_w = [np.asarray(w) for w in site.weights_out]
    if is_last:
        stored = [np.asarray(w) for w in folded.get_weights()]
        if len(stored) != len(new_w) or any(a.shape != b.shape or not np.array_equal(a, b)
                                            for a, b in zip(stored, new_w)):
            return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                    "why": "the folded model stores other weights than the fold computed"}
        new_w = stored
    x = np.asarray(tensors[id(site.x)], np.float64)
    witness = np.asarray(tensors[id(site.y)], np.float64)
    u = max(compare.unit_roundoff(w.dtype) for w in new_w if w.dtype.kind == "f" or w.dtype.name == "bfloat16")
    run = _Twin(layer)
    if site.direction == "before":
        ref = run(site.weights_in, _bn(x, site.bn))
        seen = _activation(layer, ref)
    else:
        ref = _bn(run(site.weights_in, x), site.bn)
        seen = ref
    new = run(new_w, x)
    mag = run([np.abs(np.asarray(w, np.float64)) for w in new_w], np.abs(x))
    fine = np.isfinite(witness) & np.isfinite(seen)
    # Keras' own run rounds in the layer's compute dtype: a bfloat16 layer is off by far more than 1e-3
    faithful = max(FAITHFUL, FAITHFUL_ULPS * max(COMPUTE_EPS.get(str(site.layer.compute_dtype), 0.0),
                                                  COMPUTE_EPS.get(str(site.bn.compute_dtype), 0.0)))
    if witness.shape != seen.shape or np.any(np.abs(np.where(fine, seen - witness, 0.0)) > faithful * (mag + np.abs(ref))):
        return {"not_run": f"the float64 replay of the original {layer.name} disagrees with Keras' own run of it"}
    if ref.shape != new.shape:
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": f"shapes differ: {list(ref.shape)} vs {list(new.shape)}"}
    if not np.array_equal(np.isfinite(ref), np.isfinite(new)):
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": "non-finite values differ"}
    if not ref.size:
        return {"not_run": "the region's output is empty on the captured input"}
    diff = np.where(np.isfinite(ref), np.abs(new - ref), 0.0)
    bound = (SLACK * u + F64_TERM) * mag + np.finfo(np.float32).tiny
    ratio = diff / bound
    k = int(np.argmax(ratio))
    worst = float(ratio.reshape(-1)[k])
    return {"passed": worst <= 1.0, "max_abs": float(diff.max()), "bound": float(bound.reshape(-1)[k]),
            "ratio": worst, "how": HOW}


def _bn(z: np.ndarray, bn: Any) -> np.ndarray:
    """A BatchNorm's inference map in float64, from its own parameters."""
    axis = bn.axis % z.ndim
    shape = [1] * z.ndim
    shape[axis] = z.shape[axis]

    def param(v: Any, default: float) -> np.ndarray:
        if v is None:
            return np.full(shape, default)
        return to_numpy(v).astype(np.float64).reshape(shape)

    gamma = param(bn.gamma if bn.scale else None, 1.0)
    beta = param(bn.beta if bn.center else None, 0.0)
    mean, var = param(bn.moving_mean, 0.0), param(bn.moving_variance, 1.0)
    return (z - mean) / np.sqrt(var + float(bn.epsilon)) * gamma + beta


class _Twin:
    """`layer` re-made from its config in float64, with a bias and without its activation, run on given
    weights (a layer without a bias gets a zero one: adding 0.0 is exact)."""

    def __init__(self, layer: Any) -> None:
        import keras

        cfg = dict(layer.get_config())
        cfg["dtype"] = "float64"
        if "activation" in cfg:
            cfg["activation"] = "linear"
        self.n_bias = len(layer.weights) + (0 if layer.use_bias else 1)  # weights with a bias
        cfg["use_bias"] = True
        # TensorFlow has no float64 channels_first convolutions on the CPU; a Keras kernel's layout does not
        # depend on the data format, so the same layer runs channels_last on the transposed data
        self.first = cfg.get("data_format") == "channels_first"
        if self.first:
            cfg["data_format"] = "channels_last"
        with float64(), keras.device(DEVICE_NAMES["cpu"]):
            self.layer = type(layer).from_config(cfg)
        self.built = False

    def __call__(self, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        import keras

        weights = [np.asarray(w, np.float64) for w in weights]
        if self.first:
            x = np.moveaxis(x, 1, -1)
        with float64(), keras.device(DEVICE_NAMES["cpu"]), no_grad():
            xt = keras.ops.convert_to_tensor(x, dtype="float64")
            if not self.built:
                self.layer.build(tuple(xt.shape))
                self.built = True
            if len(weights) < self.n_bias:  # the bias is the last weight of every supported layer
                weights.append(np.zeros(tuple(self.layer.weights[-1].shape)))
            self.layer.set_weights(weights)
            out = to_numpy(self.layer(xt)).astype(np.float64)
        return np.moveaxis(out, -1, 1) if self.first else out


def _activation(layer: Any, z: np.ndarray) -> np.ndarray:
    """The layer's own activation applied to its float64 pre-activation output."""
    import keras

    act = layer.get_config().get("activation")
    if act in (None, "linear"):
        return z
    with float64(), keras.device(DEVICE_NAMES["cpu"]), no_grad():
        fn = keras.activations.get(act)
        return to_numpy(fn(keras.ops.convert_to_tensor(z, dtype="float64"))).astype(np.float64)
