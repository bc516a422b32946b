"""Which layer outputs of two Keras models mean the same thing, and the first one that diverges.

Every layer both models compute under the same name (same class, or an Identity standing in for a
BatchNorm) is compared, in the original's call order, with the same noise runs as the outputs: a
wrong fold whose effect a ReLU masks on these inputs still fails, at the layer a user must look at.
A layer a BatchNorm was folded into carries the BN's output: it is compared against the original's
BN output (for bnfold's own folds, known from the decisions; for a candidate folded by another tool,
when the BNs after the layer are gone from it, either value is accepted - a real error matches neither).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core.decisions import Decision
from ..verify import compare
from .probes import BN_CLASS, Capture


def folded_after(decisions: list[Decision] | None) -> dict[str, set[str]] | None:
    """Layer path -> paths of the BNs folded into it from behind (None when the decisions are unknown)."""
    if decisions is None:
        return None
    out: dict[str, set[str]] = {}
    for d in decisions:
        if d.is_folded and d.direction == "after" and d.producer:
            out.setdefault(d.producer, set()).add(d.bn)
    return out


def _comparable(ref_cls: str, cand_cls: str) -> bool:
    return ref_cls == cand_cls or (ref_cls == BN_CLASS and cand_cls == "Identity")


def _references(key: str, ref: Capture, cand: Capture, after: dict[str, set[str]] | None) -> list[str]:
    """Keys of the original's values that the candidate's `key` may equal, the likeliest last."""
    chain = ref.carried(key)
    if after is not None:
        mine = after.get(ref.paths[key], set())
        carried = [k for k in _prefix(chain, lambda k: ref.paths[k] in mine)]
        return [carried[-1]] if carried else [key]
    gone = _prefix(chain, lambda k: cand.classes.get(k) != BN_CLASS)
    return [key, gone[-1]] if gone else [key]


def _prefix(chain: list[str], keep: Any) -> list[str]:
    out = []
    for k in chain:
        if not keep(k):
            break
        out.append(k)
    return out


def _floating(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


def first_divergence(ref: Capture, cand: Capture, noise: list[Capture], atol: Any, rtol: float | None,
                     after: dict[str, set[str]] | None, device: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the first layer whose output diverges beyond tolerance or None, notes: how many were compared,
    and the folds another tool made that were recognised)."""
    user_atol = None if isinstance(atol, Mapping) else atol
    auto = atol is None and rtol is None
    compared, notes = 0, {}
    for key, r in ref.values.items():
        c = cand.values.get(key)
        if c is None or not _comparable(ref.classes[key], cand.classes.get(key, "")):
            continue
        verdict = None
        for rk in _references(key, ref, cand, after):
            rv = ref.values[rk]
            # discrete values (indices, masks) flip when near-equal inputs swap: the outputs judge those
            if rv.shape != c.shape or not _floating(rv) or not _floating(c):
                continue
            ns = [n.values[rk] for n in noise if rk in n.values and n.values[rk].shape == rv.shape]
            if auto and compare.quick_pass(rv, c, ns):
                ok, st = True, {}
            else:
                ok, per = compare.judge({key: rv}, {key: c}, [{key: n} for n in ns], atol=user_atol, rtol=rtol)
                st = per[key]
            verdict = (ok, st, rk)
            if ok:
                break
        if verdict is None:
            continue
        compared += 1
        ok, st, rk = verdict
        if ok:
            if rk != key and after is None:
                notes.setdefault("folds_in_candidate", []).append({"layer": key, "carries": rk})
            continue
        div = {"layer": key, "module": cand.classes[key], "max_abs": st.get("max_abs"), "atol": st.get("atol"),
               "noise_max_abs": st.get("noise_max_abs"), "device": device}
        if rk != key:
            div["compared_with"] = f"the original's {rk} (the BatchNorm folded into {key})"
        notes["intermediates_compared"] = compared
        return div, notes
    notes["intermediates_compared"] = compared
    return None, notes
