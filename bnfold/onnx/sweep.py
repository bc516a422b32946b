"""Cleanup after an ONNX graph's folds: drop folded BNs, the constant subgraphs and initializers
nothing reads any more, and stale value_info, once per graph and without copying tensors."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .nodes import ONNX_DOMAINS

if TYPE_CHECKING:
    import onnx

    from .folder import OnnxFolder


def _dead_constants(f: "OnnxFolder", dead: set[int]) -> dict[str, "onnx.TensorProto"]:
    """Add to `dead` every constant-only node nobody reads any more (transitively, starting from the
    names folding released); return the initializers nobody reads any more, by name."""
    ix = f.ix
    const_nodes = ix.evaluator.const_nodes if ix.evaluator is not None else set()
    readers, outputs, inits = ix.consumers, ix.graph_outputs, ix.inits  # (ix.uses, inlined: 100k names and more)
    overridable = ix.graph_inputs if ix.ir_version >= 4 else ()  # (ix.overridable, inlined)
    # the released names nobody reads: initializers are settled here in bulk (a BN leaves four), the rest
    # (values a node writes) go through the walk, which follows constant nodes back to their inputs
    dead_inits: dict[str, onnx.TensorProto] = {}
    kept: list[str] = []  # released overridable initializers: they stay inputs
    work = []
    for n in f.maybe_dead_inits:  # (one loop, two lookups a name: a long graph releases 100k and more)
        if readers.get(n) or n in outputs:
            continue
        t = inits.get(n)
        if t is None:
            work.append(n)
        elif n in overridable:
            kept.append(n)
        else:
            dead_inits[n] = t
    seen = set(dead_inits).union(kept) if work else set()  # (the walk's: initializers settled already)
    while work:
        n = work.pop()
        if n in seen or readers.get(n) or n in outputs:
            continue
        seen.add(n)
        if n in inits:
            if n not in overridable:  # a caller may feed an overridable one: it stays an input
                dead_inits[n] = inits[n]
            continue
        src = ix.producer.get(n)
        if src is None or id(src) in dead or any(ix.uses(o) for o in src.output if o):
            continue
        if id(src) not in const_nodes and not (src.op_type == "Constant" and src.domain in ONNX_DOMAINS):
            continue
        dead.add(id(src))
        f.dead_values.update(o for o in src.output if o)
        for i in src.input:
            if i:
                ix.unread(i, src)
                work.append(i)
    return dead_inits


def sweep(f: "OnnxFolder") -> None:
    """Remove folded BNs and initializers nothing reads any more, without copying tensors."""
    g, ix = f.ix.graph, f.ix
    dead = set(f.dead_nodes)
    dead_inits = _dead_constants(f, dead)
    if f.inserted:
        # (the index holds every node's wrapper, the ones the sort sees: keys by id() are stable)
        pos: dict[int, float] = {id(n): float(i) for i, n in enumerate(ix.nodes)}
        for after, new in f.inserted:
            g.node.append(new)  # appending copies: key the stored message, not `new`
            f._nodes.append(g.node[-1])  # and keep its wrapper alive so its id() stays its own
            pos[id(g.node[-1])] = pos[id(after)] + 0.5
        # one pointer sort: live nodes in order (inserted ones right after their anchor), dead last
        g.node.sort(key=lambda n: (id(n) in dead, pos[id(n)]))
    elif dead:
        g.node.sort(key=lambda n: id(n) in dead)  # (stable: the live nodes keep their order)
    if dead:
        del g.node[len(g.node) - len(dead):]
    if dead_inits:
        dead_ids = {id(t) for t in dead_inits.values()}  # by identity, as above: a name costs a lookup
        g.initializer.sort(key=lambda t: id(t) in dead_ids)
        del g.initializer[len(g.initializer) - len(dead_inits):]
    declared_dead = ix.graph_inputs.intersection(dead_inits)  # IR < 4: the initializer's own input entry
    if declared_dead:
        g.input.sort(key=lambda v: v.name in declared_dead)
        del g.input[len(g.input) - len(declared_dead):]
        ix.graph_inputs -= declared_dead
    if len(g.value_info) and (f.dead_values or dead_inits):
        gone = f.dead_values.union(dead_inits)
        stale = {v.name for v in g.value_info if v.name in gone}
        if stale:
            g.value_info.sort(key=lambda v: v.name in stale)
            del g.value_info[len(g.value_info) - len(stale):]
