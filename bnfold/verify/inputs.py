"""Feeds for verification: seeded random data by declared dtype and shape, user shapes, or .npz data."""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ..core.errors import BnfoldError
from ..core.options import InputSpec

MAX_ELEMENTS = 1 << 28  # one input of more than 268M elements (1 GiB of float32) is refused
INT_RANGE = (0, 4)       # small non-negative ints are valid indices/sizes for most integer inputs


_SPEC = re.compile(r"^(?P<name>.+?):(?P<shape>\[?[0-9x,\s]*\]?)(?::(?P<dtype>[a-z0-9]+))?$")


def parse_input_spec(text: str) -> InputSpec:
    """Parse 'name:1x3x224x224', 'name:[1,3,224,224]:float16' or 'name:1,3,224,224'."""
    m = _SPEC.match(text.strip())
    if not m:
        raise BnfoldError(f"--input {text!r}: expected NAME:SHAPE[:DTYPE], e.g. input:1x3x224x224:float32")
    raw = m.group("shape").strip("[] ")
    parts = [p for p in re.split(r"[x,\s]+", raw) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BnfoldError(f"--input {text!r}: shape must be integers") from None
    if any(d < 0 for d in shape):
        raise BnfoldError(f"--input {text!r}: negative dimension")
    dtype = m.group("dtype")
    if dtype is not None:
        try:
            np.dtype(np_dtype(dtype))
        except TypeError:
            raise BnfoldError(f"--input {text!r}: unknown dtype {dtype!r}") from None
    return InputSpec(m.group("name"), shape, dtype)


def np_dtype(name: str) -> Any:
    if name in ("bfloat16", "bf16"):
        import ml_dtypes
        return ml_dtypes.bfloat16
    return {"fp32": "float32", "fp16": "float16", "fp64": "float64"}.get(name, name)


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Read user data from an .npz file (a dict of input name -> array)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise BnfoldError("no such file", path) from None
    except Exception as e:  # noqa: BLE001 - any unreadable npz is the user's input problem
        raise BnfoldError(f"cannot read inputs: {e}", path) from None


def random_array(shape: tuple[int, ...], dtype: Any, rng: np.random.Generator, name: str = "") -> np.ndarray:
    """Seeded data for one input: normal floats, small ints, random bools."""
    n = math.prod(int(d) for d in shape) if shape else 1  # Python ints: no wrap-around at 2**63
    if n == 0:
        raise BnfoldError(f"input {name!r} of shape {list(shape)} has no elements: nothing would be compared; "
                          f"give a shape with --input {name}:SHAPE")
    if n > MAX_ELEMENTS:
        raise BnfoldError(f"input {name!r} of shape {list(shape)} has {n:,} elements; give a smaller shape "
                          f"with --input {name}:SHAPE")
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if dt.kind in "iu":
        return rng.integers(*INT_RANGE, size=shape).astype(dt)
    if dt.kind == "f" or dt.name == "bfloat16":
        return rng.standard_normal(size=shape).astype(np.float32).astype(dt)
    raise BnfoldError(f"input {name!r} has dtype {dt.name}, which bnfold cannot generate; pass --inputs FILE.npz")


# Dynamic dimensions: the leading (batch) axis becomes 2, every other one SIZE, never 1 (a 3x3 kernel on
# a 1x1 image sees only its centre, and a flipped kernel would pass). A dim_param seen once keeps its
# value everywhere. When the model cannot run at SIZE (a kernel or pooling window larger than the input),
# the verifier tries LARGER sizes in turn.
BATCH = 2
SIZE = 64
LARGER = (128, 224, 320)


def resolve_shape(name: str, declared: list[int | str | None], specs: dict[str, InputSpec], size: int = SIZE,
                  named: dict[str, int] | None = None) -> tuple[tuple[int, ...], str]:
    """The concrete shape for an input and how it was chosen: the user's --input, the declared fixed
    dims, dynamic ones defaulted (batch BATCH, others `size`; `named` keeps one value per dim_param)."""
    if name in specs and specs[name].shape:
        user = specs[name].shape
        if declared and len(user) != len(declared):
            raise BnfoldError(f"--input {name}: shape {list(user)} has rank {len(user)}, the model declares rank "
                              f"{len(declared)} {declared}")
        for u, d in zip(user, declared):
            if isinstance(d, int) and d > 0 and u != d:
                raise BnfoldError(f"--input {name}: dimension {u} conflicts with the model's fixed {d}")
        return tuple(user), "shape from --input"
    named = {} if named is None else named
    shape, notes = [], []
    for axis, d in enumerate(declared):
        if isinstance(d, int) and d > 0:
            shape.append(d)
            continue
        if isinstance(d, str) and d in named:
            value = named[d]
        else:
            value = BATCH if axis == 0 and len(declared) > 1 else size
            if isinstance(d, str):
                named[d] = value
        shape.append(value)
        notes.append(f"{d if isinstance(d, str) else f'axis {axis}'}={value}")
    how = "declared shape" if not notes else "dynamic dims defaulted: " + ", ".join(notes)
    return tuple(shape), how


def save_npz(batches: list[dict[str, np.ndarray]], path: str) -> None:
    """Write the exact feeds as an .npz that --inputs reads back: batch 0 under each input's name,
    batch k > 0 under NAME@k."""
    from ..core.files import atomic_write
    arrays = {(name if k == 0 else f"{name}@{k}"): a for k, feeds in enumerate(batches) for name, a in feeds.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def npz_batches(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The batches of an .npz read by load_npz (see save_npz: NAME, NAME@1, NAME@2...)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for key, a in data.items():
        name, sep, k = key.rpartition("@")
        if sep and k.isdigit() and int(k) > 0:
            out.setdefault(int(k), {})[name] = a
        else:
            out.setdefault(0, {})[key] = a
    return [out[k] for k in sorted(out)]
