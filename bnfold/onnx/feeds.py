"""Feeds for an ONNX model: its real inputs, their declared types and shapes, and the data to run."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper

from ..core.errors import BnfoldError
from ..core.options import InputSpec
from ..verify import inputs as inp


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _declared(vi: onnx.ValueInfoProto) -> tuple[Any, list[int | str | None]]:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise BnfoldError(f"input {vi.name!r} is not a tensor; pass --inputs FILE.npz")
    dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dt, dims


def make_feeds(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), npz: str | None = None,
               seed: int = 0, batches: int = 1) -> list[dict[str, np.ndarray]]:
    """`batches` feed dicts for the model: .npz data when given, else seeded random data."""
    ins = model_inputs(model)
    by_name = {s.name: s for s in specs}
    unknown = set(by_name) - {i.name for i in ins}
    if unknown:
        raise BnfoldError(f"--input names {sorted(unknown)} are not inputs of the model "
                          f"(inputs: {[i.name for i in ins]})")
    if npz:
        data = inp.load_npz(npz)
        missing = [i.name for i in ins if i.name not in data]
        if missing:
            raise BnfoldError(f"no data for inputs {missing}", npz)
        feeds = {}
        for i in ins:
            dt, dims = _declared(i)
            a = np.asarray(data[i.name])
            if a.size == 0:
                raise BnfoldError(f"array {i.name!r} has shape {list(a.shape)}: no elements, nothing to compare", npz)
            if dims and (a.ndim != len(dims) or any(isinstance(d, int) and d > 0 and d != n
                                                    for d, n in zip(dims, a.shape))):
                raise BnfoldError(f"array {i.name!r} has shape {list(a.shape)}, the model declares {dims}", npz)
            try:
                feeds[i.name] = a.astype(dt, copy=False)
            except (TypeError, ValueError):
                raise BnfoldError(f"array {i.name!r} ({a.dtype}) cannot be converted to {np.dtype(dt).name}",
                                  npz) from None
        return [feeds]
    rng = np.random.default_rng(seed)
    # A one-element bool input usually picks a branch (If): every combination of such flags (up to 16)
    # gets a batch of its own, so no branch goes unverified by chance of the seed.
    flags = [i.name for i in ins if _declared(i)[0] == np.bool_
             and all(isinstance(d, int) and d == 1 for d in _declared(i)[1])][:4]
    n = max(1, batches, 2 ** len(flags) if flags else 1)
    out = []
    for b in range(n):
        feeds = {}
        for i in ins:
            dt, dims = _declared(i)
            spec = by_name.get(i.name)
            if spec is not None and spec.dtype:
                dt = np.dtype(inp.np_dtype(spec.dtype))
            feeds[i.name] = inp.random_array(inp.resolve_shape(i.name, dims, by_name), dt, rng, i.name)
            if i.name in flags:
                feeds[i.name] = np.full(feeds[i.name].shape, bool((b >> flags.index(i.name)) & 1))
        out.append(feeds)
    return out
