"""fold / check / save / load: find the framework's frontend in the registry and hand it one Options."""
from __future__ import annotations

import contextlib
import importlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from .core.errors import BnfoldError, MissingExtraError
from .core.files import check_output_path, framework_of
from .core.frontend import Frontend
from .core.options import InputSpec, Options
from .core.results import FoldResult, Verification

# name -> module holding FRONTEND; imported on first use, so picking one costs nothing
REGISTRY: dict[str, str] = {
    "onnx": "bnfold.onnx.frontend",
    "torch": "bnfold.torch.frontend",
    "keras": "bnfold.keras.frontend",
}


def frontend(name: str) -> Frontend:
    """The frontend registered for a framework name ('onnx', 'torch', 'keras'), its framework importable."""
    fe: Frontend = importlib.import_module(REGISTRY[name]).FRONTEND
    fe.available()
    return fe


def frontend_of(model: Any) -> Frontend:
    """The frontend that owns an in-memory model."""
    for name, mod in REGISTRY.items():
        fe: Frontend = importlib.import_module(mod).FRONTEND
        if fe.owns(model):
            fe.available()
            return fe
    t = type(model)
    raise BnfoldError(f"cannot fold a {t.__module__}.{t.__name__}; give an onnx.ModelProto, torch.nn.Module, "
                      "torch.export.ExportedProgram, keras.Model or a model file path")


@contextlib.contextmanager
def naming(path: str | None) -> Iterator[None]:
    """Errors about a model that came from a file name that file (a missing extra is about the machine)."""
    try:
        yield
    except MissingExtraError:
        raise
    except BnfoldError as e:
        if e.path is None and path is not None:
            raise BnfoldError(str(e), path) from None
        raise


def load(path: str, trust: bool = False) -> Any:
    """Load a model file in any supported format (ModelProto, nn.Module / ExportedProgram, keras.Model)."""
    fe = frontend(framework_of(path))
    if fe.name != "onnx" and not os.path.exists(path):
        raise BnfoldError("no such file", path)
    return fe.load(path, trust=trust)


def fold(model_or_path: Any, example_inputs: Any = None, verify: bool = True, providers: Sequence[str] | None = None,
         *, atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
         input_specs: Sequence[InputSpec] = (), inputs_npz: str | None = None, batches: int = 1,
         outputs_only: bool = False, standalone: str = "keep", trust: bool = False, dry_run: bool = False,
         progress: Callable[[str], None] | None = None, strict: bool = False,
         save_inputs: str | None = None) -> FoldResult:
    """Fold every foldable BatchNorm and verify the result against the unfolded model.

    Returns a FoldResult whose `.model` has the type given (a path gives the loaded type) and whose
    `.report` lists one decision per BatchNorm and the verification. The input is never mutated.
    A fold that fails its proof is reverted (its BN kept with VERIFICATION_FAILED) and the rest
    re-verified; with strict=True any failed proof leaves the verdict failed instead.
    """
    opts = Options.of(verify=verify, providers=providers, atol=atol, rtol=rtol, seed=seed, input_specs=input_specs,
                      inputs_npz=inputs_npz, batches=batches, outputs_only=outputs_only, standalone=standalone,
                      trust=trust, dry_run=dry_run, progress=progress, strict=strict, save_inputs=save_inputs)
    return fold_with(model_or_path, opts, example_inputs)


def fold_with(model_or_path: Any, opts: Options, example_inputs: Any = None, *, owned: bool = False) -> FoldResult:
    """fold() with its options already gathered in one Options. `owned`: the caller hands over an in-memory
    model that load() gave it and never reads it again, so an ONNX fold that needs no original (no
    verification, no dry run) may change it in place instead of folding a copy (and need not ask whether its
    external data was read: load() read it, or left it where the fold reads it)."""
    t0 = time.perf_counter()
    path = os.fspath(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else None
    if opts.standalone not in ("keep", "affine"):
        raise BnfoldError(f"--standalone must be keep or affine, not {opts.standalone!r}")
    if path is not None:
        fe = frontend(framework_of(path))
        model = load(path, trust=opts.trust)
    else:
        model = model_or_path
        fe = frontend_of(model)
    t_load = time.perf_counter() - t0
    if opts.standalone != "keep" and fe.name != "onnx":
        raise BnfoldError(f"--standalone {opts.standalone} rewrites ONNX graphs only; export the {fe.name} model to "
                          "ONNX first (bnfold export MODEL --to onnx), then fold that", path)
    with naming(path):
        if example_inputs is None and (opts.input_specs or opts.inputs_npz or path is not None):
            example_inputs = fe.example_inputs(model, opts)
        more = {"owned": True} if owned and path is None and fe.name == "onnx" else {}
        res = fe.fold(model, opts, example_inputs=example_inputs, path=path, **more)
        res = _self_heal(fe, model, opts, example_inputs, path, res)
    res.report.model = path if path is not None else res.report.model
    res.report.timing_s = {"load": t_load, **{k: v for k, v in res.report.timing_s.items() if k != "load"}}
    return res


MAX_HEALING_ROUNDS = 3


def _self_heal(fe: Frontend, model: Any, opts: Options, example_inputs: Any, path: str | None,
               res: FoldResult) -> FoldResult:
    """Revert exactly the folds a failed proof points at, fold the rest again and re-verify it.

    Each round keeps the BNs blamed so far (reason VERIFICATION_FAILED, with the measured error in the
    detail); a model whose failure blames no fold, or no new fold, stays failed. --strict turns this off.
    """
    spent = dict(res.report.timing_s)
    for _ in range(MAX_HEALING_ROUNDS):
        ver = res.report.verification
        if opts.strict or ver is None or not ver.blame:
            break
        exclude = dict(opts.exclude)
        for b in ver.blame:
            exclude.setdefault(b["bn"], b.get("why") or "its proof failed")
        if len(exclude) == len(opts.exclude):
            break  # nothing new to revert: the failure is not a fold's, the verdict stands
        opts = opts.but(exclude=exclude)
        opts.say(f"reverting {len(exclude)} fold(s) that failed their proof, folding and verifying again")
        res = fe.fold(model, opts, example_inputs=example_inputs, path=path)
        for k, v in res.report.timing_s.items():
            spent[k] = spent.get(k, 0.0) + v
    res.report.timing_s = spent
    if opts.exclude or res.report.reverted:
        res.report.info["self_healing"] = (f"{len(res.report.reverted)} fold(s) failed their proof and were "
                                           "reverted; the rest of the model was folded and verified again")
    return res


def check(original: Any, candidate: Any, *, providers: Sequence[str] | None = None,
          atol: float | Mapping[str, float] | None = None, rtol: float | None = None, seed: int = 0,
          input_specs: Sequence[InputSpec] = (), inputs_npz: str | None = None, batches: int = 1,
          outputs_only: bool = False, example_inputs: Any = None, trust: bool = False,
          progress: Callable[[str], None] | None = None, save_inputs: str | None = None) -> Verification:
    """Are `original` and `candidate` the same function? Truthy Verification when they are.

    Both may be ONNX (paths or ModelProto); a PyTorch or Keras original may be checked against its
    ONNX export (or a folded model of its own framework).
    """
    opts = Options.of(providers=providers, atol=atol, rtol=rtol, seed=seed, input_specs=input_specs,
                      inputs_npz=inputs_npz, batches=batches, outputs_only=outputs_only, trust=trust,
                      progress=progress, save_inputs=save_inputs)
    return check_with(original, candidate, opts, example_inputs)


def check_with(original: Any, candidate: Any, opts: Options, example_inputs: Any = None) -> Verification:
    """check() with its options already gathered in one Options."""
    opath = os.fspath(original) if isinstance(original, (str, os.PathLike)) else None
    orig = load(opath, trust=opts.trust) if opath is not None else original
    cand = load(os.fspath(candidate), trust=opts.trust) if isinstance(candidate, (str, os.PathLike)) else candidate
    fe = frontend_of(orig)
    with naming(opath if fe.name == "onnx" else None):  # ONNX feeds are made from the original's signature
        if example_inputs is None:
            example_inputs = fe.example_inputs(orig, opts)
        return fe.check(orig, cand, opts, example_inputs=example_inputs)


def check_output(out: str, inputs: Sequence[str], framework: str | None = None) -> None:
    """Refuse an output path that would overwrite an input, a file an input reads, or lands nowhere."""
    companions: set[str] = set()
    if Path(out).is_file():
        for i in inputs:
            companions |= companion_files(i)
    check_output_path(out, list(inputs), framework, companions)


_COMPANIONS: dict[tuple[str, int, int], set[str]] = {}


def companion_files(path: str) -> set[str]:
    """The files a model file reads besides itself (ONNX external data), asked once per file version (path,
    modification time, size): for a model with its weights inside, finding out reads the whole file, and a
    fold asks before it starts, for its mark, its report and again before writing. Empty for what is no
    model file."""
    try:
        fw = framework_of(path)
        st = os.stat(path)
    except (BnfoldError, OSError):
        return set()
    if not os.path.isfile(path):
        return set()
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _COMPANIONS:
        _COMPANIONS[key] = importlib.import_module(REGISTRY[fw]).FRONTEND.companion_files(path)
    return set(_COMPANIONS[key])


def save(result: FoldResult | Any, path: str) -> None:
    """Write a fold result (or a model) atomically, in the model's own format."""
    model = result.model if isinstance(result, FoldResult) else result
    fe = frontend_of(model)
    src = [result.report.model] if isinstance(result, FoldResult) and result.report.model else []
    check_output(os.fspath(path), src, fe.name)  # the input itself, a missing folder, a wrong extension
    fe.save(model, os.fspath(path))
    if isinstance(result, FoldResult):
        result.report.output = os.fspath(path)


__all__ = ["fold", "check", "save", "load", "frontend", "frontend_of", "fold_with", "check_with", "check_output",
           "companion_files"]
