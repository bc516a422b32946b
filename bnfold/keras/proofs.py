"""Per-fold local proofs for Keras: each folded layer, original against folded, replayed in float64 on
the data the original saw.

A fold replaces a region (a BatchNorm before the layer, the layer, the BatchNorms after it) by the one
layer with new weights. The region's data input x is captured from the original's run on the first
verification batch. Then, in float64, with the backend's own layer implementation (the layer re-made
from its config with a float64 dtype, so padding, strides, groups and data formats are Keras' own):

    ref = the original region: the layer with its original weights, the BNs' affine maps from their
          own moving_mean / moving_variance / gamma / beta / epsilon,
    new = the folded layer with its weights as stored in the folded model,
    M   = the folded layer on |x| with every weight |w| (the magnitudes the weights' rounding scales),

and the fold is proven when |new - ref| <= (2u + 2^-36) M elementwise, u the unit roundoff of the
folded weights' dtype (2^-36 covers float64's own rounding over sums of up to 2^16 terms). A weight off
by one part in 1e4, a shifted bias, a wrong channel axis or a swapped group exceed it by orders of
magnitude; rounding cannot. The float64 replay of the original region must match Keras' own run of it
(the region's output captured from the original) within 1e-3 (M + |ref|), else there is no proof
rather than a false accusation.
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
HOW = "float64 replay of the folded layer and the original layer + BatchNorm(s) on captured data; bound 2 u M"


def prove(decisions: list[Decision], built: dict[int, Any],
          tensors: dict[int, np.ndarray] | None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Set `proof` on every folded decision; returns (counts, blame for the folds whose proof failed).

    `built` maps id(original layer) -> its layer in the folded model; `tensors` maps id(KerasTensor) of
    the original's graphs -> its value on the first batch (None: nothing could be captured)."""
    counts = {"proven": 0, "failed": 0, "not_run": 0}
    blame: list[dict[str, Any]] = []
    groups: dict[int, list[Decision]] = {}
    for d in decisions:
        if not d.is_folded:
            continue
        if d.site is None:
            d.proof = {"not_run": "the fold's place in the graph is unknown"}
        elif tensors is None:
            d.proof = {"not_run": "the original's layer outputs could not be captured (no recorded layer graph)"}
        else:
            groups.setdefault(id(d.site.layer), []).append(d)
    for group in groups.values():
        try:
            proof = _prove_layer(group, built, tensors or {})
        except Exception as e:  # noqa: BLE001 - a layer Keras cannot re-make in float64: no proof, said so
            proof = {"not_run": f"the region could not be replayed in float64 ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:160]})"}
        layer = group[0].site.layer.name
        for d in group:
            d.proof = dict(proof)
            if not proof.get("passed", True) and "not_run" not in proof:
                blame.append({"bn": d.bn, "why": f"its local proof failed: max abs {proof['max_abs']:.3g} > bound "
                                                  f"{proof['bound']:.3g} at {d.producer or layer!r}",
                              "max_abs": proof["max_abs"], "bound": proof["bound"], "layer": d.producer})
    for d in decisions:
        if d.is_folded and d.proof is not None:
            counts["not_run" if "not_run" in d.proof else "proven" if d.proof["passed"] else "failed"] += 1
    return counts, blame


def _prove_layer(group: list[Decision], built: dict[int, Any], tensors: dict[int, np.ndarray]) -> dict[str, Any]:
    sites = [d.site for d in group]
    layer = sites[0].layer
    before = [s for s in sites if s.direction == "before"]
    after = [s for s in sites if s.direction == "after"]
    x_t = before[0].bn_in if before else sites[0].layer_in
    y_t = after[-1].bn_out if after else sites[0].layer_out
    folded = built.get(id(layer))
    if folded is None:
        return {"not_run": f"{layer.name} has no counterpart in the folded model"}
    if id(x_t) not in tensors or id(y_t) not in tensors:
        return {"not_run": f"the data around {layer.name} was not captured (a graph branch the inputs do not reach)"}
    x = np.asarray(tensors[id(x_t)], np.float64)
    witness = np.asarray(tensors[id(y_t)], np.float64)
    new_w = [np.asarray(w) for w in folded.get_weights()]
    u = max(compare.unit_roundoff(w.dtype) for w in new_w if w.dtype.kind == "f" or w.dtype.name == "bfloat16")
    z = _bn(x, before[0].bn) if before else x
    z = _layer(layer, layer.get_weights(), z)
    for s in after:
        z = _bn(z, s.bn)
    ref = z
    new = _layer(folded, new_w, x)
    mag = _layer(folded, [np.abs(np.asarray(w, np.float64)) for w in new_w], np.abs(x))
    seen = ref if after else _activation(layer, ref)
    fine = np.isfinite(witness) & np.isfinite(seen)
    if witness.shape != seen.shape or np.any(np.abs(np.where(fine, seen - witness, 0.0)) > FAITHFUL * (mag + np.abs(ref))):
        return {"not_run": f"the float64 replay of the original {layer.name} disagrees with Keras' own run of it"}
    if ref.shape != new.shape:
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": f"shapes differ: {list(ref.shape)} vs {list(new.shape)}"}
    if not np.array_equal(np.isfinite(ref), np.isfinite(new)):
        return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "ratio": float("inf"), "how": HOW,
                "why": "non-finite values differ"}
    if not ref.size:
        return {"not_run": "the region's output is empty on the captured input"}
    both = np.isfinite(ref)
    diff = np.where(both, np.abs(new - ref), 0.0)
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


def _layer(layer: Any, weights: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """`layer` re-made from its config in float64 with `weights`, without its activation, on `x`."""
    import keras

    cfg = dict(layer.get_config())
    cfg["dtype"] = "float64"
    if "activation" in cfg:
        cfg["activation"] = "linear"
    with float64(), keras.device(DEVICE_NAMES["cpu"]), no_grad():
        twin = type(layer).from_config(cfg)
        xt = keras.ops.convert_to_tensor(x, dtype="float64")
        twin.build(tuple(xt.shape))
        twin.set_weights([np.asarray(w, np.float64) for w in weights])
        return to_numpy(twin(xt)).astype(np.float64)


def _activation(layer: Any, z: np.ndarray) -> np.ndarray:
    """The layer's own activation applied to its float64 pre-activation output."""
    import keras

    act = layer.get_config().get("activation")
    if act in (None, "linear"):
        return z
    with float64(), keras.device(DEVICE_NAMES["cpu"]), no_grad():
        fn = keras.activations.get(act)
        return to_numpy(fn(keras.ops.convert_to_tensor(z, dtype="float64"))).astype(np.float64)
