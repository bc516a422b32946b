"""Plain, serialisable result objects: Report, Verification, FoldResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .decisions import Decision

SCHEMA = 1


@dataclass
class ProviderResult:
    """One execution provider / device: ran or not, and per-output statistics when it ran."""

    name: str
    ran: bool
    why: str = ""
    passed: bool | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if not self.ran:
            return {"ran": False, "why": self.why, **self.notes}
        return {"ran": True, "passed": self.passed, "outputs": self.outputs, **self.notes}


@dataclass
class Verification:
    """Truthy when every provider that ran agreed and at least one ran."""

    providers: dict[str, ProviderResult] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=lambda: {"atol": None, "rtol": None, "how": "auto"})
    first_divergence: dict[str, Any] | None = None
    skipped_reason: str | None = None  # set when verification was not run at all (--no-verify)

    @property
    def ran_any(self) -> bool:
        return any(p.ran for p in self.providers.values())

    @property
    def passed(self) -> bool | None:
        if self.skipped_reason is not None or not self.ran_any:
            return None
        return all(p.passed for p in self.providers.values() if p.ran)

    def __bool__(self) -> bool:
        return self.passed is True

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "passed": self.passed,
            "tolerance": self.tolerance,
            "providers": {k: v.to_dict() for k, v in self.providers.items()},
            "first_divergence": self.first_divergence,
        }
        if self.skipped_reason is not None:
            d["not_run"] = self.skipped_reason
        return d


@dataclass
class Report:
    """What a fold did: one Decision per BatchNorm, the verification and timings."""

    model: str | None = None
    output: str | None = None
    framework: str = "onnx"
    decisions: list[Decision] = field(default_factory=list)
    verification: Verification | None = None
    timing_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"capture": "fx"} for PyTorch

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.is_folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.is_folded]

    def to_dict(self) -> dict[str, Any]:
        ver = self.verification.to_dict() if self.verification is not None else {
            "passed": None, "tolerance": None, "providers": {}, "first_divergence": None, "not_run": "verification off"}
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "model": self.model,
            "output": self.output,
            "framework": self.framework,
            "folded": [x.to_dict() for x in self.folded],
            "skipped": [x.to_dict() for x in self.skipped],
            "verification": ver,
            "timing_s": {k: round(v, 6) for k, v in self.timing_s.items()},
        }
        d.update(self.info)
        return d


@dataclass
class FoldResult:
    """`model` has the type that was given (onnx.ModelProto, torch.nn.Module, keras.Model)."""

    model: Any
    report: Report
