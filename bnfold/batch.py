"""Batches: which files a run folds, where each result goes, and what happened to each of them.

- Inputs: model files named on the command line, and the model files in folders (top level, or the
  whole tree with --recursive; hidden files and SavedModel internals are not walked). In a batch a
  file bnfold wrote is never an input: recognised by the mark in its own metadata (marks.py), by the
  `*.folded.*` name, or by lying in the run's output folder; each is listed as left out, with why.
- Outputs: `<stem>.folded<ext>` beside each input; `-o FILE` for one model; `-o DIR/` (or -o with a
  folder or several models) mirrors each input folder's tree under DIR, keeping the file names.
- A folder run is incremental: an output that bnfold already wrote from the same input bytes, with
  the same options and version, is reported up to date and not folded again (--force folds it anyway).
- Without --keep-going a run delivers every model or none: a bad input anywhere is exit 2, a proof that
  failed anywhere is exit 1, and nothing is written. With it, each model is written as soon as it is
  proven, failures are reported one by one and the exit code is the worst.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import api, marks
from .beforeafter import anatomy, compare, file_bytes
from .core.errors import BnfoldError, core_dependency_error
from .core.files import (KERAS_EXTS, ONNX_EXTS, TORCH_EXTS, default_output, framework_of, remove_temp, temp_path,
                          write_error)
from .core.hold import holding
from .core.later import Later
from .core.options import Options
from .core.pause import paused_gc
from .core.results import FoldResult, Report
from .progress import Progress

MODEL_EXTS = ONNX_EXTS | TORCH_EXTS | KERAS_EXTS
EXIT_OK, EXIT_DIFFERENT, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Job:
    """One model to fold: its path, where its result goes, the folder it was found in (if any)."""

    source: str
    output: str | None
    folder: str | None = None
    mirrored: bool = False  # the output goes into a tree under -o DIR/, whose folders are made as needed


@dataclass
class Plan:
    """The jobs of a run, the files left out (each with why), and whether folders were walked."""

    jobs: list[Job]
    ignored: list[dict[str, str]] = field(default_factory=list)
    walked: bool = False
    to_dir: bool = False

    @property
    def single(self) -> bool:
        """One model named on the command line: today's report, not a batch summary."""
        return not self.walked and len(self.jobs) == 1 and not self.ignored


@dataclass
class Outcome:
    """What happened to one job."""

    job: Job
    code: int = EXIT_OK
    status: str = ""
    report: Report | None = None
    error: dict[str, Any] | None = None
    result: FoldResult | None = None  # held until written (a run that delivers all or nothing)
    seconds: float = 0.0
    version: list[tuple] | None = None  # the input's files as loaded (see _version)
    digest: Later | None = None  # their SHA-256 for the output's mark, computed while the model folds

    def row(self) -> dict[str, Any]:
        """The summary's line for this model."""
        r = self.report
        row: dict[str, Any] = {"model": self.job.source, "output": r.output if r else None, "status": self.status,
                               "exit_code": self.code}
        if r is not None:
            ver = r.verification
            row.update(bn=len(r.decisions), folded=len(r.folded), skipped=len(r.skipped),
                       verdict=ver.verdict if ver is not None and ver.skipped_reason is None else None,
                       before_after=r.before_after)
        if self.error is not None:
            row["error"] = self.error
        if self.status == "up to date":
            row["output"] = self.job.output
        row["seconds"] = round(self.seconds, 3)
        return row


# -- planning -------------------------------------------------------------------------------------

def _is_folder(p: Path) -> bool:
    return p.is_dir() and not (p / "saved_model.pb").exists()


def _named_as_output(p: Path) -> bool:
    return "folded" in p.name.split(".")[1:]


