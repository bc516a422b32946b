"""Command line: argument parsing and exit codes only (0 ok, 1 not equivalent, 2 bad input/usage)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

from . import __version__
from .core.errors import BnfoldError, core_dependency_error
from .core.options import Options

EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2

FOLD_EPILOG = """\
examples:
  bnfold model.onnx                          fold, verify on every available provider, write model.folded.onnx
  bnfold model.onnx -o deploy.onnx --json    the report as JSON on stdout
  bnfold model.onnx --dry-run                list every BatchNorm and what would happen, write nothing
  bnfold model.onnx --input images:1x3x224x224     shape for a dynamic input
  bnfold models/ -r --keep-going -o out/     every model under models/, mirrored into out/; a summary table
  bnfold model.onnx --bench --html r.html    latency before/after on onnxruntime, and a self-contained HTML report
  bnfold check original.onnx candidate.onnx  are two models the same function? (exit 0/1/2)
  bnfold export model.pt2 --to onnx          fold a PyTorch/Keras model, export ONNX, verify it

exit codes: 0 ok · 1 verification failed (nothing written) · 2 bad input or usage (nothing written)
            with --keep-going each model is written once proven, and the exit code is the worst of them
"""


def _common(p: argparse.ArgumentParser, verify_opts: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout, nothing else")
    p.add_argument("--trust", action="store_true",
                   help="allow formats that run code when loaded (pickled PyTorch modules, Keras Lambda layers)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress on stderr (by default: a progress bar on a terminal, one line per model of a "
                        "batch in a log)")
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
    p = _Parser(
        prog="bnfold", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=FOLD_EPILOG,
        description="Fold inference BatchNorm into neighbouring layers of ONNX, PyTorch and Keras models, "
                    "and prove the folded model computes the same function.\n"
                    "Other commands: 'bnfold check --help', 'bnfold export --help'.")
    p.add_argument("models", nargs="+", metavar="MODEL|DIR",
                   help=".onnx, .pt2, TorchScript .pt, a pickled nn.Module (--trust), .keras or .h5; a folder "
                        "folds every model file in it (files bnfold wrote are left out)")
    p.add_argument("-o", "--output", metavar="OUT|DIR/",
                   help="output file for one MODEL, or a folder (ending in /, or with several models or a folder) "
                        "that mirrors the input tree with the same file names (default: <stem>.folded<ext> beside "
                        "each input)")
    b = p.add_argument_group("batches")
    b.add_argument("-r", "--recursive", action="store_true", help="fold the models in subfolders of a DIR too")
    b.add_argument("--keep-going", action="store_true",
                   help="fold what can be folded: write each model once proven, report each failure, exit with the "
                        "worst code (without it a run writes every model or none)")
    b.add_argument("--force", action="store_true",
                   help="fold the models of a folder run again even where the output is up to date")
    rp = p.add_argument_group("reports")
    rp.add_argument("--bench", action="store_true",
                    help="ONNX: time the original and the folded model on onnxruntime (optimisations on, as deployed) "
                         "on each provider: median latency and speed-up")
    rp.add_argument("--html", metavar="FILE",
                    help="also write a self-contained HTML report: summary, every BatchNorm decision, error vs "
                         "tolerance along the model's depth (written whatever the verdict)")
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
    p = _Parser(
        prog="bnfold check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify that CANDIDATE computes the same function as ORIGINAL (any two ONNX models with the "
                    "same inputs and outputs, or a PyTorch/Keras original against its export).",
        epilog="exit codes: 0 equivalent · 1 not equivalent · 2 bad input or usage")
    p.add_argument("original", metavar="ORIGINAL")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--junit", metavar="FILE", help="also write JUnit XML (one test case per output and provider)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report of the comparison")
    _common(p)
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bnfold export", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fold a PyTorch or Keras model, export it to ONNX and verify the ONNX on onnxruntime against "
                    "the original framework model.",
        epilog="exit codes: 0 ok · 1 verification failed (nothing written) · 2 bad input or usage")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--to", choices=["onnx"], required=True, help="target format")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default <stem>.folded.onnx)")
    p.add_argument("--no-verify", action="store_true", help="skip the numeric verification")
    p.add_argument("--strict", action="store_true", help="a fold that fails its proof fails the run (exit 1)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
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
        outputs_only=getattr(a, "outputs_only", False), trust=a.trust,
        strict=getattr(a, "strict", False), save_inputs=a.save_inputs, **more)


def _progress(a: argparse.Namespace, models: int = 1) -> Any:
    from .progress import Progress
    return Progress.choose(a.quiet, models)


def _emit(a: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    from .report import json_safe, to_json
    print(to_json(json_safe(doc)) if a.json else text)


def _shaping(a: argparse.Namespace) -> dict[str, Any]:
    """The arguments that shape a written model: an output made with others is not up to date."""
    npz = None
    if a.inputs and os.path.isfile(a.inputs):
        st = os.stat(a.inputs)
        npz = [os.path.realpath(a.inputs), st.st_size, st.st_mtime_ns]
    return {"verify": not a.no_verify, "strict": a.strict, "standalone": a.standalone, "providers": a.providers,
            "atol": a.atol, "rtol": a.rtol, "seed": a.seed, "input": a.input, "inputs": npz, "batches": a.batches,
            "outputs_only": a.outputs_only, "trust": a.trust}


def _write_html(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        from .html import write_html
        write_html(doc, path)


def cmd_fold(a: argparse.Namespace) -> int:
    from . import api, batch, report
    opts = _options(a, verify=not a.no_verify, standalone=a.standalone, dry_run=a.dry_run)
    if a.no_verify and (opts.atol is not None or opts.rtol is not None):
        raise BnfoldError("--atol/--rtol make no sense with --no-verify")
    if a.bench and a.dry_run:
        raise BnfoldError("--bench times the folded model as written; it makes no sense with --dry-run")
    pl = batch.plan(a.models, a.output, a.recursive)
    if a.html:
        api.check_output(a.html, [j.source for j in pl.jobs] + [j.output for j in pl.jobs if j.output] + list(a.models))
    st = batch.Settings(keep_going=a.keep_going and not pl.single, force=a.force, bench=a.bench,
                        fingerprint=batch.fingerprint(_shaping(a)))
    prog = _progress(a, len(pl.jobs))
    for i in pl.ignored:
        prog.note(f"left out {i['path']}: {i['why']}")
    late: list[dict[str, Any]] = []

    def names_ok(outcomes: list[Any]) -> None:
        _check_atol_names(opts.atol, [o.report.verification for o in outcomes if o.report is not None])

    try:
        outcomes = batch.run(pl, opts.but(progress=prog.say), st, prog, before_writing=names_ok)
    finally:
        prog.close()
    if st.keep_going:
        try:
            names_ok(outcomes)
        except BnfoldError as e:
            late.append(batch.error_doc(e))
    code = max([o.code for o in outcomes] + [EXIT_BAD_INPUT for _ in late], default=EXIT_OK)
    texts = [_report_text(o) for o in outcomes if o.report is not None]
    if pl.single:
        doc = outcomes[0].report.to_dict() if a.json or a.html else {}  # (a decision a BN: 32k dicts are not free)
    else:
        rows = [o.row() for o in outcomes]
        doc = {"schema": 1, "reports": [o.report.to_dict() for o in outcomes if o.report is not None],
               "summary": {"models": rows, "ignored": pl.ignored, "exit_code": code}}
        errors = [o.error for o in outcomes if o.error is not None] + late
        if errors:
            doc["errors"] = errors
        texts.append(report.summary_table(rows, pl.ignored, late))
    _write_html(a.html, doc)
    _emit(a, doc, "\n\n".join(texts))
    return code


def _report_text(o: Any) -> str:
    from . import report
    why = {EXIT_DIFFERENT: "verification did not pass"}.get(o.code, "")
    if o.status.startswith("not written: another"):
        why = "another model's verification did not pass"
    return report.text(o.report) + (f"\nnothing written: {why}" if why else "")


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
    if a.html:
        api.check_output(a.html, [a.original, a.candidate])
    opts = _options(a)
    prog = _progress(a)
    try:
        prog.model(a.candidate)
        ver = api.check_with(a.original, a.candidate, opts.but(progress=prog.say))
    finally:
        prog.close()
    _check_atol_names(opts.atol, [ver])
    doc = {"schema": 1, "original": a.original, "candidate": a.candidate, "verification": ver.to_dict()}
    text = f"{a.original} vs {a.candidate}\n" + "\n".join(report.verification_lines(ver))
    if a.junit:
        from .junit import write_junit
        write_junit(ver, a.junit, suite=f"bnfold check {os.path.basename(a.candidate)}")
    _write_html(a.html, doc)
    _emit(a, doc, text)
    return EXIT_OK if ver.passed is True else EXIT_DIFFERENT


def cmd_export(a: argparse.Namespace) -> int:
    from . import api
    from .core.files import framework_of
    from pathlib import Path
    fw = framework_of(a.model)
    if fw == "onnx":
        raise BnfoldError("is already ONNX; fold it with 'bnfold MODEL'", a.model)
    p = Path(a.model)
    out = a.output or str(p.with_name(f"{p.stem if p.is_file() else p.name}.folded.onnx"))
    api.check_output(out, [a.model], "onnx")
    if a.html:
        api.check_output(a.html, [a.model, out])
    prog = _progress(a)
    opts = _options(a, verify=not a.no_verify).but(progress=prog.say)
    prog.model(a.model)
    try:
        return _export(a, fw, out, opts)
    finally:
        prog.close()


def _export(a: argparse.Namespace, fw: str, out: str, opts: Options) -> int:
    from . import api, batch, marks, report
    model = api.load(a.model, trust=a.trust)
    fe = api.frontend(fw)
    with api.naming(a.model):
        example = fe.example_inputs(model, opts)
    # the exporter writes before the proof: into a temporary name, renamed over `out` only once verified,
    # so a failed proof neither leaves a file nor destroys one already at `out`
    from .core.files import remove_temp, temp_path
    tmp = temp_path(out, ".onnx")
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
            mark = marks.make(a.model, marks.digest(a.model), batch.fingerprint({"export": vars(a)}),
                              ver.verdict if ver is not None else None)
            marks.stamp(tmp, mark)  # an export is bnfold's output too: a folder run leaves it out
            os.replace(tmp, out)
            rep.output = out
    finally:
        remove_temp(tmp)
    doc = rep.to_dict()
    _write_html(a.html, doc)
    _emit(a, doc, report.text(rep) + ("\nnothing written: verification did not pass" if failed else ""))
    return EXIT_DIFFERENT if failed else EXIT_OK


class _UsageError(Exception):
    """argparse's complaint, raised instead of exiting so --json can still print its document."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(message)


