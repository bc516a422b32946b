"""Big ONNX weights left in their external data files until a fold needs them.

A model whose external weights add up to LAZY_TOTAL bytes or more is loaded lazily: each top-level
initializer of at least LAZY_MIN bytes stays a reference into its data file (an "on-disk" tensor),
read by tensor_value() when a fold needs it and copied file-to-file by save_external(). A folded
weight is held in memory; everything else stays on disk, so folding and saving a model of N bytes
costs about the folded weights, not 3N (onnx's own load + save of such a model peaks near 3N).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from ..core.errors import BnfoldError
from ..core.files import remove_temp, temp_path, write_error
from .protos import (copy_fields, encoded_size, ext_info, is_external, nbytes, structure_only, tensor_groups,
                     total_nbytes, with_outputs)


TWO_GB = 2 ** 31 - 1


LAZY_TOTAL = 1 << 30


LAZY_MIN = 1 << 20


_BASE_KEY = "bnfold.base_dir"  # our own external_data keys: never written (see _stub), dropped on load


_STAMP_KEY = "bnfold.stamp"


_COPY_CHUNK = 16 << 20


def on_disk(t: onnx.TensorProto) -> bool:
    """True for a tensor that load_onnx left in its external data file (see LAZY_TOTAL)."""
    return is_external(t) and any(e.key == _BASE_KEY for e in t.external_data)


def has_on_disk(model: onnx.ModelProto, locations: set[int] | None = None) -> bool:
    """Does some initializer of `model` still live in its file? `locations`: locations_of(model), if known."""
    external = onnx.TensorProto.EXTERNAL  # (a look at the locations first: a model may hold 100k initializers)
    if external not in (locations_of(model) if locations is None else locations):
        return False
    return any(on_disk(t) for t in model.graph.initializer[:] if t.data_location == external)


def locations_of(model: onnx.ModelProto) -> set[int]:
    """The data locations of `model`'s initializers (one read a tensor: the save asks three times)."""
    return {t.data_location for t in model.graph.initializer[:]}


def _stamp(file: str) -> str:
    st = os.stat(file)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _source(t: onnx.TensorProto) -> tuple[str, int, int]:
    """(file, offset, length) of an on-disk tensor, after checking that the file is still the one
    load_onnx saw: a data file deleted, truncated or rewritten since would give wrong weights."""
    info = ext_info(t)
    file = os.path.join(info[_BASE_KEY], info["location"])
    try:
        same = _stamp(file) == info.get(_STAMP_KEY)
    except OSError:
        raise BnfoldError(f"external data of {t.name!r} is gone since the model was loaded", file) from None
    if not same:
        raise BnfoldError(f"external data of {t.name!r} changed since the model was loaded; load and fold again",
                          file)
    return file, int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0) or nbytes(t)


def _read_exact(t: onnx.TensorProto) -> bytes:
    file, offset, length = _source(t)
    try:
        with open(file, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(length)
    except OSError as e:
        raise BnfoldError(f"cannot read external data of {t.name!r}: {e.strerror or e}", file) from None
    if len(raw) != length:
        raise BnfoldError(f"external data of {t.name!r} ends early", file)
    return raw


def leave_on_disk(model: onnx.ModelProto, base: str, path: str) -> None:
    for t in model.graph.initializer:
        n = nbytes(t)
        if not is_external(t) or n < LAZY_MIN or t.data_type == onnx.TensorProto.STRING:
            continue
        info = ext_info(t)
        file = os.path.join(base, info["location"])
        offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0) or n
        if length != n or offset + length > os.path.getsize(file):
            raise BnfoldError(f"external data of {t.name!r} does not fit {info['location']!r} (offset {offset}, "
                              f"{length} bytes for a tensor of {n}; truncated or wrong file?)", path)
        for k, v in ((_BASE_KEY, base), (_STAMP_KEY, _stamp(file))):
            e = t.external_data.add()
            e.key, e.value = k, v


