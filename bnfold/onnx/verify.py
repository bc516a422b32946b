"""Are two ONNX models the same function? Reference = the unfolded original, optimisations off.

For each provider: run the original, the candidate and a noise model (the original with every weight
nudged one ulp) on the same feeds, and judge every output and every same-named intermediate with a
tolerance of 10x that noise (compare.judge). When something fails, one more noise source is measured
before calling it a failure: onnxruntime's own Conv+BN fusion of the original, a correct fold made
another way (it sees the cancellations that one-ulp nudges miss). On CUDA with TF32 the original is also
run with TF32 toggled. Differences that are folds made by another tool or order flips of near-equal
values are read as such (onnx/divergence.py). When folds are given, each is also proven on its own
(onnx/proofs.py), and a failure is traced back to the folds upstream of it: the blame self-healing acts on.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from ..core.decisions import Decision
from ..core.errors import BnfoldError
from ..core.files import remove_temp, temp_path
from ..core.options import Options
from ..core.later import Later
from ..core.results import ProviderResult, Step, Verification
from ..verify import compare
from ..verify import inputs as inp
from . import proofs
from . import runtime as runners
from .divergence import Plan, who
from .feeds import Feeds, model_inputs, plan_feeds
from .noise import nudge_by_name, nudged_initializers, perturbed, perturbed_lazily
from .ondisk import for_session, loaded, over_two_gb
from .protos import WithOutputs


def verify_onnx(original: onnx.ModelProto, candidate: onnx.ModelProto, opts: Options,
                decisions: list[Decision] | None = None) -> Verification:
    """Compare `candidate` with `original` on every requested (or available) provider.

    Besides the graph outputs, every tensor both models compute under the same name is compared: a
    wrong fold whose effect is masked downstream on these inputs still fails, and the earliest diverging
    tensor is named. With `opts.outputs_only` only the graph outputs decide. Dynamic dimensions that
    were defaulted are enlarged and tried again when the original cannot run at the default size.
    """
    _same_signature(original, candidate)
    sizes = (inp.SIZE, *inp.LARGER)
    for k, size in enumerate(sizes):
        feeds = plan_feeds(original, opts.input_specs, opts.inputs_npz, opts.seed, opts.batches, size)
        try:
            ver = _verify_on(original, candidate, opts, decisions, feeds)
            break
        except runners.RunFailed as e:
            if e.label != "original" or not feeds.defaulted or k + 1 == len(sizes):
                if feeds.defaulted and e.label == "original":
                    raise BnfoldError(f"{e}; dynamic dimensions were tried at {', '.join(map(str, sizes))}: give "
                                      "the input shapes with --input NAME:SHAPE") from None
                raise
            opts.say(f"the model cannot run with dynamic dimensions of {size}; trying {sizes[k + 1]}")
    ver.inputs = feeds.doc
    if opts.save_inputs:
        inp.save_npz(feeds.batches, opts.save_inputs)
    return ver


def _verify_on(original: onnx.ModelProto, candidate: onnx.ModelProto, opts: Options,
               decisions: list[Decision] | None, feeds: Feeds) -> Verification:
    plan = Plan(original, candidate, decisions, also=proofs.needed_inputs(decisions or ()))
    want = plan.inner + plan.extra
    if over_two_gb(original) or over_two_gb(candidate):
        # too big for one protobuf: onnxruntime reads the big weights from external data files,
        # memory-mapped. An original loaded from disk is used where it lies; the candidate's changed
        # weights and the noise model's nudged ones are written to a temporary folder, one at a time.
        opts.say("model over 2 GB: onnxruntime reads the weights from external data files")
        # named like every bnfold temporary (host, pid): one left by a killed run is removed by the next
        folder = temp_path(os.path.join(tempfile.gettempdir(), "bnfold-verify"), directory=True)
        try:
            noise_model, later = perturbed_lazily(original, opts.seed)
            plain = (for_session(original, folder, "original"), for_session(candidate, folder, "candidate"),
                     for_session(noise_model, folder, "noise", nudge_by_name(opts.seed), later))
            del noise_model
            models = (plain[0].with_outputs(want), plain[1].with_outputs(plan.inner), plain[2].with_outputs(want))
            return _Comparison(original, candidate, plan, feeds, opts, decisions,
                               "model over 2 GB: verified from external data files").run(models, plain)
        finally:
            remove_temp(folder)
    original, candidate = loaded(original), loaded(candidate)  # onnxruntime runs them from memory
    # the nudged weights are drawn in a thread of their own while onnxruntime runs the original and the
    # candidate (it releases the GIL and leaves part of a core idle): the noise run waits for them
    noise_model = Later(_noise_model, original, opts.seed, thread="bnfold-noise")
    plain = (original, candidate, noise_model)
    models = (WithOutputs(original, tuple(want)), WithOutputs(candidate, tuple(plan.inner)),
              noise_model.then(lambda m: WithOutputs(m.model, tuple(want), m.weights)))
    cmp = _Comparison(original, candidate, plan, feeds, opts, decisions, "")

    def more_noise(k: int) -> WithOutputs:
        m = _noise_model(original, opts.seed + k)
        return WithOutputs(m.model, tuple(want), m.weights)
    cmp.more_noise = more_noise
    return cmp.run(models, plain)


def _noise_model(original: onnx.ModelProto, seed: int) -> WithOutputs:
    """The original with every weight nudged (noise.perturbed): where only main-graph initializers move,
    the original itself with their new values, which onnxruntime takes as arrays (no copy of the model)."""
    weights = nudged_initializers(original, seed)
    if weights is None:
        return WithOutputs(perturbed(original, seed), ())
    return WithOutputs(original, (), weights)


SMALL = 256           # elements: a compared tensor smaller than this gets SMALL_NOISE_RUNS noise samples
SMALL_NOISE_RUNS = 3


class _Comparison:
    """One verification: every provider, then the per-fold proofs and the blame."""

    def __init__(self, original: onnx.ModelProto, candidate: onnx.ModelProto, plan: Plan, feeds: Feeds,
                 opts: Options, decisions: list[Decision] | None, big_note: str) -> None:
        self.original, self.candidate, self.plan, self.feeds, self.opts = original, candidate, plan, feeds, opts
        self.decisions, self.big_note = decisions, big_note
        self.atol, self.rtol = opts.atol, opts.rtol
        self.auto = opts.atol is None and opts.rtol is None
        self.out_names = [o.name for o in original.graph.output]
        self.captured: dict[str, np.ndarray] = {}
        # the candidate's values, set once it has run: the proofs start after the original's run and wait for
        # them only to judge each fold's folded side
        self.captured_folded: Future = Future()
        self.more_noise: Any = None  # k -> another noise model (seed + k), where memory allows
        # depth of each tensor (its producer's place in the original's node order), for the report's picture
        self.depth = {o: i for i, n in enumerate(original.graph.node) for o in n.output if o}
        self.runs_done = self.runs_total = 0
        self.proving: Any = None  # the local proofs, running beside the noise runs once their inputs are captured

    def _start_proofs(self) -> None:
        """Start the local proofs on what is captured, in a thread of their own: they work while onnxruntime
        runs the candidate and the noise models (it releases the GIL, and so do the proofs' products)."""
        if self.decisions is None or self.proving is not None:
            return
        import concurrent.futures

        self.opts.say(f"proving each of {sum(d.is_folded for d in self.decisions)} fold(s) on its own")
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-proofs")
        self.proving = pool.submit(proofs.prove, self.original, self.candidate, self.decisions, self.captured,
                                   self.captured_folded)
        pool.shutdown(wait=False)

    def _tick(self, provider: str) -> Callable[[str, int, int], None]:
        """Progress for one provider: a Step per batch run, counted over the whole verification."""
        def tick(label: str, k: int, n: int) -> None:
            self.runs_total = max(self.runs_total, self.runs_done + 1)
            self.opts.say(Step(f"verifying on {provider}: {label}, batch {k}/{n}", self.runs_done, self.runs_total))
            self.runs_done += 1
        return tick

    def run(self, models: tuple, plain: tuple) -> Verification:
        try:
            return self._run(models, plain)
        finally:
            if self.proving is not None:  # an error left them running: they end before anything else starts
                import concurrent.futures
                self._captured_folded({})  # (they may be waiting for the candidate's values)
                concurrent.futures.wait([self.proving])

    def _run(self, models: tuple, plain: tuple) -> Verification:
        names, explicit = _requested(self.opts.providers)
        ver = Verification(tolerance=_tolerance_doc(self.atol, self.rtol))
        usable = {name: runners.availability(name) for name in names}
        per_batch = [4 if n == "CUDAExecutionProvider" else 3 for n, (ok, _) in usable.items() if ok]
        self.runs_total = sum(per_batch) * len(self.feeds.batches)
        for name in names:
            ok, why = usable[name]
            if not ok:
                if explicit:
                    raise BnfoldError(f"provider {name} was requested but cannot run: {why}")
                ver.providers[name] = ProviderResult(name, ran=False, why=why)
                continue
            self.opts.say(f"verifying on {name}")
            ver.providers[name] = self._provider(name, models, plain, ver)
        if self.decisions is not None:
            self._start_proofs()  # (not started yet only when no provider ran)
            self._captured_folded({})
            counts, blame = self.proving.result()
            self.proving = None
            ver.proofs = counts
            ver.blame = blame
            # a failed local proof names its fold exactly; the end-to-end divergence it causes downstream may
            # surface at another fold's output, so it is traced back only when every local proof held
            if not blame and any(p.ran and not p.passed for p in ver.providers.values()):
                self._blame_divergence(ver)
        return ver

    def _provider(self, name: str, models: tuple, plain: tuple, ver: Verification) -> ProviderResult:
        notes: dict[str, Any] = {"noise_sources": ["weights nudged one ulp"]}
        if self.big_note:
            notes["note"] = self.big_note
        batches = self.feeds.batches
        tick = self._tick(name)
        try:
            runs = []
            for m, lbl in zip(models, ("original", "candidate", "noise model")):
                runs.append(_run_all(m, name, batches, lbl, tick=tick))
                if len(runs) <= 2:
                    self._capture(batches, runs)
                    self._start_proofs()  # on the original's values, beside the candidate's and the noise runs
        except BnfoldError:
            if not (self.plan.inner or self.plan.extra):
                raise
            # some intermediate cannot be an output (e.g. a sequence); compare the outputs only (and if the
            # original cannot run at all, that error comes from here, plainly)
            self.plan.inner, self.plan.extra, models = [], [], plain
            self.runs_total += 3 * len(batches)
            runs = [_run_all(m, name, batches, lbl, tick=tick)
                    for m, lbl in zip(models, ("original", "candidate", "noise model"))]
        self._capture(batches, runs)
        ref, cand, noise1 = (_concat(r) for r in runs)
        noise = [noise1]
        if self.more_noise is not None and min((np.size(v) for v in ref.values()), default=SMALL) < SMALL:
            # One nudged model is one sample of the noise: over many elements its maximum is a steady
            # estimate, over a handful the random nudges can cancel by chance. Small tensors get more samples.
            for k in range(1, SMALL_NOISE_RUNS):
                self.runs_total += len(batches)
                noise.append(_concat(_run_all(self.more_noise(k), name, batches, "noise model", tick=tick)))
            notes["noise_sources"][0] = f"weights nudged one ulp ({SMALL_NOISE_RUNS} samples: some tensors are small)"
        if name == "CUDAExecutionProvider":
            notes["tf32"] = True  # onnxruntime's CUDA EP default; the noise run below measures its effect
            noise.append(_concat(_run_all(models[0], name, batches, "original (TF32 off)", _options(name, tf32=False),
                                          tick=tick)))
            notes["noise_sources"].append("TF32 on vs off")
        passed, outs, div = self._judge(ref, cand, noise, notes)
        if (not passed or div is not None) and self.auto:
            # Before calling it a failure: the original under onnxruntime's basic optimisations (its own
            # Conv+BN fusion) is a correct fold made another way, and its distance from the reference is
            # fold-sized noise that weight nudges miss (cancellation inside the BN arithmetic, amplified
            # downstream, e.g. by a Div; weights that are all one value). Intermediates included: the
            # fusion keeps every tensor asked for as an output. Only run when needed: it costs a session.
            fused = None
            self.runs_total += len(batches)
            for m in (models[0], plain[0]):
                try:
                    fused = _concat(_run_all(m, name, batches, "original (onnxruntime-optimised)", optimize=True,
                                             tick=tick))
                    break
                except BnfoldError as e:  # onnxruntime's optimiser itself may fail (mixed BN-15 dtypes)
                    notes["fused_noise"] = f"not measured: {e}"
            if fused is not None:
                notes.pop("fused_noise", None)
                noise.append(fused)
                notes["noise_sources"].append("onnxruntime's own BN fusion of the original")
                notes.pop("unstable", None)
                notes.pop("folds_in_candidate", None)
                passed, outs, div = self._judge(ref, cand, noise, notes)
        if self.plan.inner:
            notes["intermediates_compared"] = len(self.plan.inner)
        if div is not None:
            div.update(who(self.original, self.candidate, div["tensor"]), provider=name)
            if self.opts.outputs_only and passed:
                notes["ignored_divergence"] = div  # reported, not decisive, as asked
                div = None
        if div is not None:
            if passed:
                notes["masked_divergence"] = (
                    "the outputs agree on these inputs, but an intermediate tensor diverges: the error is "
                    "masked downstream (e.g. a ReLU cut the damaged channel) and shows on other inputs")
            passed = False
            if ver.first_divergence is None:
                ver.first_divergence = div
        if not passed and ver.first_divergence is None:
            worst = max((k for k in outs if outs[k].get("verdict") == "failed"),
                        key=lambda k: outs[k].get("max_abs", 0) / (outs[k].get("atol") or 1e-300))
            ver.first_divergence = {"tensor": worst, **who(self.original, self.candidate, worst), "provider": name,
                                    "max_abs": outs[worst].get("max_abs"), "atol": outs[worst].get("atol")}
        return ProviderResult(name, ran=True, passed=passed, outputs=outs, notes=notes)

    def _capture(self, batches: list[dict[str, np.ndarray]], runs: list) -> None:
        """The proofs' inputs and witnesses (first batch): the original's once it has run, then the candidate's."""
        if not self.captured:
            self.captured = {**batches[0], **runs[0][0]}
        if len(runs) > 1:
            self._captured_folded(dict(runs[1][0]))

    def _captured_folded(self, values: dict[str, np.ndarray]) -> None:
        if not self.captured_folded.done():
            self.captured_folded.set_result(values)

    def _judge(self, ref: Mapping[str, np.ndarray], cand: Mapping[str, np.ndarray], noise: list[Mapping],
               notes: dict[str, Any]) -> tuple[bool, dict[str, dict[str, Any]], dict[str, Any] | None]:
        """Outputs (every one judged) and intermediates (up to the first divergence), read through the plan."""
        cache: dict[str, bool] = {}

        def agree(t: str) -> bool:  # one tensor, ref vs cand, as a continuous value
            if t not in cache:
                if t in self.feeds.batches[0]:
                    cache[t] = True  # a model input: the same feeds go to both models
                elif t not in ref or t not in cand:
                    cache[t] = False
                else:
                    cache[t] = self._one(t, ref[t], cand[t], noise)[0]
            return cache[t]

        pick = lambda d: {k: d[k] for k in self.out_names if k in d}  # noqa: E731
        passed, outs = compare.judge(pick(ref), pick(cand), [pick(n) for n in noise], atol=self.atol, rtol=self.rtol)
        compare.require_evidence(outs)
        for k, st in outs.items():
            # A value computed from discrete ones (boxes picked by NMS) that differs, or whose noise run flipped
            # order so far that the tolerance swamps it, is judged by the continuous tensors behind the
            # discrete op. An empty or all-zero output stays inconclusive: nothing behind it makes it evidence.
            swamped = st.get("verdict") == "inconclusive" and "tolerance" in st.get("inconclusive", "")
            if (st.get("verdict") == "failed" or swamped) and (behind := self.plan.unstable(k, agree)) is not None:
                st.pop("inconclusive", None)
                st.update(verdict="passed", passed=True,
                          unstable=f"computed from discrete values whose near-equal inputs swapped order; judged by "
                                   f"{', '.join(behind)}, which agree")
        passed = all(st.get("passed") for st in outs.values())
        div = None
        # every compared tensor's error and tolerance along the depth: the report's picture
        profile = [self._mark(k, st, output=True) for k, st in outs.items()]
        for t in self.plan.inner:
            if t not in ref or t not in cand:
                continue
            if div is not None:  # past the first divergence: measured for the picture, no longer judged
                profile.append(self._mark(t, self._measure(t, ref[t], cand[t], noise), after_divergence=True))
                continue
            ok, st = self._one(t, ref[t], cand[t], noise)
            cache[t] = ok
            if ok:
                profile.append(self._mark(t, st))
                continue
            carried = self.plan.other_tool_fold(t, cand[t], ref, lambda u, c, r: self._one(u, r, c, noise)[0])
            if carried is not None:
                notes.setdefault("folds_in_candidate", []).append(
                    {"tensor": t, "carries": carried,
                     "why": "the candidate folded the per-channel affine ops after this tensor into the layer "
                            "computing it and kept its name"})
                profile.append(self._mark(t, st, explained="carries a fold the candidate made"))
                continue
            behind = self.plan.unstable(t, agree)
            if behind is not None:
                notes.setdefault("unstable", []).append({"tensor": t, "judged_by": behind})
                profile.append(self._mark(t, st, explained="order flip of near-equal values"))
                continue
            div = {"tensor": t, "max_abs": st.get("max_abs"), "max_rel": st.get("max_rel"), "atol": st.get("atol"),
                   "noise_max_abs": st.get("noise_max_abs")}
            profile.append(self._mark(t, st, divergence=True))
        notes["profile"] = sorted(profile, key=lambda m: m["order"])
        return passed, outs, div

    def _mark(self, t: str, st: Mapping[str, Any], **flags: Any) -> dict[str, Any]:
        mark = {"tensor": t, "max_abs": st.get("max_abs"), "atol": st.get("atol"),
                "order": self.depth.get(t, len(self.depth))}
        mark.update({k: v for k, v in flags.items() if v})
        return mark

    def _measure(self, t: str, ref: np.ndarray, cand: np.ndarray, noise: list[Mapping]) -> dict[str, Any]:
        """Error and tolerance of one tensor without a verdict (the cheap max-abs when it applies)."""
        r, c = np.asarray(ref), np.asarray(cand)
        m = compare.quick_measure(r, c, [np.asarray(n[t]) for n in noise if t in n]) if self.auto else None
        return {"max_abs": m[0], "atol": m[1]} if m is not None else self._one(t, r, c, noise)[1]

    def _one(self, t: str, ref: np.ndarray, cand: np.ndarray, noise: list[Mapping]) -> tuple[bool, dict[str, Any]]:
        r, c = np.asarray(ref), np.asarray(cand)
        ns = [np.asarray(n[t]) for n in noise if t in n]
        user_atol = self.atol if not isinstance(self.atol, Mapping) else None
        if self.auto and (m := compare.quick_measure(r, c, ns)) is not None and m[0] <= 0.9 * m[1]:
            return True, {"max_abs": m[0], "atol": m[1]}  # quick_pass, keeping its numbers for the report
        ok, st = compare.judge({t: r}, {t: c}, [{t: n} for n in ns], atol=user_atol, rtol=self.rtol)
        return ok, st[t]

    def _blame_divergence(self, ver: Verification) -> None:
        """Trace the end-to-end failure back to the folds nearest upstream of it."""
        fd = ver.first_divergence or {}
        t = fd.get("tensor")
        if not t:
            return
        named = {b["bn"] for b in ver.blame}
        compared = set(self.plan.inner) | set(self.out_names) | set(self.feeds.batches[0])
        for bn in self.plan.blame(t, compared):
            if bn not in named:
                ver.blame.append({"bn": bn, "why": f"the end-to-end check diverges at {t!r} ({fd.get('provider')}): "
                                                   f"max abs {fd.get('max_abs'):.3g} > atol {fd.get('atol'):.3g}",
                                  "max_abs": fd.get("max_abs"), "bound": fd.get("atol"), "tensor": t})


def _same_signature(original: onnx.ModelProto, candidate: onnx.ModelProto) -> None:
    a = [i.name for i in model_inputs(original)]
    b = [i.name for i in model_inputs(candidate)]
    if sorted(a) != sorted(b):
        raise BnfoldError(f"the models have different inputs: {a} vs {b}")
    oa = [o.name for o in original.graph.output]
    ob = {o.name for o in candidate.graph.output}
    missing = [o for o in oa if o not in ob]
    if missing:
        raise BnfoldError(f"the candidate lacks outputs {missing} of the original")


def _requested(providers: Sequence[str] | None) -> tuple[list[str], bool]:
    if not providers:
        # CPU and CUDA are always reported (CUDA as "not run" where it cannot); TensorRT only when present
        trt = runners.DEFAULT_ORDER[2]
        return list(runners.DEFAULT_ORDER[:2]) + ([trt] if runners.availability(trt)[0] else []), False
    return [runners.provider_name(p) for p in providers], True


def _options(provider: str, tf32: bool | None = None) -> dict[str, Any]:
    if provider == "CUDAExecutionProvider" and tf32 is not None:
        return {"use_tf32": "1" if tf32 else "0"}
    return {}


def _run_all(model: Any, provider: str, feeds: list[dict[str, np.ndarray]], label: str,
             options: Mapping[str, Any] | None = None, optimize: bool = False,
             tick: Callable[[str, int, int], None] | None = None) -> list[dict[str, np.ndarray]]:
    if isinstance(model, Later):
        model = model.get()
    r = runners.OrtRunner(model, provider, options, label, optimize=optimize)
    out = []
    for k, f in enumerate(feeds, 1):
        if tick is not None:
            tick(label, k, len(feeds))
        out.append(r.run(f, label))
    return out


def _concat(runs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(runs) == 1:
        return runs[0]
    return {k: np.concatenate([np.asarray(r[k]).reshape(-1) for r in runs]) for k in runs[0]}


def _tolerance_doc(atol: Any, rtol: float | None) -> dict[str, Any]:
    if atol is None and rtol is None:
        return {"atol": None, "rtol": None, "how": "auto",
                "rule": f"max|cand-ref| <= max({compare.NOISE_MULTIPLE:g} x noise, {compare.FLOOR_ULPS:g} ulp x max|ref|)"}
    return {"atol": dict(atol) if isinstance(atol, Mapping) else atol, "rtol": rtol, "how": "user"}
