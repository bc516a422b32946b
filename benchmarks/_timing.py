"""Whole-process timing shared by the benchmarks: one child interpreter per run, its wall time, CPU time
(user + sys) and its own peak RSS.

The peak is the child's own high-water mark (VmHWM), read from /proc as it exits. getrusage/wait4's
ru_maxrss is not usable here: Linux carries the forking parent's resident size into the child's maxrss
across fork + exec, so a child of a parent that once held a big model reported that size instead.

The scripts run as `python benchmarks/SCRIPT.py`, so benchmarks/ is on sys.path and they import this
module as `_timing`.
"""
from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# The child: write its own VmHWM to argv[1] at exit, then run `-m module ...` or `-c code ...`.
_PEAK = """
import atexit, runpy, sys
out = sys.argv.pop(1)
def _peak():
    with open('/proc/self/status') as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith('VmHWM:'))
    with open(out, 'w') as f:
        f.write(str(kib))
atexit.register(_peak)
if sys.argv[1] == '-m':
    sys.argv = [sys.argv[2]] + sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
    code = sys.argv[2]
    sys.argv = ['-c'] + sys.argv[3:]
    exec(compile(code, '<bench>', 'exec'), {'__name__': '__main__'})
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")  # this checkout's bnfold
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # users run from cached bytecode; so do the children
    return env


@dataclass
class Run:
    wall: float  # seconds
    cpu: float  # seconds, user + sys of the child
    peak_mib: float  # the child's VmHWM
    ok: bool
    out: str = ""  # stdout when it succeeded, the tail of stderr when it failed


def run(args: list[str], timeout: float | None = None) -> Run:
    """One child of this interpreter: `args` is [-m, module, ...] or [-c, code, ...]."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        try:
            p = subprocess.run([PY, "-c", _PEAK, peak.name, *args], cwd=ROOT, env=child_env(), capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Run(time.perf_counter() - t, float("nan"), float("nan"), False, "timed out")
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        kib = int(peak.read() or 0)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = (p.stdout if p.returncode == 0 else p.stderr.strip()[-2000:])
    return Run(wall, cpu, kib / 1024, p.returncode == 0, tail)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
