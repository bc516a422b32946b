"""Readable names for ONNX nodes, from the file's own metadata.

torch.onnx's dynamo exporter names nodes after the aten op it lowered
(`node__native_batch_norm_legit_no_training_53__0`) but records, per node, the module path it came
from (`pkg.torch.onnx.name_scopes`, and `namespace` as `path: class/...` segments). A report shows
that path (`layer3.4.bn2`) beside the node's own name, which stays the identifier.
"""
from __future__ import annotations

import ast
from collections import Counter

import onnx

from ..core.hold import note, noted
from .nodes import CONTROL_FLOW, ONNX_DOMAINS, graphs_of, node_label

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"
_NONE_RECORDED = "onnx: no module paths recorded"  # (the note note_recorded leaves when the file spells neither key)
_SEARCH_BYTES_PER_NODE = 2048  # a search reads ~3 bytes a ns, readable_names ~1 node a us: longer files are walked


def note_recorded(model: onnx.ModelProto, data: bytes) -> None:
    """Note for readable_names whether the serialised `model`, `data`, records module paths at all: a file that
    never spells either key has no node (in any body or function) that holds one. Searched only where that is
    cheaper than the walk it saves (many nodes for their bytes: a long graph of small layers)."""
    if len(data) < _SEARCH_BYTES_PER_NODE * len(model.graph.node):
        if SCOPES_KEY.encode() not in data and NAMESPACE_KEY.encode() not in data:
            note(model, _NONE_RECORDED, True)


def scopes_of(node: onnx.NodeProto) -> list[str] | None:
    """The exporter's scope list of a node (module paths from the root, then the op), or None."""
    props = {p.key: p.value for p in node.metadata_props}
    if SCOPES_KEY in props:
        try:
            scopes = ast.literal_eval(props[SCOPES_KEY])
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and scopes and all(isinstance(s, str) for s in scopes):
            return scopes
    if NAMESPACE_KEY in props:
        # ": pkg.Model/layer1: pkg.Sequential/layer1.0.bn: torch...BatchNorm2d/op: aten.op"
        parts = [seg.split(": ", 1)[0].strip() for seg in props[NAMESPACE_KEY].split("/")]
        if len(parts) >= 2:
            return parts
    return None


def _module_path(scopes: list[str]) -> str | None:
    """The innermost module's path (the last scope but the op itself); None at the top level."""
    mods = [s for s in scopes[:-1] if s]
    return mods[-1] if mods else None


def readable_names(model: onnx.ModelProto) -> dict[str, str]:
    """Node label (as decisions spell it, scope included) -> module path, for nodes whose exporter recorded
    one that differs from the node's name. Two nodes of one op in one module are told apart by the op."""
    if noted(model, _NONE_RECORDED):  # (the load searched the file: note_recorded)
        return {}
    found: list[tuple[str, str, str, str]] = []  # (label, op_type, path, op scope)

    def walk(graph: onnx.GraphProto, scope: str) -> None:
        nodes = graph.node[:]
        # (each field read for all nodes at once, then a closer look at the few that need one, in graph order:
        # a label two nodes spell goes to the later one, as it always has)
        picked = [n for n, op, dom in zip(nodes, [n.op_type for n in nodes], [n.domain for n in nodes])
                  if op in CONTROL_FLOW or dom not in ONNX_DOMAINS or n.metadata_props]
        for n in picked:
            if n.op_type in CONTROL_FLOW or n.domain not in ONNX_DOMAINS:  # (only these hold bodies)
                for a in n.attribute:
                    for sub in graphs_of(a):
                        walk(sub, f"{scope}{node_label(n)}/{a.name}/")
            if not n.metadata_props:
                continue
            scopes = scopes_of(n)
            path = _module_path(scopes) if scopes else None
            if path and path != n.name:
                found.append((scope + node_label(n), n.op_type, path, scopes[-1] if scopes else ""))

    walk(model.graph, "")
    for fn in model.functions:
        g = onnx.GraphProto()
        g.node.extend(fn.node)
        walk(g, f"{fn.domain}.{fn.name}/" if fn.domain else f"{fn.name}/")
    shared = Counter((op, path) for _, op, path, _ in found)
    return {label: (path if shared[(op, path)] == 1 else f"{path} ({last})")
            for label, op, path, last in found}
