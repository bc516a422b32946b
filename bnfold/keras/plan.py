"""Decide, for every BatchNormalization of a Keras graph, whether and where it folds.

Match: BN whose input comes from a Conv/ConvTranspose/Depthwise/Separable/Dense call (fold after), or
BN whose only reader is a Dense or a padding="valid" Conv (fold before).
Check: plain inference BN, one call site, producer linear and not shared, its output read only by
the BN, the BN normalising the producer's channel axis, folded values fitting the compute dtype.
The new weights are computed here, by bnfold.kernel, so that a Skip leaves nothing half-done; the
rebuild step only copies them into fresh layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..core import kernel
from ..core.decisions import Decision, Reason, Skip
from ..core.errors import BnfoldError
from .graph import GraphView, channel_axis, main_input, role_of, slots_for


@dataclass
class LayerEdit:
    """New weights for one producer layer; `add_bias` when it had use_bias=False."""

    layer: Any
    weights: list[np.ndarray]
    add_bias: bool = False


@dataclass(frozen=True)
class FoldSite:
    """One fold, as its local proof replays it (Decision.site): the layer's weights before and after this
    BN went in, on the region's input `x`, against the original's value of the region's output `y`."""

    layer: Any                  # the layer the BN went into
    bn: Any                     # the BatchNormalization layer
    direction: str              # "after" (layer -> BN) or "before" (BN -> layer)
    x: Any                      # the tensor the layer (with weights_in) reads in the original graph
    y: Any                      # the BN's output (after) or the layer's output (before) in the original graph
    weights_in: list[np.ndarray]
    weights_out: list[np.ndarray]


@dataclass
class Plan:
    """Everything the rebuild needs for one (possibly nested) model."""

    model: Any
    graph: Any                                   # the Functional whose nodes were examined
    decisions: list[Any] = field(default_factory=list)      # Decisions, and nested Plans where they sit
    removed: set[int] = field(default_factory=set)           # ids of BN layers that disappear
    edits: dict[int, LayerEdit] = field(default_factory=dict)  # id(layer) -> new weights
    nested: dict[int, "Plan"] = field(default_factory=dict)    # id(inner model) -> its plan
    after_target: dict[int, Any] = field(default_factory=dict)  # id(folded BN) -> layer it went into
    output_bns: set[int] = field(default_factory=set)         # removed BNs whose output is a model output
    sites: dict[int, FoldSite] = field(default_factory=dict)   # id(folded BN) -> where it was folded
    reads: dict[int, Any] = field(default_factory=dict)        # id(layer) -> its input once a BN folded in front

    def all_decisions(self) -> list[Decision]:
        """Every decision, nested models' included, in graph order."""
        out: list[Decision] = []
        for item in self.decisions:
            out.extend(item.all_decisions() if isinstance(item, Plan) else [item])
        return out


def functional_of(model: Any) -> Any:
    """The Functional graph of a functional or built Sequential model (BnfoldError if unbuilt)."""
    import keras

    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise BnfoldError(f"Sequential model {model.name!r} is not built (no input shape): "
                              "give it a keras.Input or call it once before folding")
        return fn
    return model


def is_graph_model(model: Any) -> bool:
    """True for models whose layer graph Keras records (functional, Sequential)."""
    import keras
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def graphs_per_layer(fn: Any) -> dict[int, set[int]]:
    """id(layer) -> ids of the distinct graphs (this one and every nested model's) that call it.

    A layer called in a nested model and again in the outer graph is shared although each graph
    alone calls it once; folding a BN of one graph into it would change the other's result."""
    out: dict[int, set[int]] = {}
    seen: set[int] = set()

    def walk(g: Any) -> None:
        if id(g) in seen:
            return
        seen.add(id(g))
        for node in GraphView(g).nodes:
            op = node.operation
            out.setdefault(id(op), set()).add(id(g))
            if is_graph_model(op):
                walk(functional_of(op))

    walk(fn)
    return out


