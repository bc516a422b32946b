"""Per-framework calls in the keyword style the tests use, straight onto bnfold's frontends.

`torch_pass.fold(model, example_inputs=..., verify=False)` is `bnfold.api.frontend("torch").fold(model,
Options(...), example_inputs=...)`: the real frontend, nothing stubbed, only the calling convention.
"""
from __future__ import annotations

from typing import Any

from bnfold import api
from bnfold.core.options import InputSpec, Options


class FrameworkCalls:
    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def fe(self) -> Any:
        return api.frontend(self.name)

    def fold(self, model: Any, *, example_inputs: Any = None, **kw: Any) -> Any:
        return self.fe.fold(model, Options.of(**kw), example_inputs=example_inputs)

    def check(self, original: Any, candidate: Any, *, example_inputs: Any = None, **kw: Any) -> Any:
        return self.fe.check(original, candidate, Options.of(**kw), example_inputs=example_inputs)

    def export_onnx(self, model: Any, out_path: str, *, example_inputs: Any = None, **kw: Any) -> Any:
        return self.fe.export_onnx(model, out_path, Options.of(**kw), example_inputs=example_inputs)

    def example_inputs_for(self, model: Any, input_specs: Any = None, inputs_npz: str | None = None,
                           seed: int = 0) -> Any:
        specs = [InputSpec(n, tuple(s), d) for n, s, d in (input_specs or [])]
        return self.fe.example_inputs(model, Options.of(input_specs=specs, inputs_npz=inputs_npz, seed=seed))

    def load(self, path: str, *, trust: bool = False) -> Any:
        return self.fe.load(path, trust=trust)

    def save(self, model: Any, path: str) -> None:
        self.fe.save(model, path)


torch_pass = FrameworkCalls("torch")
keras_pass = FrameworkCalls("keras")
