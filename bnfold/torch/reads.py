"""Which operands of a call read a tensor's values, and which only its metadata.

A fold changes the values a layer produces, never their shape, dtype or device. A call that reads only
metadata (`x.shape`, `x.size()`, `x.dim()`, `x.dtype`, `torch.numel(x)`, torch.export's `sym_size`,
`_assert_tensor_metadata`; the `other` of `x.reshape_as(other)`) therefore does not make a conv's
output "fanned out": model code such as timm's `_assert(x.ndim == 4)` inside BatchNormAct2d reads
the conv output without seeing its values. The same tables serve the fx/torch.export graphs (nodes)
and the module-hooks capture (live calls), as the ONNX pass ignores Shape/Size readers.
"""
from __future__ import annotations

import builtins
from typing import Any

# getattr(x, NAME) in an fx graph, or a property read seen by a TorchFunctionMode
META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_leaf", "names",
                        "grad_fn", "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "is_nested", "_version",
                        "is_inference", "itemsize", "nbytes"})
# x.NAME(...) / torch.NAME(x) / aten NAME: calls whose result depends on metadata only
META_CALLS = frozenset({"size", "dim", "numel", "ndimension", "nelement", "element_size", "is_floating_point",
                        "is_complex", "is_contiguous", "stride", "storage_offset", "get_device", "data_ptr", "__len__",
                        "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "_assert_tensor_metadata",
                        "__hash__"})
# calls that read one operand (by position) for its shape/dtype/device only
SHAPE_ONLY = {"reshape_as": 1, "view_as": 1, "expand_as": 1, "type_as": 1, "to": 1, "new_zeros": 0, "new_ones": 0,
              "new_empty": 0, "new_full": 0, "new_tensor": 0, "zeros_like": 0, "ones_like": 0, "empty_like": 0,
              "full_like": 0, "rand_like": 0, "randn_like": 0, "randint_like": 0}


def call_name(target: Any) -> str:
    """The bare name of an fx node target or a called function (`aten.sym_size.int` -> 'sym_size')."""
    if isinstance(target, str):
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return getattr(packet, "__name__", "")
    name = getattr(target, "__name__", "")
    if name in ("__get__", "__set__"):  # a property read through a TorchFunctionMode: Tensor.shape.__get__
        return getattr(getattr(target, "__self__", None), "__name__", name)
    return name


def metadata_only(name: str, args: tuple = ()) -> bool:
    """Does a call named `name` (with these args) read nothing but metadata?"""
    if name in META_CALLS or name in META_ATTRS:
        return True
    return name == "getattr" and len(args) > 1 and args[1] in META_ATTRS


def value_positions(name: str, args: tuple) -> list[int]:
    """Positions of `args` whose values a call named `name` reads (all but metadata-only operands)."""
    if metadata_only(name, args):
        return []
    skip = SHAPE_ONLY.get(name)
    return [i for i in range(len(args)) if i != skip]


def node_value_inputs(node: Any) -> list[Any]:
    """The input nodes of an fx node whose values it reads."""
    import torch.fx
    if node.op not in ("call_function", "call_method"):
        return list(node.all_input_nodes)
    name = "getattr" if node.target is builtins.getattr else call_name(node.target)
    if metadata_only(name, tuple(node.args)):
        return []
    skip = SHAPE_ONLY.get(name)
    if skip is None or skip >= len(node.args):
        return list(node.all_input_nodes)
    out: list[Any] = []
    kept = [a for i, a in enumerate(node.args) if i != skip]
    torch.fx.node.map_arg((kept, node.kwargs), lambda n: out.append(n) or n)
    return list(dict.fromkeys(out))
