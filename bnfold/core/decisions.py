"""The decision record: every BatchNorm gets exactly one Decision, folded or skipped with a Reason."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Reason(str, enum.Enum):
    """Why a BatchNorm was not folded. A closed enum: tests assert which reason, not counts."""

    TRAINING_MODE = "TRAINING_MODE"
    NO_RUNNING_STATS = "NO_RUNNING_STATS"
    NON_CONSTANT_PARAM = "NON_CONSTANT_PARAM"
    NON_FINITE_PARAM = "NON_FINITE_PARAM"
    PRODUCER_FANOUT = "PRODUCER_FANOUT"
    INTERMEDIATE_IS_OUTPUT = "INTERMEDIATE_IS_OUTPUT"
    AXIS_MISMATCH = "AXIS_MISMATCH"
    PADDING_BREAKS_BACKWARD_FOLD = "PADDING_BREAKS_BACKWARD_FOLD"
    DTYPE_OVERFLOW = "DTYPE_OVERFLOW"
    UNSUPPORTED_PRODUCER = "UNSUPPORTED_PRODUCER"
    NO_PRODUCER = "NO_PRODUCER"
    SPATIAL_MODE = "SPATIAL_MODE"
    NONLINEAR_PRODUCER = "NONLINEAR_PRODUCER"
    SHARED_PRODUCER = "SHARED_PRODUCER"
    UNSUPPORTED_BN_MODE = "UNSUPPORTED_BN_MODE"
    DTYPE_MISMATCH = "DTYPE_MISMATCH"
    VERIFICATION_FAILED = "VERIFICATION_FAILED"
    NOT_CALLED = "NOT_CALLED"
    BRANCH_MISMATCH = "BRANCH_MISMATCH"

    @property
    def message(self) -> str:
        return REASON_MESSAGES[self]


REASON_MESSAGES: dict[Reason, str] = {
    Reason.TRAINING_MODE: "the BatchNorm runs in training mode (uses batch statistics or updates running stats)",
    Reason.NO_RUNNING_STATS: "the BatchNorm has no running mean/variance, so inference uses batch statistics",
    Reason.NON_CONSTANT_PARAM: "a BatchNorm or layer parameter is not a constant (graph input, overridable initializer or computed value)",
    Reason.NON_FINITE_PARAM: "a BatchNorm parameter is NaN/Inf or the variance + epsilon is not positive",
    Reason.PRODUCER_FANOUT: "the layer's output also feeds other nodes, which must keep seeing the unnormalised value",
    Reason.INTERMEDIATE_IS_OUTPUT: "the layer's output is itself a model output and must keep its value",
    Reason.AXIS_MISMATCH: "the BatchNorm normalises a different axis than the layer's output channels",
    Reason.PADDING_BREAKS_BACKWARD_FOLD: "folding into the following layer is not exact because its zero padding would see the shifted border",
    Reason.DTYPE_OVERFLOW: "a folded weight or bias does not fit the model's dtype (it would become Inf/NaN)",
    Reason.UNSUPPORTED_PRODUCER: "the BatchNorm's input comes from an op bnfold cannot fold into",
    Reason.NO_PRODUCER: "the BatchNorm's input is a model input or constant, with no layer to fold into",
    Reason.SPATIAL_MODE: "spatial=0 BatchNorm (per-element statistics) is not a per-channel affine map",
    Reason.NONLINEAR_PRODUCER: "the layer applies a non-linear activation before the BatchNorm",
    Reason.SHARED_PRODUCER: "the layer is shared by several call sites and cannot be changed for one of them",
    Reason.UNSUPPORTED_BN_MODE: "this BatchNorm variant's inference is not the plain per-channel affine map",
    Reason.DTYPE_MISMATCH: "the BatchNorm computes in another dtype than the layer, so folding would change the output's precision",
    Reason.VERIFICATION_FAILED: "the fold was made, failed its proof, and was reverted: the BatchNorm is kept",
    Reason.NOT_CALLED: "the model never runs this BatchNorm on the example inputs (an unused or skipped branch)",
    Reason.BRANCH_MISMATCH: "the branches summed with this BatchNorm's cannot be one convolution (different stride, "
                            "dilation, groups or channels, or kernels that do not line up on one grid)",
}

FOLDED = "folded"
SKIPPED = "skipped"


@dataclass
class Decision:
    """What happened to one BatchNorm. `producer` is the layer folded into (or considered)."""

    bn: str
    status: str
    producer: str | None = None
    pattern: str | None = None
    direction: str | None = None
    reason: Reason | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the fold's local proof: {"max_abs", "bound", "how"} when proven on captured data, {"not_run": why} else
    proof: dict[str, Any] | None = None
    # private to the pass that made the decision (e.g. where the fold site is); never serialised
    site: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def folded(cls, bn: str, producer: str, pattern: str, direction: str = "after", **extra: Any) -> "Decision":
        return cls(bn=bn, status=FOLDED, producer=producer, pattern=pattern, direction=direction, extra=extra)

    @classmethod
    def skipped(cls, bn: str, reason: Reason, detail: str = "", producer: str | None = None) -> "Decision":
        return cls(bn=bn, status=SKIPPED, producer=producer, reason=reason, detail=detail or reason.message)

    @property
    def is_folded(self) -> bool:
        return self.status == FOLDED

    def to_dict(self) -> dict[str, Any]:
        if self.is_folded:
            d: dict[str, Any] = {"bn": self.bn, "into": self.producer, "pattern": self.pattern,
                                 "direction": self.direction}
            if self.proof is not None:
                d["proof"] = self.proof
        else:
            d = {"bn": self.bn, "reason": self.reason.value if self.reason else None, "detail": self.detail}
            if self.producer:
                d["producer"] = self.producer
        d.update(self.extra)
        return d


class Skip(Exception):
    """Raised inside a pass's check step; carries the reason for the BN being examined."""

    def __init__(self, reason: Reason, detail: str = "", producer: str | None = None) -> None:
        super().__init__(detail or reason.message)
        self.reason = reason
        self.detail = detail or reason.message
        self.producer = producer
