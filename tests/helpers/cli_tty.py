"""Run the CLI in a child process with stderr on a terminal: bnfold shows progress only there."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def run_with_tty_stderr(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`python -m bnfold ARGS` (this checkout's bnfold) with stderr on a pseudo-terminal and stdout on a
    pipe; `env` is laid over the environment. Returns (exit code, stdout, what the terminal got)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "bnfold", *args], stdout=subprocess.PIPE, stderr=slave,
                         env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 4096)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    out = p.stdout.read().decode()
    p.wait()
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")
