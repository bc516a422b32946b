"""Keras model files (.keras, .h5, SavedModel directories) and example inputs for Keras models."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import BnfoldError, MissingExtraError
from ..core.files import atomic_write, check_input_file


def before_tensorflow() -> None:
    """Quiet TensorFlow's C++ start-up, and load triton (shipped with CUDA builds of torch) first when it is
    installed: loaded after TensorFlow, triton crashes the process (segfault) the moment torch.export or
    torch.compile imports it, which a run mixing Keras and PyTorch models does."""
    import importlib.util
    import sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and "triton" not in sys.modules:
        try:
            if importlib.util.find_spec("triton") is not None:
                import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken triton only matters to torch, which reports it itself
            pass


def import_keras(path: str | None = None) -> Any:
    """keras (TensorFlow backend), or MissingExtraError naming the `keras` extra."""
    before_tensorflow()
    try:
        import keras
    except ImportError as e:
        raise MissingExtraError("keras", "keras", path) from e
    return keras


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def load(path: str, *, trust: bool = False) -> Any:
    """Load a .keras / .h5 model; Keras' safe_mode stays on (no Lambda code) unless `trust`."""
    keras = import_keras(path)
    check_input_file(path)
    p = Path(path)
    if p.is_dir():
        try:
            return keras.saving.load_model(path, safe_mode=not trust)
        except Exception:
            raise BnfoldError(
                "is a TensorFlow SavedModel, which Keras 3 cannot turn back into layers (it keeps traced "
                "functions, not the BatchNorm layers to fold); save the model as .keras or .h5 with the "
                "Keras that wrote it", path) from None
    if p.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise BnfoldError(f"not a Keras model file (expected .keras or .h5, got {p.suffix or 'no extension'!r})",
                          path)
    _check_container(p)
    try:
        return keras.saving.load_model(path, safe_mode=not trust)
    except Exception as e:
        msg = str(e)
        if not trust and ("safe_mode" in msg or "Lambda" in msg):
            raise BnfoldError("contains a Lambda layer, whose Python code would run when loaded; "
                              "pass --trust to load it if you trust this file", path) from None
        raise BnfoldError(f"cannot be read as a Keras model ({_first_line(e)})", path) from None


def _check_container(p: Path) -> None:
    """Name a damaged file plainly: Keras reports a non-zip .keras file as 'File not found'."""
    import zipfile

    if p.suffix.lower() == ".keras" and not zipfile.is_zipfile(p):
        raise BnfoldError("is not a .keras archive (not a zip file); it may be truncated or corrupt", str(p))
    if p.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        if not h5py.is_hdf5(str(p)):
            raise BnfoldError("is not an HDF5 file; it may be truncated or corrupt", str(p))


