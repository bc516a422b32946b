"""--bench: what a fold buys at run time, measured the way the model is deployed.

Both the original and the folded model run on onnxruntime with every graph optimisation on
(ORT_ENABLE_ALL, the deployment default, which already fuses many Conv+BatchNorm pairs of the
original itself), on the same feeds, on each provider. Runs alternate between the two models so a
machine that speeds up or slows down during the measurement affects both alike; the median of the
timed runs is reported, with the speed-up original / folded.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from ..core.errors import BnfoldError
from .ondisk import loaded, over_two_gb
from .runtime import availability

WARMUP = 2
MIN_RUNS, MAX_RUNS = 5, 200


def _session(model: onnx.ModelProto | str, provider: str, label: str) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if isinstance(model, str):
        src: str | bytes = model  # a file: onnxruntime reads its external data itself
    elif over_two_gb(model):
        raise BnfoldError(f"the {label} is over 2 GB and not written to a file: it cannot be timed from memory")
    else:
        src = loaded(model).SerializeToString()
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(src, so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many types for one meaning
        raise BnfoldError(f"onnxruntime cannot load the {label} for timing: {str(e).splitlines()[0][:200]}") from None


def _once(session: Any, feeds: Mapping[str, np.ndarray]) -> float:
    t = time.perf_counter()
    session.run(None, dict(feeds))
    return time.perf_counter() - t


def latency(original: onnx.ModelProto | str, folded: onnx.ModelProto | str, feeds: Mapping[str, np.ndarray],
            providers: Sequence[str], budget_s: float = 1.0) -> dict[str, Any]:
    """Per provider: median latency (ms) of the original and the folded model, the speed-up and the
    number of timed runs; a provider that cannot run says why."""
    out: dict[str, Any] = {}
    for name in providers:
        ok, why = availability(name)
        if not ok:
            out[name] = {"ran": False, "why": why}
            continue
        try:
            a, b = _session(original, name, "original"), _session(folded, name, "folded model")
            for _ in range(WARMUP):
                _once(a, feeds), _once(b, feeds)
            pair = _once(a, feeds) + _once(b, feeds)
            runs = int(min(MAX_RUNS, max(MIN_RUNS, budget_s / max(pair, 1e-6))))
            ta, tb = [], []
            for _ in range(runs):
                ta.append(_once(a, feeds))
                tb.append(_once(b, feeds))
        except BnfoldError as e:
            out[name] = {"ran": False, "why": str(e)}
            continue
        except Exception as e:  # noqa: BLE001 - a run that fails here was verified already: say so, go on
            out[name] = {"ran": False, "why": f"onnxruntime failed to run: {str(e).splitlines()[0][:200]}"}
            continue
        ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        out[name] = {"ran": True, "original_ms": ma, "folded_ms": mb, "speedup": ma / mb if mb > 0 else None,
                     "runs": runs, "optimization": "ORT_ENABLE_ALL"}
    return out


def bench_feeds(model: onnx.ModelProto, opts: Any, verified: Mapping[str, Mapping[str, Any]] | None) -> dict:
    """One batch of feeds of the shapes verification used (so a model whose dynamic dimensions had to be
    enlarged runs), the user's own data when given."""
    from ..core.options import InputSpec
    from .feeds import plan_feeds
    specs = tuple(opts.input_specs)
    if verified and not opts.inputs_npz:
        specs = tuple(InputSpec(n, tuple(int(x) for x in d["shape"]), d.get("dtype"))
                      for n, d in verified.items() if isinstance(d.get("shape"), list))
    return plan_feeds(model, specs, opts.inputs_npz, opts.seed, 1).batches[0]


def providers_for(requested: Sequence[str] | None) -> list[str]:
    """The providers to time when verification did not say which ran: the requested ones, or CPU and CUDA."""
    from .runtime import DEFAULT_ORDER, provider_name
    return [provider_name(p) for p in requested] if requested else list(DEFAULT_ORDER[:2])