_T = onnx.TensorProto
# element types whose raw data is the numpy array's own bytes (little-endian)
_PLAIN = {_T.FLOAT: np.dtype(np.float32), _T.DOUBLE: np.dtype(np.float64), _T.FLOAT16: np.dtype(np.float16),
          _T.INT64: np.dtype(np.int64), _T.INT32: np.dtype(np.int32), _T.INT16: np.dtype(np.int16),
          _T.INT8: np.dtype(np.int8), _T.UINT64: np.dtype(np.uint64), _T.UINT32: np.dtype(np.uint32),
          _T.UINT16: np.dtype(np.uint16), _T.UINT8: np.dtype(np.uint8), _T.BOOL: np.dtype(np.bool_)}
_LITTLE = sys.byteorder == "little"


def tensor_value(t: onnx.TensorProto) -> np.ndarray:
    """numpy_helper.to_array that also reads on-disk tensors (one tensor read, nothing kept)."""
    dtype = _PLAIN.get(t.data_type)
    if dtype is not None and _LITTLE:
        # what to_array does for these, without its ~20 us of dispatch (a fold reads six tensors per BN)
        raw = t.raw_data
        if raw and t.data_location != _T.EXTERNAL:
            dims = t.dims[:]
            a = np.frombuffer(raw, dtype)
            if len(dims) == 1 and a.size == dims[0]:
                return a
            if a.size == math.prod(dims):
                return a.reshape(dims)
    from onnx import numpy_helper
    if not on_disk(t):
        try:
            return numpy_helper.to_array(t)
        except ValueError:  # its data does not fill its dims (load_onnx checks small tensors up front)
            raise BnfoldError(f"tensor {t.name!r} declares dims {list(t.dims)} but its data does not match; the "
                              "file is corrupt") from None
    file, offset, length = _source(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    simple = dtype.kind in "fiub" or dtype.name == "bfloat16"
    if simple and dtype.itemsize * math.prod(t.dims) == length:
        try:
            a = np.fromfile(file, dtype=dtype.newbyteorder("<"), count=math.prod(t.dims), offset=offset)
        except OSError as e:
            raise BnfoldError(f"cannot read external data of {t.name!r}: {e.strerror or e}", file) from None
        if a.size != math.prod(t.dims):
            raise BnfoldError(f"external data of {t.name!r} ends early", file)
        return a.astype(dtype, copy=False).reshape(tuple(t.dims))
    plain = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))  # packed 4-bit types...
    plain.raw_data = _read_exact(t)
    return numpy_helper.to_array(plain)


def loaded(model: onnx.ModelProto, locations: set[int] | None = None) -> onnx.ModelProto:
    """`model` itself when every weight is in memory, else a copy with the on-disk tensors read in
    (for what needs a self-contained proto: onnxruntime from memory, onnx.save_model). `locations`:
    locations_of(model), if known."""
    if not has_on_disk(model, locations):
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if on_disk(t):
            _read_in(t)
    return m


def _read_in(t: onnx.TensorProto) -> onnx.TensorProto:
    """Turn an on-disk tensor into an ordinary one holding its bytes (in place); returns `t`."""
    raw = _read_exact(t)
    del t.external_data[:]
    t.data_location = onnx.TensorProto.DEFAULT
    t.raw_data = raw
    return t


@dataclass
class ExternalModel:
    """A model for onnxruntime that is too big for one protobuf: a light `proto` whose big weights are
    external data under `folder` (onnxruntime reads them itself, memory-mapped when it can)."""

    proto: onnx.ModelProto
    folder: str

    def with_outputs(self, names: list[str]) -> "ExternalModel":
        return ExternalModel(with_outputs(self.proto, names), self.folder)


def for_session(model: onnx.ModelProto, folder: str, name: str,
                transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                transform_names: set[str] | frozenset[str] = frozenset()) -> ExternalModel:
    """`model` as an ExternalModel. A model loaded with its big weights on disk (one folder) is used
    where it lies: nothing is written. Anything else (weights a fold changed, or the values that
    `transform` gives the initializers named in `transform_names`) is written to `folder` first,
    one tensor at a time."""
    bases = {ext_info(t)[_BASE_KEY] for t in model.graph.initializer if on_disk(t)}
    in_memory = sum(nbytes(t) for t in model.graph.initializer if not on_disk(t))
    if transform is None and len(bases) == 1 and in_memory < TWO_GB // 2:  # the light proto must serialise
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if on_disk(t):
                _source(t)  # the data file is still the one loaded
                drop_private(t)
        return ExternalModel(m, bases.pop())
    path = os.path.join(folder, f"{name}.onnx")
    save_external(model, path, f"{name}.data", transform=transform, transform_names=transform_names)
    return ExternalModel(onnx.load(path, load_external_data=False), folder)


