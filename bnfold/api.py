"""fold / check / save: dispatch on what the caller gave (a path or an in-memory model) to one pass."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

from .errors import BnfoldError, MissingExtraError
from .io import framework_of
from .results import FoldResult, Report, Verification
from .verify.inputs import InputSpec


def _framework_of_object(model: Any) -> str:
    import onnx
    if isinstance(model, onnx.ModelProto):
        return "onnx"
    mod = type(model).__module__
    for cls in type(model).__mro__:
        m = cls.__module__
        if m.startswith("torch"):
            return "torch"
        if m.startswith(("keras", "tf_keras", "tensorflow")):
            return "keras"
    raise BnfoldError(f"cannot fold a {mod}.{type(model).__name__}; give an onnx.ModelProto, torch.nn.Module, "
                      "torch.export.ExportedProgram, keras.Model or a model file path")


def framework_pass(framework: str):
    """The pass module for a framework, imported lazily with a clear error for a missing extra."""
    if framework == "torch":
        try:
            import torch  # noqa: F401
        except ImportError:
            raise MissingExtraError("PyTorch", "torch") from None
        from .passes import torch_pass
        return torch_pass
    if framework == "keras":
        # TensorFlow's C++ start-up chatter on stderr would bury bnfold's own one-line messages
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            import keras  # noqa: F401
        except ImportError:
            raise MissingExtraError("Keras 3 with TensorFlow", "keras") from None
        from .passes import keras_pass
        return keras_pass
    raise ValueError(framework)


def load(path: str, trust: bool = False) -> Any:
    """Load a model file in any supported format (ModelProto, nn.Module / ExportedProgram, keras.Model)."""
    fw = framework_of(path)
    if fw == "onnx":
        from .onnx_io import load_onnx
        return load_onnx(path)
    if not os.path.exists(path):
        raise BnfoldError("no such file", path)
    return framework_pass(fw).load(path, trust=trust)


def fold(model_or_path: Any, example_inputs: Any = None, verify: bool = True, providers: Sequence[str] | None = None,
         *, atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
         input_specs: Sequence[InputSpec] = (), inputs_npz: str | None = None, batches: int = 1,
         outputs_only: bool = False, standalone: str = "keep", trust: bool = False, dry_run: bool = False,
         progress: Callable[[str], None] | None = None) -> FoldResult:
    """Fold every foldable BatchNorm and verify the result against the unfolded model.

    Returns a FoldResult whose `.model` has the type given (a path gives the loaded type) and whose
    `.report` lists one decision per BatchNorm and the verification. The input is never mutated.
    """
    t0 = time.perf_counter()
    path = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if standalone not in ("keep", "affine"):
        raise BnfoldError(f"--standalone must be keep or affine, not {standalone!r}")
    if path is not None:
        fw = framework_of(path)
        model = load(path, trust=trust)
    else:
        model = model_or_path
        fw = _framework_of_object(model)
        if fw == "onnx":
            _require_loaded_external_data(model)
    t_load = time.perf_counter() - t0
    if standalone != "keep" and fw != "onnx":
        raise BnfoldError(f"--standalone {standalone} rewrites ONNX graphs only; export the {fw} model to ONNX "
                          "first (bnfold export MODEL --to onnx), then fold that", path)
    if fw == "onnx":
        from .passes.onnx_fold import fold_onnx
        try:
            res = fold_onnx(model, verify=verify, providers=providers, atol=atol, rtol=rtol, seed=seed,
                            input_specs=input_specs, inputs_npz=inputs_npz, batches=batches, standalone=standalone,
                            outputs_only=outputs_only,
                            dry_run=dry_run, original_path=path, progress=progress, copy=path is None)
        except BnfoldError as e:
            if e.path is None and path is not None:
                raise BnfoldError(str(e), path) from None  # name the file the problem is about
            raise
    else:
        p = framework_pass(fw)
        if example_inputs is None and (input_specs or inputs_npz or path is not None):
            try:
                example_inputs = p.example_inputs_for(model, input_specs=list(_spec_tuples(input_specs)),
                                                      inputs_npz=inputs_npz, seed=seed)
            except BnfoldError as e:
                if e.path is None and path is not None:
                    raise BnfoldError(str(e), path) from None
                raise
        try:
            res = p.fold(model, example_inputs=example_inputs, verify=verify, providers=providers, atol=atol,
                         rtol=rtol, seed=seed, dry_run=dry_run)
        except BnfoldError as e:
            if e.path is None and path is not None and not isinstance(e, MissingExtraError):
                raise BnfoldError(str(e), path) from None  # name the file the problem is about
            raise
    res.report.model = path if path is not None else res.report.model
    res.report.timing_s = {"load": t_load, **{k: v for k, v in res.report.timing_s.items() if k != "load"}}
    return res


def _require_loaded_external_data(model: Any) -> None:
    from onnx.external_data_helper import uses_external_data

    from .onnx_io import on_disk
    for t in model.graph.initializer:
        if uses_external_data(t) and not t.HasField("raw_data") and not on_disk(t):
            raise BnfoldError(f"initializer {t.name!r} lives in external data that is not loaded; pass the file "
                              "path instead, or onnx.load() the model with its external data")


def _spec_tuples(specs: Sequence[InputSpec]):
    for s in specs:
        yield (s.name, tuple(s.shape), s.dtype)  # None: the model's own dtype for that input, else float32


def check(original: Any, candidate: Any, *, providers: Sequence[str] | None = None,
          atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
          input_specs: Sequence[InputSpec] = (), inputs_npz: str | None = None, batches: int = 1,
          outputs_only: bool = False, example_inputs: Any = None, trust: bool = False,
          progress: Callable[[str], None] | None = None) -> Verification:
    """Are `original` and `candidate` the same function? Truthy Verification when they are.

    Both may be ONNX (paths or ModelProto); a PyTorch or Keras original may be checked against its
    ONNX export (or a folded model of its own framework).
    """
    opath = os.fspath(original) if isinstance(original, (str, os.PathLike)) else None
    orig = load(opath, trust=trust) if opath is not None else original
    cand = load(os.fspath(candidate), trust=trust) if isinstance(candidate, (str, os.PathLike)) else candidate
    fw = _framework_of_object(orig)
    if fw == "onnx":
        if _framework_of_object(cand) != "onnx":
            raise BnfoldError("an ONNX original can only be checked against an ONNX candidate")
        from .verify.onnx_verify import verify_onnx
        try:
            return verify_onnx(orig, cand, providers=providers, atol=atol, rtol=rtol, seed=seed,
                               input_specs=input_specs, inputs_npz=inputs_npz, batches=batches,
                               outputs_only=outputs_only, progress=progress)
        except BnfoldError as e:
            if e.path is None and opath is not None:
                raise BnfoldError(str(e), opath) from None  # inputs are made from the original's signature
            raise
    p = framework_pass(fw)
    if example_inputs is None:
        example_inputs = p.example_inputs_for(orig, input_specs=list(_spec_tuples(input_specs)),
                                              inputs_npz=inputs_npz, seed=seed)
    return p.check(orig, cand, example_inputs=example_inputs, providers=providers, atol=atol, rtol=rtol, seed=seed)


def save(result: FoldResult | Any, path: str) -> None:
    """Write a fold result (or a model) atomically, in the model's own format."""
    model = result.model if isinstance(result, FoldResult) else result
    fw = _framework_of_object(model)
    from .io import check_output_path
    src = [result.report.model] if isinstance(result, FoldResult) and result.report.model else []
    check_output_path(os.fspath(path), src, fw)  # the input itself, a missing folder, a wrong extension
    if fw == "onnx":
        from .onnx_io import save_onnx
        save_onnx(model, os.fspath(path))
    else:
        framework_pass(fw).save(model, os.fspath(path))
    if isinstance(result, FoldResult):
        result.report.output = os.fspath(path)


__all__ = ["fold", "check", "save", "load", "Report", "FoldResult", "Verification"]
