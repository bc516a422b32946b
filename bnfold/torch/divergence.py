"""Which module outputs a PyTorch comparison judges, against which values of the original, and whom to blame.

- Every submodule call both models make at the same module path, with the same class and as often, is
  compared (a ReLU must not hide an error), in the original's call order; the first that diverges
  beyond tolerance fails the verification even when the outputs agree.
- A fold moves values: the layer a BN was folded into carries the BN's output (Conv->BN->BN: the last
  one's), and a module that handed on a BN's output object now hands on the BN's input when the BN was
  folded into the layer after it. With the fold's decisions the value to expect is known; without them
  (`bnfold check` of a model folded by another tool) the module may carry any of those values.
- Tolerance: the same rule as compare.judge, over every batch at once (maxima kept per batch, so only
  one batch's module outputs are in memory at a time): max |cand - ref| <= max(NOISE_MULTIPLE x noise,
  FLOOR_ULPS ulp x max |ref|), noise = the noise runs' largest deviation from the reference.
- Amplified rounding: a module that holds no tensors of its own and whose code is the same in both
  models (same class, same plain attributes), fed with values that agree and whose every submodule call
  agrees, cannot compute a different function; when its output still diverges, its own code amplified
  rounding-sized differences (a
  saturated sigmoid whose 0/1 flips at another element than in the noise runs, say). Such a module is
  "unstable", like the order flips of discrete ops in the ONNX verifier: it is noted, not decisive, and
  so is everything computed from it (the outputs are always judged, and each fold has its own proof).
- Blame: a first divergence at a layer that folds were made into, or where a folded BN's value is
  expected, is those folds' fault.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core.decisions import Decision
from ..verify import compare
from .taps import INPUT, Key, Taps

Target = tuple[str, Key]  # ("out", call) or ("in", BN call): a value recorded in the original's run


class Intermediates:
    """Module outputs judged over every batch; `add` one batch's taps at a time."""

    def __init__(self, decisions: list[Decision] | None, atol: Any = None, rtol: float | None = None) -> None:
        self.decisions = decisions
        self.after = {d.bn for d in decisions or () if d.is_folded and d.direction == "after"}
        self.before = {d.bn for d in decisions or () if d.is_folded and d.direction == "before"}  # a merge moves no value
        self.atol = None if isinstance(atol, Mapping) else atol
        self.rtol = rtol
        self.auto = self.atol is None and rtol is None
        self.order: list[Key] = []
        self.targets: dict[Key, list[Target]] = {}
        self.classes: dict[str, str] = {}
        self.tally: dict[tuple[Key, Target], dict[str, Any]] = {}
        self.uncompared: dict[str, str] = {}
        self.folded_into: dict[Key, list[str]] = {}
        self.calls: list[Key] = []  # every call of the original, compared or not, in the order first seen
        self.sources: dict[Key, set[Key]] = {}
        self.direct: set[Key] = set()
        self.inside: dict[Key, list[Key]] = {}
        self.same_code: dict[str, bool] = {}
        self.unstable: list[dict[str, Any]] = []

    # -- one batch ---------------------------------------------------------------------------------
    def add(self, ref: Taps, cand: Taps, noise: list[Taps]) -> None:
        at = -1  # a call first made on a later batch (a branch a variant takes) joins after its predecessor
        for key in ref.order:
            if key in self.sources:
                at = self.calls.index(key)
            else:
                at += 1
                self.calls.insert(at, key)
                self.sources[key] = ref.sources.get(key, set())
                lo, hi = ref.window.get(key, (0, 0))
                self.inside[key] = ref.order[lo:hi]
                if key in ref.direct:
                    self.direct.add(key)
        for key in ref.order:
            path, k = key
            if key not in self.targets:
                if not self._comparable(ref, cand, path):
                    continue
                self.order.append(key)
                self.classes[path] = ref.classes.get(path, "")
                self.targets[key] = self._targets(ref, key)
                own, plain = ref.own.get(path, (True, ()))
                self.same_code[path] = not own and cand.own.get(path, (True, None)) == (False, plain)
            if key not in cand.values:
                continue
            for target in self.targets[key]:
                r = ref.value(target)
                if r is None:
                    continue
                ns = [n.value(target) for n in noise]
                self._add(key, target, r, cand.values[key], [v for v in ns if v is not None])

    def _comparable(self, ref: Taps, cand: Taps, path: str) -> bool:
        if not path or path not in ref.classes:
            return False  # the root (its output is compared as the outputs) or a functional BN call
        if (path, 0) in ref.of_params:
            return False  # it computes a weight from parameters (a parametrization): folds change those
        if cand.classes.get(path) != ref.classes[path]:
            return False  # not in the candidate, or another module there (a folded BN's Identity)
        if ref.calls[path] != cand.calls[path]:
            self.uncompared.setdefault(path, f"called {ref.calls[path]} times in the original and "
                                             f"{cand.calls[path]} in the candidate")
            return False
        return True

    def _targets(self, ref: Taps, key: Key) -> list[Target]:
        chain = ref.chain(key)
        alias = ref.bn_output_of.get(key)
        if self.decisions is None:  # anyone's fold: the module may carry any of the values a fold moves there
            out: list[Target] = [("out", key)] + [("out", b) for b in chain]
            return out + ([("in", alias)] if alias is not None else [])
        folded = 0
        while folded < len(chain) and ref.name_of(chain[folded]) in self.after:
            folded += 1
        names = [ref.name_of(b) for b in chain[:folded]]
        if alias is not None and ref.name_of(alias) in self.before:
            self.folded_into[key] = names + [ref.name_of(alias)]
            return [("in", alias)]
        if names:
            self.folded_into[key] = names
        if folded:
            return [("out", chain[folded - 1])]
        through = [d.bn for d in self.decisions if d.is_folded and d.direction == "after" and d.producer == key[0]]
        if through:  # folded through layout ops: the layer now carries the BN's output in its own layout,
            self.folded_into[key] = through  # a value no module of the original returns (the fold's proof
            self.uncompared.setdefault(key[0], "carries the output of " + ", ".join(repr(b) for b in through) +
                                       " in the layer's layout (folded through layout ops)")
            return []  # and the modules after it judge it)
        return [("out", key)]

    def _add(self, key: Key, target: Target, ref: list[np.ndarray], cand: list[np.ndarray],
             noise: list[list[np.ndarray]]) -> None:
        t = self.tally.setdefault((key, target), {"max_abs": 0.0, "noise": 0.0, "ref_max": 0.0, "bad": "",
                                                  "user_ok": True, "exact": False, "ulp": 0.0})
        if len(ref) != len(cand):
            t["bad"] = f"{len(cand)} output tensors where the original has {len(ref)}"
            return
        for i, (r, c) in enumerate(zip(ref, cand)):
            r, c = np.asarray(r), np.asarray(c)
            if r.shape != c.shape:
                t["bad"] = f"shape {list(c.shape)} where the original has {list(r.shape)}"
                return
            floating = r.dtype.kind in "fc" or r.dtype.name == "bfloat16"
            t["exact"] = t["exact"] or not floating
            t["ulp"] = max(t["ulp"], compare.unit_roundoff(r.dtype) if floating else 0.0)
            with np.errstate(invalid="ignore", over="ignore"):
                bad = self._add_one(t, i, r, c, noise)
            if bad:
                t["bad"] = bad
                return

    def _add_one(self, t: dict[str, Any], i: int, r: np.ndarray, c: np.ndarray, noise: list[list[np.ndarray]]) -> str:
        r64, c64 = r.astype(np.float64), c.astype(np.float64)
        both = np.isfinite(r64) & np.isfinite(c64)
        odd = ~both & ~((r64 == c64) | (np.isnan(r64) & np.isnan(c64)))
        if odd.any():
            return f"{int(odd.sum())} non-finite values where the original has others"
        if r.size:
            t["max_abs"] = max(t["max_abs"], float(np.abs(np.where(both, c64 - r64, 0.0)).max()))
            fin = np.isfinite(r64)
            t["ref_max"] = max(t["ref_max"], float(np.abs(np.where(fin, r64, 0.0)).max()))
            for n in noise:
                if i < len(n) and np.shape(n[i]) == r.shape:
                    n64 = np.asarray(n[i], np.float64)
                    ok = fin & np.isfinite(n64)
                    t["noise"] = max(t["noise"], float(np.abs(np.where(ok, n64 - r64, 0.0)).max()))
        if not self.auto:
            lim = (self.atol or 0.0) + (self.rtol or 0.0) * np.abs(r64)
            t["user_ok"] = t["user_ok"] and bool(np.all(np.where(both, np.abs(c64 - r64) <= lim, True)))
        return ""

    # -- the verdict -------------------------------------------------------------------------------
    def _verdict(self, t: dict[str, Any]) -> tuple[bool, float]:
        if t["bad"]:
            return False, 0.0
        if self.auto:
            if t["exact"] and t["ulp"] == 0.0:
                return t["max_abs"] == 0.0, 0.0
            atol = max(compare.NOISE_MULTIPLE * t["noise"], compare.FLOOR_ULPS * t["ulp"] * t["ref_max"])
            return t["max_abs"] <= atol, atol
        return t["user_ok"], float(self.atol or 0.0)

    def first_divergence(self, device: str) -> dict[str, Any] | None:
        """The earliest compared call (the original's order) that no acceptable value explains; unstable
        calls and those computed from them are noted in `self.unstable` instead."""
        agreed: set[Key] = {INPUT}
        tainted: set[Key] = set()
        self.unstable = []
        for key in self.calls:
            derived = any(s in tainted for s in self.sources.get(key, ())) or any(
                k in tainted for k in self.inside.get(key, ()))
            results = [(target, self.tally[(key, target)]) for target in self.targets.get(key, ())
                       if (key, target) in self.tally]
            if not results:  # not compared (a folded BN's slot, another class): its value follows its sources
                if derived:
                    tainted.add(key)
                continue
            good = [target for target, t in results if self._verdict(t)[0]]
            if good:
                agreed.update([key] + [other for kind, other in good if kind == "out"])
                continue
            # the value it came closest to is the one it was meant to carry
            target, t = min(results, key=lambda r: r[1]["max_abs"] / max(self._verdict(r[1])[1], 1e-300))
            atol = self._verdict(t)[1]
            if derived or (self.same_code.get(key[0]) and not t["bad"] and key in self.direct
                           and all(s in agreed for s in self.sources[key])
                           and all(k in agreed for k in self.inside[key])):
                tainted.update([key] + [other for kind, other in self.targets[key] if kind == "out"])
                self.unstable.append({"layer": key[0], "module": self.classes.get(key[0]), "max_abs": t["max_abs"],
                                      "atol": atol, "why": "computed from an unstable module's output" if derived else
                                      "tensor-free code fed with values that agree: amplified rounding"})
                continue
            div: dict[str, Any] = {"layer": key[0], "module": self.classes.get(key[0]), "device": device,
                                   "max_abs": t["max_abs"], "atol": atol, "noise_max_abs": t["noise"]}
            if key[1]:
                div["call"] = key[1]
            if t["bad"]:
                div.update(max_abs=float("inf"), why=t["bad"])
            if target != ("out", key):
                kind, other = target
                div["compared_with"] = (f"the original's {other[0]!r} output" if kind == "out" else
                                        f"the input of the original's {other[0]!r}")
            return div
        return None

    @property
    def compared(self) -> int:
        return len(self.order)

    def blame(self, div: dict[str, Any]) -> list[dict[str, Any]]:
        """The folds a first divergence is the fault of: those made into the diverging layer, and those
        whose value the diverging module was expected to carry."""
        if not div or self.decisions is None:
            return []
        key = (div["layer"], div.get("call", 0))
        names = list(self.folded_into.get(key, []))
        names += [d.bn for d in self.decisions if d.is_folded and d.producer == div["layer"] and d.bn not in names]
        why = (f"the end-to-end check diverges at {div['layer']!r} ({div.get('device')}): max abs "
               f"{div.get('max_abs', 0.0):.3g} > atol {div.get('atol', 0.0):.3g}")
        return [{"bn": n, "why": why, "max_abs": div.get("max_abs"), "bound": div.get("atol"), "layer": div["layer"]}
                for n in names]
