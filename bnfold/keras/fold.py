"""Keras 3 pass: fold BatchNormalization into Conv/ConvTranspose/Depthwise/Separable/Dense layers.

y = s*x + t with s = gamma/sqrt(var+eps), t = beta - s*mean, folded by bnfold.kernel into the layer
before the BN (or into a following Dense / padding="valid" Conv). Functional and Sequential models,
nested models and shared layers are handled through Keras' recorded layer graph; a subclassed model
is traced into such a graph when its call() allows, else every BN in it is reported skipped.
The result is always a new model; the input model is never mutated.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

from ..core.decisions import Decision, Reason
from ..core.errors import BnfoldError
from ..core.results import FoldResult, Report, Verification
from ..core.options import Options
from .feeds import Feeds, feeds_for, runnable
from .files import import_keras, model_input_specs
from .graph import all_batchnorms
from .plan import Plan, is_graph_model, plan_model
from .rebuild import rebuild
from .verify import normalise_providers, run, verify_keras


def _opaque(model: Any, prefix: str) -> list[Decision]:
    """Decisions for a nested model whose graph bnfold cannot see (a subclassed model inside another)."""
    return [Decision.skipped(prefix + path, Reason.UNSUPPORTED_PRODUCER,
                             f"inside subclassed model {model.name!r}, whose call() graph Keras does not record")
            for path, _ in all_batchnorms(model)]


def _trace(model: Any, feeds: Feeds | None) -> tuple[Any, Any]:
    """A Functional graph of a subclassed model's call() on symbolic inputs, and an undo function.

    Calling sub-layers on symbolic tensors records nodes on those (original) layers; the undo
    function removes exactly the nodes added here, so the input model ends as it began.
    """
    keras = import_keras()
    if feeds is not None:
        specs = [(f"input_{i}", (None,) + tuple(f.shape[1:]), str(f.dtype)) for i, f in enumerate(feeds)]
    else:
        specs = [(n, (None,) + tuple(s[1:]), d) for n, s, d in model_input_specs(model)]
    layers = [model] + list(model._flatten_layers(include_self=False))
    marks = [(op, len(op._inbound_nodes), len(op._outbound_nodes)) for op in layers]

    def undo() -> None:
        for op, n_in, n_out in marks:
            del op._inbound_nodes[n_in:]
            del op._outbound_nodes[n_out:]

    try:
        inputs = [keras.Input(batch_shape=shape, dtype=dtype) for _, shape, dtype in specs]
        arg = inputs[0] if len(inputs) == 1 else inputs
        kwargs = {"training": False} if "training" in inspect.signature(model.call).parameters else {}
        outputs = model.call(arg, **kwargs)
        return keras.Model(inputs=arg, outputs=outputs, name=model.name), undo
    except BaseException:
        undo()
        raise


def _plan(model: Any, feeds: Feeds | None, opts: Options) -> tuple[Plan | None, Any, str]:
    """(plan or None, undo, why-not). A subclassed model that cannot be traced has no plan."""
    if is_graph_model(model):
        return plan_model(model, opaque=_opaque, exclude=opts.exclude), (lambda: None), ""
    try:
        graph, undo = _trace(model, feeds)
    except BnfoldError:
        raise
    except Exception as e:  # any failure of a user's call() on symbolic tensors means: no graph
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return None, (lambda: None), f"its call() cannot be traced into a layer graph ({type(e).__name__}: {first})"
    try:
        return plan_model(model, graph=graph, opaque=_opaque, exclude=opts.exclude), undo, ""
    except BaseException:
        undo()
        raise


def _copy(model: Any) -> Any:
    """An unchanged copy of a model nothing was folded in (the original when Keras cannot copy it)."""
    keras = import_keras()
    try:
        clone = keras.models.clone_model(model)
        clone.set_weights(model.get_weights())
        return clone
    except Exception:
        return model


def settled_feeds(model: Any, example_inputs: Any, opts: Options) -> Feeds:
    """The feeds to verify on: the caller's, or planned ones the original can run on (larger unknown
    dims tried when it cannot run at the default size)."""
    feeds = feeds_for(model, example_inputs, opts)
    if not feeds.defaulted:
        return feeds  # nothing to enlarge: a model that cannot run on them says so when verified
    return runnable(model, feeds, opts, lambda m, b: run(m, b, "cpu"))


def fold(model: Any, opts: Options, example_inputs: Any = None) -> FoldResult:
    """Fold every foldable BatchNorm of a keras.Model into a new model, then verify it numerically."""
    keras = import_keras()
    if not isinstance(model, keras.Model):
        raise BnfoldError(f"expected a keras.Model, got {type(model).__name__}")
    normalise_providers(opts.providers)  # reject bad names before any work
    report = Report(framework="keras")
    t0 = time.perf_counter()
    feeds = None
    if opts.verify:
        feeds = settled_feeds(model, example_inputs, opts)
    elif example_inputs is not None:
        feeds = feeds_for(model, example_inputs, opts)
    plan, undo, why_not = _plan(model, feeds, opts)
    built: dict[int, Any] = {}
    try:
        if plan is None:
            decisions = [Decision.skipped(path, Reason.UNSUPPORTED_PRODUCER, f"subclassed model: {why_not}")
                         for path, _ in all_batchnorms(model)]
        else:
            decisions = plan.all_decisions()
            named = {d.bn for d in decisions}
            decisions += [Decision.skipped(path, Reason.NOT_CALLED, "not called in the model's layer graph")
                          for path, _ in all_batchnorms(model) if path not in named]
        report.decisions = decisions
        if plan is None or not any(d.is_folded for d in decisions):
            new = _copy(model)
        else:
            new = rebuild(model, plan, built)
        report.timing_s["fold"] = time.perf_counter() - t0
        if opts.verify:
            # before undo(): the proofs of a traced subclassed model replay the traced graph
            t1 = time.perf_counter()
            report.verification = verify_keras(model, new, feeds, opts, decisions, built,
                                               plan.graph if plan is not None else None)
            report.timing_s["verify"] = time.perf_counter() - t1
        else:
            report.verification = Verification(skipped_reason="verification off")
    finally:
        undo()
    if opts.dry_run:
        # Decided, built and verified like a real run, so the report says what a fold would do.
        report.info["dry_run"] = True
        return FoldResult(model=model, report=report)
    return FoldResult(model=new, report=report)


def check(original: Any, candidate: Any, opts: Options, example_inputs: Any = None) -> Verification:
    """Is the Keras `candidate` the same function as the Keras `original`? Judged with the original's noise."""
    feeds = settled_feeds(original, example_inputs, opts)
    n_orig, n_cand = len(model_input_specs(original)), len(model_input_specs(candidate))
    if n_orig != n_cand:
        raise BnfoldError(f"the models take different numbers of inputs ({n_orig} vs {n_cand})")
    return verify_keras(original, candidate, feeds, opts)
