"""Reading and writing ONNX files: clear errors for bad files, atomic writes, external data kept."""
from __future__ import annotations

import os
from pathlib import Path

import onnx

from .errors import BnfoldError
from .io import atomic_write, check_input_file

TWO_GB = 2 ** 31 - 1


def load_onnx(path: str, load_external: bool = True) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; any problem is a one-line BnfoldError naming the file."""
    check_input_file(path)
    if Path(path).is_dir():
        raise BnfoldError("is a directory, expected an .onnx file", path)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError...
        raise BnfoldError(f"not a valid ONNX model (cannot parse: {_short(e)})", path) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise BnfoldError("not a valid ONNX model (no graph or IR version; truncated or not ONNX?)", path)
    if load_external and _has_external(model):
        base = str(Path(path).resolve().parent)
        try:
            from onnx.external_data_helper import load_external_data_for_model
            load_external_data_for_model(model, base)
        except FileNotFoundError as e:
            raise BnfoldError(f"external data file missing: {_short(e)}", path) from None
        except Exception as e:  # noqa: BLE001
            raise BnfoldError(f"cannot read external data: {_short(e)}", path) from None
    try:
        onnx.checker.check_model(structure_only(model), full_check=False)
    except onnx.checker.ValidationError as e:
        raise BnfoldError(f"invalid ONNX model: {_short(e)}", path) from None
    except Exception as e:  # noqa: BLE001
        raise BnfoldError(f"invalid ONNX model: {_short(e)}", path) from None
    return model


def structure_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without weight data, for the checker: initializers become typed graph inputs.

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
    have = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in have:
            mg.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _has_external(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import uses_external_data
    return any(uses_external_data(t) for t in model.graph.initializer)


def save_onnx(model: onnx.ModelProto, path: str, external_data: bool | None = None) -> None:
    """Write `model` atomically; models over 2 GB (or when asked) keep their weights in `<name>.data`."""
    big = _probably_big(model) if external_data is None else external_data

    def write(tmp: str) -> None:
        if big:
            loc = Path(path).name + ".data"
            data_tmp = Path(tmp).parent / loc
            if data_tmp.exists():
                data_tmp.unlink()
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=loc, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)

    atomic_write(path, write)


def _probably_big(model: onnx.ModelProto) -> bool:
    # ByteSize() walks every byte of a large model; the weights' raw bytes decide it unless close to 2 GB.
    raw = sum(len(t.raw_data) for t in model.graph.initializer)
    if raw < TWO_GB * 0.9:
        return raw + 64 * len(model.graph.node) > TWO_GB * 0.9 and model.ByteSize() > TWO_GB
    return model.ByteSize() > TWO_GB


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:240]