def drop_private(t: onnx.TensorProto) -> None:
    keep = [(e.key, e.value) for e in t.external_data if not e.key.startswith("bnfold.")]
    del t.external_data[:]
    for k, v in keep:
        e = t.external_data.add()
        e.key, e.value = k, v


def _stub(t: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    s = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims), doc_string=t.doc_string,
                         data_location=onnx.TensorProto.EXTERNAL)
    s.metadata_props.extend(t.metadata_props)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = s.external_data.add()
        e.key, e.value = k, v
    return s


def _raw(t: onnx.TensorProto) -> bytes:
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper
    return _le_bytes(numpy_helper.to_array(t))


def disk_length(t: onnx.TensorProto) -> int:
    """Bytes of an on-disk tensor's data (its data file checked to be the one loaded)."""
    return _source(t)[2]


def copy_to(fh, t: onnx.TensorProto) -> int:
    """Append an on-disk tensor's bytes to the open file `fh`, a chunk at a time; returns the count."""
    return _copy_range(fh, t)


def _copy_range(fh, t: onnx.TensorProto) -> int:
    """Copy an on-disk tensor's bytes from its source file into `fh`, a chunk at a time."""
    file, offset, length = _source(t)
    try:
        src = open(file, "rb")
    except OSError as e:
        raise BnfoldError(f"cannot read external data of {t.name!r}: {e.strerror or e}", file) from None
    with src:
        src.seek(offset)
        left = length
        while left:
            chunk = src.read(min(left, _COPY_CHUNK))
            if not chunk:
                raise BnfoldError(f"external data of {t.name!r} ends early", file)
            fh.write(chunk)
            left -= len(chunk)
    return length


def _array_tensor(a: np.ndarray, like: onnx.TensorProto) -> onnx.TensorProto:
    from onnx import numpy_helper
    t = numpy_helper.from_array(np.asarray(a), like.name)
    t.data_type = like.data_type  # bfloat16 and friends: from_array may not know the ONNX type
    return t


def _le_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes()


