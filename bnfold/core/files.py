"""Model files: formats by extension, output-path checks and atomic writes (no framework imported)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

from .errors import BnfoldError, WriteFailed

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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BnfoldError(f"output directory {str(parent)!r} is not writable", out)


def atomic_write(path: str, write: Callable[[str], None], suffix: str | None = None) -> None:
    """Call write(tmp_path) for a temporary path beside `path`, then rename it over `path`.

    A failure leaves no partial file behind and never touches an existing `path`; a process killed
    mid-write leaves a temporary name that the next bnfold writing into that folder removes (see
    temp_path). The rename makes the write atomic for readers; it is not fsync'ed (a power cut may lose
    it, never half-write it over the old file), which keeps a 100 MB save as fast as onnx.save itself.
    """
    target = Path(path)
    try:
        tmp = temp_path(target, suffix if suffix is not None else target.suffix)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as e:
        remove_temp(tmp)
        raise write_error(e, path) from None
    except BaseException:
        remove_temp(tmp)
        raise


def write_error(e: OSError, path: str | Path) -> WriteFailed:
    """A failed write as a one-line error naming the output (disk full, read-only folder...)."""
    import errno
    why = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        why += " (disk full, quota or file size limit)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why += " (the output folder is not writable)"
    return WriteFailed(f"cannot write the output: {why}; nothing written", str(path), e.errno, e.strerror)


# -- temporary names ------------------------------------------------------------------------------
# Every file or folder bnfold writes before renaming it into place is named
# `.<target name>.bnfold-tmp-<host>-<pid>-<random><suffix>`: a process killed mid-write (SIGKILL, power
# cut) cannot remove its own, so whoever next makes a temporary name in that folder removes the ones
# whose process (on this host) is gone.

_TMP_RE = re.compile(r"\.bnfold-tmp-([0-9a-f]{8})-(\d+)-[0-9a-z]{8}")


def _host_tag() -> str:
    import hashlib
    import socket
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: leave its file alone
    return True


def sweep_temps(folder: str | Path) -> None:
    """Remove bnfold temporary files and folders in `folder` left by processes of this host that died."""
    host = _host_tag()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _TMP_RE.search(name) if name.startswith(".") else None
        if m is None or m.group(1) != host or _alive(int(m.group(2))):
            continue
        remove_temp(os.path.join(folder, name))


def temp_path(target: str | Path, suffix: str = "", directory: bool = False) -> str:
    """Create (exclusively) and return a new empty temporary file, or folder, beside `target` whose
    name ends in `suffix` (writers that choose a format by extension need it); stale temporary names
    of dead processes in that folder are removed first. Files get the mode a plain open() gives."""
    import secrets
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    sweep_temps(folder)
    while True:
        rand = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
        # the target's name cut short: a temporary name of a temporary name stays under NAME_MAX (255)
        tmp = folder / f".{target.name[:80]}.bnfold-tmp-{_host_tag()}-{os.getpid()}-{rand}{suffix[-16:]}"
        try:
            if directory:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)


def remove_temp(path: str | Path) -> None:
    """Remove a temporary file or folder if it is there; never raises."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass
