"""Command line: argument parsing and exit codes only (0 ok, 1 not equivalent, 2 bad input/usage)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

from . import __version__
from .core.errors import BnfoldError
from .core.options import Options

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2

FOLD_EPILOG = """\
examples:
  bnfold model.onnx                          fold, verify on every available provider, write model.folded.onnx
  bnfold model.onnx -o deploy.onnx --json    the report as JSON on stdout
  bnfold model.onnx --dry-run                list every BatchNorm and what would happen, write nothing
  bnfold model.onnx --input images:1x3x224x224     shape for a dynamic input
  bnfold check original.onnx candidate.onnx  are two models the same function? (exit 0/1/2)
  bnfold export model.pt2 --to onnx          fold a PyTorch/Keras model, export ONNX, verify it

exit codes: 0 ok · 1 verification failed (nothing written) · 2 bad input or usage (nothing written)
"""


def _common(p: argparse.ArgumentParser, verify_opts: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout, nothing else")
    p.add_argument("--trust", action="store_true",
                   help="allow formats that run code when loaded (pickled PyTorch modules, Keras Lambda layers)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    if not verify_opts:
        return
    g = p.add_argument_group("verification")
    g.add_argument("--providers", metavar="LIST",
                   help="comma-separated: cpu,cuda,tensorrt (default: every available one; an explicitly requested "
                        "provider that cannot run is an error)")
    g.add_argument("--atol", action="append", metavar="[NAME:]VALUE",
                   help="absolute tolerance instead of the derived one, globally or per output (repeatable)")
    g.add_argument("--rtol", type=float, metavar="VALUE", help="relative tolerance instead of the derived one")
    g.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    g.add_argument("--input", action="append", default=[], metavar="NAME:SHAPE[:DTYPE]",
                   help="shape (and dtype) of an input, e.g. images:1x3x224x224 (dynamic dims default to 1)")
    g.add_argument("--inputs", metavar="FILE.npz", help="real input data: an .npz with one array per input name")
    g.add_argument("--batches", type=int, default=1, metavar="N", help="number of random input batches (default 1)")
    g.add_argument("--save-inputs", metavar="FILE.npz",
                   help="write the exact inputs verification used (replay them with --inputs FILE.npz)")
    g.add_argument("--outputs-only", action="store_true",
                   help="only the model outputs decide; by default every tensor both models compute under the same "
                        "name must agree too (catches errors a ReLU masks on the test inputs)")


def _fold_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnfold", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FOLD_EPILOG,
        description="Fold inference BatchNorm into neighbouring layers of ONNX, PyTorch and Keras models, "
                    "and prove the folded model computes the same function.\n"
                    "Other commands: 'bnfold check --help', 'bnfold export --help'.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help=".onnx, .pt2, TorchScript .pt, a pickled nn.Module (--trust), .keras or .h5")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (one MODEL only; default <stem>.folded<ext>)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric verification")
    p.add_argument("--strict", action="store_true",
                   help="a fold that fails its proof fails the run (exit 1, nothing written); by default that one "
                        "fold is reverted, its BatchNorm kept (VERIFICATION_FAILED) and the rest verified again")
    p.add_argument("--dry-run", action="store_true", help="decide and report, write nothing")
    p.add_argument("--standalone", choices=["keep", "affine"], default="keep",
                   help="ONNX: a BatchNorm with no layer to fold into: keep it, or rewrite it as Mul+Add (default keep)")
    p.add_argument("--version", action="version", version=f"bnfold {__version__}")
    _common(p)
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnfold check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify that CANDIDATE computes the same function as ORIGINAL (any two ONNX models with the "
                    "same inputs and outputs, or a PyTorch/Keras original against its export).",
        epilog="exit codes: 0 equivalent · 1 not equivalent · 2 bad input or usage")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML (one test case per output and provider)")
    _common(p)
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnfold export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fold a PyTorch or Keras model, export it to ONNX and verify the ONNX on onnxruntime against "
                    "the original framework model.",
        epilog="exit codes: 0 ok · 1 verification failed (nothing written) · 2 bad input or usage")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", choices=["onnx"], required=True, help="target format")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default <stem>.folded.onnx)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric verification")
    p.add_argument("--strict", action="store_true", help="a fold that fails its proof fails the run (exit 1)")
    _common(p)
    return p


def _parse_atol(values: list[str] | None) -> Any:
    if not values:
        return None
    glob: float | None = None
    per: dict[str, float] = {}
    for v in values:
        name, sep, num = v.rpartition(":")
        try:
            f = float(num)
        except ValueError:
            raise BnfoldError(f"--atol {v!r}: expected VALUE or NAME:VALUE") from None
        if not math.isfinite(f) or f < 0:
            raise BnfoldError(f"--atol {v!r}: a tolerance must be a finite number >= 0")
        if sep and not name:
            raise BnfoldError(f"--atol {v!r}: the output name before ':' is empty")
        if sep:
            per[name] = f
        else:
            glob = f
    if per:
        if glob is not None:
            return _DefaultDict(per, glob)
        return per
    return glob


class _DefaultDict(dict):
    """Per-output tolerances with a default for the other outputs."""

    def __init__(self, per: dict[str, float], default: float) -> None:
        super().__init__(per)
        self.default = default

    def get(self, key: Any, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key, self.default)


def _options(a: argparse.Namespace, **more: Any) -> Options:
    """The one Options object a command hands down, from its parsed arguments."""
    if a.input:  # the verification package is imported only by runs that use it
        from .verify.inputs import parse_input_spec
    if a.batches < 1:
        raise BnfoldError("--batches must be at least 1")
    if a.seed < 0:
        raise BnfoldError(f"--seed {a.seed}: the seed must be >= 0")
    if a.rtol is not None and (not math.isfinite(a.rtol) or a.rtol < 0):
        raise BnfoldError(f"--rtol {a.rtol}: a tolerance must be a finite number >= 0")
    return Options.of(
        providers=[p for p in a.providers.split(",") if p.strip()] if a.providers else None,
        atol=_parse_atol(a.atol), rtol=a.rtol, seed=a.seed,
        input_specs=[parse_input_spec(s) for s in a.input], inputs_npz=a.inputs, batches=a.batches,
        outputs_only=getattr(a, "outputs_only", False), trust=a.trust, progress=_progress(a),
        strict=getattr(a, "strict", False), save_inputs=a.save_inputs, **more)


def _progress(a: argparse.Namespace):
    if a.quiet or a.json or not sys.stderr.isatty():
        return None
    return lambda msg: print(f"bnfold: {msg}...", file=sys.stderr, flush=True)


def _emit(a: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    from .report import json_safe, to_json
    print(to_json(json_safe(doc)) if a.json else text)


def cmd_fold(a: argparse.Namespace) -> int:
    from . import api, report
    from .core.files import default_output, framework_of
    if a.output and len(a.models) > 1:
        raise BnfoldError("-o/--output needs exactly one MODEL")
    opts = _options(a, verify=not a.no_verify, standalone=a.standalone, dry_run=a.dry_run)
    if a.no_verify and (opts.atol is not None or opts.rtol is not None):
        raise BnfoldError("--atol/--rtol make no sense with --no-verify")
    docs, texts, code = [], [], EXIT_OK
    outs = []
    for m in a.models:
        out = a.output or default_output(m)
        if not a.dry_run:
            api.check_output(out, a.models, framework_of(m))
        outs.append(out)
    # Every model is folded and verified before anything is written: a bad input (exit 2) anywhere
    # in the list leaves nothing behind.
    results = [api.fold_with(m, opts) for m in a.models]
    _check_atol_names(opts.atol, [r.report.verification for r in results])
    # Likewise a failed proof anywhere (exit 1) writes nothing: a run either delivers every model or none.
    failed = [not a.no_verify and (r.report.verification is None or r.report.verification.passed is not True)
              for r in results]
    if any(failed):
        code = max(code, EXIT_DIFFERENT)
    for m, out, res, bad in zip(a.models, outs, results, failed):
        rep = res.report
        rep.model = m
        rep.timing_s.setdefault("save", 0.0)
        if not any(failed) and not a.dry_run:
            import time
            t = time.perf_counter()
            api.save(res, out)
            rep.timing_s["save"] = time.perf_counter() - t
        docs.append(rep.to_dict())
        why = ("verification did not pass" if bad else "another model's verification did not pass") if any(failed) else ""
        texts.append(report.text(rep) + (f"\nnothing written: {why}" if why else ""))
    doc = docs[0] if len(docs) == 1 else {"schema": 1, "reports": docs}
    _emit(a, doc, "\n\n".join(texts))
    return code


def _check_atol_names(atol: Any, verifications: list[Any]) -> None:
    """A per-output --atol must name an output of some model (a typo would silently not apply)."""
    if not isinstance(atol, dict):
        return
    seen = {o for v in verifications if v is not None for p in v.providers.values() if p.ran for o in p.outputs}
    if not seen:
        return  # nothing ran: nothing to check the names against
    unknown = sorted(k for k in atol if k not in seen)
    if unknown:
        raise BnfoldError(f"--atol names {unknown} are not outputs of the model (outputs: {sorted(seen)})")


def cmd_check(a: argparse.Namespace) -> int:
    from . import api, report
    for p in (a.original, a.candidate):
        if not os.path.exists(p):
            raise BnfoldError("no such file", p)
    if a.junit:
        api.check_output(a.junit, [a.original, a.candidate])
    opts = _options(a)
    ver = api.check_with(a.original, a.candidate, opts)
    _check_atol_names(opts.atol, [ver])
    doc = {"schema": 1, "original": a.original, "candidate": a.candidate, "verification": ver.to_dict()}
    text = f"{a.original} vs {a.candidate}\n" + "\n".join(report.verification_lines(ver))
    if a.junit:
        from .junit import write_junit
        write_junit(ver, a.junit, suite=f"bnfold check {os.path.basename(a.candidate)}")
    _emit(a, doc, text)
    return EXIT_OK if ver.passed is True else EXIT_DIFFERENT


def cmd_export(a: argparse.Namespace) -> int:
    from . import api, report
    from .core.files import framework_of
    from pathlib import Path
    fw = framework_of(a.model)
    if fw == "onnx":
        raise BnfoldError("is already ONNX; fold it with 'bnfold MODEL'", a.model)
    p = Path(a.model)
    out = a.output or str(p.with_name(f"{p.stem if p.is_file() else p.name}.folded.onnx"))
    api.check_output(out, [a.model], "onnx")
    opts = _options(a, verify=not a.no_verify)
    model = api.load(a.model, trust=a.trust)
    fe = api.frontend(fw)
    with api.naming(a.model):
        example = fe.example_inputs(model, opts)
    # the exporter writes before the proof: into a temporary name, renamed over `out` only once verified,
    # so a failed proof neither leaves a file nor destroys one already at `out`
    tmp = str(Path(out).with_name(f".{Path(out).name}.bnfold-{os.getpid()}.onnx"))
    try:
        try:
            res = fe.export_onnx(model, tmp, opts, example_inputs=example)
        except BnfoldError as e:
            if e.path is None or e.path == tmp:
                raise BnfoldError(str(e).removeprefix(f"{tmp}: "), a.model) from None  # name the user's file
            raise
        rep = res.report
        rep.model = a.model
        ver = rep.verification
        failed = not a.no_verify and (ver is None or ver.passed is not True)
        if failed:
            rep.output = None
        else:
            os.replace(tmp, out)
            rep.output = out
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _emit(a, rep.to_dict(), report.text(rep) + ("\nnothing written: verification did not pass" if failed else ""))
    return EXIT_DIFFERENT if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "check":
        parser, cmd, rest = _check_parser(), cmd_check, args[1:]
    elif args and args[0] == "export":
        parser, cmd, rest = _export_parser(), cmd_export, args[1:]
    else:
        parser, cmd, rest = _fold_parser(), cmd_fold, args
    a = parser.parse_args(rest)
    try:
        return cmd(a)
    except BnfoldError as e:
        print(f"bnfold: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("bnfold: interrupted; nothing written", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
