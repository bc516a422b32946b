"""Every scope of a model: the main graph, If/Loop/Scan bodies (any depth) and model-local functions.

A body may read its enclosing scopes' values; a BN there folds when its parameters are constants of
some enclosing scope (outer initializers, Constant nodes or constant subgraphs, looked up through the
parent's evaluator). Bodies fold before their parent, so the parent's sweep sees which outer
initializers no body reads any more. New names come from one model-wide set, so nothing created in
a body shadows or repeats a name of another scope (ONNX requires names to be unique across scopes).
Functions have no initializers: what a fold creates there becomes Constant nodes.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import helper

from ..core.decisions import Decision
from ..core.options import Options
from .const import ConstEvaluator
from .folder import OnnxFolder
from .graph import GraphIndex, fresh, subgraphs
from .nodes import graphs_of, model_opset, node_label, subgraph_free_names
from .shapes import needs_shapes, value_types

Lookup = Callable[[str], "np.ndarray | None"]


def _all_graphs(g: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield g
    for n in g.node:
        for sub in subgraphs(n):
            yield from _all_graphs(sub)


def all_names(model: onnx.ModelProto, main: GraphIndex | None = None) -> set[str]:
    """Every value and node name in every graph and function of `model`; with `main` (the main graph,
    indexed), every one but the main graph's own, which the index holds already."""
    names: set[str] = set()
    if main is None:
        graphs = list(_all_graphs(model.graph))
    else:
        graphs = [sub for n in main.with_bodies for body in subgraphs(n) for sub in _all_graphs(body)]
    for f in model.functions:
        names.update(f.input)
        names.update(f.output)
        names.update(v.name for v in getattr(f, "value_info", ()))  # (a function's own, from IR 10)
        for n in f.node:
            names.update(n.output)
            names.add(n.name)
            for sub in subgraphs(n):
                graphs.extend(_all_graphs(sub))
    for g in graphs:
        names.update(v.name for v in g.input)
        names.update(v.name for v in g.output)
        names.update(v.name for v in g.value_info)
        names.update(t.name for t in g.initializer[:])
        names.update(sp.values.name for sp in g.sparse_initializer)
        for n in g.node[:]:  # ([:] is one C call; iterating a repeated field ends in a caught IndexError)
            names.update(n.output[:])
            names.add(n.name)
    names.discard("")
    return names


LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
AFFINE = {"Mul", "Add", "Sub", "Div", "Sum"}  # with a layer: a block to merge or a BN in disguise (regions, multi)


def _has_bn(graph_nodes) -> bool:
    ops = set()
    for n in graph_nodes:
        if n.op_type == "BatchNormalization":
            return True
        ops.add(n.op_type)
        for sub in subgraphs(n):
            if _has_bn(sub.node):
                return True
    return bool(ops & LAYERS) and bool(ops & AFFINE)


def fold_graph(model: onnx.ModelProto, graph: onnx.GraphProto, opset: int, outer: Lookup | None, scope: str,
               names: set[str], opts: Options, shapes: dict, prepared: OnnxFolder | None = None) -> list[Decision]:
    """Fold `graph` and, first, every subgraph of its nodes; returns the decisions of all of them
    (`prepared`: the graph's folder, already built by the caller)."""
    folder = OnnxFolder(model, graph, opset, outer, scope, names, opts, shapes) if prepared is None else prepared
    ix = folder.ix
    decisions: list[Decision] = []
    for node in list(ix.with_bodies):  # (gathered by the index's walk over the nodes)
        subs = [(a.name, g) for a in node.attribute for g in graphs_of(a)]
        if not subs or not any(_has_bn(g.node) for _, g in subs):
            continue
        if ix.evaluator is None:
            ix.evaluator = ConstEvaluator(ix, opset)
        before = set().union(*(subgraph_free_names(g) for _, g in subs))
        for aname, g in subs:
            decisions += fold_graph(model, g, opset, ix.evaluator.value, f"{scope}{node_label(node)}/{aname}/",
                                    names, opts, shapes)
        after = set().union(*(subgraph_free_names(g) for _, g in subs))
        for name in before - after:
            # the bodies stopped reading this outer value: the parent's sweep may drop it
            users = ix.consumers.get(name, [])
            users[:] = [u for u in users if u is not node]
            folder.maybe_dead_inits[name] = None
    decisions += folder.run()
    if scope and model.ir_version < 4 and folder.created:
        # before IR 4 a body's initializers would have to be its inputs, which If/Loop bodies cannot add
        created = set(folder.created)
        _to_constants(graph, [t for t in graph.initializer if t.name in created], names)
    return decisions


