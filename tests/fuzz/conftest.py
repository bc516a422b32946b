"""Fuzz-test setup: puts tests/fuzz on sys.path (strategies_onnx, oracle_onnx, fuzz_config) and registers
the hypothesis settings profiles ci / dev / long, chosen by BNFOLD_FUZZ_PROFILE (default ci), with
BNFOLD_FUZZ_EXAMPLES overriding the total number of ONNX examples -- see fuzz_config.py.

tests/fuzz is a package, so this module is `fuzz.conftest` and never shadows tests/conftest.py
(`from conftest import random_bn` in the other tests).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

try:
    import fuzz_config  # noqa: F401 - registers the profiles
except ImportError:  # hypothesis not installed: test_fuzz_onnx.py skips itself, the regressions still run
    pass
