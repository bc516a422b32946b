"""The package as it was at an earlier commit, extracted from git, to hold today's code to its verdicts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def extract(commit: str, dest: Path) -> Path:
    """`bnfold/` at `commit` under dest; a test that needs it fails where git or the commit is not at hand (a
    shallow clone): its verdicts are held to that code, and nothing else can stand in for it."""
    try:
        blob = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit, "bnfold"],
                              capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pytest.fail(f"commit {commit} is not in this checkout's history (a shallow clone? these tests compare "
                    "with the package at that commit: clone the whole history)")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(dest, filter="data")
    return dest


def run_json(tree: Path, script: str, arg: object, timeout: float = 120) -> object:
    """Run `script` (reads json from argv[1], prints json) with the package at `tree` on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=str(tree))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
