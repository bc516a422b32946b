"""Hypothesis settings for the fuzz tests, picked by environment variables.

BNFOLD_FUZZ_PROFILE   ci (default) | dev | long
    ci    derandomized (the same examples on every run, no example database), 2,000 ONNX examples in all
    dev   random, 100 examples in all, failing examples remembered in .hypothesis/ and replayed first
    long  random, 20,000 examples in all
BNFOLD_FUZZ_EXAMPLES  total number of ONNX examples, split over the @given tests of test_fuzz_onnx.py
                      (overrides the profile's count)
BNFOLD_FUZZ_FAILURES  folder for reproducers of failing examples (default tests/fuzz/failures)

Every profile: no deadline (onnxruntime session start-up varies on a loaded machine) and no too_slow
health check. `pytest tests/fuzz --hypothesis-show-statistics` shows what was covered.
"""
from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, settings

TOTAL = {"ci": 2000, "dev": 100, "long": 20000}
# share of the total per test (test_fuzz_onnx.py); the shares add up to 1
SHARES = {"single": 0.5, "multi": 0.5}

PROFILE = os.environ.get("BNFOLD_FUZZ_PROFILE", "ci").strip() or "ci"
if PROFILE not in TOTAL:
    raise ValueError(f"BNFOLD_FUZZ_PROFILE must be one of {sorted(TOTAL)}, not {PROFILE!r}")
_total = os.environ.get("BNFOLD_FUZZ_EXAMPLES", "").strip()
TOTAL_EXAMPLES = int(_total) if _total else TOTAL[PROFILE]

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, **_common)
settings.register_profile("dev", **_common)
settings.register_profile("long", **_common)


def fuzz_settings(share: str) -> settings:
    """The active profile with this test's share of the examples."""
    n = max(1, math.ceil(TOTAL_EXAMPLES * SHARES[share]))
    return settings(settings.get_profile(PROFILE), max_examples=n)


FAILURES = os.environ.get("BNFOLD_FUZZ_FAILURES") or os.path.join(os.path.dirname(__file__), "failures")
