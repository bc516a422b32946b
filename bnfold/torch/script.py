"""TorchScript modules (scripted or traced): fold the weights, keep the compiled code.

The capture walks the module's method graphs at module granularity: a `prim::CallMethod` on a
Conv/ConvTranspose/Linear/BatchNorm submodule is one op, any other submodule call is followed into
its own graph, and every other node is an op that uses its inputs (nodes with blocks - TorchScript
`if`/`for` - count as using every outer value their blocks read). The same rules as for nn.Modules
decide. TorchScript code is compiled and may be shared between module instances, so it is not
edited: the layer gets the folded weights and the BN call stays in the code with statistics that make
it an exact identity, or a pure shift `x + t` when the layer has no bias to hold t. The report says
so; the numerics are those of a folded model, the BN kernel still runs.
"""
from __future__ import annotations

import io
import time
from typing import Any

import torch

from ..core import kernel
from ..core.decisions import Decision, Reason, Skip
from ..core.options import Options
from ..core.results import FoldResult, Report
from . import bnlike as bnlike
from . import rewrite as rewrite
from . import rules as rules
from .ops import Capture, Op
from .verify import verify_result

LEAF = {"Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "ConvTranspose1d": "convT",
        "ConvTranspose2d": "convT", "ConvTranspose3d": "convT", "Linear": "linear",
        "BatchNorm1d": "bn", "BatchNorm2d": "bn", "BatchNorm3d": "bn", "SyncBatchNorm": "bn"}
NOTE = "TorchScript: weights folded; the BatchNorm call stays in the compiled code as an exact identity"


def _const(v: Any) -> Any:
    node = v.node()
    if node.kind() == "prim::Constant":
        return v.toIValue()
    if node.kind() == "prim::ListConstruct":
        return [_const(i) for i in node.inputs()]
    raise ValueError("not a constant")


def _aten_node(sub: Any, names: tuple[str, ...]) -> Any:
    for n in sub.inlined_graph.nodes():
        if n.kind() in names:
            return n
    return None


def _attr(sub: Any, name: str, default: Any = None) -> Any:
    try:
        return getattr(sub, name)
    except AttributeError:
        return default


def _frozen(sub: Any) -> bool:
    """A scripted frozen BN (torch_bnlike): BatchNorm by name and structure, not a torch.nn BatchNorm."""
    name = getattr(sub, "original_name", "")
    return name not in LEAF and bnlike.bn_named(name) and bnlike.problem(sub, name, _eps(sub)) is None


_VIEWS = {"aten::reshape", "aten::view", "aten::unsqueeze", "aten::expand", "aten::to", "aten::contiguous"}


def _eps(sub: Any) -> float | None:
    """A frozen BN's eps: its attribute when scripted; when traced, the one constant its code adds to
    running_var (through reshapes), if there is exactly one."""
    eps = _attr(sub, "eps")
    if eps is not None or not isinstance(_attr(sub, "running_var"), torch.Tensor):
        return eps
    seen, found = set(), []
    for n in sub.inlined_graph.nodes():
        ins = list(n.inputs())
        if n.kind() == "prim::GetAttr" and n.s("name") == "running_var":
            seen.add(n.output())
        elif n.kind() in _VIEWS and ins and ins[0] in seen:
            seen.add(n.output())
        elif n.kind() == "aten::add" and len(ins) == 3 and ins[0] in seen:
            try:
                c, alpha = _const(ins[1]), _const(ins[2])
            except ValueError:
                continue
            if isinstance(c, torch.Tensor) and c.dim() == 0 and c.is_floating_point():
                c = float(c)  # the tracer records a Python float as a 0-d double tensor
            if isinstance(c, float) and alpha == 1:
                found.append(c)
    return found[0] if len(found) == 1 else None


def _bn_like(sub: Any) -> bool:
    """A BatchNorm of its own, scripted: a torch.nn one, or a BatchNorm-named module that is no container."""
    name = getattr(sub, "original_name", "")
    if LEAF.get(name) == "bn":
        return True
    return bnlike.bn_named(name) and not any(
        c is not sub and bnlike.bn_named(getattr(c, "original_name", "")) for _, c in sub.named_modules())


