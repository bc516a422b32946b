"""The ONNX frontend (see core/frontend.py): what api.py and cli.py call for .onnx files and ModelProtos."""
from __future__ import annotations

from typing import Any

from ..core.errors import BnfoldError
from ..core.options import Options
from ..core.results import FoldResult, Verification


class OnnxFrontend:
    name = "onnx"
    needs = "onnx and onnxruntime"
    extra = ""

    def owns(self, model: Any) -> bool:
        return type(model).__name__ == "ModelProto" and type(model).__module__.startswith("onnx")

    def available(self) -> None:
        """onnx and onnxruntime are core dependencies: always there."""

    def load(self, path: str, *, trust: bool = False) -> Any:
        from .io import load_onnx
        return load_onnx(path)

    def save(self, model: Any, path: str) -> None:
        from .io import save_onnx
        save_onnx(model, path)

    def companion_files(self, path: str) -> set[str]:
        from .io import external_files
        return external_files(path)

    def example_inputs(self, model: Any, opts: Options) -> Any:
        return None  # ONNX feeds come from the graph's declared inputs (onnx/feeds.py) at verification

    def fold(self, model: Any, opts: Options, *, example_inputs: Any = None, path: str | None = None,
             owned: bool = False) -> FoldResult:
        """`owned`: the caller never reads `model` again (api.fold_with), so it is folded in place when
        nothing needs the original (fold_onnx copies it anyway for verification or a dry run)."""
        from ..core.pause import paused_gc
        from .fold import fold_onnx
        if path is None and not owned:  # (an owned model comes from load_onnx, which read its external data)
            with paused_gc():
                _require_loaded_external_data(model)
        try:
            return fold_onnx(model, opts, original_path=path, copy=path is None and not owned)
        except BnfoldError as e:
            if e.path is None and path is not None:
                raise BnfoldError(str(e), path) from None  # name the file the problem is about
            raise

    def check(self, original: Any, candidate: Any, opts: Options, *, example_inputs: Any = None) -> Verification:
        if not self.owns(candidate):
            raise BnfoldError("an ONNX original can only be checked against an ONNX candidate")
        from .verify import verify_onnx
        return verify_onnx(original, candidate, opts)

    def export_onnx(self, model: Any, out_path: str, opts: Options, *, example_inputs: Any = None) -> FoldResult:
        raise BnfoldError("is already ONNX; fold it with 'bnfold MODEL'")


def _require_loaded_external_data(model: Any) -> None:
    import onnx

    from .ondisk import on_disk
    external = onnx.TensorProto.EXTERNAL
    inits = model.graph.initializer[:]
    if external not in {t.data_location for t in inits}:  # (one attribute a tensor: a model may hold 100k)
        return
    for t in inits:  # (onnx's uses_external_data, inlined: a call per tensor adds up)
        if t.data_location == external and not t.HasField("raw_data") and not on_disk(t):
            raise BnfoldError(f"initializer {t.name!r} lives in external data that is not loaded; pass the file "
                              "path instead, or onnx.load() the model with its external data")


FRONTEND = OnnxFrontend()
