"""Graph edits of the ONNX pass, kept current in the index: writing constants (copy on write when shared),
rewiring inputs, fresh names for values a fold changes, inserted bias Adds, and what a fold leaves dead.

OnnxFolder (folder.py) decides; these methods change the graph. A tensor name never changes meaning: a value
a fold changes gets a fresh name, so the verifier can compare every tensor both models share.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..core import kernel
from ..core.decisions import Decision
from .layout import shape_reader
from .match import Match
from .nodes import ONNX_DOMAINS, node_label, set_attr
from .ondisk import on_disk
from .protos import release_freed
from .standalone import BnView

if TYPE_CHECKING:
    from .graph import GraphIndex

# numpy float types whose bytes are the ONNX raw data of that element type
_RAW_FLOAT = {np.dtype(np.float32): onnx.TensorProto.FLOAT, np.dtype(np.float16): onnx.TensorProto.FLOAT16,
              np.dtype(np.float64): onnx.TensorProto.DOUBLE}


class GraphEdits:
    """The editing half of OnnxFolder (which supplies ix, scope, shapes and the bookkeeping sets)."""

    ix: "GraphIndex"
    scope: str
    shapes: dict
    exact: dict
    created: list
    inserted: list
    dead_nodes: set
    dead_values: set
    maybe_dead_inits: dict[str, None]  # (an ordered set: the sweep reads the names in the order they were released)
    written: set

    # -- chains: Conv -> BN -> BN, BN -> BN -> Conv round once ------------------------------------
    def layer_params(self, layer: onnx.NodeProto, weight_name: str, bias_name: str | None,
                     label: str) -> tuple[np.ndarray, np.ndarray | None, np.dtype]:
        """A layer's weight and bias for a fold, and the weight's dtype: the float64 values an earlier fold
        of this pass left (so a chain of folds is rounded once, as the kernel promises), else the tensors."""
        ex = self.exact.get(id(layer))
        if ex is not None and ex[0] == weight_name and ex[1] == bias_name:
            return ex[2], ex[3], ex[4]
        weight = self.ix.const(weight_name, f"{label} weight")
        bias = self.ix.const(bias_name, f"{label} bias") if bias_name else None
        return weight, bias, weight.dtype

    def _may_chain(self, layer: onnx.NodeProto, out: str, *, readers: list | None = None,
                   x: str | None = None) -> bool:
        """Whether another BN may fold into `layer` in this pass (worth keeping float64 values): a Conv, Gemm
        or MatMul whose new output, or data input, is a BatchNorm's. `readers` (of `out`) and `x` (the layer's
        data input): what the caller has looked up already."""
        if layer.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or self.scope:
            return False
        if any(u.op_type == "BatchNormalization" for u in (self.ix.consumers.get(out, ()) if readers is None
                                                          else readers)):
            return True
        if x is None:
            x = layer.input[0] if layer.input else None
        before = self.ix.producer.get(x) if x is not None else None
        return before is not None and before.op_type == "BatchNormalization"

    def remember_exact(self, layer: onnx.NodeProto, folded: kernel.Folded) -> None:
        """Keep a fold's float64 weight and bias for a later fold into the same layer (see layer_params)."""
        if folded.weight64 is None:
            self.exact.pop(id(layer), None)
            return
        self.exact[id(layer)] = (layer.input[1], self.bias_name_of(layer), folded.weight64, folded.bias64,
                                 folded.weight.dtype)

    def bias_name_of(self, layer: onnx.NodeProto) -> str | None:
        """The tensor holding `layer`'s bias: input 2 of a Conv or Gemm; for a MatMul, the other operand of
        the Add that alone reads it (a fold writes its bias there), else None."""
        if layer.op_type != "MatMul":
            return layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
        out = layer.output[0]
        users = self.ix.consumers.get(out, [])
        if out in self.ix.graph_outputs or len(users) != 1:
            return None
        add = users[0]
        if add.op_type != "Add" or add.domain not in ONNX_DOMAINS or len(add.input) != 2 or add.input[0] == add.input[1]:
            return None
        return add.input[1] if add.input[0] == out else add.input[0]

    def located(self, d: Decision, x: str | tuple[str, ...], y: str) -> Decision:
        """Record where a fold sits: the region from data input(s) `x` to output `y`, tensors that mean the
        same in the original and the folded graph (main graph only: a body's tensors cannot be captured)."""
        if not self.scope:
            d.site = (x, y)
        return d

    def _write_const(self, name: str, value: np.ndarray, user: onnx.NodeProto | None) -> str:
        """Write `value` for `user`: in place when only `user` reads `name` (and it is no graph output), else under
        a new name (always, for no `user`: a new constant)."""
        ix = self.ix
        t = ix.inits.get(name)
        users = ix.consumers.get(name)
        if (t is not None and user is not None and users and len(users) == 1 and users[0] is user
                and name not in ix.graph_outputs):
            raw = t.HasField("raw_data")
            if (_RAW_FLOAT.get(value.dtype) == t.data_type and sys.byteorder == "little"
                    and tuple(t.dims[:]) == value.shape and (raw or name in ix.borrowed or on_disk(t))):
                if not raw and on_disk(t):  # the folded weight lives in memory from now on
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                self.write_raw(t, name, value)
                return name
            t.CopyFrom(numpy_helper.from_array(value, name))
            if name in ix.graph_inputs:  # IR < 4 declares every initializer as an input, with its shape
                for vi in ix.graph.input:
                    if vi.name == name:
                        vi.CopyFrom(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
            self.written.add(name)
            ix.const_cache.pop(name, None)  # re-read from the initializer if ever needed: no second copy held
            ix.borrowed.pop(name, None)  # its data is its own now
            return name
        new = ix.unique(name or "bias")
        t = numpy_helper.from_array(value, new)
        ix.graph.initializer.append(t)
        ix.inits[new] = ix.graph.initializer[-1]
        self.created.append(new)
        if ix.ir_version < 4 and not self.scope:
            # before IR 4 every initializer of the main graph must also be declared as a graph input
            ix.graph.input.append(helper.make_tensor_value_info(new, t.data_type, list(t.dims)))
            ix.graph_inputs.add(new)
        return new

    def write_raw(self, t: onnx.TensorProto, name: str, value: np.ndarray | bytes) -> None:
        """`value`, of `t`'s dtype and shape (an array, or its bytes), as the raw data of initializer `t` (named
        `name`), in place: every fold that rewrites a weight in place writes it here."""
        ix = self.ix
        t.raw_data = value if type(value) is bytes else value.tobytes()  # (C order) one copy, not three
        if name in ix.borrowed:
            # a fold into a copy, beside the caller's model: its temporaries go back to the system
            # (a file's fold peaks at reading the file; there the trim would only cost time)
            release_freed(len(value) if type(value) is bytes else value.nbytes)
            del ix.borrowed[name]  # its data is its own now
        self.written.add(name)
        ix.const_cache.pop(name, None)  # re-read from the initializer if ever needed: no second copy held

    def _replace_input(self, node: onnx.NodeProto, slot: int, new: str) -> None:
        ix = self.ix
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        if old == new:
            return
        if old:
            ix.unread(old, node)
            self.maybe_dead_inits[old] = None
        node.input[slot] = new
        ix.consumers.setdefault(new, []).append(node)

    def _rewrite(self, bn: onnx.NodeProto, m: Match, f: kernel.Folded, view: BnView) -> None:
        ix, out = self.ix, view.out
        if m.tail is not m.layer:
            self._rename_path(m.layer, m.tail)
        new_w = self._write_const(m.weight_name, f.weight, m.layer)
        self._replace_input(m.layer, 1, new_w)
        if m.bias_slot is not None:
            node, slot = m.bias_slot
            new_b = self._write_const(m.bias_name or f"{node_label(m.layer)}_bias", f.bias, node)
            self._replace_input(node, slot, new_b)
            if m.layer.op_type == "Gemm":
                set_attr(m.layer, "beta", 1.0)
        else:
            # MatMul without bias: the shift needs an Add right after it (before any layout ops).
            old_layer_out = m.layer.output[0]
            self.insert_add(m.layer, f.bias, out if m.tail is m.layer else old_layer_out)
            if m.tail is m.layer:
                self._move_shape_readers(old_layer_out, out)
                self.drop_bn(bn, view, old_out=old_layer_out)
                return
            self.rename_value(old_layer_out)  # the Add writes it now, with the folded value
        for node in m.changed:
            self.rename_value(node.output[0])
        old_out = m.tail.output[0]
        self._move_shape_readers(old_out, out)
        m.tail.output[0] = out
        ix.producer[out] = m.tail
        self.drop_bn(bn, view, old_out=old_out)

    def _rename_path(self, start: onnx.NodeProto, stop: onnx.NodeProto) -> None:
        """Tensors between a folded layer and its BN change value: give them fresh names, so a tensor
        name never means two different values in the original and the folded model (the verifier
        compares same-named intermediates)."""
        ix, node = self.ix, start
        while node is not stop:
            old = node.output[0]
            users = ix.consumers.get(old, [])
            value_readers = [u for u in users if not shape_reader(u)]
            if len(value_readers) != 1:
                return
            nxt, new = value_readers[0], ix.unique(old)
            node.output[0] = new
            for u in users:  # shape readers follow: the shape is the same
                for i, name in enumerate(u.input):
                    if name == old:
                        u.input[i] = new
            ix.producer.pop(old, None)
            ix.producer[new] = node
            ix.consumers[new] = ix.consumers.pop(old)
            self._same_shape(old, new)
            self.dead_values.add(old)
            node = nxt

    def _move_shape_readers(self, old: str, new: str) -> None:
        """Point the Shape/Size readers of `old` at `new`, a value of the same shape."""
        ix = self.ix
        readers = [u for u in ix.consumers.get(old, []) if shape_reader(u)]
        for r in readers:
            for i, name in enumerate(r.input):
                if name == old:
                    r.input[i] = new
            ix.unread(old, r)
            ix.consumers.setdefault(new, []).append(r)

    def rename_value(self, value: str) -> str:
        """Give a single-use intermediate whose content a fold changes a fresh name (a name never
        changes meaning, so the verifier can compare every tensor both models share)."""
        ix = self.ix
        prod = ix.producer[value]
        new = ix.unique(value)
        prod.output[list(prod.output).index(value)] = new
        ix.producer[new] = prod
        readers = ix.consumers.pop(value, [])
        for r in readers:
            for k, name in enumerate(r.input):
                if name == value:
                    r.input[k] = new
        ix.consumers[new] = readers
        ix.producer.pop(value, None)
        self._same_shape(value, new)
        self.dead_values.add(value)
        return new

    def _same_shape(self, old: str, new: str) -> None:
        """A renamed value keeps its static shape and type (later folds in this pass look them up)."""
        if old in self.shapes:
            self.shapes[new] = self.shapes[old]

    def insert_add(self, layer: onnx.NodeProto, bias: np.ndarray, out: str) -> onnx.NodeProto:
        """Make `layer` write a fresh name and an Add of `bias` to it write `out` (placed right after `layer`)."""
        ix = self.ix
        mid = ix.unique(layer.output[0])
        b_name = self._write_const(f"{node_label(layer)}_bias", bias, None)  # type: ignore[arg-type]
        add = helper.make_node("Add", [mid, b_name], [out], name=ix.unique(node_label(layer) + "_add"))
        self._same_shape(layer.output[0], mid)
        layer.output[0] = mid
        ix.producer[mid] = layer
        ix.consumers[mid] = [add]
        ix.consumers.setdefault(b_name, []).append(add)
        self.inserted.append((layer, add))
        ix.producer[out] = add
        return add

    def unlink(self, node: onnx.NodeProto, inputs: tuple[str, ...] | None = None) -> None:
        """Mark `node` dead and stop counting it as a reader of its inputs (which may now be dead too);
        `inputs`: only these (a caller that settles the others itself)."""
        ix = self.ix
        self.dead_nodes.add(id(node))
        consumers, maybe_dead = ix.consumers, self.maybe_dead_inits
        for name in node.input[:] if inputs is None else inputs:
            if name:
                users = consumers.get(name)
                if users:
                    if users[0] is node:  # (ix.unread, inlined for its commonest case: a BN's own parameters)
                        del users[0]
                    else:
                        ix.unread(name, node)
                maybe_dead[name] = None

    def drop_bn(self, bn: onnx.NodeProto, view: BnView, old_out: str | None) -> None:
        """Mark the BN and its absorbed Mul/Add chain dead; `view.out` stays alive when someone now writes it."""
        ix = self.ix
        for node in (bn, *view.chain):
            self.unlink(node)
            for o in node.output[:]:
                if o and not (o == view.out and ix.producer.get(o) is not node):
                    self.dead_values.add(o)
                    if ix.producer.get(o) is node:
                        ix.producer.pop(o)
        if old_out is not None:
            ix.producer.pop(old_out, None)
            ix.consumers.pop(old_out, None)
            self.dead_values.add(old_out)
            self.maybe_dead_inits.pop(old_out, None)  # (no producer, no reader: nothing for the sweep to look at)