def _leaf_op(path: str, sub: Any, kind: str, inputs: list[int], outputs: list[int]) -> Op:
    pre = f"{path}." if path else ""
    has = {k: isinstance(_attr(sub, k), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")}
    attrs: dict[str, Any] = {}
    if kind == "bn":
        node = _aten_node(sub, ("aten::batch_norm",))
        eps = _eps(sub) if _frozen(sub) else _attr(sub, "eps")
        training = bool(sub.training)
        if node is not None and eps is None:  # traced: the values are constants in the graph
            ins = list(node.inputs())
            eps, training = float(_const(ins[7])), bool(_const(ins[5]))
        attrs = {"eps": float(eps if eps is not None else 1e-5), "training": training}
        if _frozen(sub):
            attrs.update({"training": False, "frozen": sub.original_name})  # the probe decides (torch_bnlike)
        params = {k: (pre + k if has[k] else None) for k in ("weight", "bias", "running_mean", "running_var")}
    else:
        params = {"weight": pre + "weight", "bias": pre + "bias" if has["bias"] else None}
        if kind != "linear":
            groups, padding, mode = _attr(sub, "groups"), _attr(sub, "padding"), _attr(sub, "padding_mode", "zeros")
            if groups is None:
                node = _aten_node(sub, ("aten::_convolution",))
                ins = list(node.inputs())
                groups, padding = int(_const(ins[8])), tuple(_const(ins[4]))
                mode = "zeros" if _aten_node(sub, ("aten::pad", "aten::reflection_pad2d", "aten::replication_pad2d")) is None else "copies"
            attrs = {"groups": int(groups), "padding": padding, "padding_mode": mode,
                     "kernel": tuple(_attr(sub, "weight").shape[2:])}
    return Op(path, kind, inputs, outputs, module=path, params=params, attrs=attrs)


class _Walker:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.cap = Capture("torchscript")
        self.next = 0

    def fresh(self) -> int:
        self.next += 1
        return self.next

    def walk(self, graph: Any, self_path: str, arg_ids: list[int]) -> list[int]:
        env: dict[Any, int] = {}
        paths: dict[Any, str] = {}
        ins = list(graph.inputs())
        paths[ins[0]] = self_path
        for v, i in zip(ins[1:], arg_ids):
            env[v] = i
        for node in graph.nodes():
            self.node(node, env, paths)
        return [env.get(v, -1) for v in graph.return_node().inputs()]

    def _ids(self, values: Any, env: dict, paths: dict) -> list[int]:
        out = []
        for v in values:
            if v in env:
                out.append(env[v])
            elif v in paths and isinstance(_attr_path(self.root, paths[v]), torch.Tensor):
                self.cap.param_uses[paths[v]] += 1
        return out

    def node(self, node: Any, env: dict, paths: dict) -> None:
        kind = node.kind()
        if kind == "prim::Constant":
            return
        if kind == "prim::GetAttr":
            src = list(node.inputs())[0]
            if src in paths:
                base = paths[src]
                paths[node.output()] = f"{base}.{node.s('name')}" if base else node.s("name")
            return
        ins = list(node.inputs())
        if kind == "prim::CallMethod" and ins and ins[0] in paths:
            path = paths[ins[0]]
            sub = _attr_path(self.root, path)
            args = self._ids(ins[1:], env, paths)
            leaf = LEAF.get(getattr(sub, "original_name", "")) or ("bn" if _frozen(sub) else None)
            if leaf and node.s("name") == "forward":
                outs = [self.fresh() for _ in node.outputs()]
                for v, i in zip(node.outputs(), outs):
                    env[v] = i
                op = _leaf_op(path, sub, leaf, args, outs)
                rank = _out_rank(sub, leaf)
                if rank is not None:
                    self.cap.ranks[outs[0]] = rank
                elif args and args[0] in self.cap.ranks:  # conv, linear and BN keep their input's rank
                    self.cap.ranks[outs[0]] = self.cap.ranks[args[0]]
                self.cap.ops.append(op)
                self.cap.module_calls[path] += 1
                for p in op.params.values():
                    if p:
                        self.cap.param_uses[p] += 1
                return
            rets = self.walk(sub._c._get_method(node.s("name")).graph, path, args)
            for v, i in zip(node.outputs(), rets):
                env[v] = i if i >= 0 else self.fresh()
            return
        used = self._ids(ins, env, paths)
        for block in node.blocks():
            used += self._block_uses(block, env, paths)
        outs = [self.fresh() for _ in node.outputs()]
        for v, i in zip(node.outputs(), outs):
            env[v] = i
        self.cap.ops.append(Op(kind, "other", used, outs))

    def _block_uses(self, block: Any, env: dict, paths: dict) -> list[int]:
        used = []
        for n in list(block.nodes()) + [block.returnNode()]:
            if n.kind() == "prim::GetAttr":
                self.node(n, env, paths)
                continue
            used += self._ids(n.inputs(), env, paths)
            for b in n.blocks():
                used += self._block_uses(b, env, paths)
        return used


def _out_rank(sub: Any, kind: str) -> int | None:
    """Rank of a traced leaf's output (traced graphs carry complete tensor types)."""
    names = {"linear": ("aten::linear",), "bn": ("aten::batch_norm",)}.get(kind, ("aten::_convolution",))
    node = _aten_node(sub, names)
    try:
        return node.output().type().dim() if node is not None else None
    except RuntimeError:
        return None


def _attr_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj


def capture_script(sm: Any, example_inputs: tuple | None = None) -> Capture:
    """The module-level op graph of a TorchScript module's forward. Scripted graphs carry no shapes:
    the example inputs' ranks seed the graph inputs and flow through conv/linear/BN calls (which
    keep their input's rank)."""
    w = _Walker(sm)
    ins = list(sm.graph.inputs())
    ids = [w.fresh() for _ in ins[1:]]
    for i, x in zip(ids, example_inputs or ()):
        if isinstance(x, torch.Tensor):
            w.cap.ranks[i] = x.dim()
    rets = w.walk(sm.graph, "", ids)
    w.cap.graph_outputs.update(i for i in rets if i >= 0)
    return w.cap


def _apply(sm: Any, plan: rules.Plan) -> dict[str, Any]:
    bn, layer = plan.bn, plan.layer
    assert layer is not None
    s, t = rules.scale_shift(sm, bn)
    w = rules.get_tensor(sm, layer.params["weight"])
    b = rules.get_tensor(sm, layer.params["bias"]) if layer.params.get("bias") else None
    fold = kernel.fold_after if plan.direction == "after" else kernel.fold_before
    res = fold(rules.to_numpy(w), rules.to_numpy(b) if b is not None else None, s, t, rewrite.layer_layout(layer))
    var = rules.get_tensor(sm, bn.params["running_var"])
    ident = rewrite.identity_var(var, bn.attrs["eps"])
    bn_bias = rules.get_tensor(sm, bn.params["bias"]) if bn.params.get("bias") else None
    if b is None and (plan.direction == "before" or bn_bias is None):
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{layer.name} has no bias and TorchScript code is not edited, so the "
                                                "BatchNorm's shift has nowhere to go", producer=layer.name)
    saved = [t.detach().clone() for t in _written(sm, bn, w, b)]
    with torch.no_grad():
        w.copy_(rules.from_numpy(res.weight, w))
        if b is not None:
            b.copy_(rules.from_numpy(res.bias, b))
        rules.get_tensor(sm, bn.params["running_mean"]).zero_()
        var.copy_(ident)
        if bn.params.get("weight"):
            rules.get_tensor(sm, bn.params["weight"]).fill_(1.0)
        if bn_bias is not None:
            bn_bias.copy_(rules.from_numpy(res.bias, bn_bias) if b is None else torch.zeros_like(bn_bias))
    if "frozen" in bn.attrs and not _is_identity(sm, bn, bn_bias if b is None else None):
        with torch.no_grad():
            for t, old in zip(_written(sm, bn, w, b), saved):
                t.copy_(old)
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{bn.module} ({bn.attrs['frozen']}): its compiled forward cannot be "
                                               "made an exact identity, so the fold cannot be written", producer=layer.name)
    return {"note": NOTE + ("" if b is not None else " (shift kept in its bias)")}


