"""The Keras backend in use (tensorflow, torch or jax): its devices, its GPU, its TF32, running a model.

Keras 3 computes with whichever framework KERAS_BACKEND names, and a machine running Keras on torch or
jax may not have TensorFlow at all. Every run here goes through keras.device(), so each backend places
the computation itself; what is asked of the framework directly (is there a GPU, may it round float32
to TF32) is asked of the backend that runs, never of TensorFlow by default. On torch and jax a model's
variables live on the device they were made on: a model is run on another device through a copy made
there (`Runner`), never by moving the caller's variables.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import BnfoldError

DEVICE_NAMES = {"cpu": "cpu:0", "gpu": "gpu:0"}


def name() -> str:
    """The backend Keras computes with: 'tensorflow', 'torch', 'jax' (or 'numpy')."""
    import keras

    return str(keras.backend.backend())


def gpu_available() -> bool:
    """Whether the backend in use sees a GPU (TensorFlow's GPU list, torch.cuda, jax.devices('gpu'))."""
    b = name()
    try:
        if b == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if b == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if b == "jax":
            import jax

            return bool(jax.devices("gpu"))
    except (RuntimeError, ImportError):  # jax raises RuntimeError when it has no such platform
        return False
    return False


def no_gpu_why() -> str:
    """Why the GPU is not run, in the backend's own terms."""
    return {"tensorflow": "TensorFlow sees no GPU", "torch": "torch.cuda sees no GPU (Keras backend torch)",
            "jax": "jax sees no GPU device (Keras backend jax)"}.get(name(), f"Keras backend {name()} has no GPU")


def tf32_enabled() -> bool:
    """Whether float32 matmuls/convolutions on the GPU may be rounded to TF32 by the backend in use."""
    b = name()
    if b == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.experimental.tensor_float_32_execution_enabled())
    if b == "torch":
        import torch

        return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    if b == "jax":
        import jax

        # jax's "default" precision runs float32 dots on tensor cores (TF32) on recent GPUs
        return str(jax.config.jax_default_matmul_precision or "default").lower() not in ("highest", "float32")
    return False


def platform(variable: Any) -> str | None:
    """'cpu' / 'gpu' for where a torch or jax variable lives; None when the backend places it freely."""
    value = getattr(variable, "value", None)
    dev = getattr(value, "device", None)
    if dev is None:
        return None
    kind = getattr(dev, "type", None) or getattr(dev, "platform", None)
    if callable(dev):  # older jax: Array.device() is a method
        kind = getattr(dev(), "platform", None)
    if kind is None:
        return None
    kind = str(kind).lower()
    return "gpu" if kind in ("cuda", "gpu", "rocm") else kind


def home(model: Any) -> str:
    """The device a model's variables live on: 'gpu' for a torch / jax model built there, else 'cpu'."""
    places = {platform(v) for v in getattr(model, "variables", [])} - {None}
    return "gpu" if places == {"gpu"} else "cpu"


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inference only: torch records no autograd graph (memory, time); other backends need nothing."""
    if name() == "torch":
        import torch

        with torch.no_grad():
            yield
    else:
        yield


def to_numpy(x: Any) -> np.ndarray:
    """A backend tensor (or anything array-like) as a numpy array."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def pack_inputs(model: Any, feeds: Sequence[np.ndarray]) -> Any:
    """Feeds in the structure the model's call expects."""
    import keras

    struct = getattr(model, "_inputs_struct", None)
    if struct is not None:
        return keras.tree.pack_sequence_as(struct, list(feeds))
    return feeds[0] if len(feeds) == 1 else list(feeds)


def call(model: Any, feeds: Sequence[np.ndarray], device: str = "cpu") -> list[np.ndarray]:
    """Outputs of `model` (inference mode) on `device` ('cpu' / 'gpu'), flattened, as numpy arrays."""
    import keras

    with keras.device(DEVICE_NAMES[device]), no_grad():
        out = model(pack_inputs(model, feeds), training=False)
    return [to_numpy(o) for o in keras.tree.flatten(out)]


class Runner:
    """Runs models on one device; on torch and jax, through a copy made on that device when the model's
    variables live elsewhere (a model built on the GPU, verified on the CPU)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.copies: dict[int, Any] = {}

    def here(self, model: Any) -> Any:
        """`model` itself when it can run on this device, else a copy of it made there."""
        if id(model) in self.copies:
            copy = self.copies[id(model)]
            copy.set_weights(model.get_weights())  # a model nudged in place since (noise runs)
            return copy
        places = {platform(v) for v in getattr(model, "variables", [])} - {None}
        if not places or places == {self.device}:
            return model
        import keras

        try:
            with keras.device(DEVICE_NAMES[self.device]):
                copy = keras.models.clone_model(model)
                copy.set_weights(model.get_weights())
        except Exception as e:
            raise BnfoldError(f"model {model.name!r} lives on {', '.join(sorted(places))} and Keras cannot copy it to "
                              f"{self.device} ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from None
        self.copies[id(model)] = copy
        return copy

    def run(self, model: Any, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Outputs of `model` on this device."""
        return call(self.here(model), feeds, self.device)


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Computations that may use float64 (jax truncates it to float32 unless x64 is on)."""
    if name() != "jax":
        yield
        return
    import jax

    if hasattr(jax, "enable_x64"):
        ctx = jax.enable_x64(True)
    else:  # older jax
        from jax.experimental import enable_x64
        ctx = enable_x64()
    with ctx:
        yield
