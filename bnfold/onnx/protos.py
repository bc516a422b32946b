"""Light copies and walks of ONNX ModelProtos that never touch weight bytes."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from ..core.hold import hold
from .nodes import counts_bodies_of


def structure_only(model: onnx.ModelProto, keep_up_to: int = 0) -> onnx.ModelProto:
    """A copy of `model` without weight data, for the checker and shape inference: initializers with
    more than `keep_up_to` elements become typed graph inputs (small ones, such as Reshape targets,
    can be kept so inference sees their values).

    Checking the structure this way costs the size of the node list, not of the weights (re-reading a
    100 MB file just to check it doubled the load time).
    """
    m = onnx.ModelProto()
    g = model.graph
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    mg = m.graph
    mg.name = g.name
    mg.doc_string = g.doc_string
    mg.node.extend(g.node)
    mg.input.extend(g.input)
    mg.output.extend(g.output)
    mg.value_info.extend(g.value_info)
    mg.sparse_initializer.extend(g.sparse_initializer)  # (small by nature; the checker must see what nodes read)
    have = {i.name for i in g.input}
    for t in g.initializer:
        if keep_up_to and math.prod(t.dims) <= keep_up_to:
            mg.initializer.append(t)
        elif t.name not in have:
            mg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


# initializers of at least this many bytes are borrowed, not copied, by copy_borrowing()
BORROW_MIN = 1 << 12
# and more elements than this: shape inference reads the values of smaller ones (shapes.SMALL_INIT)
BORROW_MIN_ELEMENTS = 1 << 13
BORROW_MAX_TENSORS = 10_000  # more initializers than this: a plain copy (looking at each costs ~1 us)


def copy_borrowing(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TensorProto]]:
    """A copy of `model` whose big main-graph initializers (held in memory) are header-only stubs, and
    name -> the original tensor of each stub, whose data a reader takes instead (see fill_borrowed).

    A fold replaces most big weights: copying them first would hold every folded weight twice (protobuf
    keeps a replaced field's bytes until the whole message is freed).
    """
    g = model.graph
    if len(g.initializer) > BORROW_MAX_TENSORS or has_unknown_fields(model, g):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m, {}
    m = onnx.ModelProto()
    copy_fields(m, model, lambda k: k != _MODEL_GRAPH)
    copy_fields(m.graph, g, lambda k: k != _GRAPH_INITIALIZER)
    sources: dict[str, onnx.TensorProto] = {}
    for t in g.initializer:
        if (t.HasField("raw_data") and not is_external(t) and nbytes(t) >= BORROW_MIN
                and math.prod(t.dims) > BORROW_MIN_ELEMENTS and not has_unknown_fields(t)):
            copy_fields(m.graph.initializer.add(), t, lambda k: k != _TENSOR_RAW_DATA)  # data: see sources
            sources[t.name] = t
        else:
            m.graph.initializer.append(t)
    return m, sources


def fill_borrowed(model: onnx.ModelProto, sources: dict[str, onnx.TensorProto]) -> None:
    """Give every stub copy_borrowing() left in `model` that nobody rewrote the data of its original."""
    if not sources:
        return
    for t in model.graph.initializer:
        src = sources.get(t.name)
        if src is not None:
            t.CopyFrom(src)
    sources.clear()


# field numbers in onnx.proto
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def copy_fields(dst, src, keep: Callable[[int], bool]) -> None:
    """Copy into message `dst` the set fields of `src` whose numbers `keep` accepts, never reading the others
    (a getter would copy a tensor's whole raw data)."""
    for fd in src.DESCRIPTOR.fields:
        if not keep(fd.number):
            continue
        value = getattr(src, fd.name)
        if fd.is_repeated:
            if len(value):
                getattr(dst, fd.name).extend(value)
        elif src.HasField(fd.name):
            if fd.message_type is not None:
                getattr(dst, fd.name).CopyFrom(value)
            else:
                setattr(dst, fd.name, value)


def has_unknown_fields(*msgs) -> bool:
    """True when a message carries fields this onnx does not know (a newer writer's): they survive only
    whole-message copies and encodings."""
    from google.protobuf.unknown_fields import UnknownFieldSet
    return any(len(UnknownFieldSet(m)) for m in msgs)


# the freed temporaries go back to the system once folded weights of this many bytes have been written
RELEASE_EVERY = 8 << 20
_TRIM: list = []  # [glibc's malloc_trim or None, bytes written since the last trim]


def release_freed(written: int) -> None:
    """Count `written` bytes of folded weight; past RELEASE_EVERY, hand the heap's free pages back to the
    system (glibc's malloc_trim; nothing elsewhere).

    A fold's temporaries (the float64 product, the rounded weight, its bytes) are freed as soon as the
    weight is written, but glibc keeps what it freed in the heap: the space that the next weights' bytes
    are allocated above cannot shrink, so every temporary stayed resident until the process ended (a
    ResNet-50 fold peaked at 1.5x the file instead of 1.25x). A trim walks the heap: one per 8 MiB."""
    if not _TRIM:
        trim = None
        try:
            import ctypes
            import ctypes.util
            name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
            libc = ctypes.CDLL(name) if name else None
            trim = getattr(libc, "malloc_trim", None)
        except (OSError, AttributeError):
            trim = None
        _TRIM.extend((trim, 0))
    _TRIM[1] += written
    if _TRIM[0] is not None and _TRIM[1] >= RELEASE_EVERY:
        _TRIM[1] = 0
        _TRIM[0](0)


@dataclass(frozen=True, eq=False)
class WithOutputs:
    """`model` asked to output the tensors `names` too, for a runtime: encoded together (io.serialize),
    never copied (with_outputs would copy every weight). `weights`, when given, are new values (same
    dtype and shape) of main-graph initializers: the model with those weights replaced, never built
    (onnxruntime takes them as arrays: runtime.OrtRunner)."""

    model: onnx.ModelProto
    names: tuple[str, ...]
    weights: Mapping[str, np.ndarray] | None = None


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    return m


# Default-domain ops whose every attribute onnx's checker knows, in every opset (it refuses any other:
# tests/onnx/test_speed.py asks it, version by version), none of them a tensor or a graph: all_tensors skips
# their attributes (a model's checker runs after what reads them). Not LayerNormalization: from opset 17 its
# schema lets the checker pass attributes it does not know.
SCHEMA_CHECKED = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softmax", "Add", "Sub", "Mul", "Div", "Sum", "MatMul", "Gemm", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Concat", "Reshape", "Flatten", "Transpose", "Identity", "Dropout",
    "Squeeze", "Unsqueeze", "Gather", "Slice", "Shape", "Cast", "Pad", "Resize", "Split", "ReduceMean", "Erf",
    "Pow", "Sqrt", "Where", "Expand", "Neg", "Exp", "Abs", "Max", "Min", "InstanceNormalization"})
