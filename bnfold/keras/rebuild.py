"""Rebuild a Keras model from a Plan: fresh layers from their configs, folded BNs left out.

Every layer is re-created from its config (a use_bias=False producer with use_bias=True), called on
new symbolic tensors in the original graph order and then given its weights, so the new model owns
all of its variables and the input model is never touched. Shared layers map to one new layer.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import BnfoldError
from .plan import Plan

_DROP = object()  # stands in for a folded BN during the rebuild: its input passes straight through


class Rebuilder:
    """Maps original operations to new ones, recursing into nested models with their own plans."""

    def __init__(self) -> None:
        self.new_ops: dict[int, Any] = {}
        self.weights_of: list[tuple[Any, list]] = []
        self.variables: dict[int, Any] = {}
        self.identities: set[int] = set()

    def _own(self, v: Any) -> Any:
        """A new variable for one of the input model's variables (the same one for every use)."""
        import keras

        if not isinstance(v, keras.Variable):
            return v
        if id(v) not in self.variables:
            self.variables[id(v)] = keras.Variable(keras.ops.convert_to_numpy(v), dtype=v.dtype,
                                                   trainable=v.trainable, name=v.name)
        return self.variables[id(v)]

    def model(self, model: Any, plan: Plan) -> Any:
        """The folded copy of `model` (functional, Sequential or a traced graph)."""
        import keras

        if isinstance(model, keras.Sequential) and plan.graph is getattr(model, "_functional", None):
            new = self._sequential(model, plan)
        else:
            new = self._functional(plan.graph, plan, model.name)
        if getattr(model, "compiled", False):
            try:
                new.compile_from_config(model.get_compile_config())
            except Exception:  # an uncompilable config must not stop a fold that is only for inference
                pass
        new.trainable = model.trainable
        return new

    def finish(self) -> None:
        """Give every new layer its weights (after the calls above built them)."""
        for layer, weights in self.weights_of:
            layer.set_weights(weights)

    def op(self, op: Any, plan: Plan) -> Any:
        key = id(op)
        if key in self.new_ops:
            return self.new_ops[key]
        if key in plan.output_bns:
            import keras
            new = keras.layers.Identity(name=op.name, dtype=op.dtype_policy.name)  # the output keeps its name
            self.identities.add(id(new))
        elif key in plan.removed:
            new = _DROP
        elif key in plan.nested:
            new = self.model(op, plan.nested[key])
        else:
            new = self._clone_layer(op, plan)
        self.new_ops[key] = new
        return new

    def _clone_layer(self, op: Any, plan: Plan) -> Any:
        import keras

        edit = plan.edits.get(id(op))
        if isinstance(op, keras.layers.Lambda):
            # Built directly: a config round trip would re-serialise the function's bytecode.
            new = keras.layers.Lambda(op.function, output_shape=op._output_shape, mask=op.mask,
                                      arguments=op.arguments, name=op.name, dtype=op.dtype_policy)
        else:
            try:
                cfg = op.get_config()
                if edit is not None and edit.add_bias:
                    cfg["use_bias"] = True
                new = type(op).from_config(cfg)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise BnfoldError(
                    f"layer {op.name!r} ({type(op).__name__}) cannot be re-created from its config, so the "
                    f"folded model cannot be built without sharing it with the input model ({type(e).__name__}: "
                    f"{first}); give the class a get_config() that its __init__ accepts") from None
        weights = edit.weights if edit is not None else (op.get_weights() if isinstance(op, keras.layers.Layer) else [])
        if weights:
            self.weights_of.append((new, weights))
        return new

    def _functional(self, fn: Any, plan: Plan, name: str) -> Any:
        import keras

        inputs = keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name), fn._inputs_struct)

        def call(op: Any, *args: Any, **kwargs: Any) -> Any:
            if op is _DROP:
                return args[0]
            if id(op) in self.identities:
                return op(args[0])  # stands in for a BN: its training/mask arguments do not apply
            # a traced call() may pass the input model's own variables to an op: give the copy its own
            args, kwargs = keras.tree.map_structure(self._own, (args, kwargs))
            return op(*args, **kwargs)

        outputs = fn._run_through_graph(keras.tree.flatten(inputs), operation_fn=lambda o: self.op(o, plan),
                                        call_fn=call)
        return keras.Model(inputs=inputs, outputs=outputs, name=name)

    def _sequential(self, model: Any, plan: Plan) -> Any:
        import keras

        x = model.inputs[0]
        layers = [keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name)]
        for layer in model.layers:
            new = self.op(layer, plan)
            if new is not _DROP:
                layers.append(new)
        return keras.Sequential(layers, name=model.name)


def rebuild(model: Any, plan: Plan, built: dict[int, Any] | None = None) -> Any:
    """A new model computing `model` with the plan's BNs folded away. `built`, when given, receives
    id(original layer) -> its layer in the new model (what the per-fold proofs read the weights of)."""
    r = Rebuilder()
    new = r.model(model, plan)
    r.finish()
    if built is not None:
        built.update({k: v for k, v in r.new_ops.items() if v is not _DROP})
    return new
