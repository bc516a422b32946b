"""Hostile files, crafted to crash, exhaust, read outside their folder or run code: each is refused with
one error line and exit 2, nothing is written, nothing outside the model's folder is read, no code runs."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import random_bn

from .conftest import assert_one_line_error, bnfold, snapshot, strays

SECRET = b"SECRET-" * 62 + b"END!!!"  # 440 bytes: enough for the 432-byte weight a hostile model points at


def conv_bn(c: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    st = random_bn(rng, c)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (c, 3, 3, 3)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(st[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    n, varint = len(payload), bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        varint.append(b | (0x80 if n else 0))
        if not n:
            return bytes([(number << 3) | 2]) + bytes(varint) + payload


def nesting_bomb() -> bytes:
    """ModelProto.graph -> node -> attribute -> g -> node -> ... 3,000 levels deep (a parser that recursed
    without a limit would overflow the C stack)."""
    inner = b""
    for _ in range(3000):
        inner = _field(6, _field(1, _field(5, inner)))  # AttributeProto.g, GraphProto.node, NodeProto.attribute
    return b"\x08\x08" + _field(7, _field(1, _field(5, inner)))


def length_bomb() -> bytes:
    """A graph field that declares 4 GiB and holds 100 bytes."""
    return b"\x08\x08" + bytes([(7 << 3) | 2]) + b"\xff\xff\xff\xff\x0f" + b"\0" * 100


def _external(m: onnx.ModelProto, location: str) -> onnx.ModelProto:
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "432")):
        e = t.external_data.add()
        e.key, e.value = k, v
    return m


def _dims_short() -> onnx.ModelProto:
    m = conv_bn()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:100]
    return m


def _dims_huge() -> onnx.ModelProto:
    m = conv_bn()
    m.graph.initializer[0].dims[:] = [1 << 20, 1 << 20, 1 << 20, 1 << 20]  # 2^80 elements claimed
    return m


def _big_short() -> onnx.ModelProto:
    """16 MB of weights 4 bytes short: too big to check at load (that would copy it), caught when read."""
    rng = np.random.default_rng(1)
    st = random_bn(rng, 1024)
    inits = [numpy_helper.from_array(rng.normal(0, .03, (1024, 4096)).astype(np.float32), "w")]
    inits += [numpy_helper.from_array(st[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    inits[0].raw_data = inits[0].raw_data[:-4]
    nodes = [helper.make_node("Gemm", ["x", "w"], ["c"], name="gemm", transB=1),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4096])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1024])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _typed_short() -> onnx.ModelProto:
    m = conv_bn()
    t = m.graph.initializer[1]  # gamma, as float_data with one value missing
    values = numpy_helper.to_array(t).tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values[:-1])
    return m


def _duplicate_initializer() -> onnx.ModelProto:
    m = conv_bn()
    m.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "gamma"))
    return m


def _duplicate_node() -> onnx.ModelProto:
    m = conv_bn()
    m.graph.node[1].name = "conv"
    return m


def _cycle() -> onnx.ModelProto:
    m = conv_bn()
    m.graph.node[0].input[0] = "y"  # conv reads bn's output, bn reads conv's
    return m


HOSTILE_ONNX = {
    "nesting-bomb": (nesting_bomb, "cannot parse"),
    "length-bomb": (length_bomb, "cannot parse"),
    "dims-disagree-with-data": (_dims_short, "declares dims"),
    "dims-claim-2^80-elements": (_dims_huge, "declares dims"),
    "typed-data-short": (_typed_short, "declares dims"),
    "big-tensor-short": (_big_short, "declares dims"),
    "duplicate-initializer-names": (_duplicate_initializer, "'gamma'"),
    "duplicate-node-names": (_duplicate_node, "conv"),
    "cycle": (_cycle, "topologically sorted"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ONNX))
def test_hostile_onnx_is_refused_and_nothing_is_written(case, tmp_path):
    make, words = HOSTILE_ONNX[case]
    path = tmp_path / "m.onnx"
    made = make()
    path.write_bytes(made if isinstance(made, bytes) else made.SerializeToString())
    before = snapshot(tmp_path)
    r = bnfold(path, timeout=120)
    assert_one_line_error(r, path, words)
    assert snapshot(tmp_path) == before


def _untouched_since(secret: Path) -> float | None:
    """Give `secret` an old access time; None where this file system does not record reads."""
    old = time.time() - 3 * 86400
    st = secret.stat()
    os.utime(secret, (old, st.st_mtime))
    secret.read_bytes()
    if secret.stat().st_atime <= old + 1:
        return None
    os.utime(secret, (old, st.st_mtime))
    return old


@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink", "symlinked-folder"])
def test_external_data_outside_the_model_folder_is_never_read(how, tmp_path):
    """The location points at a file outside the model's folder that would fit the weight exactly: were
    it read, the fold would succeed with its bytes as weights."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    folder = tmp_path / "deep" / "down" / "model"
    folder.mkdir(parents=True)
    location = {"dot-dot": "../../../secret.bin", "absolute": str(secret), "symlink": "weights.bin",
                "symlinked-folder": "sub/secret.bin"}[how]
    if how == "symlink":
        (folder / "weights.bin").symlink_to(secret)
    if how == "symlinked-folder":
        (folder / "sub").symlink_to(tmp_path)
    path = folder / "m.onnx"
    onnx.save(_external(conv_bn(), location), str(path))
    before = snapshot(tmp_path)
    old = _untouched_since(secret)  # after the snapshot, which reads it
    r = bnfold(path, "--json", timeout=120)
    if old is not None:
        assert secret.stat().st_atime <= old + 1, "the file outside the model's folder was read"
    assert_one_line_error(r, path, "outside the model's folder")
    assert json.loads(r.stdout)["error"]["code"] == 2
    assert snapshot(tmp_path) == before


def test_external_data_to_etc_passwd(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_external(conv_bn(), "../" * 40 + "etc/passwd"), str(path))
    r = bnfold(path, timeout=120)
    assert_one_line_error(r, path, "outside the model's folder")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


# -- PyTorch ------------------------------------------------------------------------------------------

def test_hostile_torch_files_run_no_code_without_trust(early):
    """One batch run over every hostile PyTorch file, started with the session (early.py: hostile_torch):
    each refused with its own error, no code from any file ran, nothing written."""
    got = early.get("torch-hostile")
    r = got["run"]
    assert got["live"].exists(), "the payloads do not run under torch.export.load: this test proves nothing"
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = {e["path"]: e["message"] for e in json.loads(r.stdout)["errors"]}
    for case, (path, words) in got["cases"].items():
        assert words in errors.get(str(path), ""), (case, errors)
    assert not got["marker"].exists(), "code from a hostile file ran"
    assert snapshot(got["folder"]) == got["before"] and not got["out"].exists()


# -- Keras --------------------------------------------------------------------------------------------

def test_keras_archive_with_members_outside_it(early):
    """Started with the session (early.py: hostile_keras)."""
    got = early.get("keras-hostile")
    r = got["run"]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = {e["path"]: e["message"] for e in json.loads(r.stdout)["errors"]}
    for path, words in got["bad"].items():
        assert "outside the archive" in errors[str(path)] and words in errors[str(path)], errors
    assert snapshot(got["root"]) == got["before"] and strays(got["root"]) == []
    assert not Path("/tmp/evil.txt").exists() and not (got["root"].parent / "evil.txt").exists()
