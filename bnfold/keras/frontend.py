"""The Keras 3 frontend (see core/frontend.py): functional, Sequential, nested and subclassed keras.Models.

Importing this module imports no keras or tensorflow: each method imports what it needs when called.
"""
from __future__ import annotations

from typing import Any

from ..core.options import Options
from ..core.results import FoldResult, Verification


class KerasFrontend:
    name = "keras"
    needs = "Keras 3 (with TensorFlow, PyTorch or JAX as its backend)"
    extra = "keras"

    def owns(self, model: Any) -> bool:
        return any(c.__module__.startswith(("keras", "tf_keras", "tensorflow")) for c in type(model).__mro__)

    def available(self) -> None:
        from .files import import_keras
        import_keras()

    def load(self, path: str, *, trust: bool = False) -> Any:
        from .files import load
        return load(path, trust=trust)

    def save(self, model: Any, path: str) -> None:
        from .files import save
        save(model, path)

    def companion_files(self, path: str) -> set[str]:
        return set()

    def example_inputs(self, model: Any, opts: Options) -> Any:
        """Feeds (batches, and how each input was chosen) from --input / --inputs / the model's signature."""
        from .feeds import plan_feeds
        return plan_feeds(model, opts)

    def fold(self, model: Any, opts: Options, *, example_inputs: Any = None, path: str | None = None) -> FoldResult:
        from .fold import fold
        return fold(model, opts, example_inputs)

    def check(self, original: Any, candidate: Any, opts: Options, *, example_inputs: Any = None) -> Verification:
        """Is `candidate` (a Keras model, or an ONNX ModelProto run on onnxruntime) the same function as the
        Keras `original`? Judged with the original's own numeric noise."""
        if type(candidate).__module__.startswith("onnx") and hasattr(candidate, "SerializeToString"):
            from .export import verify_onnx
            from .fold import settled_feeds
            return verify_onnx(original, candidate, settled_feeds(original, example_inputs, opts), opts)
        from .fold import check
        return check(original, candidate, opts, example_inputs)

    def export_onnx(self, model: Any, out_path: str, opts: Options, *, example_inputs: Any = None) -> FoldResult:
        """Fold, export to ONNX with Keras' own exporter, verify the ONNX on onnxruntime against the original."""
        from .export import check_exportable, fold_healed, write_and_verify
        from .fold import settled_feeds
        check_exportable(model)
        feeds = settled_feeds(model, example_inputs, opts)
        result = fold_healed(lambda o: self.fold(model, o, example_inputs=feeds), opts)
        return write_and_verify(result, model, out_path, feeds, opts)


FRONTEND = KerasFrontend()