def plan(models: Sequence[str], output: str | None, recursive: bool = False) -> Plan:
    """The jobs for MODEL|DIR arguments and -o; BnfoldError for a usage problem (exit 2)."""
    walked = any(_is_folder(Path(m)) for m in models)
    several = walked or len(models) > 1
    to_dir = output is not None and (output.endswith(("/", os.sep)) or several)
    if to_dir and Path(output).suffix.lower() in MODEL_EXTS and not Path(output).is_dir():
        raise BnfoldError("-o/--output names one model file, which needs exactly one MODEL; give a folder "
                          "(-o DIR/) for several models or a folder of them", output)
    out_root = Path(output) if to_dir else None
    if out_root is not None and out_root.exists() and not out_root.is_dir():
        raise BnfoldError("-o/--output is an existing file, not a folder", output)
    pl = Plan([], walked=walked, to_dir=to_dir)
    seen: set[str] = set()

    def add(src: Path, folder: Path | None) -> None:
        key = os.path.realpath(src)
        if key in seen:
            return
        seen.add(key)
        if several:  # a batch never takes what bnfold wrote as an input
            why = _left_out(src)
            if why:
                pl.ignored.append({"path": str(src), "why": why})
                return
        if out_root is None:
            out = output if output is not None else default_output(str(src))
        else:
            out = str(out_root / (src.relative_to(folder) if folder is not None else src.name))
        pl.jobs.append(Job(str(src), out, str(folder) if folder is not None else None, mirrored=to_dir))

    for m in models:
        p = Path(m)
        if _is_folder(p):
            if out_root is not None and os.path.realpath(out_root) == os.path.realpath(p):
                raise BnfoldError("-o/--output is the input folder itself: the outputs would replace the inputs, "
                                  "which are never overwritten; give another folder", output)
            found = list(_walk(p, recursive, out_root, pl.ignored))
            if not found and not any(i["path"].startswith(str(p)) for i in pl.ignored):
                raise BnfoldError("no model files in this folder" + ("" if recursive else " (add --recursive to "
                                  "look in its subfolders)"), m)
            for f in found:
                add(f, p)
        else:
            add(p, None)
    sources = {os.path.realpath(j.source): j.source for j in pl.jobs}
    outs: dict[str, str] = {}
    for j in pl.jobs:
        hit = sources.get(os.path.realpath(j.output)) if j.output and several else None
        if hit is not None:
            raise BnfoldError(f"the output of {j.source} would overwrite the input {hit}; the input is never "
                              "overwritten", j.output)
        k = os.path.realpath(j.output) if j.output else ""
        if k and k in outs:
            raise BnfoldError(f"{outs[k]} and {j.source} would both be written to {j.output}")
        outs[k] = j.source
    return pl


def _walk(root: Path, recursive: bool, out_root: Path | None, ignored: list[dict[str, str]]):
    """Model files (and SavedModel folders) in `root`, sorted; never inside hidden or output folders."""
    skip = os.path.realpath(out_root) if out_root is not None else None

    def unreadable(err: OSError) -> None:
        raise BnfoldError(f"cannot read this folder: {err.strerror or err}", err.filename or str(root))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
        here = Path(dirpath)
        keep = []
        for name in sorted(dirnames):
            sub = here / name
            if name.startswith("."):
                continue
            if skip is not None and os.path.realpath(sub) == skip:
                ignored.append({"path": str(sub), "why": "the output folder of this run"})
                continue
            if (sub / "saved_model.pb").exists():
                yield sub  # a model, not a folder to walk
                continue
            keep.append(name)
        dirnames[:] = keep if recursive else []
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in MODEL_EXTS:
                yield here / name


def _left_out(src: Path) -> str | None:
    """Why a batch does not fold this file (it is a bnfold output), or None."""
    mark = marks.read(str(src))
    if mark is not None:
        return f"written by {mark.get('written_by', 'bnfold')} (folded from {mark.get('source', '?')})"
    if _named_as_output(src):
        return "named like a bnfold output (*.folded.*)"
    return None


# -- running --------------------------------------------------------------------------------------

@dataclass
class Settings:
    """How a batch runs, besides the Options each fold gets."""

    keep_going: bool = False
    force: bool = False
    bench: bool = False
    fingerprint: str = ""


