"""Reading and writing ONNX files: clear errors for bad files, atomic writes, external data kept."""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from ..core.errors import BnfoldError
from ..core.files import atomic_write, check_input_file
from . import ondisk
from .protos import all_tensors, ext_info, is_external, nbytes, structure_only


def load_onnx(path: str, load_external: bool = True) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; any problem is a one-line BnfoldError naming the file."""
    check_input_file(path)
    if Path(path).is_dir():
        raise BnfoldError("is a directory, expected an .onnx file", path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError...
        raise BnfoldError(f"not a valid ONNX model (cannot parse: {_short(e)})", path) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise BnfoldError("not a valid ONNX model (no graph or IR version; truncated or not ONNX?)", path)
    for t in all_tensors(model):  # a file never speaks for bnfold's bookkeeping (onnx.save of a lazy model)
        if t.external_data and any(e.key.startswith("bnfold.") for e in t.external_data):
            ondisk.drop_private(t)
    external = _has_external(model)
    if load_external and external:
        base = str(Path(path).resolve().parent)
        _check_external_files(model, base, path)
        try:
            if sum(nbytes(t) for t in model.graph.initializer if is_external(t)) >= ondisk.LAZY_TOTAL:
                ondisk.leave_on_disk(model, base, path)  # big weights are read one at a time, when needed
            from onnx.external_data_helper import load_external_data_for_tensor
            for t in all_tensors(model):  # what is left: small or nested tensors
                if is_external(t) and not ondisk.on_disk(t):
                    load_external_data_for_tensor(t, base)
        except BnfoldError:
            raise
        except FileNotFoundError as e:
            raise BnfoldError(f"external data file missing: {_short(e)}", path) from None
        except Exception as e:  # noqa: BLE001
            raise BnfoldError(f"cannot read external data: {_short(e)}", path) from None
    _check_sizes(model, path, None if external else os.path.getsize(path))
    try:
        onnx.checker.check_model(structure_only(model), full_check=False)
    except onnx.checker.ValidationError as e:
        raise BnfoldError(f"invalid ONNX model: {_short(e)}", path) from None
    except Exception as e:  # noqa: BLE001
        raise BnfoldError(f"invalid ONNX model: {_short(e)}", path) from None
    return model


def _check_external_files(model: onnx.ModelProto, base: str, path: str) -> None:
    """Every external data file is a file inside the model's folder: a location that is absolute, climbs
    out with '..' or is a symbolic link is refused before anything is opened (a hostile model could
    otherwise make bnfold read, and copy into its output, any file the user can read)."""
    for t in all_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if loc and (os.path.isabs(loc) or ".." in Path(loc.replace("\\", "/")).parts
                    or os.path.islink(os.path.join(base, loc))
                    or not os.path.realpath(os.path.join(base, loc)).startswith(os.path.join(base, ""))):
            raise BnfoldError(f"external data location {loc!r} (weights of {t.name!r}) is outside the model's "
                              "folder or a symbolic link; refused", path)
        if not loc or not os.path.isfile(os.path.join(base, loc)):
            raise BnfoldError(f"external data file {loc!r} (weights of {t.name!r}) is missing next to the model",
                              path)


_EXACT_RAW = 8 << 20  # reading raw_data's length copies the bytes: bigger tensors are checked when read


def _check_sizes(model: onnx.ModelProto, path: str, size: int | None) -> None:
    """Each tensor holds as much data as its dims declare (a mismatch would crash, or allocate what the
    dims claim, later); on-disk tensors were checked against their files when left there. A tensor over
    _EXACT_RAW bytes is only checked against `size`, the file's, here (ondisk.tensor_value checks it
    exactly)."""
    T = onnx.TensorProto
    for t in all_tensors(model):
        if is_external(t) or t.data_type in (T.STRING, T.UNDEFINED):
            continue
        if any(d < 0 for d in t.dims):
            raise BnfoldError(f"tensor {t.name!r} has a negative dimension {list(t.dims)}", path)
        if t.HasField("raw_data"):
            want, unit = nbytes(t), "bytes"
            if size is not None and want > size:
                raise BnfoldError(f"tensor {t.name!r} declares dims {list(t.dims)} ({want} bytes), more than the "
                                  f"whole file holds ({size}); the file is corrupt", path)
            if want > _EXACT_RAW:
                continue
            have = len(t.raw_data)
        else:
            n = 1
            for d in t.dims:
                n *= int(d)
            have = len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data) + len(t.uint64_data)
            want = 2 * n if t.data_type in (T.COMPLEX64, T.COMPLEX128) else (n + 1) // 2 if nbytes(t) < n else n
            unit = "values"
        if have != want:
            raise BnfoldError(f"tensor {t.name!r} declares dims {list(t.dims)} ({want} {unit}) but holds {have} "
                              f"{unit}; the file is corrupt", path)


def external_files(path: str) -> set[str]:
    """Resolved paths of the external data files an ONNX file refers to (empty when unreadable)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - load_onnx reports bad files; this only guards outputs
        return set()
    base = Path(path).resolve().parent
    return {str((base / loc).resolve()) for t in all_tensors(model) if is_external(t)
            for loc in [ext_info(t).get("location", "")] if loc}


def _has_external(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import uses_external_data
    return any(uses_external_data(t) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str, external_data: bool | None = None, *, location: str | None = None,
              size_threshold: int = 1024, all_tensors_to_one_file: bool = True) -> None:
    """Write `model` atomically; models over 2 GB (or when asked) keep their weights in external data
    files (`<name>.data` unless `location` says otherwise), with onnx's layout options."""
    big = ondisk.over_two_gb(model) if external_data is None else external_data
    if not big:
        inline = ondisk.loaded(model)
        atomic_write(path, lambda tmp: onnx.save_model(inline, tmp))
        return
    ondisk.save_external(model, path, location or Path(path).name + ".data", size_threshold, all_tensors_to_one_file)


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:240]
