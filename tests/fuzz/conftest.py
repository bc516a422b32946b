"""Fuzz-test setup: registers the hypothesis settings profiles ci / dev / long, chosen by BNFOLD_FUZZ_PROFILE
(default ci), with BNFOLD_FUZZ_EXAMPLES overriding the total number of examples -- see fuzz_config.py."""
from __future__ import annotations

from tests.fuzz import fuzz_config  # noqa: F401 - registers the profiles
