"""What to fold and how to prove it: one frozen object built once (CLI or bnfold.fold) and handed down."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class InputSpec:
    """--input NAME:SHAPE[:DTYPE]; a shape entry of None keeps the model's own dimension."""

    name: str
    shape: tuple[int, ...]
    dtype: str | None = None


@dataclass(frozen=True)
class Options:
    """Every knob of a fold or a check. Frontends read what applies to them and ignore the rest."""

    verify: bool = True
    providers: tuple[str, ...] | None = None    # None: every available provider / device
    atol: float | Mapping[str, float] | None = None
    rtol: float | None = None
    seed: int = 0
    input_specs: tuple[InputSpec, ...] = ()
    inputs_npz: str | None = None
    batches: int = 1
    outputs_only: bool = False
    standalone: str = "keep"                    # ONNX: a BN with no layer to fold into: keep | affine
    trust: bool = False
    dry_run: bool = False
    progress: Callable[[str], None] | None = None
    strict: bool = False                        # a failed fold proof fails the run instead of reverting the fold
    exclude: Mapping[str, str] = dataclasses.field(default_factory=dict)  # BN name -> why its fold was reverted
    save_inputs: str | None = None              # write the exact verification feeds here (.npz)

    @classmethod
    def of(cls, **kw: Any) -> "Options":
        """Options from keyword arguments as the library API takes them (sequences become tuples)."""
        if kw.get("providers") is not None:
            kw["providers"] = tuple(kw["providers"])
        kw["input_specs"] = tuple(kw.get("input_specs") or ())
        return cls(**kw)

    def but(self, **changes: Any) -> "Options":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def spec_tuples(self) -> list[tuple[str, tuple, str | None]]:
        """--input specs as (name, shape, dtype) tuples; dtype None means the model's own dtype."""
        return [(s.name, tuple(s.shape), s.dtype) for s in self.input_specs]

    def reverted(self, bn: str) -> str | None:
        """Why the fold of `bn` was reverted by an earlier proof (self-healing), or None."""
        return self.exclude.get(bn)

    def say(self, msg: str) -> None:
        """Report progress, when someone listens."""
        if self.progress is not None:
            self.progress(msg)

