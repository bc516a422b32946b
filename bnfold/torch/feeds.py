"""The inputs a PyTorch verification runs on, what the report says about them, and --save-inputs.

A model runs on its example inputs and on two variants of them (hooks.variants: negated, and fresh
random data of the same shapes), so that a branch the first input does not take is still exercised.
`--save-inputs FILE.npz` writes every batch that ran (batch k of input NAME under NAME@k, see
verify.inputs.save_npz); `--inputs FILE.npz` with several batches replays exactly those, so a replay
is bit for bit. A file with one batch (a user's own data) gets the two variants as well.
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten

from ..core.errors import BnfoldError
from ..core.options import Options
from ..verify import inputs as inp

VARIANTS = ("negated", "fresh random normal x 2 + 0.5 of the same shapes")


def input_names(model: Any, n: int) -> list[str]:
    """One name per positional input: forward's parameter names (a program's own input names), padded
    with input_<i> where the signature has no name (*args)."""
    names: list[str] = []
    if isinstance(model, torch.export.ExportedProgram):
        names = list(model.graph_signature.user_inputs)
    elif isinstance(model, torch.jit.ScriptModule):
        try:
            names = [a.name for a in model.forward.schema.arguments[1:]]
        except Exception:  # noqa: BLE001 - a module without a forward schema: positional names
            names = []
    else:
        try:
            names = [p.name for p in inspect.signature(model.forward).parameters.values()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError, AttributeError):
            names = []
    names = names[:n]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _entry(x: Any) -> dict[str, Any]:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": _dtype(x)}
    leaves = [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]
    return {"shape": None, "structure": f"{type(x).__name__} holding {len(leaves)} tensor(s)",
            "leaves": [{"shape": list(t.shape), "dtype": _dtype(t)} for t in leaves]}


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.cpu(), y.cpu())):
            return False
    return True


def provenance(model: Any, ex: tuple, opts: Options) -> str:
    """How the example inputs were chosen, found by remaking them the way bnfold makes them."""
    from .files import example_inputs_for
    if opts.inputs_npz:
        return f"from {opts.inputs_npz}"
    if opts.input_specs:
        try:
            if _same(ex, example_inputs_for(model, input_specs=opts.spec_tuples(), seed=opts.seed)):
                return f"random (seed {opts.seed}; floats normal, integers in [0, 4)); shape from --input"
        except BnfoldError:
            pass
    if isinstance(model, torch.export.ExportedProgram):
        stored = getattr(model, "example_inputs", None)
        if stored is not None and stored[0] is not None and not stored[1] and _same(ex, tuple(stored[0])):
            return "the program's stored example inputs"
        try:
            if _same(ex, example_inputs_for(model, seed=opts.seed)):
                return f"random (seed {opts.seed}); shapes of the program's inputs"
        except BnfoldError:
            pass
    return "example_inputs given"


def batches(model: Any, ex: tuple, opts: Options) -> tuple[list[tuple], dict[str, dict[str, Any]]]:
    """The input tuples to verify on, and the report's `inputs` entry (one per input name)."""
    from .hooks import variants
    names = input_names(model, len(ex))
    how = provenance(model, ex, opts)
    runs: list[tuple] | None = None
    if opts.inputs_npz:
        saved = inp.npz_batches(inp.load_npz(opts.inputs_npz))
        if len(saved) > 1:
            runs = [_from_arrays(model, b, names, ex, opts.inputs_npz, k) for k, b in enumerate(saved)]
    note = (f"{len(runs)} batches from the file, run as they are" if runs is not None else
            f"also run on 2 variants: {VARIANTS[0]}, and {VARIANTS[1]} (seed {opts.seed + 7919})")
    if runs is None:
        runs = variants(ex, opts.seed)
    doc = {name: {**_entry(x), "how": how, "batches": len(runs), "variants": note} for name, x in zip(names, ex)}
    return runs, doc


def _from_arrays(model: Any, arrays: dict[str, np.ndarray], names: list[str], ex: tuple, path: str,
                 k: int) -> tuple:
    """Batch k of an .npz as an input tuple like `ex` (by forward's names, else in the file's order)."""
    if set(arrays) == set(names):
        ordered = [arrays[n] for n in names]
    elif len(arrays) == len(ex):
        ordered = list(arrays.values())
    else:
        raise BnfoldError(f"batch {k} holds {sorted(arrays)}, the model takes {names}", path)
    from .files import tensor_from_numpy
    out = []
    for a, like in zip(ordered, ex):
        t = tensor_from_numpy(a)
        if isinstance(like, torch.Tensor) and t.dim() != like.dim():
            raise BnfoldError(f"batch {k} has an array of shape {list(t.shape)} where batch 0 has "
                              f"{list(like.shape)}", path)
        out.append(t.to(like.device) if isinstance(like, torch.Tensor) else t)
    return tuple(out)


def check_savable(model: Any, ex: tuple, opts: Options) -> None:
    """--save-inputs needs every input to be a tensor: say so before any work is done."""
    if not opts.save_inputs:
        return
    for name, x in zip(input_names(model, len(ex)), ex):
        if not isinstance(x, torch.Tensor):
            raise BnfoldError(f"--save-inputs: input {name!r} is a {type(x).__name__}, not a tensor; only "
                              "tensor inputs can be written to an .npz")


def save(model: Any, runs: list[tuple], path: str) -> None:
    """Write every batch that ran (verify.inputs.save_npz), for a bit-for-bit replay with --inputs."""
    from .rules import to_numpy
    names = input_names(model, len(runs[0]))
    inp.save_npz([{n: to_numpy(t.detach().clone()) for n, t in zip(names, run)} for run in runs], path)
