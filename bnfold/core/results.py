"""Plain, serialisable result objects: Report, Verification, FoldResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .decisions import Decision

SCHEMA = 1


class Step(str):
    """A progress message that also says how far a long task is (`done` of `total` steps); listeners
    that only read text see the message."""

    done: int
    total: int

    def __new__(cls, message: str, done: int, total: int) -> "Step":
        s = super().__new__(cls, message)
        s.done, s.total = done, total
        return s


@dataclass
class ProviderResult:
    """One execution provider / device: ran or not, and per-output statistics when it ran."""

    name: str
    ran: bool
    why: str = ""
    passed: bool | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str | None:
        """passed / failed / inconclusive (some output proves nothing); None when it did not run."""
        if not self.ran:
            return None
        if not self.passed:
            return "failed"
        if any(st.get("verdict") == "inconclusive" for st in self.outputs.values()):
            return "inconclusive"
        return "passed"

    def to_dict(self) -> dict[str, Any]:
        if not self.ran:
            return {"ran": False, "why": self.why, **self.notes}
        return {"ran": True, "passed": self.passed, "verdict": self.verdict, "outputs": self.outputs, **self.notes}


@dataclass
class Verification:
    """Truthy when the verdict is "passed": every provider that ran agreed, at least one ran, every fold's
    local proof held and every output was evidence (not empty, zero or swamped by its tolerance)."""

    providers: dict[str, ProviderResult] = field(default_factory=dict)
    tolerance: dict[str, Any] = field(default_factory=lambda: {"atol": None, "rtol": None, "how": "auto"})
    first_divergence: dict[str, Any] | None = None
    skipped_reason: str | None = None  # set when verification was not run at all (--no-verify)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> shape, dtype, how it was chosen
    # folds a failed proof points at (local proof, or the end-to-end divergence traced back): what
    # self-healing reverts. Each: {"bn", "why", and "max_abs"/"bound" when measured}
    blame: list[dict[str, Any]] = field(default_factory=list)
    proofs: dict[str, int] = field(default_factory=dict)  # local proofs: {"proven", "failed", "not_run"}
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ran_any(self) -> bool:
        return any(p.ran for p in self.providers.values())

    @property
    def verdict(self) -> str | None:
        """passed / failed / inconclusive, or None when nothing ran."""
        if self.skipped_reason is not None or not self.ran_any:
            return None
        ran = [p for p in self.providers.values() if p.ran]
        if self.blame or any(p.verdict == "failed" for p in ran):
            return "failed"
        if any(p.verdict == "inconclusive" for p in ran):
            return "inconclusive"
        return "passed"

    @property
    def passed(self) -> bool | None:
        v = self.verdict
        return None if v is None else v == "passed"

    def __bool__(self) -> bool:
        return self.passed is True

    def hint(self) -> str | None:
        """What a user can do about a verdict that is not "passed"."""
        v = self.verdict
        if v == "inconclusive":
            return ("nothing was proven on these inputs: give real data with --inputs FILE.npz, other shapes with "
                    "--input NAME:SHAPE, or a smaller --atol/--rtol")
        if v == "failed" and self.blame:
            return "a fold failed its own proof: bnfold reverts such folds unless --strict"
        return None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "passed": self.passed,
            "verdict": self.verdict,
            "tolerance": self.tolerance,
            "providers": {k: v.to_dict() for k, v in self.providers.items()},
            "inputs": self.inputs,
            "first_divergence": self.first_divergence,
        }
        if self.proofs:
            d["local_proofs"] = self.proofs
        if self.blame:
            d["blame"] = self.blame
        if self.hint():
            d["hint"] = self.hint()
        d.update(self.notes)
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
    # what the fold changed, measured: {"ops": {op: [before, after]} (changed ops only), "parameters":
    # [before, after], "file_bytes": [before, after or None], "latency_ms": per provider (--bench)}
    before_after: dict[str, Any] | None = None

    @property
    def folded(self) -> list[Decision]:
        return [d for d in self.decisions if d.is_folded]

    @property
    def skipped(self) -> list[Decision]:
        return [d for d in self.decisions if not d.is_folded]

    @property
    def reverted(self) -> list[Decision]:
        """Folds that were made, failed their proof and were undone (kept with VERIFICATION_FAILED)."""
        return [d for d in self.decisions if d.reason is not None and d.reason.value == "VERIFICATION_FAILED"]

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
        if self.before_after is not None:
            d["before_after"] = self.before_after
        d.update(self.info)
        return d


@dataclass
class FoldResult:
    """`model` has the type that was given (onnx.ModelProto, torch.nn.Module, keras.Model)."""

    model: Any
    report: Report
