"""Is a loaded ONNX model sound? Tensor data against the dims it declares, and onnx's checker on the
file's bytes (load_onnx calls both)."""
from __future__ import annotations

import math

import onnx

from ..core.errors import BnfoldError
from ..core.hold import note
from .protos import itemsize, raw_bytes, tensor_groups, typed_values


def passes_checker(data: bytes) -> bool:
    """Does onnx's checker (no shape inference) accept the serialised model `data`?"""
    try:
        onnx.checker.check_model(data, full_check=False)
    except Exception:  # noqa: BLE001 - the caller's structure check gives the verdict and the message
        return False
    return True


_KNOWN = frozenset(onnx.TensorProto.DataType.values())
_EXACT_RAW = 8 << 20  # reading raw_data's length copies the bytes: bigger tensors are checked when read


def check_sizes(model: onnx.ModelProto, path: str, size: int | None) -> bool:
    """Each tensor holds as much data as its dims declare (a mismatch would crash, or allocate what the
    dims claim, later); on-disk tensors are checked against their files when read or left there. A
    tensor over _EXACT_RAW bytes is only checked against `size`, the file's, here (ondisk.tensor_value
    checks it exactly). Returns whether some tensor lives in a data file (io.load_onnx then reads it)."""
    external, found = onnx.TensorProto.EXTERNAL, False
    items, prod, exact = _ITEMS, math.prod, _EXACT_RAW  # (looked up in place: a model may hold 100k tensors)
    last_type = item = None  # (most tensors share their neighbour's type: no lookup then)
    elements = 0  # of the initializers beforeafter counts (the count of the model as loaded reads it: core/hold.py)
    for group, counted in tensor_groups(model):
        for t in group:  # ~1 us each
            dims = t.dims[:]  # (a list: iterating the repeated field itself ends in a raised IndexError)
            if dims and min(dims) < 0:
                raise BnfoldError(f"tensor {t.name!r} has a negative dimension {dims}", path)
            n = prod(dims)
            if counted:
                elements += n
            dt = t.data_type
            if dt != last_type:
                item = items.get(dt)
                if item is None:
                    item = items[dt] = itemsize(dt)
                last_type = dt
            if t.data_location == external:
                found = True
                if item:
                    continue  # checked when read
            if item > 0:
                want = n * item
                if 0 < want <= exact and len(t.raw_data) == want:
                    continue  # the common case: raw data that fills its dims
            _check_tensor(t, dims, n, item, path, size)
    note(model, INITIALIZER_ELEMENTS, elements)
    return found


INITIALIZER_ELEMENTS = "onnx initializer elements"  # (the note check_sizes leaves: beforeafter's count reads it)


def _check_tensor(t: onnx.TensorProto, dims: list[int], n: int, item: int, path: str, size: int | None) -> None:
    """check_sizes for one tensor that is not plainly raw data filling its dims."""
    dt = t.data_type
    if not item:
        if dt not in _KNOWN:
            raise BnfoldError(f"tensor {t.name!r} has data type {dt}, which onnx {onnx.__version__} "
                              "does not know (a newer ONNX type? a newer onnx package may read it)", path)
        return  # strings and undefined: nothing to count
    if t.HasField("raw_data"):
        want, unit = raw_bytes(n, item), "bytes"
        if size is not None and want > size:
            raise BnfoldError(f"tensor {t.name!r} declares dims {dims} ({want} bytes), more than the "
                              f"whole file holds ({size}); the file is corrupt", path)
        if want > _EXACT_RAW or len(t.raw_data) == want:
            return
        have = len(t.raw_data)
    else:
        have = len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data) + len(t.uint64_data)
        want = 2 * n if dt in _TWO_FLOATS else typed_values(n, item)
        unit = "values"
    if have != want:
        raise BnfoldError(f"tensor {t.name!r} declares dims {dims} ({want} {unit}) but holds {have} "
                          f"{unit}; the file is corrupt", path)


_ITEMS: dict[int, int] = {}  # data type -> itemsize()
_TWO_FLOATS = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)  # two values an element