def _written(sm: Any, bn: Op, w: torch.Tensor, b: torch.Tensor | None) -> list[torch.Tensor]:
    out = [w] + ([b] if b is not None else [])
    return out + [rules.get_tensor(sm, p) for p in bn.params.values() if p]


def _is_identity(sm: Any, bn: Op, shift: torch.Tensor | None) -> bool:
    """Does the frozen BN's compiled forward now compute exactly x (or x + shift)? Run it to know."""
    sub = _attr_path(sm, bn.module)
    like = rules.get_tensor(sm, bn.params["running_var"])
    c = like.numel()
    for rank in bnlike.PROBE_RANKS:
        g = torch.Generator().manual_seed(rank)
        x = torch.randn((2, c) + (3,) * (rank - 2), generator=g).to(dtype=like.dtype, device=like.device)
        try:
            with torch.no_grad():
                y = sub(x)
        except Exception:  # noqa: BLE001 - a forward written for another rank: try the next
            continue
        want = x if shift is None else x + shift.reshape((1, c) + (1,) * (rank - 2))
        return isinstance(y, torch.Tensor) and torch.equal(y, want)
    return False


def _clone(sm: Any) -> Any:
    buf = io.BytesIO()
    torch.jit.save(sm, buf)
    buf.seek(0)
    return torch.jit.load(buf, map_location="cpu" if not any(p.is_cuda for p in sm.parameters()) else None)


