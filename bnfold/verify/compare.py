"""Comparing outputs with a tolerance derived from the model's own numeric noise.

The noise of a model is how much its outputs move when every weight is nudged by about one unit in
the last place of its dtype (a rounding-sized perturbation, see `perturbation_eps`): the reference is
the unfolded original, the noise run is the same original with nudged weights, on the same provider.
A candidate passes an output when its max |candidate - reference| is at most
    atol = max(NOISE_MULTIPLE * noise_max_abs, FLOOR_ULPS * eps(dtype) * max|reference|)
or the user's --atol/--rtol. A non-finite candidate value where the reference is finite always fails.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core.errors import BnfoldError

NOISE_MULTIPLE = 10.0
FLOOR_ULPS = 4.0


def unit_roundoff(dtype: Any) -> float:
    """Machine epsilon of a float dtype (bf16 included); 0 for non-float outputs (exact match)."""
    dt = np.dtype(dtype)
    if dt.name == "bfloat16":
        return 2.0 ** -7
    if dt.kind != "f":
        return 0.0
    return float(np.finfo(dt).eps)


def perturbation_eps(dtype: Any) -> float:
    """Relative size of the nudge used to measure noise for weights of `dtype` (one ulp)."""
    return unit_roundoff(dtype)


def perturb(arr: np.ndarray, rng: np.random.Generator, eps: float | None = None) -> np.ndarray:
    """Return `arr` with every element moved by about `eps` relative (default: one ulp of its dtype), up or
    down at random, in float64 and rounded once to the array's dtype. An element moves by at least one
    ulp of its dtype whenever `eps` is at least that ulp: a nudge that rounds back to the same value
    would leave a weight (a whole channel, for a small BatchNorm) out of the noise estimate."""
    e = perturbation_eps(arr.dtype) if eps is None else eps
    a = np.asarray(arr).reshape(-1)
    # one fair random bit per element, eight to a drawn byte (a draw per element took half the time)
    bits = rng.integers(0, 256, size=(a.size + 7) // 8, dtype=np.uint8)
    y = np.empty_like(a)
    # float32 times a float32 factor is the float64 product rounded once to float32 (a product of two 24-bit
    # significands is exact in float64): where 1 +- e are float32 values, no float64 temporaries are needed
    ft = np.dtype(np.float32 if a.dtype == np.float32 and all(float(np.float32(f)) == f for f in (1.0 + e, 1.0 - e))
                  else np.float64)
    # the factor of each element, 1 - e + up * 2e: one multiply-add (np.where took most of the time), used
    # where it gives exactly 1 - e and 1 + e
    step, base = ft.type(2.0 * e), ft.type(1.0 - e)
    exact = float(step + base) == 1.0 + e and float(base) == 1.0 - e
    factor = np.empty(min(_CHUNK, a.size), ft)
    for lo in range(0, a.size, _CHUNK):  # in slices that stay in the cache: big float64 temporaries cost
        hi = min(lo + _CHUNK, a.size)     # more in page faults than in arithmetic
        up = np.unpackbits(bits[lo // 8:(hi + 7) // 8], count=hi - lo).view(np.bool_)
        f = factor[:hi - lo]
        if exact:
            np.multiply(up, step, out=f, dtype=ft)
            f += base
        else:
            f[...] = np.where(up, 1.0 + e, 1.0 - e)
        if ft == a.dtype:
            np.multiply(a[lo:hi], f, out=y[lo:hi])
        else:
            x = a[lo:hi].astype(np.float64)
            np.multiply(x, f, out=x)  # x * (1 + sign * e) in float64
            y[lo:hi] = x  # rounded once to the array's dtype
        if e >= perturbation_eps(arr.dtype) and np.dtype(arr.dtype).kind == "f":
            same = np.flatnonzero(y[lo:hi] == a[lo:hi])  # few: zeros, and values just above a power of two
            if same.size:
                xs = a[lo:hi][same]
                stuck = same[np.isfinite(xs) & (xs != 0)]
                if stuck.size:  # e.g. just above a power of two, one ulp relative is less than one ulp there
                    toward = np.where(up[stuck], np.inf, -np.inf).astype(a.dtype)
                    y[lo + stuck] = np.nextafter(a[lo + stuck], toward)
    return y.reshape(np.shape(arr))


_CHUNK = 1 << 16  # elements (a multiple of 8: each slice starts on a byte of the random bits)


def stats(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """max/mean/p99 absolute error and max relative error of cand against ref (finite parts)."""
    r = np.asarray(ref, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if r.shape != c.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf"), "p99_abs": float("inf")}
    if r.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mean_abs": 0.0, "p99_abs": 0.0}
    both = np.isfinite(r) & np.isfinite(c)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(np.where(both, c - r, 0.0))
    same_nonfinite = (~both) & ((r == c) | (np.isnan(r) & np.isnan(c)))
    bad = ~both & ~same_nonfinite
    if bad.any():
        return {"max_abs": float("inf"), "max_rel": float("inf"), "mean_abs": float("inf"), "p99_abs": float("inf"),
                "non_finite": int(bad.sum())}
    scale = np.abs(np.where(both, r, 0.0))
    tiny = max(float(scale.max()) * 1e-6, 1e-30)
    return {
        "max_abs": float(d.max()),
        "max_rel": float((d / np.maximum(scale, tiny)).max()),
        "mean_abs": float(d.mean()),
        "p99_abs": float(np.quantile(d, 0.99)),
    }


def quick_pass(ref: np.ndarray, cand: np.ndarray, noise: list[np.ndarray]) -> bool:
    """True when `cand` surely passes the automatic tolerance against `ref` (max-abs only, no
    quantiles): the cheap test for the hundreds of intermediate tensors of a deep net. False means
    "look closer with judge()", not "failed"."""
    m = quick_measure(ref, cand, noise)
    # a little under the judge's tolerance, so float32 subtraction here never decides a close call
    return m is not None and m[0] <= 0.9 * m[1]


def quick_measure(ref: np.ndarray, cand: np.ndarray, noise: list[np.ndarray]) -> tuple[float, float] | None:
    """(max |cand - ref|, automatic tolerance) computed cheaply in the tensor's own dtype, or None when
    that cannot be done (shapes or dtypes differ, non-finite values): judge() must look instead."""
    if ref.shape != cand.shape or ref.dtype.kind != "f" or cand.dtype != ref.dtype:
        return None
    if not ref.size:
        return 0.0, 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        buf = np.subtract(cand, ref)  # one temporary, reused: max |a| is max(max a, -min a), NaN if any is
        d = _max_abs(buf)
        if not np.isfinite(d):
            return None
        scale = _max_abs(ref)
        nmax = 0.0
        for n in noise:
            if n.shape == ref.shape:
                reuse = isinstance(buf, np.ndarray) and buf.ndim and n.dtype == ref.dtype
                v = _max_abs(np.subtract(n, ref, out=buf) if reuse else np.subtract(n, ref))
                if np.isfinite(v):
                    nmax = max(nmax, v)
    if not np.isfinite(scale):
        return None
    return d, max(NOISE_MULTIPLE * nmax, FLOOR_ULPS * unit_roundoff(ref.dtype) * scale)


def _max_abs(a: np.ndarray) -> float:
    hi, lo = float(a.max()), float(a.min())
    return hi if hi != hi else max(hi, -lo)  # a NaN anywhere is the answer (both ends are NaN then)


def judge(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
          noise_runs: list[Mapping[str, np.ndarray]], atol: float | Mapping[str, float] | None = None,
          rtol: float | None = None, floor_multiplier: float = 1.0,
          roundoff: float | None = None) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Compare every output of `candidate` with `reference`. Returns (passed, per-output dict).

    `roundoff`: the unit roundoff of the coarsest arithmetic the model computes in, when coarser than
    its outputs' dtype (a mixed-precision model's float16 layers behind a float32 output): whether the
    tolerance is small against the values is judged at that precision, not the outputs' dtype.

    `noise_runs` are outputs of the reference model with nudged weights (or of another execution
    path); the largest deviation among them is the noise. `atol` may be global or per output name;
    when neither atol nor rtol is given the tolerance is derived (how = "auto").
    """
    passed = True
    out: dict[str, dict[str, Any]] = {}
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if name not in candidate:
            out[name] = {"passed": False, "verdict": "failed", "why": "missing in candidate"}
            passed = False
            continue
        cand = np.asarray(candidate[name])
        s = stats(ref, cand)
        r64 = np.asarray(ref, np.float64)
        finite = r64[np.isfinite(r64)]
        ref_max = float(np.abs(finite).max()) if finite.size else 0.0
        noise = 0.0
        for run in noise_runs:
            if name in run:
                ns = stats(ref, np.asarray(run[name]))
                if np.isfinite(ns["max_abs"]):
                    noise = max(noise, ns["max_abs"])
        user_atol = atol.get(name) if isinstance(atol, Mapping) else atol
        if user_atol is None and rtol is None:
            floor = FLOOR_ULPS * floor_multiplier * unit_roundoff(ref.dtype) * ref_max
            tol_abs = max(NOISE_MULTIPLE * noise, floor)
            ok = s["max_abs"] <= tol_abs
            how = "auto"
            tol_rel = 0.0
        else:
            tol_abs = float(user_atol or 0.0)
            tol_rel = float(rtol or 0.0)
            d = np.abs(np.asarray(cand, np.float64) - r64) if ref.shape == cand.shape else None
            if d is None or "non_finite" in s:
                ok = False
            else:
                with np.errstate(invalid="ignore"):
                    lim = tol_abs + tol_rel * np.abs(r64)
                    ok = bool(np.all((d <= lim) | (np.isfinite(r64) == False) & (r64 == np.asarray(cand, np.float64))))  # noqa: E712
            how = "user"
        if ref.dtype.kind in "iub" and user_atol is None and rtol is None:
            ok = s["max_abs"] == 0.0  # integers and booleans: equal or not
            tol_abs, how = 0.0, "exact"
        entry: dict[str, Any] = dict(s)
        entry.update({"noise_max_abs": noise, "atol": tol_abs, "rtol": tol_rel, "how": how,
                      "needed_atol": s["max_abs"], "ref_max_abs": ref_max, "passed": bool(ok)})
        if ref.size and not finite.size and (ref.dtype.kind in "fc" or ref.dtype.name == "bfloat16"):
            entry["nothing_finite"] = True  # NaN == NaN everywhere: this output proves nothing
        # bit-identical values need no tolerance: a large one proves nothing only where it was needed
        loose = s["max_abs"] > 0 or "non_finite" in s
        why = unproven(ref, finite, ref_max, tol_abs if loose else 0.0, tol_rel if loose else 0.0,
                       roundoff) if ok else None
        entry["verdict"] = "failed" if not ok else "inconclusive" if why else "passed"
        if why:
            entry["inconclusive"] = why
        out[name] = entry
        passed = passed and bool(ok)
    return passed, out


