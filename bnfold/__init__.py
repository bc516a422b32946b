"""bnfold: fold inference BatchNorm into neighbouring layers and prove the model is unchanged."""
from __future__ import annotations

__version__ = "0.1.0"

from .api import check, fold, load, save  # noqa: E402
from .core.decisions import Decision, Reason  # noqa: E402
from .core.errors import BnfoldError  # noqa: E402
from .core.results import FoldResult, Report, Verification  # noqa: E402

__all__ = ["fold", "check", "save", "load", "Report", "FoldResult", "Verification", "Decision", "Reason",
           "BnfoldError", "__version__"]
