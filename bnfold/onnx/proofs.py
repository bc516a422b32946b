"""Per-fold local proofs: each fold's region, original against folded, replayed in float64 on captured data.

A fold replaces a region of the graph (layer + layout ops + BatchNorm + per-channel Mul/Add, or
BatchNorm + the layer after it) by a region that computes the same affine map with new weights. Both
regions are cut out of their graphs by the two tensors that mean the same thing in both: the data input
x and the output y (Decision.site; a fold into several layers at once, as after an Add or a Concat of
layers, has one data input per layer: x is then a tuple). Both then run in float64 (onnx's reference
evaluator) on the x the original computed on the verification inputs, so the only difference left is
the rounding of the new weights and biases to the model's float type:

    |y_folded - y_original| <= u * M,   M = the folded region run on |x| with every weight |w|

M is the sum of the magnitudes that rounding scales (each weight and bias is off by at most u of
itself); u is the unit roundoff of the lowest-precision float type in either region. The check takes
2 u M per element, plus 2^-36 M for float64's own rounding over sums of up to 2^16 terms. A wrong
channel axis, a swapped group, a weight off by one part in 1e4 or a shifted bias exceed it by orders of
magnitude; rounding, by construction, cannot.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from ..core.decisions import Decision
from ..verify import blas, compare
from .nodes import ONNX_DOMAINS
from . import windows
from .replay import float_types, run

# ops whose output magnitude is bounded by running them on magnitudes (non-negative multilinear maps)
MONOTONE = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Sum", "Identity", "Dropout", "Reshape",
            "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Cast", "CastLike", "Expand", "Constant",
            "ConstantOfShape", "Shape", "Size", "Concat", "Gather", "Slice", "Sub"}  # Sub: as Add on magnitudes
MAX_REGION = 64       # nodes: a region this large is not a fold site any more
SLACK = 2.0
F64_TERM = 2.0 ** -36
FAITHFUL = 1e-3  # the float64 replay of the original region must match onnxruntime's run of it this closely
HOW = "float64 replay of the fold's region on captured data; bound 2 u M"


def site_inputs(site: tuple[Any, str]) -> tuple[str, ...]:
    """The data inputs of a fold site, one or several."""
    return (site[0],) if isinstance(site[0], str) else tuple(site[0])


def needed_inputs(decisions: Iterable[Decision]) -> set[str]:
    """The tensors the proofs need captured from the original's run: each fold's data input(s), and its output
    (onnxruntime's value of the original region, the witness that the float64 replay is faithful)."""
    return {t for d in decisions if d.is_folded and d.site is not None for t in (*site_inputs(d.site), d.site[1])}


def prove(original: onnx.ModelProto, folded: onnx.ModelProto, decisions: list[Decision],
          captured: dict[str, np.ndarray], captured_folded: Mapping[str, np.ndarray] | Future | None = None,
          ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Set `proof` on every folded decision; returns (counts, blame for the folds whose proof failed).

    `captured` holds the original's values from onnxruntime (each region's input and output),
    `captured_folded` the folded model's: both replays must agree with onnxruntime's run of their region,
    or the proof is 'not run' (the reference evaluator has had bugs, e.g. grouped ConvTranspose with a bias).
    `captured_folded` may be a Future, set once the folded model has run: the replays go on meanwhile, and
    only judging the folded side waits for it (verify starts the proofs right after the original's run).
    """
    with blas.one_thread():  # small products: threads only wait for each other (verify/blas.py)
        return _prove(original, folded, decisions, captured, {} if captured_folded is None else captured_folded)


PENDING_BYTES = 256 << 20  # replays held while the folded model's values are awaited; past this, wait for them


def _prove(original: onnx.ModelProto, folded: onnx.ModelProto, decisions: list[Decision],
           captured: dict[str, np.ndarray], captured_folded: Mapping[str, np.ndarray] | Future,
           ) -> tuple[dict[str, int], list[dict[str, Any]]]:
    orig_g, fold_g = _Graph(original), _Graph(folded)
    done: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}  # one replay per site: a merge folds many BNs
    waiting: dict[tuple[tuple[str, ...], str], _Replayed] = {}  # replayed, the folded side not judged yet
    held = 0
    got: list[Mapping[str, np.ndarray]] = [captured_folded] if not isinstance(captured_folded, Future) else []

    def judge_waiting(wait: bool) -> None:
        nonlocal held
        if not got and (wait or captured_folded.done()):  # type: ignore[union-attr]
            got.append(captured_folded.result() or {})  # type: ignore[union-attr]
        if not got:
            return
        fv = got[0]
        for key, r in waiting.items():
            done[key] = r.judged(fv.get(key[1]), {x: fv.get(x, None if x in fold_g.producer else captured[x])
                                                   for x in key[0]})  # a graph input has one value in both models
        waiting.clear()
        held = 0

    for d in decisions:
        if not d.is_folded or d.site is None:
            continue
        xs = site_inputs(d.site)
        key = (xs, d.site[1])
        if any(x not in captured for x in xs) or key in done or key in waiting:
            continue
        r = _replay(orig_g, fold_g, xs, d.site[1], {x: captured[x] for x in xs}, captured.get(d.site[1]))
        if isinstance(r, dict):
            done[key] = r
            continue
        waiting[key] = r
        held += r.nbytes
        judge_waiting(wait=held > PENDING_BYTES)
    judge_waiting(wait=True)

    counts = {"proven": 0, "failed": 0, "not_run": 0}
    blame: list[dict[str, Any]] = []
    for d in decisions:
        if not d.is_folded:
            continue
        if d.site is None:
            d.proof = {"not_run": "the fold is inside a subgraph or function, whose tensors cannot be captured"}
            continue
        xs = site_inputs(d.site)
        missing = [x for x in xs if x not in captured]
        d.proof = {"not_run": f"its input {missing[0]!r} was not captured"} if missing else dict(done[(xs, d.site[1])])
        if "not_run" in d.proof:
            counts["not_run"] += 1
        elif d.proof["passed"]:
            counts["proven"] += 1
        else:
            counts["failed"] += 1
            blame.append({"bn": d.bn, "why": f"its local proof failed: max abs {d.proof['max_abs']:.3g} > bound "
                                              f"{d.proof['bound']:.3g} at {d.site[1]!r}",
                          "max_abs": d.proof["max_abs"], "bound": d.proof["bound"], "tensor": d.site[1]})
    return counts, blame


class _Graph:
    """The main graph of a model, indexed for cutting regions out of it."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = model.graph.node[:]  # held: node identities (id()) stay valid while indexed
        self.position = {id(n): k for k, n in enumerate(self.nodes)}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.inputs = {i.name for i in model.graph.input} - set(self.inits)

    def region(self, xs: tuple[str, ...], y: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | str:
        """Nodes (in graph order) and initializers computing `y` from `xs` and constants, or why not."""
        need, seen, inits = [y], set(), []
        nodes: dict[int, onnx.NodeProto] = {}
        x = ", ".join(repr(v) for v in xs)
        while need:
            name = need.pop()
            if name in seen or name in xs or not name:
                continue
            seen.add(name)
            if name in self.inits:
                inits.append(self.inits[name])
                continue
            node = self.producer.get(name)
            if node is None:
                return f"{y!r} also depends on {name!r}, another input of the model"
            if node.domain not in ONNX_DOMAINS:
                return f"the region holds the custom op {node.op_type}"
            nodes[id(node)] = node
            if len(nodes) > MAX_REGION:
                return f"the region from {x} to {y!r} has more than {MAX_REGION} nodes"
            need.extend(node.input)
            for a in node.attribute:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    return f"the region holds {node.op_type} with a subgraph"
        return sorted(nodes.values(), key=lambda n: self.position[id(n)]), inits


def _prove_one(orig_g: _Graph, fold_g: _Graph, xin: tuple[str, ...], y: str, x: dict[str, np.ndarray],
               witness: np.ndarray | None, witness_folded: np.ndarray | None,
               xs_folded: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """One fold's proof, every value at hand."""
    r = _replay(orig_g, fold_g, xin, y, x, witness, None if witness_folded is None else np.shape(witness_folded))
    return r if isinstance(r, dict) else r.judged(witness_folded, xs_folded)


_UNSEEN = (-1,)  # the folded model's value has another shape than this: not known yet


def _replay(orig_g: _Graph, fold_g: _Graph, xin: tuple[str, ...], y: str, x: dict[str, np.ndarray],
            witness: np.ndarray | None, folded_shape: tuple[int, ...] | None = _UNSEEN) -> "_Replayed | dict[str, Any]":
    """The original's side of a proof: both regions replayed in float64 on the original's captured input,
    the original's replay held against onnxruntime's run of it. A dict: the proof ends here ('not run')."""
    ro, rf = orig_g.region(xin, y), fold_g.region(xin, y)
    for r in (ro, rf):
        if isinstance(r, str):
            return {"not_run": r}
    (on, oi), (fn, fi) = ro, rf  # type: ignore[misc]
    odd = sorted({n.op_type for n in fn} - MONOTONE)
    if odd:
        return {"not_run": f"no magnitude bound for the folded region's {', '.join(odd)}"}
    u = max([compare.unit_roundoff(helper.tensor_dtype_to_np_dtype(t)) for t in float_types(on, oi, fn, fi)] +
            [compare.unit_roundoff(v.dtype) for v in x.values()])
    rep = _Replayed(orig_g, fold_g, xin, y, (on, oi), (fn, fi), u, x, witness)
    if (len(xin) == 1 and witness is not None and np.ndim(witness) == np.ndim(x[xin[0]])
            and (folded_shape is None or folded_shape in (_UNSEEN, np.shape(witness)))):
        # one data input: replay one item and a window of a conv's output (both witnesses cut alike; a
        # folded output of another shape is judged whole: 'shapes differ')
        name, seen = xin[0], np.asarray(witness)
        cut_x, rep.cut, rep.pads = windows.shrink((on, oi), (fn, fi), name, np.asarray(x[name]), seen)
        x, witness = {name: cut_x}, seen[rep.cut]
    x64 = {k: np.asarray(v, np.float64) for k, v in x.items()}  # widened after the cut: activations are big
    rep.absx = absx = {k: np.abs(v) for k, v in x64.items()}
    pads = rep.pads
    wide: dict[tuple[int, bool], np.ndarray] = {}  # this proof's weights in float64, each widened once
    try:
        rep.ref = ref = run(orig_g.model, on, oi, y, x64, pads=pads, wide=wide)
        rep.new = run(fold_g.model, fn, fi, y, x64, pads=pads, wide=wide)
        rep.mag = mag = run(fold_g.model, fn, fi, y, absx, magnitudes=True, pads=pads, wide=wide)
    except Exception as e:  # noqa: BLE001 - the reference evaluator lacks some ops / versions: say so
        return {"not_run": f"the region could not be replayed in float64 ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:160]})"}
    if witness is None or np.shape(witness) != ref.shape:
        return {"not_run": f"onnxruntime's value of {y!r} in the original model was not captured"}
    w = np.asarray(witness, np.float64)
    if not _faithful(ref, w, np.isfinite(w) & np.isfinite(ref), mag,
                     lambda: run(orig_g.model, on, oi, y, absx, magnitudes=True, pads=pads, wide=wide)):
        # the reference evaluator itself computes this region differently from onnxruntime (it has had
        # bugs in grouped ConvTranspose, for one): no proof rather than a false accusation
        return {"not_run": "the float64 replay of the original region disagrees with onnxruntime's own run of it"}
    return rep


class _Replayed:
    """A proof whose regions are replayed and whose original side holds: judged() takes the folded model's
    values and gives the verdict."""

    def __init__(self, orig_g: _Graph, fold_g: _Graph, xin: tuple[str, ...], y: str, orig: tuple, fold: tuple,
                 u: float, x: dict[str, np.ndarray], witness: np.ndarray | None) -> None:
        self.orig_g, self.fold_g, self.xin, self.y, self.orig, self.fold, self.u = orig_g, fold_g, xin, y, orig, fold, u
        self.x, self.witness = x, witness  # uncut, as captured
        self.cut: tuple[slice, ...] | None = None
        self.pads: dict[int, list[int]] = {}
        self.absx: dict[str, np.ndarray] = {}
        self.ref = self.new = self.mag = np.empty(0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.ref, self.new, self.mag, *self.absx.values()))

    def judged(self, witness_folded: np.ndarray | None, xs_folded: dict[str, np.ndarray | None]) -> dict[str, Any]:
        y, (fn, fi), ref, new, mag, pads = self.y, self.fold, self.ref, self.new, self.mag, self.pads
        if self.cut is not None and witness_folded is not None:
            if np.shape(witness_folded) != np.shape(self.witness):  # cut on the guess that the shapes match
                return _prove_one(self.orig_g, self.fold_g, self.xin, y, self.x, self.witness, witness_folded,
                                  xs_folded)
            witness_folded = np.asarray(witness_folded)[self.cut]
            name = self.xin[0]
            whole, own = np.asarray(self.x[name]), xs_folded.get(name)
            if own is not None:  # the folded model's own input, cut alike (the cut depends on shapes alone)
                own = np.asarray(own)
                xs_folded = {name: windows.shrink(self.orig, self.fold, name, own, np.asarray(self.witness))[0]
                             if own.shape == whole.shape else None}
        if witness_folded is None or np.shape(witness_folded) != new.shape:
            return {"not_run": f"onnxruntime's value of {y!r} in the folded model was not captured"}
        w = np.asarray(witness_folded, np.float64)
        if not _faithful(new, w, np.isfinite(w) & np.isfinite(new), mag, lambda: mag) and not _faithful_on_own_input(
                fn, fi, self.fold_g.model, y, xs_folded, w, pads):
            return {"not_run": "the float64 replay of the folded region disagrees with onnxruntime's own run of it"}
        if ref.shape != new.shape or mag.shape != new.shape:
            return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "how": HOW,
                    "why": f"shapes differ: {list(ref.shape)} vs {list(new.shape)}"}
        bound = (SLACK * self.u + F64_TERM) * mag
        both = np.isfinite(ref) & np.isfinite(new)
        if not np.array_equal(np.isfinite(ref), np.isfinite(new)):
            return {"passed": False, "max_abs": float("inf"), "bound": 0.0, "how": HOW, "why": "non-finite values differ"}
        judged = both & np.isfinite(bound)  # an infinite magnitude (an input already at inf) bounds nothing
        if not judged.any():
            return {"not_run": "the region's output is empty or not finite on the captured input"}
        with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf where not judged: masked)
            diff = np.where(judged, np.abs(new - ref), 0.0)
        ratio = diff / np.maximum(np.where(judged, bound, 1.0), np.finfo(np.float64).tiny)
        k = int(np.argmax(ratio))
        worst = float(ratio.reshape(-1)[k])
        return {"passed": worst <= 1.0, "max_abs": float(diff.max()), "bound": float(bound.reshape(-1)[k]),
                "ratio": worst, "how": HOW}


def _faithful_on_own_input(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], model: onnx.ModelProto,
                           y: str, x: dict[str, np.ndarray | None], w: np.ndarray,
                           pads: dict[int, list[int]] | None = None,
                           wide: dict[tuple[int, bool], np.ndarray] | None = None) -> bool:
    """The folded model's onnxruntime run read its own x, which differs from the original's by the folds
    upstream (far more than rounding where their values cancel): replayed on that x, does it agree?"""
    if any(v is None for v in x.values()):
        return False
    x64 = {k: np.asarray(v, np.float64) for k, v in x.items()}
    try:
        value = run(model, nodes, inits, y, x64, pads=pads, wide=wide)
        mag = run(model, nodes, inits, y, {k: np.abs(v) for k, v in x64.items()}, magnitudes=True, pads=pads,
                   wide=wide)
    except Exception:  # noqa: BLE001 - as for the first replay
        return False
    fine = np.isfinite(w) & np.isfinite(value)
    return value.shape == w.shape and _faithful(value, w, fine, mag, lambda: mag)


def _faithful(ref: np.ndarray, w: np.ndarray, fine: np.ndarray, mag: np.ndarray, own_mag: Any) -> bool:
    """onnxruntime's float run of a region agrees with its float64 replay up to rounding. Where the
    original's branches or shifts cancel (several BNs summed), its rounding scales with the magnitudes it
    summed, which the folded region no longer has: those (own_mag(), computed only then) count too."""
    with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf where not fine: masked)
        diff = np.abs(np.where(fine, ref - w, 0.0))
    if not np.any(diff > FAITHFUL * (mag + np.abs(ref))):
        return True
    try:
        om = own_mag()
    except Exception:  # noqa: BLE001 - no magnitude for some op of the region: judged without it
        return False
    return om.shape == ref.shape and not np.any(diff > FAITHFUL * (mag + np.abs(ref) + np.where(fine, om, 0.0)))
