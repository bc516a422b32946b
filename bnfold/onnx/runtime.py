"""Execution backends for ONNX models: onnxruntime sessions on CPU / CUDA / TensorRT, optimisations off."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import onnx

from ..core.errors import BnfoldError
from .ondisk import ExternalModel, over_two_gb
from .protos import WithOutputs

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
        prov: list[Any] = [(provider, dict(options or {}))] if provider != "CPUExecutionProvider" else [provider]
        if provider != "CPUExecutionProvider":
            prov.append("CPUExecutionProvider")
        if isinstance(model, ExternalModel):
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", model.folder)
            # without pre-packing onnxruntime maps the weights from the files instead of copying them
            so.add_session_config_entry("session.disable_prepacking", "1")
            src: str | bytes = model.proto.SerializeToString()
        elif isinstance(model, WithOutputs):
            src = _serialize(model.model, model.names)
        else:
            src = model if isinstance(model, str) else _serialize(model)
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


def _serialize(model: onnx.ModelProto, outputs: tuple[str, ...] = ()) -> bytes:
    if over_two_gb(model):  # ByteSize() would walk every byte of the weights just to ask
        raise BnfoldError("model over 2 GB in memory: verify it from a file with external data")
    from .io import serialize
    return serialize(model, outputs)  # the weights' bytes framed by hand: protobuf encodes them slowly


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