_DEFAULT = ("", "ai.onnx")
_HOLDERS = frozenset({onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR,
                      onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS})


def all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers (sparse ones too) and attribute values, in
    subgraphs and model-local functions as well (functions' default attribute values too); not the
    attributes of SCHEMA_CHECKED ops, where onnx's checker refuses any tensor."""
    for group, _ in tensor_groups(model):
        yield from group


def tensor_groups(model: onnx.ModelProto):
    """all_tensors, a group at a time, as (tensors, counted): each graph's initializers come as one list (a loop
    over a model's 100k initializers then runs in the caller, not through three nested generators); counted:
    the initializers of the main graph and of the bodies within it, what beforeafter counts as a model's
    parameters (not a model-local function's bodies, not attribute or sparse tensors)."""
    A = onnx.AttributeProto

    def of_attributes(attributes, main):
        for a in attributes:
            if a.type not in _HOLDERS:
                continue
            if a.type == A.TENSOR:
                yield (a.t,), False
            elif a.type == A.TENSORS:
                yield a.tensors[:], False
            elif a.type == A.SPARSE_TENSOR:
                yield (a.sparse_tensor.values, a.sparse_tensor.indices), False
            elif a.type == A.SPARSE_TENSORS:
                for sp in a.sparse_tensors:
                    yield (sp.values, sp.indices), False
            elif a.type == A.GRAPH:
                yield from of_graph(a.g, main)
            else:
                for g in a.graphs:
                    yield from of_graph(g, main)

    def of_nodes(nodes, main):
        for n in nodes:
            if n.op_type not in SCHEMA_CHECKED or n.domain not in _DEFAULT:
                # (a body counts where beforeafter counts it: onnx's checker lets any op hold one in an
                # attribute named "__...", which no runtime runs)
                yield from of_attributes(n.attribute[:], main and counts_bodies_of(n.op_type, n.domain))

    def of_graph(g, main):
        yield hold(g.initializer[:]), main  # (kept for the job's later passes, when one holds them: core/hold.py)
        for sp in g.sparse_initializer:
            yield (sp.values, sp.indices), False
        yield from of_nodes(g.node[:], main)  # (not held: the nodes' wrappers kept from here raised a 32k chain's peak by a quarter)

    yield from of_graph(model.graph, True)
    for f in model.functions:
        yield from of_attributes(f.attribute_proto, False)  # default attribute values (the checker reads none)
        yield from of_nodes(f.node, False)


def nbytes(t: onnx.TensorProto) -> int:
    # from the header alone: reading raw_data (or ByteSize()) would copy or encode the whole tensor
    size = itemsize(t.data_type)
    if not size:
        return 0
    n = math.prod(t.dims[:])  # ([:] is one call; iterating a repeated field ends in a raised IndexError)
    return raw_bytes(n, size)


def total_nbytes(tensors: list[onnx.TensorProto]) -> int:
    """sum(nbytes(t) for t in tensors), one tensor at a time in this loop (a model may hold 100k); a string
    tensor, which no header sizes, counts its encoded bytes (read: strings are rare)."""
    items, total, string = _ITEMSIZE, 0, onnx.TensorProto.STRING
    for t in tensors:
        dt = t.data_type
        size = items.get(dt)
        if size is None:
            size = itemsize(dt)
        if size:
            n = math.prod(t.dims[:])
            total += raw_bytes(n, size)
        elif dt == string:
            total += encoded_size(t)
    return total


def encoded_size(msg) -> int:
    """msg.ByteSize(), or 2**31 (over any protobuf's limit) where protobuf refuses to encode it at all."""
    try:
        return msg.ByteSize()
    except EncodeError:  # (protobuf refuses to encode 2 GB and more)
        return 1 << 31


def itemsize(data_type: int) -> int:
    """Bytes per element of an ONNX data type in raw data: 0 for strings and unknown types; for the types
    under a byte, minus their bits (-4, -2, -6: packed without gaps, raw_bytes; numpy's ml_dtypes stand-ins
    take a whole byte each)."""
    size = _ITEMSIZE.get(data_type)
    if size is not None:
        return size
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        size = 0
    elif data_type in _BITS:
        size = -_BITS[data_type]
    else:
        try:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
        except (KeyError, TypeError, ValueError):  # a type this onnx does not know: the checker speaks of it
            size = 0
    _ITEMSIZE[data_type] = size
    return size


_ITEMSIZE: dict[int, int] = {}  # data type -> itemsize(), filled as types are met (a lookup per tensor, not a dtype)
# the types under a byte (as this onnx knows them), by their bits per element
_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(onnx.TensorProto, name)}


def raw_bytes(n: int, size: int) -> int:
    """Raw bytes of `n` elements of a type of itemsize() `size` (under a byte: minus its bits, packed)."""
    return (n * -size + 7) // 8 if size < 0 else n * size


def typed_values(n: int, size: int) -> int:
    """How many entries of int32_data (or another typed field) hold `n` elements of a type of itemsize `size`:
    one an element, but one packed byte an entry for the 4- and 2-bit types (the 6-bit floats keep one value
    an entry), as onnx's helper.make_tensor writes them."""
    return raw_bytes(n, size) if size in (-4, -2) else n


def is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def ext_info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}
