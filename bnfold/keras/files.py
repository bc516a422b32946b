"""Keras model files (.keras, .h5, SavedModel directories), the Keras import and a model's input signature."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import BnfoldError, MissingExtraError
from ..core.files import atomic_write, check_input_file, temp_path


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


BACKEND_PACKAGES = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax", "jaxlib": "jax"}


def import_keras(path: str | None = None) -> Any:
    """keras on the backend KERAS_BACKEND names, or MissingExtraError naming what is missing: keras
    itself (the `keras` extra) or the backend's framework."""
    before_tensorflow()
    try:
        import keras
    except ImportError as e:
        top = (e.name or "").split(".")[0]
        if top in BACKEND_PACKAGES:
            backend = os.environ.get("KERAS_BACKEND", "tensorflow")
            raise BnfoldError(f"Keras runs on the {backend} backend here (KERAS_BACKEND), which needs "
                              f"{BACKEND_PACKAGES[top]}, and {top} is not installed: pip install {BACKEND_PACKAGES[top]}, "
                              "or set KERAS_BACKEND to a backend that is installed", path) from None
        raise MissingExtraError("keras", "keras", path) from e
    return keras


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def load(path: str, *, trust: bool = False) -> Any:
    """Load a .keras / .h5 model; Keras' safe_mode stays on (no Lambda code) unless `trust`."""
    check_input_file(path)
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".keras":
        _check_keras_zip(p)  # before TensorFlow starts: a damaged or hostile archive is refused at once
    keras = import_keras(path)
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
    if p.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        if not h5py.is_hdf5(str(p)):
            raise BnfoldError("is not an HDF5 file; it may be truncated or corrupt", str(p))


def _check_keras_zip(p: Path) -> None:
    """A .keras file is a zip whose members all stay inside it (no absolute names, no '..')."""
    import zipfile

    if not zipfile.is_zipfile(p):
        raise BnfoldError("is not a .keras archive (not a zip file); it may be truncated or corrupt", str(p))
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BnfoldError(f"is not a readable .keras archive ({_first_line(e)})", str(p)) from None
    for n in names:
        parts = n.replace("\\", "/").split("/")
        if n.startswith(("/", "\\")) or ".." in parts or (len(n) > 1 and n[1] == ":"):
            raise BnfoldError(f"archive member {n!r} points outside the archive; refused", str(p))


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
    tmp = Path(temp_path(target, directory=True))
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
