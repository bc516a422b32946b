"""The sweep's reference: sweep._dead_constants as it was before the bulk settling (1089169^), a plain
walk over every released name. Tests hold today's sweep to it (the same nodes and initializers go)."""
from __future__ import annotations


def walk_only(f, dead):
    """sweep._dead_constants as it was before the bulk settling (1089169^): a walk over every released name."""
    ix = f.ix
    const_nodes = ix.evaluator.const_nodes if ix.evaluator is not None else set()
    work, seen, dead_inits = list(f.maybe_dead_inits), set(), set()
    readers, outputs, inits = ix.consumers, ix.graph_outputs, ix.inits
    while work:
        n = work.pop()
        if n in seen or readers.get(n) or n in outputs:
            continue
        seen.add(n)
        if n in inits:
            if not ix.overridable(n):
                dead_inits.add(n)
            continue
        src = ix.producer.get(n)
        if src is None or id(src) in dead or any(ix.uses(o) for o in src.output if o):
            continue
        if id(src) not in const_nodes and not (src.op_type == "Constant" and src.domain in ("", "ai.onnx")):
            continue
        dead.add(id(src))
        f.dead_values.update(o for o in src.output if o)
        for i in src.input:
            if i:
                ix.unread(i, src)
                work.append(i)
    return {n: inits[n] for n in dead_inits}  # (the sweep takes the tensors by name)
