"""Model files: formats by extension, output-path checks and atomic writes (no framework imported)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import BnfoldError

ONNX_EXTS = {".onnx"}
TORCH_EXTS = {".pt2", ".pt", ".pth", ".ts", ".torchscript", ".jit"}
KERAS_EXTS = {".keras", ".h5", ".hdf5"}


def framework_of(path: str) -> str:
    """'onnx', 'torch' or 'keras' from a model path; BnfoldError for anything else."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in ONNX_EXTS:
        return "onnx"
    if ext in TORCH_EXTS:
        return "torch"
    if ext in KERAS_EXTS:
        return "keras"
    if p.is_dir() and (p / "saved_model.pb").exists():
        return "keras"
    if p.is_dir():
        raise BnfoldError("is a directory but not a SavedModel (no saved_model.pb)", path)
    raise BnfoldError(f"unknown model format {ext or '(no extension)'!r}; expected .onnx, .pt2, .pt/.pth "
                      "(TorchScript or, with --trust, a pickled nn.Module), .keras, .h5 or a SavedModel directory",
                      path)


def default_output(path: str) -> str:
    """`<stem>.folded<ext>` beside the input (a SavedModel directory gets `<name>.folded`)."""
    p = Path(path)
    if p.is_dir():
        return str(p.with_name(p.name.rstrip("/") + ".folded"))
    return str(p.with_name(f"{p.stem}.folded{p.suffix}"))


def check_input_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise BnfoldError("no such file", path)
    if p.is_file() and p.stat().st_size == 0:
        raise BnfoldError("file is empty", path)
    if not os.access(p, os.R_OK):
        raise BnfoldError("file is not readable", path)


def check_output_path(out: str, inputs: list[str], framework: str | None = None,
                      companions: Iterable[str] = ()) -> None:
    """Refuse an output that would overwrite an input or one of its `companions` (files an input reads,
    such as ONNX external data), lands in a missing directory, or does not carry the extension of the
    format it will hold (so `-o weights.data` cannot clobber a sidecar)."""
    o = Path(out)
    if framework is not None:
        ext = o.suffix.lower()
        allowed = {"onnx": ONNX_EXTS, "torch": TORCH_EXTS, "keras": KERAS_EXTS}[framework]
        if ext not in allowed and not (framework == "keras" and (ext == "" or o.is_dir())):
            raise BnfoldError(f"output must be a {framework} model file ({', '.join(sorted(allowed))})", out)
        # a torch.export program is written as .pt2 and only .pt2 is read as one
        if framework == "torch" and inputs and (Path(inputs[0]).suffix.lower() == ".pt2") != (ext == ".pt2"):
            want = ".pt2" if Path(inputs[0]).suffix.lower() == ".pt2" else "one of .pt, .pth, .ts"
            raise BnfoldError(f"output extension {ext} does not fit the input's format; use {want}", out)
    for i in inputs:
        try:
            if o.resolve() == Path(i).resolve():
                raise BnfoldError("output path is the same as the input; the input is never overwritten", out)
        except OSError:
            pass
    # a data file may have any name, .onnx included: do not write over the input's weights
    if o.is_file() and str(o.resolve()) in {str(Path(c).resolve()) for c in companions}:
        raise BnfoldError("output path is an external data file of the input; the input is never overwritten", out)
    parent = o.parent if str(o.parent) else Path(".")
    if not parent.exists():
        raise BnfoldError(f"output directory {str(parent)!r} does not exist", out)
    if not parent.is_dir():
        raise BnfoldError(f"{str(parent)!r} is not a directory", out)
    if o.is_dir() and not (o / "saved_model.pb").exists():
        raise BnfoldError("output path is an existing directory", out)


def atomic_write(path: str, write: Callable[[str], None], suffix: str | None = None) -> None:
    """Call write(tmp_path) for a temporary path beside `path`, then rename it over `path`.

    A failure leaves no partial file behind and never touches an existing `path`. The rename makes
    the write atomic for readers; it is not fsync'ed (a power cut may lose it, never half-write it
    over the old file), which keeps a 100 MB save as fast as onnx.save itself.
    """
    target = Path(path)
    sfx = suffix if suffix is not None else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{sfx}", dir=str(target.parent or "."))
    os.close(fd)
    try:
        write(tmp)
        if os.path.isfile(tmp):
            # mkstemp makes the file owner-only; give it the mode a plain open() would have
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