def plan_model(model: Any, prefix: str = "", graph: Any = None, opaque: Any = None,
               graphs: dict[int, set[int]] | None = None, exclude: Mapping[str, str] | None = None) -> Plan:
    """Examine `graph` (default: the model's own Functional) and decide every BN in it.

    `opaque(model, prefix)` returns decisions for a nested model whose graph cannot be seen; a BN named in
    `exclude` (BN path -> why) stays, its fold reverted because an earlier proof of it failed.
    """
    exclude = exclude or {}
    import keras

    fn = graph if graph is not None else functional_of(model)
    view = GraphView(fn)
    view.graphs = graphs if graphs is not None else graphs_per_layer(fn)
    plan = Plan(model=model, graph=fn)
    seen: set[int] = set()
    for node in view.nodes:
        op = node.operation
        if id(op) in seen:
            continue
        seen.add(id(op))
        if isinstance(op, keras.Model):
            if is_graph_model(op):
                plan.nested[id(op)] = plan_model(op, f"{prefix}{op.name}/", opaque=opaque, graphs=view.graphs,
                                                 exclude=exclude)
                plan.decisions.append(plan.nested[id(op)])
            elif opaque is not None:
                plan.decisions.extend(opaque(op, f"{prefix}{op.name}/"))
            continue
        if isinstance(op, keras.layers.BatchNormalization):
            name = prefix + op.name
            if name in exclude:
                plan.decisions.append(Decision.skipped(name, Reason.VERIFICATION_FAILED,
                                                       f"fold reverted: {exclude[name]}"))
                continue
            try:
                plan.decisions.append(_decide(view, node, plan, name, prefix))
            except Skip as s:
                plan.decisions.append(Decision.skipped(name, s.reason, s.detail, s.producer))
            continue
        for sub in op._flatten_layers(include_self=False) if hasattr(op, "_flatten_layers") else []:
            if isinstance(sub, keras.layers.BatchNormalization):
                plan.decisions.append(Decision.skipped(
                    f"{prefix}{op.name}/{sub.name}", Reason.UNSUPPORTED_PRODUCER,
                    f"inside custom layer {op.name!r} ({type(op).__name__}), whose call() bnfold cannot rewrite"))
    return plan


def _bn_params(bn: Any) -> tuple[np.ndarray | None, ...]:
    import keras

    def arr(v: Any) -> np.ndarray | None:
        return None if v is None else np.asarray(keras.ops.convert_to_numpy(v))

    return (arr(bn.gamma) if bn.scale else None, arr(bn.beta) if bn.center else None,
            arr(bn.moving_mean), arr(bn.moving_variance))


def _check_bn(view: GraphView, node: Any, bn: Any) -> None:
    import keras

    if type(bn) is not keras.layers.BatchNormalization:
        raise Skip(Reason.UNSUPPORTED_BN_MODE, f"{type(bn).__name__} is a BatchNormalization subclass; "
                                               "its call() may differ from the plain affine map")
    if getattr(bn, "renorm", False):
        raise Skip(Reason.UNSUPPORTED_BN_MODE, "renorm=True")
    if getattr(bn, "synchronized", False):
        raise Skip(Reason.UNSUPPORTED_BN_MODE, "synchronized=True")
    if node.arguments.kwargs.get("training") is True:
        raise Skip(Reason.TRAINING_MODE, f"{bn.name} is called with training=True, so it uses batch statistics")
    if bn.moving_mean is None or bn.moving_variance is None:
        raise Skip(Reason.NO_RUNNING_STATS, f"{bn.name} is not built")
    if _shared(view, bn):
        raise Skip(Reason.SHARED_PRODUCER, f"BatchNorm {bn.name} itself is called at {_call_sites(view, bn)}")


def _shared(view: GraphView, layer: Any) -> bool:
    return view.calls[id(layer)] > 1 or len(view.graphs.get(id(layer), ())) > 1


def _call_sites(view: GraphView, layer: Any) -> str:
    n = len(view.graphs.get(id(layer), ()))
    return f"{view.calls[id(layer)]} places" if n <= 1 else f"places in {n} (nested) models"


def _decide(view: GraphView, node: Any, plan: Plan, name: str, prefix: str) -> Decision:
    bn = node.operation
    _check_bn(view, node, bn)
    x = main_input(node)
    if x is None or len(node.input_tensors) != 1:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{bn.name} is called on several tensors")
    rank = len(x.shape)
    axis = bn.axis % rank
    s, t = kernel.bn_scale_shift(*_bn_params(bn), bn.epsilon)
    try:
        return _fold_after(view, bn, x, rank, axis, s, t, plan, name, prefix)
    except Skip as fwd:
        try:
            return _fold_before(view, node, bn, rank, axis, s, t, plan, name, prefix)
        except Skip as bwd:
            if bwd.reason in (Reason.PADDING_BREAKS_BACKWARD_FOLD, Reason.DTYPE_OVERFLOW):
                raise Skip(bwd.reason, f"{fwd.detail}; {bwd.detail}", bwd.producer) from None
            raise fwd from None


