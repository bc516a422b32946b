"""PyTorch and Keras runs that need nothing from the test that checks them, started with the session on
one background thread: each starts its framework (seconds) on the second core while the ONNX tests run
on the first, and its test only checks the outcome. Nothing here imports torch or keras."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from tests.conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": ROOT, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
CLI = [sys.executable, "-m", "bnfold"]


class Early:
    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="early")
        self.jobs: dict[str, Future] = {}

    def submit(self, name: str, fn: Callable[..., Any], *args: Any) -> None:
        self.jobs[name] = self.pool.submit(fn, *args)

    def get(self, name: str, timeout: float = 900) -> Any:
        return self.jobs[name].result(timeout=timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# -- the two framework models ---------------------------------------------------------------------------

BUILD_PT2 = r"""
import sys, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.ReLU(),
                        torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024))
m.train()
with torch.no_grad():
    for _ in range(4):
        m(torch.randn(64, 256) * 3 + 1)  # statistics far from the defaults
m.eval()
torch.export.save(torch.export.export(m, (torch.randn(2, 256),)), sys.argv[1])
if len(sys.argv) > 2:  # the control of the hostile-file test: torch.export.load runs these payloads
    from pathlib import Path
    from tests.reliability.early import hostile_pt2
    folder = Path(sys.argv[2])
    folder.mkdir()
    for case, (path, _) in hostile_pt2(Path(sys.argv[1]), folder, Path(sys.argv[3])).items():
        if case.startswith("pickled"):
            try:
                torch.export.load(str(path))
            except Exception:
                pass  # the payload returns None where a tensor belongs
"""

BUILD_KERAS = r"""
import sys, numpy as np, keras
from tests.conftest import random_bn
rng = np.random.default_rng(5)
x = keras.Input((256,))
y = keras.layers.BatchNormalization()(keras.layers.Dense(1024)(x))
y = keras.layers.BatchNormalization()(keras.layers.Dense(512)(keras.layers.ReLU()(y)))
m = keras.Model(x, y)
for layer in m.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        st = random_bn(rng, layer.gamma.shape[0])
        layer.set_weights([st[k].astype("float32") for k in ("gamma", "beta", "mean", "var")])
m.save(sys.argv[1])
"""


def build(code: str, path: Path, *more: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", code, str(path), *map(str, more)], env=ENV, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and path.is_file(), r.stderr[-3000:]
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones too): file -> sha256, link -> its target."""
    import hashlib
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def inputs_of(folder: Path) -> dict[str, str]:
    """The model files in `folder`: everything but outputs and hidden (temporary) names."""
    return {k: v for k, v in snapshot(folder).items() if ".folded." not in k and not k.startswith(".")}


def copy_model(src: Path, folder: Path) -> Path:
    """`src` and its sidecar files (not its fold) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        if ".folded." not in f.name:
            shutil.copy2(f, folder / f.name)
    return folder / src.name


# -- a run killed in the middle of its save -----------------------------------------------------------
# The child SIGKILLs itself at a chosen point of its save: on the `nth` opening of one of bnfold's
# temporary files (a Python audit event, before that open happens), or `delay` seconds later from a timer
# thread. The child picks its own moment, so no scheduling of the test process can make it early or late.

KILLER = r"""
import os, runpy, signal, sys, threading
nth, delay, what = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
seen = 0
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def hook(event, args):
    global seen
    if event == "open" and args and not isinstance(args[0], int) and ".bnfold-tmp-" in os.fspath(args[0]):
        seen += 1
        if seen == nth:
            die() if delay == 0 else threading.Timer(delay, die).start()
sys.addaudithook(hook)
if what == "-m":
    sys.argv = ["bnfold", *sys.argv[4:]]
    runpy.run_module("bnfold", run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *sys.argv[4:]]
    exec(compile(what, "<script>", "exec"))
"""


def killed_run(nth: int, delay: float, *args: Any, script: str | None = None) -> int:
    """The exit status of a run killed at the `nth` temporary-file opening (+ `delay` s): -9, or 0 when it
    finished before the timer fired (or opened fewer temporary files)."""
    r = subprocess.run([sys.executable, "-c", KILLER, str(nth), str(delay), script or "-m", *map(str, args)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, -signal.SIGKILL), (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.returncode


def killed_mid_save(model: Future, folder: Path) -> tuple[int, Path, dict[str, str]]:
    """A .pt2 or .keras run killed as it writes: bnfold's temporary output is opened 1st, the saver's own
    temporary file 2nd, and the 3rd opening writes into it."""
    src = copy_model(model.result(), folder)
    inputs = inputs_of(folder)
    return killed_run(3, 0.0, "-q", src), src, inputs


def disk_full(model: Future, folder: Path) -> tuple[subprocess.CompletedProcess, Path, dict[str, str]]:
    src = copy_model(model.result(), folder)
    inputs = inputs_of(folder)
    r = subprocess.run([*CLI, "-q", str(src)], env=ENV, capture_output=True, text=True, timeout=300,
                       preexec_fn=file_size_limit(1 << 20))
    return r, src, inputs


def file_size_limit(nbytes: int) -> Callable[[], None]:
    """preexec_fn: no file may grow past `nbytes` (a full disk); SIGXFSZ ignored so the write fails EFBIG."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