def save_external(model: onnx.ModelProto, path: str, location: str, size_threshold: int = 1024,
                  all_tensors_to_one_file: bool = True,
                  transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
                  transform_names: set[str] | frozenset[str] = frozenset()) -> None:
    """Write `model` with its large initializers in external data files, atomically and without
    touching `model`: the written proto holds stubs, the bytes go straight from each tensor to the
    data file (one tensor in flight, so peak memory stays near one copy of the weights; on-disk
    tensors are copied file to file). Data files are renamed into place before the model file, so
    a reader never sees a model without its data. `transform(name, value)` gives the value written
    for each initializer named in `transform_names` (the verifier's nudged noise model)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if "/" in location or "\\" in location or location in ("", ".", ".."):
        raise BnfoldError(f"external data location must be a plain file name, not {location!r}", path)
    sources = {os.path.realpath(_source(t)[0]) for t in model.graph.initializer if on_disk(t)}
    for loc in ([location] if all_tensors_to_one_file else
                [f"{location}.{i}" for i in range(len(model.graph.initializer))]):
        if os.path.realpath(folder / loc) in sources:
            raise BnfoldError(f"would overwrite {loc!r}, the external data file the model's weights are read from",
                              path)
    try:
        light = structure_only(model)  # nodes, inputs, outputs, sparse initializers, functions; initializers next
        del light.graph.input[len(model.graph.input):]
        light.graph.doc_string = model.graph.doc_string
        # every other field of the model as it is (producer, doc string, metadata, training_info, ...)
        copy_fields(light, model, lambda k: k not in _BUILT)
    except EncodeError:  # (protobuf copies a message by encoding it: a node of 2 GB and more cannot be copied)
        raise _too_big(path) from None
    pending: list[tuple[str, Path]] = []  # (temporary file, final name)
    files: dict[str, tuple[object, str, int]] = {}
    try:
        for i, t in enumerate(model.graph.initializer):
            n = nbytes(t)
            changed = transform is not None and t.name in transform_names
            if n < size_threshold or t.data_type == onnx.TensorProto.STRING:
                if changed:
                    light.graph.initializer.append(_array_tensor(transform(t.name, tensor_value(t)), t))
                elif on_disk(t):
                    light.graph.initializer.add().CopyFrom(t)
                    _read_in(light.graph.initializer[-1])
                else:
                    light.graph.initializer.append(t)
                continue
            loc = location if all_tensors_to_one_file else f"{location}.{i}"
            if loc not in files:
                tmp = temp_path(folder / loc)
                files[loc] = (open(tmp, "wb"), tmp, 0)
                pending.append((tmp, folder / loc))
            fh, tmp, offset = files[loc]
            pad = (-offset) % 4096 if n >= 1 << 20 else 0  # page-aligned big tensors can be mmapped
            fh.write(b"\0" * pad)  # type: ignore[attr-defined]
            offset += pad
            if changed:
                raw = _le_bytes(transform(t.name, tensor_value(t)))
            elif on_disk(t):
                raw = None
                length = _copy_range(fh, t)
            else:
                raw = _raw(t)
            if raw is not None:
                fh.write(raw)  # type: ignore[attr-defined]
                length = len(raw)
            light.graph.initializer.append(_stub(t, loc, offset, length))
            files[loc] = (fh, tmp, offset + length)
            del raw
        for fh, _, _ in files.values():
            fh.flush()  # type: ignore[attr-defined]
            os.fsync(fh.fileno())  # type: ignore[attr-defined]
            fh.close()  # type: ignore[attr-defined]
        files.clear()
        try:
            encoded = light.SerializeToString()
        except EncodeError:  # (what is left beside the initializers' data is still too big for one protobuf)
            raise _too_big(path) from None
        model_tmp = temp_path(target)
        with open(model_tmp, "wb") as fh:
            fh.write(encoded)
            fh.flush()
            os.fsync(fh.fileno())
        pending.append((model_tmp, target))
        for tmp, final in pending:
            os.replace(tmp, final)
        pending.clear()
    except OSError as e:
        raise write_error(e, path) from None
    finally:
        for fh, _, _ in files.values():
            fh.close()  # type: ignore[attr-defined]
        for tmp, _ in pending:
            remove_temp(tmp)


_BUILT = frozenset({1, 7, 8, 25})  # the ModelProto fields structure_only sets: ir_version, graph, opset_import, functions


def _too_big(path: str) -> BnfoldError:
    return BnfoldError("cannot be written: over 2 GB of the model lies outside its initializers (in Constant nodes, "
                       "other attributes or bodies), more than one protobuf can hold, and only initializers go to "
                       "external data", path)


def over_two_gb(model: onnx.ModelProto, locations: set[int] | None = None) -> bool:
    """True when `model` cannot be serialised as one protobuf (over 2 GB). `locations`: locations_of(model),
    if known."""
    # ByteSize() encodes every byte of a large model; the tensors' sizes decide it unless close to 2 GB: every
    # tensor's, wherever it is held (a Constant node's value weighs as much as an initializer), training graphs too
    groups = [group for group, _ in tensor_groups(model)]  # (the initializers are held: core/hold.py)
    groups += [g.initializer[:] for ti in model.training_info for g in (ti.initialization, ti.algorithm)]
    raw = sum(total_nbytes(group) for group in groups)  # (typed-field values as headers say: the writers check)
    if has_on_disk(model, locations):  # ByteSize() counts the in-memory part only
        return raw + encoded_size(model) > TWO_GB
    if raw < TWO_GB * 0.9:
        return raw + 64 * len(model.graph.node) > TWO_GB * 0.9 and encoded_size(model) > TWO_GB
    return raw > TWO_GB or encoded_size(model) > TWO_GB