def _check_producer(view: GraphView, layer: Any, what: str) -> None:
    if getattr(layer, "quantization_mode", None):
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{what} {layer.name} is quantized ({layer.quantization_mode})",
                   layer.name)
    if getattr(layer, "lora_enabled", False):
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{what} {layer.name} has LoRA enabled", layer.name)
    if _shared(view, layer):
        raise Skip(Reason.SHARED_PRODUCER, f"{what} {layer.name} is called at {_call_sites(view, layer)}",
                   layer.name)


def _check_dtypes(bn: Any, layer: Any, what: str) -> None:
    # Folding moves the BN's arithmetic into the layer: the BN's dtype (and its cast of the result)
    # would be lost, changing the output's precision or dtype.
    if bn.compute_dtype != layer.compute_dtype:
        raise Skip(Reason.DTYPE_MISMATCH, f"{bn.name} computes in {bn.compute_dtype} but {what} {layer.name} in "
                                          f"{layer.compute_dtype}: folding would change the output's precision",
                   layer.name)


def _check_bias_axis(layer: Any, out: Any) -> None:
    # Keras 3 on TensorFlow adds a channels_first bias with bias_add, whose data format it picks from
    # the last axis: when that axis is as long as the channel axis the bias lands on the wrong axis.
    # The model means whatever Keras computes; a folded bias would follow the same rule, so refuse.
    shape = tuple(out.shape)
    ch = getattr(layer, "filters", None) or (shape[1] if len(shape) > 1 else None)
    if getattr(layer, "data_format", "channels_last") == "channels_first" and len(shape) > 2 and shape[-1] == ch:
        raise Skip(Reason.UNSUPPORTED_PRODUCER,
                   f"{layer.name} is channels_first with a last axis as long as its {ch} channels: Keras adds "
                   "its bias along the last axis there, so the channel-wise fold would not match", layer.name)


def _check_single_use(view: GraphView, tensor: Any, layer_name: str) -> None:
    uses = view.uses(tensor)
    if len(uses) > 1:
        others = [u for u in uses]
        reason = Reason.INTERMEDIATE_IS_OUTPUT if "model output" in uses else Reason.PRODUCER_FANOUT
        raise Skip(reason, f"{layer_name} output feeds {', '.join(others)}", layer_name)


def _fold_after(view: GraphView, bn: Any, x: Any, rank: int, axis: int, s: np.ndarray, t: np.ndarray,
                plan: Plan, name: str, prefix: str) -> Decision:
    import keras

    pnode = view.producer_node(x)
    if pnode is None:
        raise Skip(Reason.NO_PRODUCER, f"{bn.name} reads model input {x.name}")
    prod = pnode.operation
    if isinstance(prod, keras.layers.BatchNormalization) and id(prod) in plan.after_target:
        # BN -> BN: the first one already lives in the layer before it; fold the second there too.
        _check_single_use(view, x, prod.name)
        layer_in = plan.sites[id(prod)].x
        prod = plan.after_target[id(prod)]
    else:
        role = role_of(prod)
        if role is None:
            raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{bn.name} follows {type(prod).__name__} {prod.name}",
                       prod.name)
        _check_producer(view, prod, "layer")
        act = prod.get_config().get("activation")
        if act not in (None, "linear"):
            raise Skip(Reason.NONLINEAR_PRODUCER, f"{prod.name} applies activation {act!r}", prod.name)
        _check_single_use(view, x, prod.name)
        _check_bias_axis(prod, x)
        # a BN folded into this layer from the front already: the layer now reads that BN's input
        layer_in = plan.reads.get(id(prod), main_input(pnode))
    _check_dtypes(bn, prod, "layer")
    ch = channel_axis(prod, rank)
    if axis != ch:
        raise Skip(Reason.AXIS_MISMATCH, f"{bn.name} normalises axis {axis} but {prod.name}'s channels are "
                                         f"on axis {ch}", prod.name)
    w_in, w_out = _apply(plan, prod, s, t, after=True)
    out = _output_of(view, bn)
    _remove(view, plan, bn, node_output=out)
    plan.after_target[id(bn)] = prod
    plan.sites[id(bn)] = FoldSite(prod, bn, "after", layer_in, out, w_in, w_out)
    d = Decision.folded(name, prefix + prod.name, f"{type(prod).__name__}->BatchNormalization", "after")
    d.site = plan.sites[id(bn)]
    return d


