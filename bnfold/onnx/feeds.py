"""Feeds for an ONNX model: its real inputs, their declared types and shapes, and the data to run."""
from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Feeds:
    """The batches an ONNX model is verified on, and how each input was chosen (for the report)."""

    batches: list[dict[str, np.ndarray]]
    doc: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, dtype, how
    defaulted: bool = False  # some dynamic dimension was given a default size (a larger one may be tried)


def make_feeds(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), npz: str | None = None,
               seed: int = 0, batches: int = 1) -> list[dict[str, np.ndarray]]:
    """`batches` feed dicts for the model: .npz data when given, else seeded random data."""
    return plan_feeds(model, specs, npz, seed, batches).batches


def plan_feeds(model: onnx.ModelProto, specs: Sequence[InputSpec] = (), npz: str | None = None, seed: int = 0,
               batches: int = 1, size: int = inp.SIZE) -> Feeds:
    """Feeds for the model: the user's .npz data, else seeded random data of the declared dtypes and shapes,
    dynamic dimensions from --input or defaulted (batch 2, others `size`, never 1)."""
    ins = model_inputs(model)
    by_name = {s.name: s for s in specs}
    unknown = set(by_name) - {i.name for i in ins}
    if unknown:
        raise BnfoldError(f"--input names {sorted(unknown)} are not inputs of the model "
                          f"(inputs: {[i.name for i in ins]})")
    if npz:
        return _from_npz(ins, npz)
    rng = np.random.default_rng(seed)
    # A one-element bool input usually picks a branch (If): every combination of such flags (up to 16)
    # gets a batch of its own, so no branch goes unverified by chance of the seed.
    flags = [i.name for i in ins if _declared(i)[0] == np.bool_
             and all(isinstance(d, int) and d == 1 for d in _declared(i)[1])][:4]
    n = max(1, batches, 2 ** len(flags) if flags else 1)
    named: dict[str, int] = {}
    shapes = {}
    doc: dict[str, dict[str, Any]] = {}
    defaulted = False
    for i in ins:
        dt, dims = _declared(i)
        spec = by_name.get(i.name)
        if spec is not None and spec.dtype:
            dt = np.dtype(inp.np_dtype(spec.dtype))
        shape, how = inp.resolve_shape(i.name, dims, by_name, size, named)
        defaulted = defaulted or how.startswith("dynamic")
        shapes[i.name] = (shape, dt)
        what = ("every combination of the flag, one batch each" if i.name in flags else
                "random normal" if np.dtype(dt).kind == "f" or np.dtype(dt).name == "bfloat16" else
                f"random in [{inp.INT_RANGE[0]}, {inp.INT_RANGE[1]})" if np.dtype(dt).kind in "iu" else "random")
        doc[i.name] = {"shape": list(shape), "dtype": np.dtype(dt).name, "how": f"{what} (seed {seed}); {how}"}
    out = []
    for b in range(n):
        feeds = {}
        for i in ins:
            shape, dt = shapes[i.name]
            feeds[i.name] = inp.random_array(shape, dt, rng, i.name)
            if i.name in flags:
                feeds[i.name] = np.full(feeds[i.name].shape, bool((b >> flags.index(i.name)) & 1))
        out.append(feeds)
    if n > 1:
        for d in doc.values():
            d["batches"] = n
    return Feeds(out, doc, defaulted)


def _from_npz(ins: list[onnx.ValueInfoProto], npz: str) -> Feeds:
    batches = inp.npz_batches(inp.load_npz(npz))
    out = []
    for data in batches:
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
        out.append(feeds)
    doc = {i.name: {"shape": list(out[0][i.name].shape), "dtype": out[0][i.name].dtype.name,
                    "how": f"from {npz}" + (f" ({len(out)} batches)" if len(out) > 1 else "")} for i in ins}
    return Feeds(out, doc)