def _to_constants(graph: onnx.GraphProto, tensors: list[onnx.TensorProto], taken: set[str]) -> None:
    """Move `tensors` (initializers of `graph` a fold made) into Constant nodes placed first in `graph`, named
    after them and unlike any name in `taken` (the model's names a made one could equal: each tensor's name, made
    by GraphIndex.unique, holds its mark, and so does its node's)."""
    if not tensors:
        return
    consts = [helper.make_node("Constant", [], [t.name], name=fresh(taken, f"{t.name}_const"), value=t)
              for t in tensors]
    for c in consts:
        c.attribute[0].t.name = ""
    names = {t.name for t in tensors}
    keep = [t for t in graph.initializer if t.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = consts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def _function_opset(model: onnx.ModelProto, fn: onnx.FunctionProto) -> int:
    for o in fn.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return model_opset(model)


def fold_function(model: onnx.ModelProto, fn: onnx.FunctionProto, names: set[str], opts: Options,
                  shapes: dict) -> list[Decision]:
    """Fold the BNs of a model-local function; new constants become Constant nodes inside it."""
    g = onnx.GraphProto()
    g.node.extend(fn.node)
    g.input.extend(onnx.ValueInfoProto(name=i) for i in fn.input)
    g.output.extend(onnx.ValueInfoProto(name=o) for o in fn.output)
    decisions = fold_graph(model, g, _function_opset(model, fn), None, f"{fn.domain}.{fn.name}/" if fn.domain
                           else f"{fn.name}/", names, opts, shapes)
    if any(d.is_folded for d in decisions):
        _to_constants(g, list(g.initializer), names)
        del fn.node[:]
        fn.node.extend(g.node)
    return decisions


def fold_all_scopes(model: onnx.ModelProto, opts: Options,
                    borrowed: dict[str, onnx.TensorProto] | None = None) -> list[Decision]:
    """Fold every BN of every scope of `model` in place; one Decision per BN. `borrowed`: main-graph
    initializers of `model` that are stubs whose data lives in these tensors (protos.copy_borrowing);
    the ones a fold rewrites leave it."""
    names: set[str] = set()  # every name of the model, shared by the folders: filled before any rewrite
    shapes: dict = {}  # likewise, when some BN needs them
    main = OnnxFolder(model, model.graph, model_opset(model), None, "", names, opts, shapes)
    names.update(all_names(model, main.ix))
    if borrowed:
        main.ix.borrowed = borrowed
    if needs_shapes(model, main.ix):
        shapes.update(value_types(model))
    decisions = fold_graph(model, model.graph, model_opset(model), None, "", names, opts, shapes, main)
    for fn in model.functions:
        if _has_bn(fn.node):
            decisions += fold_function(model, fn, names, opts, shapes)
    return decisions


def neighbourhoods(model: onnx.ModelProto) -> dict[str, dict[str, object]]:
    """BN label (as in its Decision) -> the node feeding it and the nodes reading it, in every scope."""
    out: dict[str, dict[str, object]] = {}

    def walk(graph: onnx.GraphProto, scope: str) -> None:
        producer = {o: n for n in graph.node for o in n.output if o}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                readers.setdefault(i, []).append(n)
        outputs = {o.name for o in graph.output}
        for n in graph.node:
            for a in n.attribute:
                for sub in graphs_of(a):
                    walk(sub, f"{scope}{node_label(n)}/{a.name}/")
            if n.op_type != "BatchNormalization" or not n.input:
                continue
            src = producer.get(n.input[0])
            feeds = [f"{r.op_type} {node_label(r)}" for r in readers.get(n.output[0], [])]
            if n.output[0] in outputs:
                feeds.append("graph output")
            out[scope + node_label(n)] = {
                "input": f"{src.op_type} {node_label(src)}" if src is not None else f"{n.input[0]} (no producer)",
                "feeds": feeds}

    walk(model.graph, "")
    for fn in model.functions:
        g = onnx.GraphProto()
        g.node.extend(fn.node)
        g.output.extend(onnx.ValueInfoProto(name=o) for o in fn.output)
        walk(g, f"{fn.domain}.{fn.name}/" if fn.domain else f"{fn.name}/")
    return out