def fingerprint(args: dict[str, Any]) -> str:
    """A short digest of the options that shape an output (an output made otherwise is not up to date)."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(pl: Plan, opts: Options, st: Settings, progress: Progress,
        before_writing: Callable[[list[Outcome]], None] | None = None) -> list[Outcome]:
    """Fold every job: all or nothing, or (keep_going) each on its own. Raises BnfoldError on a bad input
    when not keep_going (nothing written); `before_writing` may raise one too, once every model is folded."""
    outcomes: list[Outcome] = []
    if not st.keep_going:
        for j in pl.jobs:
            _precheck(j, opts)  # an unwritable output is found before any work, and nothing is written
    for j in pl.jobs:
        t0 = time.perf_counter()
        progress.model(j.source)
        try:
            o = _fold(j, pl, opts, st)
            if st.keep_going and o.result is not None:
                _deliver(o, opts, st)
        except BnfoldError as e:
            if not st.keep_going:
                raise
            o = Outcome(j, EXIT_BAD_INPUT, "error", error=error_doc(e))
        except Exception as e:  # noqa: BLE001 - a bug met on one model must not stop the others
            if not st.keep_going:
                raise
            missing = core_dependency_error(e)
            if missing is not None:  # about the machine, not the model: one line, no traceback
                o = Outcome(j, EXIT_BAD_INPUT, "error", error=error_doc(missing))
            else:
                import traceback
                traceback.print_exc()  # for whoever fixes it; the summary carries the one line
                o = Outcome(j, EXIT_BAD_INPUT, "error", error={
                    "message": f"internal error (a bug in bnfold; please report it): {type(e).__name__}: {e}",
                    "path": j.source, "code": EXIT_BAD_INPUT, "internal": True})
        o.seconds = time.perf_counter() - t0
        progress.done(j.source, o.status if o.error is None else f"error: {o.error['message']}")
        outcomes.append(o)
    if not st.keep_going:
        if before_writing is not None:
            before_writing(outcomes)
        failed = any(o.code == EXIT_DIFFERENT for o in outcomes)
        if not failed:
            for o in outcomes:
                _unchanged(o)  # every input still the one folded, before any output is written
        for o in outcomes:
            if o.result is None:
                continue
            if failed:
                if o.code == EXIT_OK:
                    o.status = "not written: another model's verification did not pass"
                o.result = None
            else:
                _deliver(o, opts, st)
    return outcomes


def error_doc(e: BnfoldError, code: int = EXIT_BAD_INPUT) -> dict[str, Any]:
    """The JSON form of a bad-input error: the message without the path prefix, the path, the exit code."""
    msg = str(e)
    if e.path and msg.startswith(f"{e.path}: "):
        msg = msg[len(e.path) + 2:]
    return {"message": msg, "path": e.path, "code": code}


def _precheck(j: Job, opts: Options) -> None:
    """Refuse an output that could not be written, before any model is folded."""
    if not os.path.lexists(j.source):
        raise BnfoldError("no such file", j.source)  # before its extension is judged: the path is the problem
    if opts.dry_run or j.output is None:
        return
    try:
        fw = framework_of(j.source)
    except BnfoldError:
        return  # loading reports the input itself
    parent = Path(j.output).parent
    if parent.exists() or not j.mirrored:
        api.check_output(j.output, [j.source], fw)
        return
    up = parent
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise BnfoldError(f"{str(up)!r} is not a folder", j.output)


def _up_to_date(j: Job, opts: Options, st: Settings) -> bool:
    if st.force or opts.dry_run or j.output is None or not os.path.exists(j.output):
        return False
    mark = marks.read(j.output)
    from . import __version__
    if mark is None or mark.get("options") != st.fingerprint or mark.get("written_by") != f"bnfold {__version__}":
        return False
    return mark.get("source_sha256") == marks.digest(j.source, _companions(j.source))


def _companions(path: str) -> set[str]:
    return api.companion_files(path)


def _fold(j: Job, pl: Plan, opts: Options, st: Settings) -> Outcome:
    with holding():  # (the load's wrappers serve the counts and the fold: core/hold.py)
        return _fold_held(j, pl, opts, st)


def _fold_held(j: Job, pl: Plan, opts: Options, st: Settings) -> Outcome:
    if st.keep_going:
        _precheck(j, opts)
    if pl.walked and _up_to_date(j, opts, st):
        return Outcome(j, EXIT_OK, "up to date")
    t0 = time.perf_counter()
    version = _version(j.source)
    with api.naming(j.source):
        fe = api.frontend(framework_of(j.source))
        with paused_gc():  # (the fold pauses it too, verification does not)
            model = api.load(j.source, trust=opts.trust)
            t_load = time.perf_counter() - t0
            digest = None
            if j.output is not None and not opts.dry_run and marks.read(j.source) is None:
                # The output's mark names the input's digest: hashlib reads and hashes the files beside the
                # fold (it lets go of the GIL) instead of after it, a fifth of a 100 MB model's run. Only
                # once loaded: loading refuses a data file outside the model's folder before anything reads it.
                digest = Later(marks.digest, j.source, _companions(j.source), thread="bnfold-digest", daemon=True)
            before = anatomy(model, fe.name, as_loaded=True)
        # the model is this job's own: an ONNX fold without verification changes it in place, no copy
        res = api.fold_with(model, opts, fe.example_inputs(model, opts), owned=True)
    rep = res.report
    rep.model = j.source
    rep.timing_s = {"load": t_load, **{k: v for k, v in rep.timing_s.items() if k != "load"}}
    rep.timing_s.setdefault("save", 0.0)
    with paused_gc():
        rep.before_after = compare(before, None if opts.dry_run else anatomy(res.model, fe.name))
    rep.before_after["file_bytes"][0] = file_bytes(j.source, _companions(j.source))
    ver = rep.verification
    if opts.verify and (ver is None or ver.passed is not True):
        verdict = ver.verdict if ver is not None else None
        return Outcome(j, EXIT_DIFFERENT, f"{(verdict or 'not verified').upper()}: not written", rep)
    if opts.dry_run:
        return Outcome(j, EXIT_OK, "dry run: nothing written", rep, result=None)
    return Outcome(j, EXIT_OK, "pending", rep, result=res, version=version, digest=digest)


def _version(path: str) -> list[tuple]:
    """What a model's files are now: size, time and inode of the file and of each file it reads."""
    out: list[tuple] = []
    for f in [path, *sorted(_companions(path))]:
        try:
            st = os.stat(f)
            out.append((f, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev))
        except OSError:
            out.append((f, None))
    return out


