"""What bnfold wrote: a mark in each format's own metadata, read back without loading any framework.

A folder run must never take its own outputs as inputs, whatever they are called, and must know an
output it already made from the same bytes. So every file the command line writes carries a small
JSON mark (bnfold version, source name and SHA-256, a fingerprint of the options) where its format
keeps metadata:
- ONNX: a `bnfold` entry of the model's metadata_props;
- torch.export (.pt2), TorchScript and torch.save archives: `<archive>/extra/bnfold.json`, the extra
  file torch.export.load(extra_files=...) and torch.jit.load(_extra_files=...) return;
- .keras: a `bnfold` key in the archive's own metadata.json; .h5: a `bnfold` attribute of the root
  group; a SavedModel directory: `assets.extra/bnfold.json` (TensorFlow's place for extra files).
Reading uses zipfile, h5py and a walk over the top-level fields of the ONNX protobuf: no model is
loaded, so scanning a folder of large models costs a few reads each.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterable

from .core.files import remove_temp, temp_path

KEY = "bnfold"
EXTRA_NAME = "bnfold.json"
ONNX_METADATA_FIELD = 14  # ModelProto.metadata_props
MAX_ENTRY = 1 << 20


def make(source: str, source_sha256: str, options: str, verdict: str | None) -> dict[str, Any]:
    """The mark of an output folded from `source`."""
    from . import __version__
    return {"written_by": f"bnfold {__version__}", "source": os.path.basename(os.path.normpath(source)),
            "source_sha256": source_sha256, "options": options, "verdict": verdict}


def digest(path: str, companions: Iterable[str] = ()) -> str:
    """SHA-256 of a model's bytes: the plain file digest, or over each file (by relative name) of a
    directory and the files it reads (ONNX external data)."""
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        parts = [(str(f.relative_to(p)), f) for f in sorted(p.rglob("*")) if f.is_file()]
    else:
        _feed(h, p)
        parts = []
    parts += [(Path(c).name, Path(c)) for c in sorted(companions)]
    for name, f in parts:
        h.update(name.encode() + b"\0")
        _feed(h, f)
    return h.hexdigest()


def _feed(h: Any, f: Path) -> None:
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)


def read(path: str) -> dict[str, Any] | None:
    """The bnfold mark of a model file or SavedModel directory, or None (unmarked, unreadable, foreign)."""
    p = Path(path)
    try:
        if p.is_dir():
            f = p / "assets.extra" / EXTRA_NAME
            return _parse(f.read_text(encoding="utf-8")) if f.is_file() else None
        ext = p.suffix.lower()
        if ext == ".onnx":
            with open(p, "rb") as fh:
                return _parse(_onnx_metadata(fh).get(KEY))
        if ext in (".h5", ".hdf5"):
            return _parse(_h5_attr(p))
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                for name in z.namelist():
                    if name == "metadata.json":  # .keras
                        meta = json.loads(z.read(name)[:MAX_ENTRY])
                        if isinstance(meta, dict) and isinstance(meta.get(KEY), dict) and "written_by" in meta[KEY]:
                            return meta[KEY]
                    elif name.endswith(f"/extra/{EXTRA_NAME}") and name.count("/") == 2:  # torch archives
                        return _parse(z.read(name)[:MAX_ENTRY].decode("utf-8"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    return None


def _parse(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "written_by" in doc else None


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("truncated")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("bad varint")


def _onnx_metadata(f: BinaryIO) -> dict[str, str]:
    """metadata_props of an ONNX file, read by skipping over every other top-level field (the graph
    with its weights is never parsed)."""
    size = os.fstat(f.fileno()).st_size
    props: dict[str, str] = {}
    while f.tell() < size:
        key = _varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            n = _varint(f)
            if field == ONNX_METADATA_FIELD and n <= MAX_ENTRY:
                k, v = _entry(f.read(n))
                props[k] = v
            else:
                f.seek(n, 1)
        else:
            raise ValueError("not a protobuf")
    return props


def _entry(buf: bytes) -> tuple[str, str]:
    """A StringStringEntryProto: key = 1, value = 2."""
    import io
    f = io.BytesIO(buf)
    out = {1: "", 2: ""}
    while f.tell() < len(buf):
        key = _varint(f)
        if key & 7 != 2:
            raise ValueError("not a string entry")
        n = _varint(f)
        out[key >> 3] = f.read(n).decode("utf-8")
    return out[1], out[2]


def _h5_attr(p: Path) -> str | None:
    try:
        import h5py
    except ImportError:  # no h5py: no Keras either, and nothing bnfold wrote as .h5 to find
        return None
    with h5py.File(p, "r") as f:
        v = f.attrs.get(KEY)
    return v.decode() if isinstance(v, bytes) else v


def stamp_onnx(model: Any, mark: dict[str, Any]) -> None:
    """Put the mark into an in-memory ModelProto's metadata_props (an existing mark stays: a model folded
    again by bnfold is the same output, byte for byte)."""
    if any(p.key == KEY for p in model.metadata_props):
        return
    entry = model.metadata_props.add()
    entry.key, entry.value = KEY, json.dumps(mark, sort_keys=True)


def stamp(path: str, mark: dict[str, Any]) -> None:
    """Put the mark into a written model file or SavedModel directory, in place (call it on a temporary
    file that is renamed into place afterwards)."""
    p = Path(path)
    text = json.dumps(mark, sort_keys=True)
    if p.is_dir():
        (p / "assets.extra").mkdir(exist_ok=True)
        (p / "assets.extra" / EXTRA_NAME).write_text(text, encoding="utf-8")
        return
    ext = p.suffix.lower()
    if ext == ".onnx":
        import onnx
        model = onnx.load(str(p), load_external_data=False)  # external data stays where it is, by name
        stamp_onnx(model, mark)
        onnx.save(model, str(p))
        return
    if ext in (".h5", ".hdf5"):
        import h5py
        with h5py.File(p, "a") as f:
            f.attrs[KEY] = text
        return
    with zipfile.ZipFile(p) as z:
        names = z.namelist()
    if "metadata.json" in names:
        _rewrite_keras_metadata(p, mark)
        return
    root = names[0].split("/", 1)[0] if names and "/" in names[0] else "archive"
    with zipfile.ZipFile(p, "a") as z:
        z.writestr(f"{root}/extra/{EXTRA_NAME}", text)


def _rewrite_keras_metadata(p: Path, mark: dict[str, Any]) -> None:
    """A .keras archive with `bnfold` added to its metadata.json (entries can only be replaced by rewriting)."""
    tmp = temp_path(p, p.suffix)
    try:
        with zipfile.ZipFile(p) as src, zipfile.ZipFile(tmp, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == "metadata.json":
                    meta = json.loads(data)
                    meta[KEY] = mark
                    data = json.dumps(meta).encode()
                dst.writestr(info, data)
        shutil.copymode(p, tmp)
        os.replace(tmp, p)
    finally:
        remove_temp(tmp)
