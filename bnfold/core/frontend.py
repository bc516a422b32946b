"""The interface every framework package implements (bnfold.onnx, bnfold.torch, bnfold.keras).

The front ends (api.py, cli.py) only ever talk to a framework through this interface, found by name
in api.py's registry; each package imports its framework lazily, inside these methods, so that
picking a frontend costs nothing and `bnfold model.onnx` never imports torch or tensorflow.
"""
from __future__ import annotations

from typing import Any, Protocol

from .options import Options
from .results import FoldResult, Verification


class Frontend(Protocol):
    """Load, fold, check, export and save the models of one framework."""

    name: str           # "onnx", "torch", "keras": the report's `framework`
    needs: str          # what must be installed, for a missing-extra message
    extra: str          # the pip extra that brings it

    def owns(self, model: Any) -> bool:
        """Whether an in-memory object is a model of this framework (without importing it)."""

    def available(self) -> None:
        """Import the framework or raise MissingExtraError naming the pip extra."""

    def load(self, path: str, *, trust: bool = False) -> Any:
        """Read a model file; BnfoldError for anything that is not a valid model."""

    def save(self, model: Any, path: str) -> None:
        """Write a model atomically, in this framework's own format."""

    def companion_files(self, path: str) -> set[str]:
        """Files a model file reads besides itself (never to be overwritten by an output)."""

    def example_inputs(self, model: Any, opts: Options) -> Any:
        """Inputs to run the model on (from --input shapes, --inputs data or the model's signature)."""

    def fold(self, model: Any, opts: Options, *, example_inputs: Any = None, path: str | None = None) -> FoldResult:
        """Fold a copy of `model` and verify it as `opts` says; `model` itself is never changed."""

    def check(self, original: Any, candidate: Any, opts: Options, *, example_inputs: Any = None) -> Verification:
        """Is `candidate` the same function as `original`?"""

    def export_onnx(self, model: Any, out_path: str, opts: Options, *, example_inputs: Any = None) -> FoldResult:
        """Fold, write ONNX at `out_path`, verify the ONNX against the original model."""