def fold_script(sm: Any, opts: Options, example_inputs: tuple | None) -> FoldResult:
    """Fold a TorchScript module's BN statistics into its layers; returns a new ScriptModule."""
    t0 = time.perf_counter()
    work = _clone(sm)
    cap = capture_script(work, example_inputs)
    decided: dict[str, Decision] = {}
    for plan in rules.decide(cap, work, can_add_bias=False):
        if plan.name in decided:
            continue
        if plan.skip is not None:
            decided[plan.name] = Decision.skipped(plan.name, plan.skip.reason, plan.skip.detail, plan.skip.producer)
            continue
        if opts.reverted(plan.name) is not None:  # an earlier proof failed: keep this BN (self-healing)
            decided[plan.name] = Decision.skipped(plan.name, Reason.VERIFICATION_FAILED,
                                                  f"fold reverted: {opts.reverted(plan.name)}", plan.layer.name)
            continue
        try:
            extra = _apply(work, plan)
        except Skip as e:
            decided[plan.name] = Decision.skipped(plan.name, e.reason, e.detail, e.producer)
            continue
        decided[plan.name] = Decision.folded(plan.name, plan.layer.name, rewrite.pattern(plan), plan.direction, **extra)
    for path, sub in work.named_modules():
        if path in decided or not _bn_like(sub):
            continue
        bad = None if LEAF.get(sub.original_name) else bnlike.problem(sub, sub.original_name, _eps(sub))
        if bad is not None:
            decided[path] = Decision.skipped(path, bad.reason, bad.detail)
        else:
            decided[path] = Decision.skipped(path, Reason.NO_PRODUCER, "this BatchNorm is not called directly by "
                                                                       "forward() (unused, or inside TorchScript control flow)")
    t1 = time.perf_counter()
    report = Report(framework="torch", decisions=list(decided.values()), info={"capture": "torchscript", "torchscript": NOTE},
                    timing_s={"fold": t1 - t0})
    report.verification = verify_result(sm, work, example_inputs, opts, report.decisions)
    report.timing_s["verify"] = time.perf_counter() - t1
    return FoldResult(work, report)
