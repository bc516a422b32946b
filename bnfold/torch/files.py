"""PyTorch model files: .pt2 (torch.export), TorchScript, and pickled nn.Modules only when trusted.

A pickled module runs code from the file when it is unpickled, so without trust the file is opened
with torch.load(weights_only=True), which refuses anything but tensors and plain containers; the
refusal is turned into an explanation. A bare state_dict is not a model: bnfold needs the module.
"""
from __future__ import annotations

import inspect
import os
import zipfile
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import BnfoldError
from ..core.files import atomic_write


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 2)[1:2] == ["code"] for n in names) and any(n.endswith("constants.pkl") for n in names)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def load(path: str, *, trust: bool = False) -> Any:
    """Load a .pt2 ExportedProgram, a TorchScript module, or (with trust) a pickled nn.Module."""
    if not os.path.exists(path):
        raise BnfoldError("no such file", path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise BnfoldError("file is empty", path)
    if path.endswith(".pt2"):
        return _load_pt2(path, trust)
    if _is_torchscript(path):
        try:
            return torch.jit.load(path, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise BnfoldError(f"cannot read as TorchScript: {_first_line(e)}", path) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        msg = _first_line(e)
        if "weights_only" not in str(e) and "Unsupported global" not in str(e) and "GLOBAL" not in str(e):
            raise BnfoldError(f"cannot read as a PyTorch file: {msg}", path) from None
        if not trust:
            raise BnfoldError("is a pickled PyTorch object (e.g. a whole nn.Module); unpickling it runs code from the "
                              "file, so bnfold refused it; pass --trust (trust=True) if you trust its source, or save "
                              "the model with torch.export.save / torch.jit.save", path) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise BnfoldError(f"cannot unpickle: {_first_line(e2)}", path) from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BnfoldError("holds only weights (a state_dict); bnfold needs the module itself: save it with "
                          "torch.export.save, torch.jit.save, or torch.save(model) (then pass --trust)", path)
    raise BnfoldError(f"holds a {type(obj).__name__}, not an nn.Module, ExportedProgram or TorchScript module", path)


_REFUSED = "refused to unpickle it without --trust"


def _load_pt2(path: str, trust: bool) -> Any:
    """torch.export.load, which is not as safe as it looks: a .pt2 may hold pickled weights, constants or
    objects (unpickled with weights_only=False or pickle.loads, running code from the file) and compiled
    AOTInductor libraries (loaded into the process). Without `trust` the archive's member names are
    checked first and every unpickling during the load is held to weights only."""
    import logging
    if not trust:
        _check_pt2_members(path)
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                said.append(_first_line(record.exc_info[1]))

    log = logging.getLogger("torch.export")
    keep, propagate = Keep(), log.propagate
    log.addHandler(keep)
    log.propagate = False  # torch logs the real error as a warning, then raises a vaguer one
    try:
        with _weights_only(not trust):
            return torch.export.load(path)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file is the user's input problem
        why = next((s for s in said if s), _first_line(e))
        if _REFUSED in why or "Weights only load failed" in why or _REFUSED in str(e):
            raise BnfoldError("holds pickled objects whose unpickling runs code from the file; bnfold refused "
                              "them; pass --trust if you trust its source", path) from None
        raise BnfoldError(f"cannot read as a torch.export program: {why}", path) from None
    finally:
        log.removeHandler(keep)
        log.propagate = propagate


def _check_pt2_members(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BnfoldError(f"cannot read as a torch.export program: not a zip archive ({_first_line(e)})",
                          path) from None
    for n in names:
        parts = n.replace("\\", "/").split("/")
        if n.startswith(("/", "\\")) or ".." in parts or (len(n) > 1 and n[1] == ":"):
            raise BnfoldError(f"archive member {n!r} points outside the archive; refused", path)
        if "aotinductor" in parts:
            raise BnfoldError(f"holds compiled AOTInductor code ({n!r}), which is loaded into the process and runs; "
                              "pass --trust if you trust its source", path)


class _weights_only:
    """While active (when `on`): torch.load always loads weights only, and pickle.loads in torch's .pt2
    reader refuses."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self) -> None:
        if not self.on:
            return
        import pickle
        self.real = torch.load

        def only_weights(*args: Any, **kwargs: Any) -> Any:
            kwargs["weights_only"] = True
            return self.real(*args, **kwargs)

        class NoPickle:
            def __getattr__(self, name: str) -> Any:
                return getattr(pickle, name)

            @staticmethod
            def loads(*args: Any, **kwargs: Any) -> Any:
                raise pickle.UnpicklingError(f"a pickled object in a .pt2: {_REFUSED}")

        torch.load = only_weights
        try:
            import torch.export.pt2_archive._package as package
        except ImportError:
            package = None
        self.package = package
        if package is not None and hasattr(package, "pickle"):
            self.pickle = package.pickle
            package.pickle = NoPickle()

    def __exit__(self, *exc: Any) -> None:
        if not self.on:
            return
        torch.load = self.real
        if self.package is not None and hasattr(self, "pickle"):
            self.package.pickle = self.pickle


def save(model: Any, path: str) -> None:
    """Write `model` atomically in its own format (.pt2, TorchScript, or a pickled nn.Module)."""
    if isinstance(model, torch.export.ExportedProgram):
        how = torch.export.save
    elif isinstance(model, torch.jit.ScriptModule):
        how = torch.jit.save
    elif isinstance(model, nn.Module):
        how = torch.save
    else:
        raise BnfoldError(f"cannot save a {type(model).__name__} as a PyTorch model", path)
    atomic_write(path, lambda tmp: _writing(how, model, tmp))


def _writing(how: Any, model: Any, tmp: str) -> None:
    """Serialise into memory, then write the bytes: torch's zip writer, when a write to a file fails (disk
    full, file size limit), throws again from its destructor and aborts the whole process. The archive
    is held once in memory meanwhile (about the size of the weights)."""
    import io
    buf = io.BytesIO()
    how(model, buf)
    view = buf.getbuffer()
    try:
        with open(tmp, "wb") as fh:
            step = 64 << 20
            for i in range(0, len(view), step):
                fh.write(view[i:i + step])
    finally:
        view.release()


_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64, "int64": torch.int64, "int32": torch.int32,
           "uint8": torch.uint8, "bool": torch.bool}


def _random(shape: Sequence[int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), generator=g).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape), generator=g).bool()
    return torch.randint(0, 4, tuple(shape), generator=g).to(dtype)


def arg_names(model: Any) -> list[str]:
    if isinstance(model, torch.export.ExportedProgram):
        return list(model.graph_signature.user_inputs)  # the program's own input names, kwargs included
    fn = model.forward if hasattr(model, "forward") else model
    try:
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _ordered(model: Any, named: dict[str, Any]) -> list[Any]:
    names = arg_names(model)
    if names and set(named) <= set(names):
        return [named[n] for n in names if n in named]
    if isinstance(model, torch.export.ExportedProgram):
        # a program's input names are known for sure: an unknown one is a typo, not a position
        raise BnfoldError(f"--input names {sorted(set(named) - set(names))} are not inputs of the program "
                          f"(inputs: {names})")
    return list(named.values())


def example_inputs_for(model: Any, input_specs: Sequence[tuple[str, tuple, str]] | None = None,
                       inputs_npz: str | None = None, seed: int = 0) -> tuple:
    """Example inputs from --inputs FILE.npz, --input NAME:SHAPE[:DTYPE], or an ExportedProgram's own."""
    if inputs_npz:
        from ..verify.inputs import load_npz, npz_batches
        arrays = npz_batches(load_npz(inputs_npz))[0]  # NAME@k are further batches, replayed by verification
        return tuple(tensor_from_numpy(a) for a in _ordered(model, arrays))
    if input_specs:
        g = torch.Generator().manual_seed(seed)
        named = {}
        own = _program_dtypes(model)
        for name, shape, dtype in input_specs:
            if dtype is None:
                dtype = own.get(name, "float32")  # a program knows its inputs' dtypes (int64 ids...)
            if dtype not in _DTYPES:
                raise BnfoldError(f"--input {name}: dtype {dtype!r} is not one bnfold can make for PyTorch")
            named[name] = _random(shape, _DTYPES[dtype], g)
        return tuple(_ordered(model, named))
    if isinstance(model, torch.export.ExportedProgram):
        ex = getattr(model, "example_inputs", None)
        if ex is not None and ex[0] is not None and not ex[1]:
            return tuple(ex[0])
        return _from_placeholders(model, seed)
    raise BnfoldError("PyTorch models need example inputs to trace and verify: pass --input NAME:SHAPE[:DTYPE] "
                      "(e.g. --input x:1x3x224x224) or --inputs FILE.npz")


def tensor_from_numpy(a: np.ndarray) -> torch.Tensor:
    """An .npz array as a tensor; bfloat16, which .npz stores as 2-byte void, comes back as bfloat16."""
    if a.dtype.name == "bfloat16" or (a.dtype.kind == "V" and a.dtype.itemsize == 2):
        import ml_dtypes
        return torch.from_numpy(a.view(ml_dtypes.bfloat16).astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _program_dtypes(model: Any) -> dict[str, str]:
    """Input name -> dtype name (as --input spells it) of an ExportedProgram; empty for other models."""
    if not isinstance(model, torch.export.ExportedProgram):
        return {}
    user = set(model.graph_signature.user_inputs)
    names = {v: k for k, v in _DTYPES.items()}
    return {n.name: names[n.meta["val"].dtype] for n in model.graph.nodes
            if n.op == "placeholder" and n.name in user and isinstance(n.meta.get("val"), torch.Tensor)
            and n.meta["val"].dtype in names}


def _from_placeholders(ep: Any, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    user = set(ep.graph_signature.user_inputs)
    out = []
    for n in ep.graph.nodes:
        if n.op != "placeholder" or n.name not in user:
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
            raise BnfoldError("the exported program has dynamic input shapes and no stored example inputs: pass "
                              "--input NAME:SHAPE[:DTYPE]")
        out.append(_random(val.shape, val.dtype, g))
    return tuple(out)
