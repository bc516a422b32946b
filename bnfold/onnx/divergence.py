"""What an ONNX comparison looks at, which differences are divergences, and which fold is to blame.

- Intermediates: every tensor both models compute under the same name is compared (a ReLU must not hide
  an error), in the original's node order, so the first divergence is the layer a user must look at.
- Folds made by another tool: onnxsim, onnxoptimizer and friends fold a BatchNorm into the conv before it
  and keep the conv's output name for what is now the BatchNorm's output. A same-named tensor that differs
  from the original but equals the original's value a few per-channel affine ops (BatchNormalization,
  Mul/Add/Sub/Div by a constant) further down is such a fold site, not a divergence. A real error there
  matches neither value and still fails.
- Discrete values: indices, labels and masks made by TopK, NonMaxSuppression, ArgMax, comparisons and
  roundings flip when near-equal inputs swap order, and everything computed from them (boxes gathered by
  NMS indices) follows. Such a tensor that differs is judged by the continuous tensors that fed the
  discrete op: when those agree within tolerance, the flip is rounding-sized ("unstable"), not an error.
- Blame: a divergence is traced back, in the folded graph, to the nearest folds upstream of it: those
  are what self-healing reverts.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from ..core.decisions import Decision
from .nodes import ONNX_DOMAINS, attr, node_label

# op -> output positions that are discrete (decided by comparing continuous values)
DISCRETE_OPS = {"TopK": (1,), "NonMaxSuppression": (0,), "ArgMax": (0,), "ArgMin": (0,), "NonZero": (0,),
                "Greater": (0,), "Less": (0,), "GreaterOrEqual": (0,), "LessOrEqual": (0,), "Equal": (0,),
                "Round": (0,), "Floor": (0,), "Ceil": (0,), "Sign": (0,), "Unique": (0, 1, 2, 3)}
AFFINE_BY_CONSTANT = {"Mul", "Add", "Sub", "Div"}
MAX_CHAIN = 4
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


class Plan:
    """Which tensors each model must output for a comparison, and how to read differences in them."""

    def __init__(self, original: onnx.ModelProto, candidate: onnx.ModelProto,
                 decisions: Iterable[Decision] | None = None, also: Iterable[str] = ()) -> None:
        g = original.graph
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.consts = {t.name for t in g.initializer} | {n.output[0] for n in g.node
                                                          if n.op_type == "Constant" and n.output}
        self.inner = common_tensors(original, candidate)
        self.chains = {t: c for t in self.inner if (c := self._affine_chain(t))}
        self.sources = self._discrete_sources()
        outs = {o.name for o in g.output}
        extra = {u for chain in self.chains.values() for u in chain}
        extra |= {c for cs in self.sources.values() for c in cs}
        extra |= set(also)
        self.extra = [t for t in extra if t in self.producer and t not in outs and t not in set(self.inner)]
        self.derived = self._ordering_derived()
        self.cand_producer = {o: n for n in candidate.graph.node for o in n.output if o}
        self.sites = {d.site[1]: d.bn for d in (decisions or ()) if d.is_folded and d.site is not None}

    # -- what to request ---------------------------------------------------------------------------
    def _affine_chain(self, t: str) -> list[str]:
        """Outputs of the per-channel affine ops that alone read `t` in the original, in order."""
        chain, cur = [], t
        for _ in range(MAX_CHAIN):
            users = self.consumers.get(cur, [])
            if len(users) != 1:
                break
            n = users[0]
            if n.domain not in ONNX_DOMAINS:
                break
            if n.op_type == "BatchNormalization" and n.input[0] == cur and len(n.output) >= 1:
                pass
            elif n.op_type in AFFINE_BY_CONSTANT and len(n.input) == 2 and \
                    (n.input[0] == cur) != (n.input[1] == cur) and (set(n.input) - {cur}) <= self.consts:
                pass
            else:
                break
            cur = n.output[0]
            chain.append(cur)
        return chain

    def _discrete_sources(self) -> dict[str, list[str]]:
        """Discrete tensor -> the continuous tensors its op compared to make it."""
        out: dict[str, list[str]] = {}
        for t, n in self.producer.items():
            pos = DISCRETE_OPS.get(n.op_type) if n.domain in ONNX_DOMAINS else None
            if n.op_type == "Cast" and n.domain in ONNX_DOMAINS and attr(n, "to") not in FLOAT_TYPES:
                pos = (0,)  # a float made an integer or a bool
            if pos and t in [n.output[k] for k in pos if k < len(n.output)]:
                out[t] = [i for i in n.input[:2] if i and i not in self.consts]
        return out

    def _ordering_derived(self) -> dict[str, set[str]]:
        """Tensor -> the discrete tensors it is computed from (for every tensor computed from one)."""
        derived: dict[str, set[str]] = {t: {t} for t in self.sources}
        queue = deque(self.sources)
        while queue:
            t = queue.popleft()
            for n in self.consumers.get(t, []):
                for o in n.output:
                    if o and not derived.get(t, set()) <= derived.get(o, set()):
                        derived.setdefault(o, set()).update(derived[t])
                        queue.append(o)
        return derived

    # -- how to read a difference ------------------------------------------------------------------
    def other_tool_fold(self, t: str, cand: np.ndarray, ref: Mapping[str, np.ndarray], judge: Any) -> str | None:
        """The original tensor whose value the candidate's `t` carries when another tool folded the affine
        ops after `t` into the layer computing it, or None."""
        for u in self.chains.get(t, []):
            if u in ref and judge(u, cand, ref[u]):
                return u
        return None

    def unstable(self, t: str, passes: Any) -> list[str] | None:
        """For a tensor computed from discrete values: the continuous tensors behind them, when every one of
        them agrees (`passes(name)`), else None (the difference is not explained by an order flip)."""
        if t not in self.derived:
            return None
        # the continuous tensors at the start of the discrete chain (a NonZero of a Greater of scores: scores)
        behind = sorted({c for s in self.derived[t] for c in self.sources.get(s, []) if c not in self.derived})
        if behind and all(passes(c) for c in behind):
            return behind
        return None

    def blame(self, t: str, compared: set[str]) -> list[str]:
        """The folds a first divergence at `t` is the fault of: the fold whose output `t` is, or folds whose
        outputs reach `t` only through tensors that were not compared. Every compared tensor before the
        first divergence agreed, so a fold behind one of them is not to blame."""
        found, seen, queue = [], set(), deque([t])
        while queue:
            name = queue.popleft()
            if name in seen:
                continue
            seen.add(name)
            if name in self.sites:
                found.append(self.sites[name])
                continue
            if name != t and name in compared:
                continue
            node = self.cand_producer.get(name)
            if node is not None:
                queue.extend(i for i in node.input if i)
        return found


def common_tensors(original: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Tensors computed by nodes of both models under the same name, in the original's node order
    (graph outputs excluded: they are compared anyway)."""
    cand = {o for n in candidate.graph.node for o in n.output if o}
    outs = {o.name for o in original.graph.output}
    seen: set[str] = set()
    order = []
    for n in original.graph.node:
        for o in n.output:
            if o and o in cand and o not in outs and o not in seen:
                seen.add(o)
                order.append(o)
    return order


def who(original: onnx.ModelProto, candidate: onnx.ModelProto, tensor: str) -> dict[str, Any]:
    """The nodes computing `tensor` in both models, for a report."""
    cn = next((n for n in candidate.graph.node if tensor in n.output), None)
    on = next((n for n in original.graph.node if tensor in n.output), None)
    return {"node": node_label(cn) if cn is not None else None, "op": cn.op_type if cn is not None else None,
            "original_node": node_label(on) if on is not None else None}