def save(model: Any, path: str) -> None:
    """Write `model` atomically by extension: .keras, .h5, or a SavedModel directory (model.export)."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in (".keras", ".h5", ".hdf5"):
        # Keras picks the format from the extension of the path it is given, so the temp name keeps it.
        atomic_write(path, lambda tmp: model.save(tmp), suffix=ext)
        return
    if ext and not p.is_dir():
        raise BnfoldError(f"cannot save a Keras model as {ext!r}; use .keras, .h5 or a directory name "
                          "(SavedModel)", path)
    _save_saved_model(model, p)


def _save_saved_model(model: Any, target: Path) -> None:
    if target.exists() and not (target / "saved_model.pb").exists():
        raise BnfoldError("is an existing directory that is not a SavedModel; it is left as it is", str(target))
    parent = target.parent if str(target.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(parent)))
    old = None
    try:
        out = tmp / "model"
        model.export(str(out), format="tf_saved_model", verbose=False)
        if target.exists():
            old = tmp / "old"
            os.replace(target, old)
        os.replace(out, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_input_specs(model: Any) -> list[tuple[str, tuple, str]]:
    """(name, shape with None for unknown dims, dtype) of each model input, in call order."""
    keras = import_keras()
    inputs = getattr(model, "inputs", None)
    try:
        inputs = list(inputs) if inputs else None
    except (AttributeError, ValueError):
        inputs = None
    if inputs:
        return [(x.name, tuple(x.shape), str(keras.backend.standardize_dtype(x.dtype))) for x in inputs]
    shapes = getattr(model, "_build_shapes_dict", None) or {}
    if len(shapes) == 1:
        shape = next(iter(shapes.values()))
        if isinstance(shape, (tuple, list)) and all(d is None or isinstance(d, int) for d in shape):
            return [("input", tuple(shape), getattr(model, "input_dtype", "float32") or "float32")]
    raise BnfoldError(f"cannot tell the input shape of Keras model {model.name!r} (subclassed and never built "
                      "on a known shape); give example inputs (--input NAME:SHAPE or --inputs FILE.npz)")


def example_inputs_for(model: Any, input_specs: Sequence[tuple[str, tuple, str]] | None = None,
                       inputs_npz: str | None = None, seed: int = 0) -> list[np.ndarray]:
    """Seeded random feeds from the model's input shapes (None dims from input_specs, else 1), or an .npz."""
    specs = model_input_specs(model)
    if inputs_npz is not None:
        return _from_npz(specs, inputs_npz)
    user = {name: (tuple(shape), dtype) for name, shape, dtype in (input_specs or [])}
    if len(specs) == 1 and len(user) == 1 and specs[0][0] not in user:
        user = {specs[0][0]: next(iter(user.values()))}  # one input: its name may be left out
    unknown = set(user) - {name for name, _, _ in specs}
    if unknown:
        raise BnfoldError(f"--input names {sorted(unknown)} are not inputs of the model "
                          f"(inputs: {[n for n, _, _ in specs]})")
    rng = np.random.default_rng(seed)
    feeds = []
    for name, shape, dtype in specs:
        if name in user:
            ushape, udtype = user[name]
            if len(ushape) != len(shape) or any(d is not None and d != u for d, u in zip(shape, ushape)):
                raise BnfoldError(f"--input {name}: shape {ushape} does not match the model's {shape}")
            shape, dtype = ushape, udtype or dtype
        shape = tuple(1 if d is None else int(d) for d in shape)
        feeds.append(_random(rng, shape, dtype))
    return feeds


def _random(rng: np.random.Generator, shape: tuple, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype("float32")
    if dt.kind == "f":
        return rng.standard_normal(shape).astype(dt)
    if dt.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dt)  # small and non-negative: safe as indices
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    raise BnfoldError(f"cannot make random data of dtype {dtype}; give --inputs FILE.npz")


def _from_npz(specs: list[tuple[str, tuple, str]], npz: str) -> list[np.ndarray]:
    check_input_file(npz)
    try:
        data = np.load(npz, allow_pickle=False)
        files = list(data.files)
    except Exception as e:
        raise BnfoldError(f"cannot be read as an .npz file ({_first_line(e)})", npz) from None
    names = [n for n, _, _ in specs]
    if all(n in files for n in names):
        arrays = [data[n] for n in names]
    elif len(files) == len(names):
        arrays = [data[f] for f in files]
    else:
        raise BnfoldError(f"holds {files} but the model's inputs are {names}", npz)
    for (name, shape, _), a in zip(specs, arrays):
        if a.ndim != len(shape) or any(d is not None and d != s for d, s in zip(shape, a.shape)):
            raise BnfoldError(f"array for input {name!r} has shape {a.shape}, the model expects {shape}", npz)
    return arrays


def feeds_for(model: Any, example_inputs: Any, seed: int) -> list[np.ndarray]:
    """Inputs as the flat list of arrays the model is run on (example inputs, a dict of them, or random)."""
    if example_inputs is None:
        return example_inputs_for(model, seed=seed)
    if isinstance(example_inputs, Mapping):
        return _feeds_by_name(model, example_inputs)
    if isinstance(example_inputs, np.ndarray) or not isinstance(example_inputs, (list, tuple)):
        return [np.asarray(example_inputs)]
    return [np.asarray(x) for x in example_inputs]


def _feeds_by_name(model: Any, example_inputs: Mapping[str, Any]) -> list[np.ndarray]:
    """A dict of inputs, in the order the model's inputs are flattened (what keras_runner packs)."""
    keras = import_keras()
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, Mapping) and set(struct) == set(example_inputs):
        return [np.asarray(x) for x in keras.tree.flatten(dict(example_inputs))]  # same key order as struct
    names = [n for n, _, _ in model_input_specs(model)]
    if set(names) == set(example_inputs):
        return [np.asarray(example_inputs[n]) for n in names]
    raise BnfoldError(f"example_inputs names {sorted(example_inputs)} do not match the model's inputs {names}")
