"""What a fold bought, measured on both models: op counts, parameters and file size before and after.

Counted the way each framework's own tools count (no framework is imported here; the models are read
through their public attributes):
- ONNX: nodes by op type, subgraphs included; parameters = elements of every initializer and Constant.
- torch.export programs: aten calls of the graph; TorchScript: aten calls of the inlined graph (a
  BatchNorm call kept as an identity still counts); nn.Modules: leaf modules by class. Parameters =
  elements of the state_dict (running statistics included: they are stored weights too).
- Keras: layers by class, nested models included; parameters = count_params() (non-trainable too).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable


def anatomy(model: Any, framework: str, *, as_loaded: bool = False) -> dict[str, Any]:
    """{"ops": Counter of op kinds, "parameters": stored weight elements} of one in-memory model. `as_loaded`:
    `model` is exactly what this job's load returned (ONNX: the load check's sums serve, core/hold.py)."""
    if framework == "onnx":
        return _onnx(model, as_loaded)
    if framework == "torch":
        return _torch(model)
    if framework == "keras":
        return _keras(model)
    return {"ops": Counter(), "parameters": None}


def file_bytes(path: str, companions: Iterable[str] = ()) -> int | None:
    """Size on disk of a model: the file, every file of a directory, and the files it reads."""
    p = Path(path)
    try:
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        return sum(f.stat().st_size for f in files) + sum(os.path.getsize(c) for c in companions)
    except OSError:
        return None


def compare(before: dict[str, Any], after: dict[str, Any] | None) -> dict[str, Any]:
    """The report's before_after: changed op counts only, parameters and (filled in later) file sizes."""
    doc: dict[str, Any] = {"ops": {}, "parameters": [before["parameters"], None], "file_bytes": [None, None]}
    if after is None:
        return doc
    ops = sorted(set(before["ops"]) | set(after["ops"]))
    doc["ops"] = {op: [before["ops"].get(op, 0), after["ops"].get(op, 0)] for op in ops
                  if before["ops"].get(op, 0) != after["ops"].get(op, 0)}
    doc["parameters"][1] = after["parameters"]
    doc["total_ops"] = [sum(before["ops"].values()), sum(after["ops"].values())]
    return doc


# -- ONNX ------------------------------------------------------------------------------------------

def _onnx(model: Any, as_loaded: bool = False) -> dict[str, Any]:
    from .onnx.nodes import COUNTED_HOLDERS as holders, ONNX_DOMAINS as default, counts_bodies_of
    ops: Counter = Counter()
    params = None
    if as_loaded:  # the elements of the initializers counted below, summed by the load check as it read their dims
        from .core.hold import noted
        from .onnx.validity import INITIALIZER_ELEMENTS
        params = noted(model, INITIALIZER_ELEMENTS)
    count_initializers = params is None
    params = params or 0

    def walk(graph: Any) -> None:
        nonlocal params
        if count_initializers:
            params += sum(math.prod(t.dims[:]) for t in graph.initializer[:])
        nodes = graph.node[:]  # ([:] copies a repeated field in one call: a graph may hold 100k nodes)
        types = [n.op_type for n in nodes]
        domains = [n.domain for n in nodes]
        if set(default).issuperset(domains):
            ops.update(types)  # (a list: counted in C)
            if holders.isdisjoint(types):
                return  # no Constant and no body: nothing more to count
        else:
            ops.update(op if dom in default else f"{dom}.{op}" for dom, op in zip(domains, types))
        for n, dom, op in zip(nodes, domains, types):
            # only Constant holds a counted tensor, and only control flow (or another domain's op) a graph:
            # the attributes of every other node need no look
            if not counts_bodies_of(op, dom):
                continue
            for a in n.attribute:
                if op == "Constant" and a.HasField("t"):
                    params += math.prod(a.t.dims)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g)

    walk(model.graph)
    return {"ops": ops, "parameters": params}


# -- PyTorch ---------------------------------------------------------------------------------------

def _numel(tensors: Iterable[Any]) -> int:
    return sum(int(t.numel()) for t in tensors if hasattr(t, "numel"))


def _torch(model: Any) -> dict[str, Any]:
    ops: Counter = Counter()
    if hasattr(model, "graph_signature") and hasattr(model, "graph"):  # torch.export.ExportedProgram
        for n in model.graph.nodes:
            if n.op == "call_function":
                ops[str(n.target).removesuffix(".default")] += 1
        params = _numel(model.state_dict.values()) + _numel(getattr(model, "constants", {}).values())
        return {"ops": ops, "parameters": params}
    if hasattr(model, "inlined_graph"):  # TorchScript
        for n in model.inlined_graph.nodes():
            if n.kind().startswith("aten::"):
                ops[n.kind()] += 1
        return {"ops": ops, "parameters": _numel(model.state_dict().values())}
    if hasattr(model, "graph") and hasattr(model.graph, "nodes"):  # torch.fx GraphModule
        mods = dict(model.named_modules())
        for n in model.graph.nodes:
            if n.op == "call_module" and n.target in mods:
                ops[type(mods[n.target]).__name__] += 1
            elif n.op in ("call_function", "call_method"):
                ops[getattr(n.target, "__name__", str(n.target))] += 1
    elif hasattr(model, "modules"):
        for m in model.modules():
            if not any(True for _ in m.children()):
                ops[type(m).__name__] += 1
    params = _numel(model.state_dict().values()) if hasattr(model, "state_dict") else None
    return {"ops": ops, "parameters": params}


# -- Keras -----------------------------------------------------------------------------------------

def _keras(model: Any) -> dict[str, Any]:
    ops: Counter = Counter()

    def walk(layer: Any) -> None:
        subs = list(getattr(layer, "layers", None) or [])
        if not subs:
            ops[type(layer).__name__] += 1
        for s in subs:
            walk(s)

    walk(model)
    try:
        params = int(model.count_params())
    except Exception:  # noqa: BLE001 - an unbuilt model has no weights to count
        params = None
    return {"ops": ops, "parameters": params}