# -- hostile PyTorch and Keras files ----------------------------------------------------------------------

class Payload:
    """Unpickling this makes a folder: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def rewrite_zip(src: Path, dst: Path, change=lambda name, data: data, extra: dict | None = None) -> Path:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            out.writestr(info.filename, change(info.filename, z.read(info.filename)))
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return dst


def hostile_pt2(src: Path, folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """.pt2 files that run code when torch.export.load opens them, or name members outside the archive;
    each with the words its refusal must say."""
    evil = pickle.dumps(Payload(marker), protocol=2)
    root = zipfile.ZipFile(src).namelist()[0].split("/")[0]
    weights = f"{root}/data/weights/"
    config = json.loads(zipfile.ZipFile(src).read(weights + "model_weights_config.json"))
    first = next(iter(config["config"].values()))

    def pickled_weight(name: str, data: bytes) -> bytes:
        if name == weights + "model_weights_config.json":
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["use_pickle"] = True
            return json.dumps(cfg).encode()
        return evil if name == weights + first["path_name"] else data

    return {
        "pickled-weight": (rewrite_zip(src, folder / "pickled_weight.pt2", pickled_weight), "pickled objects"),
        "pickled-sample-inputs": (rewrite_zip(src, folder / "sample_inputs.pt2", lambda n, d: evil if
                                              n.startswith(f"{root}/data/sample_inputs/") else d),
                                  "pickled objects"),
        "member-outside": (rewrite_zip(src, folder / "traversal.pt2", extra={"../../evil.sh": b"echo"}),
                           "outside the archive"),
        "member-absolute": (rewrite_zip(src, folder / "absolute.pt2", extra={"/tmp/evil.sh": b"echo"}),
                            "outside the archive"),
        "aotinductor-library": (rewrite_zip(src, folder / "aoti.pt2", extra={
            f"{root}/data/aotinductor/model/model.so": b"\x7fELF", f"{root}/data/aotinductor/model/m.cpp": b""}),
            "AOTInductor"),
    }


def hostile_torch(model: Future, root: Path, live: Path) -> dict[str, Any]:
    """One batch run over every hostile PyTorch file (PyTorch starts once). `live` is the control's
    marker: the build made the same files with it and opened them with torch.export.load."""
    folder = root / "models"
    folder.mkdir(parents=True)
    marker = root / "PWNED"
    cases = hostile_pt2(model.result(), folder, marker)
    (folder / "pickled_module.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    cases["pickled-file"] = (folder / "pickled_module.pt", "pass --trust")
    before = snapshot(folder)
    r = subprocess.run([*CLI, "--keep-going", "--json", "-q", str(folder), "-o", str(root / "out")], env=ENV,
                       capture_output=True, text=True, timeout=300)
    return {"run": r, "cases": cases, "marker": marker, "live": live, "before": before, "folder": folder,
            "out": root / "out"}


def hostile_keras(model: Future, root: Path) -> dict[str, Any]:
    folder = root / "models"
    folder.mkdir(parents=True)
    src = model.result()
    bad = {rewrite_zip(src, folder / "dotdot.keras", extra={"../../evil.txt": b"x"}): "'../../evil.txt'",
           rewrite_zip(src, folder / "absolute.keras", extra={"/tmp/evil.txt": b"x"}): "'/tmp/evil.txt'"}
    before = snapshot(root)
    r = subprocess.run([*CLI, "--keep-going", "--json", "-q", str(folder), "-o", str(root / "out")], env=ENV,
                       capture_output=True, text=True, timeout=300)
    return {"run": r, "bad": bad, "before": before, "root": root}


def start_all(early: Early, root: Path) -> None:
    """Builds first, then what depends on them, in the order the tests need them."""
    live = root / "LIVE"
    early.submit("pt2", build, BUILD_PT2, root / "pt2" / "model.pt2", root / "control", live)
    early.submit("pt2-disk-full", disk_full, early.jobs["pt2"], root / "pt2-disk-full")
    early.submit("pt2-killed", killed_mid_save, early.jobs["pt2"], root / "pt2-killed")
    early.submit("keras", build, BUILD_KERAS, root / "keras" / "model.keras")
    early.submit("keras-killed", killed_mid_save, early.jobs["keras"], root / "keras-killed")
    early.submit("torch-hostile", hostile_torch, early.jobs["pt2"], root / "torch-hostile", live)
    early.submit("keras-hostile", hostile_keras, early.jobs["keras"], root / "keras-hostile")