# A tolerance of 1% of the largest reference value or more (64 ulp for 16-bit floats, whose own noise is
# that large) proves nothing about the values.
SWAMPED = 0.01
SWAMPED_ULPS = 64.0


def unproven(ref: np.ndarray, finite: np.ndarray, ref_max: float, atol: float, rtol: float,
             roundoff: float | None = None) -> str | None:
    """Why agreement on this tensor proves nothing (empty, all zero, nothing finite, tolerance as large as
    the values), or None when it is evidence."""
    floating = ref.dtype.kind in "fc" or ref.dtype.name == "bfloat16"
    if ref.size == 0:
        return "empty in the original (no elements: nothing to compare, e.g. no detections)"
    if floating and not finite.size:
        return "no finite value in the original"
    if floating and ref_max == 0.0:
        return "all zero in the original"
    limit = max(SWAMPED, SWAMPED_ULPS * max(unit_roundoff(ref.dtype), roundoff or 0.0))
    if floating and (atol >= limit * ref_max or rtol >= limit):
        return (f"the tolerance (atol {atol:.3g}{f', rtol {rtol:.3g}' if rtol else ''}) is not small against the "
                f"values (max |reference| {ref_max:.3g})")
    return None


def require_evidence(per_output: Mapping[str, Mapping[str, Any]]) -> None:
    """BnfoldError when no output had a finite reference value: equal NaNs everywhere prove nothing."""
    if per_output and all(st.get("nothing_finite") for st in per_output.values()):
        raise BnfoldError("the original gives no finite output value on these inputs, so nothing can be compared; "
                          "use other --inputs")


def outputs_only_culprit(outs: dict[str, dict[str, Any]], onnx_name: dict[str, str], provider: str) -> dict[str, Any]:
    """The first failing output, for models that share no tensor names to search upstream of it."""
    name, st = next((k, v) for k, v in outs.items() if not v.get("passed"))
    return {"tensor": onnx_name.get(name, name), "node": None, "op": "graph output", "provider": provider,
            "max_abs": st.get("max_abs"), "atol": st.get("atol"),
            "why": "the two models share no intermediate tensor names: the first failing output is named"}
