"""Real files and the real `bnfold` command in subprocesses: models to fold, and checks that a run ended
either well or in one clear line, with nothing partial or temporary left on disk."""
from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.conftest import random_bn

from .early import (CLI, ENV, Early, copy_model, file_size_limit, inputs_of, killed_run,  # noqa: F401 - shared
                    snapshot, start_all)

# TensorFlow's C++ start-up lines, printed before any Python runs: not bnfold's output
_TF_NOISE = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ", "To enable the following")


def bnfold(*args, cwd=None, preexec_fn=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=ENV,
                          preexec_fn=preexec_fn, timeout=timeout)


def start(*args, cwd=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, env=ENV, text=True, **kw)


def error_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's start-up lines and Python warnings (a library's deprecation notice)."""
    out, warning = [], False
    for ln in stderr.splitlines():
        if warning and ln.startswith("  "):  # the source line a warning quotes
            continue
        warning = "Warning: " in ln and not ln.startswith("bnfold:")
        if ln.strip() and not warning and not ln.startswith(_TF_NOISE):
            out.append(ln)
    return out


def assert_one_line_error(r: subprocess.CompletedProcess, path: str | Path, *words: str) -> str:
    """Exit 2, no traceback, and exactly one error line that names `path` (and says `words`)."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [ln for ln in error_lines(r.stderr) if ln.startswith("bnfold: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    if not any(ln.startswith("bnfold: [") for ln in error_lines(r.stderr)):  # a single model: nothing else
        assert error_lines(r.stderr) == errors, r.stderr[-3000:]
    line = errors[0]
    assert str(path) in line, (str(path), line)
    for w in words:
        assert w in line, (w, line)
    return line


def strays(folder: Path) -> list[str]:
    """Temporary leftovers: anything hidden (bnfold's temporary names all start with a dot)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*"))


def without_dac_override() -> None:
    """preexec_fn: as root, drop the capabilities that ignore file modes, so a read-only folder is one."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            os._exit(97)


# -- models ---------------------------------------------------------------------------------------

def mlp_onnx(seed: int, width: int = 1024, layers: int = 2) -> onnx.ModelProto:
    """MatMul -> BatchNormalization -> Relu, `layers` times: 5 MB of weights, so a save takes a while."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, c = [], [], "x", 256
    for i in range(layers):
        w = f"w{i}"
        inits.append(numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(c), (c, width)).astype(np.float32), w))
        st = random_bn(rng, width)
        names = [f"bn{i}_{k}" for k in ("gamma", "beta", "mean", "var")]
        inits += [numpy_helper.from_array(st[k].astype(np.float32), n)
                  for k, n in zip(("gamma", "beta", "mean", "var"), names)]
        nodes.append(helper.make_node("MatMul", [x, w], [f"mm{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("BatchNormalization", [f"mm{i}", *names], [f"bn{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"bn{i}"], [f"r{i}"], name=f"relu{i}"))
        x, c = f"r{i}", width
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 256])],
                          [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [2, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bnfold-tests")
    m.ir_version = 8
    return m


def save_onnx(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory) -> dict[str, Path]:
    """Two different big ONNX models (inline and with external data), and their folds by a clean run.
    Each sits alone in its folder as `model.onnx`: a fold's bytes depend on its input only."""
    root = tmp_path_factory.mktemp("onnx_models")
    out: dict[str, Path] = {}
    for key, seed, external in (("a", 1, False), ("b", 2, False), ("ext", 3, True)):
        src = save_onnx(mlp_onnx(seed), root / key / "model.onnx", external)
        r = bnfold("-q", src)
        assert r.returncode == 0, r.stderr
        out[key] = src
    return out


def folded_bytes(src: Path) -> bytes:
    return src.with_name(f"{src.stem}.folded{src.suffix}").read_bytes()


@pytest.fixture(scope="session", autouse=True)
def early(tmp_path_factory) -> Early:
    """The PyTorch and Keras runs, started with the session on a background thread (see early.py)."""
    e = Early()
    start_all(e, tmp_path_factory.mktemp("early"))
    yield e
    e.close()


@pytest.fixture
def pt2_model(early) -> Path:
    """A torch.export program: Linear -> BatchNorm1d twice (statistics calibrated in train mode), 5 MB."""
    return early.get("pt2")


@pytest.fixture
def keras_model(early) -> Path:
    """A functional Keras model: Dense -> BatchNormalization twice (random statistics), 3 MB."""
    return early.get("keras")
