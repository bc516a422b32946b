"""The PyTorch frontend (see core/frontend.py): nn.Modules, GraphModules, torch.export programs, TorchScript.

Importing this module imports no torch: each method imports what it needs when called.
"""
from __future__ import annotations

import os
from typing import Any

from ..core.errors import BnfoldError, MissingExtraError
from ..core.options import Options
from ..core.results import FoldResult, Verification


def as_tuple(example_inputs: Any) -> tuple | None:
    """Example inputs as the positional tuple a torch model is called with."""
    if example_inputs is None:
        return None
    import torch
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


class TorchFrontend:
    name = "torch"
    needs = "PyTorch"
    extra = "torch"

    def owns(self, model: Any) -> bool:
        # a Keras model on Keras' torch backend is also an nn.Module: it is Keras' to fold
        mro = type(model).__mro__
        return any(c.__module__.startswith("torch") for c in mro) and not any(c.__module__.startswith("keras")
                                                                              for c in mro)

    def available(self) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MissingExtraError(self.needs, self.extra) from None

    def load(self, path: str, *, trust: bool = False) -> Any:
        from .files import load
        return load(path, trust=trust)

    def save(self, model: Any, path: str) -> None:
        from .files import save
        save(model, path)

    def companion_files(self, path: str) -> set[str]:
        return set()

    def example_inputs(self, model: Any, opts: Options) -> Any:
        from .files import example_inputs_for
        return example_inputs_for(model, input_specs=opts.spec_tuples(), inputs_npz=opts.inputs_npz, seed=opts.seed)

    def fold(self, model: Any, opts: Options, *, example_inputs: Any = None, path: str | None = None) -> FoldResult:
        """Fold an nn.Module, GraphModule, ExportedProgram or TorchScript module; the result has the same type."""
        import torch
        import torch.nn as nn

        from .verify import requested_devices
        requested_devices(opts.providers)  # reject bad names before any work
        ex = as_tuple(example_inputs)
        if isinstance(model, torch.export.ExportedProgram):
            from .program import fold_exported
            return fold_exported(model, opts, ex)
        if isinstance(model, torch.jit.ScriptModule):
            from .script import fold_script
            return fold_script(model, opts, ex)
        if not isinstance(model, nn.Module):
            raise BnfoldError(f"cannot fold a {type(model).__name__}: expected an nn.Module, ExportedProgram or "
                              "TorchScript module")
        from .fold import fold_nn
        return fold_nn(model, opts, ex)

    def check(self, original: Any, candidate: Any, opts: Options, *, example_inputs: Any = None) -> Verification:
        """Is `candidate` (a torch model, an ONNX file path or ModelProto) the same function as `original`?"""
        import torch
        import torch.nn as nn
        ex = as_tuple(example_inputs)
        if ex is None:
            ex = self.example_inputs(original, opts.but(input_specs=(), inputs_npz=None))
        if isinstance(candidate, (str, os.PathLike)) or type(candidate).__name__ == "ModelProto":
            from .export import verify_onnx_against_torch
            return verify_onnx_against_torch(original, candidate, ex, opts)
        from .fold import prepare
        from .verify import verify_result
        ref = prepare(original)[0] if isinstance(original, nn.Module) and not isinstance(
            original, torch.jit.ScriptModule) else original
        return verify_result(ref, candidate, ex, opts.but(verify=True))

    def export_onnx(self, model: Any, out_path: str, opts: Options, *, example_inputs: Any = None) -> FoldResult:
        """Fold, export the folded model to ONNX at `out_path`, and verify the ONNX against the original."""
        from .export import write_and_verify
        ex = as_tuple(example_inputs)
        if ex is None:
            ex = self.example_inputs(model, opts.but(input_specs=(), inputs_npz=None))
        res = self.fold(model, opts.but(verify=False), example_inputs=ex)
        return write_and_verify(res, model, out_path, ex, opts)


FRONTEND = TorchFrontend()