def _fold_before(view: GraphView, node: Any, bn: Any, rank: int, axis: int, s: np.ndarray, t: np.ndarray,
                 plan: Plan, name: str, prefix: str) -> Decision:
    y = node.outputs[0]
    readers = view.consumers.get(id(y), [])
    if id(y) in view.output_ids or len(readers) != 1:
        raise Skip(Reason.PRODUCER_FANOUT, f"{bn.name} output has {len(readers)} readers")
    cnode = readers[0]
    cons = cnode.operation
    role = role_of(cons)
    if role not in ("dense", "conv") or main_input(cnode) is not y or len(cnode.input_tensors) != 1:
        raise Skip(Reason.UNSUPPORTED_PRODUCER, f"{bn.name} is read by {type(cons).__name__} {cons.name}")
    _check_producer(view, cons, "following layer")
    _check_dtypes(bn, cons, "the following layer")
    _check_bias_axis(cons, cnode.outputs[0])
    if role == "conv" and cons.padding != "valid":
        raise Skip(Reason.PADDING_BREAKS_BACKWARD_FOLD,
                   f"the following {cons.name} has padding={cons.padding!r}", cons.name)
    ch = channel_axis(cons, rank)
    if axis != ch:
        raise Skip(Reason.AXIS_MISMATCH, f"{bn.name} normalises axis {axis} but {cons.name} reads channels on "
                                         f"axis {ch}", cons.name)
    w_in, w_out = _apply(plan, cons, s, t, after=False)
    _remove(view, plan, bn, node_output=y)
    plan.reads[id(cons)] = main_input(node)
    plan.sites[id(bn)] = FoldSite(cons, bn, "before", main_input(node), cnode.outputs[0], w_in, w_out)
    d = Decision.folded(name, prefix + cons.name, f"BatchNormalization->{type(cons).__name__}", "before")
    d.site = plan.sites[id(bn)]
    return d


def _output_of(view: GraphView, bn: Any) -> Any:
    return next(n.outputs[0] for n in view.nodes if n.operation is bn)


def _remove(view: GraphView, plan: Plan, bn: Any, node_output: Any) -> None:
    plan.removed.add(id(bn))
    if id(node_output) in view.output_ids:
        plan.output_bns.add(id(bn))  # keeps its name as an Identity: users compile/export by output name


def _apply(plan: Plan, layer: Any, s: np.ndarray, t: np.ndarray,
           after: bool) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fold (s, t) into the layer's current weights: (weights before, weights after). Raises Skip
    before changing anything."""
    edit = plan.edits.get(id(layer)) or LayerEdit(layer, [np.asarray(w) for w in layer.get_weights()])
    slots = slots_for(layer, edit.weights)
    w = edit.weights[slots.kernel]
    b = edit.weights[slots.bias] if slots.bias is not None else None
    fold = kernel.fold_after if after else kernel.fold_before
    f = fold(w, b, s, t, slots.layout)
    compute = np.dtype(_np_dtype(layer.compute_dtype))
    if compute.itemsize < f.weight.dtype.itemsize:
        # mixed precision keeps float32 variables but computes in float16/bfloat16: must fit that too.
        kernel.round_to(f.weight.astype(np.float64), compute, "weight")
        kernel.round_to(f.bias.astype(np.float64), compute, "bias")
    old = list(edit.weights)
    new = list(edit.weights)
    new[slots.kernel] = f.weight
    if slots.bias is None:
        new.append(f.bias)  # the bias is the last weight of every supported layer
        edit.add_bias = True
    else:
        new[slots.bias] = f.bias
    edit.weights = new
    plan.edits[id(layer)] = edit
    return old, new


def _np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