def _unchanged(o: Outcome) -> None:
    """Refuse to write a model whose input was rewritten or replaced while it was folded: the output
    would carry the mark (and name) of a file it was not made from."""
    if o.result is not None and o.version is not None and _version(o.job.source) != o.version:
        raise BnfoldError("changed while bnfold was running (rewritten or replaced); nothing written for it, "
                          "run bnfold again", o.job.source)


def _deliver(o: Outcome, opts: Options, st: Settings) -> None:
    """Write a proven result with its mark, then (--bench) time it against the original."""
    res, j = o.result, o.job
    assert res is not None and j.output is not None
    _unchanged(o)
    t = time.perf_counter()
    with paused_gc():
        write(res, j.source, j.output, st.fingerprint, o.digest)
    res.report.timing_s["save"] = time.perf_counter() - t
    ba = res.report.before_after
    if ba is not None:
        ba["file_bytes"][1] = file_bytes(j.output, _companions(j.output))
    o.status = "written" if opts.verify else "written (not verified: --no-verify)"
    if st.bench:
        _bench(o, opts)
    o.result = None  # a batch holds one folded model at a time


def write(res: FoldResult, source: str, out: str, options_fingerprint: str, digest: Later | None = None) -> None:
    """Save a fold result at `out` with bnfold's mark in its metadata, atomically; folders of a mirrored
    tree are made as needed. A source that carries a mark passes it on (a re-fold is the same output).
    `digest`: the source's marks.digest, computed since it was loaded (the caller saw it unchanged since)."""
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, out) from None
    api.check_output(out, [source], res.report.framework)
    ver = res.report.verification
    mark = marks.read(source) or marks.make(source, digest.get() if digest is not None else
                                            marks.digest(source, _companions(source)), options_fingerprint,
                                            ver.verdict if ver is not None else None)
    if res.report.framework == "onnx":
        with holding():  # (the save's passes over the initializers share their wrappers)
            marks.stamp_onnx(res.model, mark)
            api.save(res, out)
        return
    p = Path(out)
    if not p.suffix:  # a Keras SavedModel folder: replaced as a whole by the saver, then marked
        api.save(res, out)
        marks.stamp(out, mark)
        return
    try:
        tmp = temp_path(p, p.suffix)
    except OSError as e:
        raise write_error(e, out) from None
    try:
        api.save(res, tmp)
        marks.stamp(tmp, mark)
        os.replace(tmp, out)
    except OSError as e:
        raise write_error(e, out) from None
    finally:
        remove_temp(tmp)
    res.report.output = out


def _bench(o: Outcome, opts: Options) -> None:
    rep = o.report
    assert rep is not None and rep.before_after is not None
    if rep.framework != "onnx":
        rep.before_after["latency_ms"] = {"not_measured": "--bench times ONNX models on onnxruntime; export this "
                                                          "model to ONNX (bnfold export) to time it"}
        return
    from .onnx.bench import bench_feeds, latency, providers_for
    from .onnx.io import load_onnx
    original = load_onnx(o.job.source)
    ver = rep.verification
    # the providers verification considered (one that could not run says why here too)
    providers = list(ver.providers) if ver is not None and ver.providers else providers_for(opts.providers)
    opts.say("timing the original and the folded model (--bench)")
    feeds = bench_feeds(original, opts, ver.inputs if ver is not None else None)
    rep.before_after["latency_ms"] = latency(o.job.source, o.job.output or "", feeds, providers)