def _fail(json_wanted: bool, message: str, path: str | None, code: int) -> int:
    """One line on stderr; with --json also the one JSON document on stdout."""
    print(f"bnfold: {'' if code == 130 else 'error: '}{f'{path}: ' if path else ''}{message}", file=sys.stderr)
    if json_wanted:
        from .report import json_safe, to_json
        print(to_json(json_safe({"schema": 1, "error": {"message": message, "path": path, "code": code}})))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "check":
        parser, cmd, rest = _check_parser(), cmd_check, args[1:]
    elif args and args[0] == "export":
        parser, cmd, rest = _export_parser(), cmd_export, args[1:]
    else:
        parser, cmd, rest = _fold_parser(), cmd_fold, args
    json_wanted = "--json" in rest
    try:
        a = parser.parse_args(rest)
    except _UsageError as e:
        parser.print_usage(sys.stderr)
        return _fail(json_wanted, str(e), None, EXIT_BAD_INPUT)
    try:
        return cmd(a)
    except BnfoldError as e:
        from .batch import error_doc
        d = error_doc(e)
        if not a.json:
            print(f"bnfold: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return _fail(True, d["message"], d["path"], EXIT_BAD_INPUT)
    except OSError as e:  # the file system said no (a folder gone, a disk full...): not a bug in bnfold
        return _fail(json_wanted, f"{e.strerror or e}", e.filename, EXIT_BAD_INPUT)
    except Exception as e:
        missing = core_dependency_error(e)  # (the frameworks' extras are MissingExtraError, a BnfoldError)
        if missing is not None:
            return _fail(json_wanted, str(missing), None, EXIT_BAD_INPUT)
        if a.json:  # a bug: its traceback follows on stderr, and --json still gets its one document
            from .report import json_safe, to_json
            print(to_json(json_safe({"schema": 1, "error": {
                "message": f"internal error (a bug in bnfold; please report it): {type(e).__name__}: {e}",
                "path": None, "code": 1, "internal": True}})))
        raise
    except KeyboardInterrupt:
        done = "; the models proven before it are written, the rest is not" if getattr(a, "keep_going", False) \
            else "; nothing written"
        return _fail(json_wanted, f"interrupted{done}", None, 130)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
