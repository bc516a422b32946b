"""Execution backends for ONNX models: onnxruntime sessions on CPU / CUDA / TensorRT, optimisations off."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx

from ..core.errors import BnfoldError
from .ondisk import ExternalModel, on_disk, over_two_gb, tensor_value
from .protos import WithOutputs, copy_fields, has_unknown_fields, is_external, nbytes

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5  # field numbers in onnx.proto

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
DEFAULT_ORDER = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]


def provider_name(short: str) -> str:
    """'cpu' -> 'CPUExecutionProvider'; full names pass through; unknown names are a usage error."""
    key = short.strip()
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    if key in DEFAULT_ORDER:
        return key
    raise BnfoldError(f"--providers: unknown provider {short!r}; use cpu, cuda or tensorrt")


def _ort():
    import onnxruntime as ort
    return ort


def availability(name: str) -> tuple[bool, str]:
    """(usable, why-not) for one execution provider, without creating a model session."""
    ort = _ort()
    avail = ort.get_available_providers()
    if name not in avail:
        if name == "CUDAExecutionProvider":
            return False, "onnxruntime-gpu not installed (this onnxruntime has no CUDAExecutionProvider)"
        if name == "TensorrtExecutionProvider":
            return False, "onnxruntime has no TensorrtExecutionProvider"
        return False, f"{name} not available in this onnxruntime"
    if name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        try:
            ok = _cuda_device_present()
        except Exception as e:  # noqa: BLE001 - probing a driver must never break verification
            return False, f"cannot probe for a CUDA device: {e}"
        if not ok:
            return False, "no CUDA device visible"
    return True, ""


def _cuda_device_present() -> bool:
    # The EP library can be installed on a machine without a GPU; a tiny session tells for sure.
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    ort = _ort()
    s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
    return "CUDAExecutionProvider" in s.get_providers()


class OrtRunner:
    """One onnxruntime session with every graph optimisation off (the runtime must not fold BN itself)."""

    def __init__(self, model: onnx.ModelProto | str | ExternalModel | WithOutputs, provider: str,
                 options: Mapping[str, Any] | None = None, label: str = "model", optimize: bool = False) -> None:
        ort = _ort()
        so = ort.SessionOptions()
        # optimize=True (basic level: constant folding and onnxruntime's own Conv+BN fusion) is only
        # ever used for a noise estimate, never for the reference
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3
        # threads that wait for work sleep instead of spinning: on busy cores spinning threads take the time
        # slices the working ones need (a ResNet-50 run at 224x224 on two loaded cores: 0.42 s spinning,
        # 0.27 s not); on idle cores a sleeping thread costs a wake-up per op, microseconds
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        prov: list[Any] = [(provider, dict(options or {}))] if provider != "CPUExecutionProvider" else [provider]
        if provider != "CPUExecutionProvider":
            prov.append("CPUExecutionProvider")
        if isinstance(model, ExternalModel):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", model.folder)
            # without pre-packing onnxruntime maps the weights from the files instead of copying them
            so.add_session_config_entry("session.disable_prepacking", "1")
            src: str | bytes = model.proto.SerializeToString()
        elif isinstance(model, str):
            src = model
        else:
            wo = model if isinstance(model, WithOutputs) else WithOutputs(model, ())
            # onnxruntime's own fusions (optimize) read the weights from the model: they travel in it. So they
            # do for other providers than the CPU, where arrays given as weights are not tested here
            skeleton = (_skeleton(wo) if provider == "CPUExecutionProvider" and not optimize
                        and hasattr(so, "add_external_initializers") else None)
            if skeleton is None:
                src = _encoded(wo)
            else:
                # the big weights go to onnxruntime as arrays it reads in place: not encoded into the model's
                # bytes, decoded and copied again (half the cost of a session for a 100 MB model)
                src, names, arrays = skeleton
                self._weights = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
                if names:
                    so.add_external_initializers(names, self._weights)
        try:
            self.session = ort.InferenceSession(src, so, providers=prov)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many types for one meaning
            raise BnfoldError(f"onnxruntime cannot load the {label}: {_first_line(e)}") from None
        if provider not in self.session.get_providers():
            raise BnfoldError(f"onnxruntime fell back from {provider} for the {label}")
        self.provider = provider
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray], label: str = "model") -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(None, dict(feeds))
        except Exception as e:  # noqa: BLE001
            raise RunFailed(f"onnxruntime failed to run the {label}: {_first_line(e)}", label) from None
        return dict(zip(self.output_names, outs))


class RunFailed(BnfoldError):
    """onnxruntime loaded a model but could not run it on the feeds (`label` says which model)."""

    def __init__(self, message: str, label: str) -> None:
        super().__init__(message)
        self.label = label


# a main-graph initializer of at least this many bytes goes to onnxruntime as an array (_skeleton)
ARRAY_MIN = 1 << 12
_ARRAY_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64,
                onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.INT64: np.int64,
                onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8}
_IN_MEMORY = "bnfold-in-memory"  # the location the stubs name: never read, onnxruntime is given every one


def _skeleton(model: WithOutputs) -> tuple[bytes, list[str], list[np.ndarray]] | None:
    """`model.model` encoded without its big weights, and the weights as arrays for onnxruntime's
    external initializers: each big main-graph initializer becomes a header marked external, its
    value an array (its own bytes, or the new value `model.weights` gives it). Asks for `model.names`
    as outputs too. None when a weight left on disk cannot be an array (io.serialize copies it)."""
    m0 = model.model
    g = m0.graph
    weights = model.weights or {}
    m = onnx.ModelProto()
    copy_fields(m, m0, lambda k: k != _MODEL_GRAPH)
    copy_fields(m.graph, g, lambda k: k != _GRAPH_INITIALIZER)
    names: list[str] = []
    arrays: list[np.ndarray] = []
    for t in g.initializer:
        a = _array_of(t, weights.get(t.name))
        if a is None:
            if on_disk(t) and not weights:
                return None
            if t.name in weights or on_disk(t):
                raise BnfoldError(f"onnxruntime cannot take the new value of {t.name!r} as an array")
            m.graph.initializer.append(t)
            continue
        stub = m.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                       data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=_IN_MEMORY)
        names.append(t.name)
        arrays.append(a)
    have = {o.name for o in g.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(model.names) if n not in have)
    return m.SerializeToString(), names, arrays


def _encoded(model: WithOutputs) -> bytes:
    """`model` encoded whole (io.serialize), its new weights written in (a light copy: the others are shared)."""
    if not model.weights:
        return _serialize(model.model, model.names)
    from onnx import numpy_helper
    m = onnx.ModelProto()
    copy_fields(m, model.model, lambda k: k != _MODEL_GRAPH)
    copy_fields(m.graph, model.model.graph, lambda k: k != _GRAPH_INITIALIZER)
    for t in model.model.graph.initializer:
        new = model.weights.get(t.name)
        m.graph.initializer.append(t if new is None else numpy_helper.from_array(np.asarray(new), t.name))
    return _serialize(m, model.names)


def _array_of(t: onnx.TensorProto, new: np.ndarray | None) -> np.ndarray | None:
    """The value onnxruntime is to read for `t` as an array, or None when `t` travels in the model."""
    dtype = _ARRAY_TYPES.get(t.data_type)
    if dtype is None or (is_external(t) and not on_disk(t)) or has_unknown_fields(t):
        return None
    if new is not None:
        a = _c_order(new)
        return a if a.dtype == dtype and list(a.shape) == list(t.dims) else None
    if not (t.HasField("raw_data") or on_disk(t)) or not len(t.dims) or nbytes(t) < ARRAY_MIN:
        return None
    a = _c_order(tensor_value(t))  # an on-disk weight is read from its file
    return a if a.dtype == dtype and list(a.shape) == list(t.dims) else None


def _c_order(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")  # (ascontiguousarray makes a scalar 1-d)


def _serialize(model: onnx.ModelProto, outputs: tuple[str, ...] = ()) -> bytes:
    if over_two_gb(model):  # ByteSize() would walk every byte of the weights just to ask
        raise BnfoldError("model over 2 GB in memory: verify it from a file with external data")
    from .io import serialize
    return serialize(model, outputs)  # the weights' bytes framed by hand: protobuf encodes them slowly


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
