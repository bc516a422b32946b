"""Adversarial tests of the load, fold, sweep, mark and count speed-ups since 7ce0cad, each held to what the
code said before them (the package at OLD, extracted from git into a temporary folder: these tests need
that commit in the checkout's history, as a full clone has it):

- load: the size check's fast path and its first walk (which now also says whether a tensor lives in a data
  file) refuse every corrupt tensor the former check refused, in the file and in data files;
- fold: the batch's byte-slice writes and its BN unlink give the same bytes and reports as the ordinary path
  on graphs where names are shared, and the folded models compute what the originals do;
- sweep: the one-loop settling of released names leaves the graph the plain walk over them leaves;
- marks: the digest computed in a thread from the load on names exactly the source's bytes;
- counts: anatomy() and readable_names() say what they said at OLD.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import bnfold
from bnfold.core.hold import holding, noted
from bnfold.onnx import sweep as sweep_mod
from bnfold.onnx.io import load_onnx
from bnfold.onnx.validity import INITIALIZER_ELEMENTS
from tests.conftest import random_bn
from tests.helpers import corrupt_models as cm
from tests.helpers.batch_check import same_either_way, taken
from tests.helpers.old_code import ROOT, extract, run_json
from tests.helpers.sweep_reference import walk_only
from tests.helpers.onnx_build import G, count_ops, run_ort

OLD = "7ce0cad"
T = onnx.TensorProto


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory) -> Path:
    return extract(OLD, tmp_path_factory.mktemp("old"))


# -- load: the size check --------------------------------------------------------------------------

def _tensor(name: str, dt: int, dims, raw: bytes | None = None, **fields) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dt, dims=list(dims))
    if raw is not None:
        t.raw_data = raw
    for k, v in fields.items():
        getattr(t, k).extend(v)
    return t


def _ext(name: str, location: str | None, dims=(2, 3), dt: int = T.FLOAT, offset: int = 0,
         length: int | None = None, raw: bytes | None = None) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dt, dims=list(dims))
    t.data_location = T.EXTERNAL
    if location is not None:
        t.external_data.add(key="location", value=location)
    if offset:
        t.external_data.add(key="offset", value=str(offset))
    if length is not None:
        t.external_data.add(key="length", value=str(length))
    if raw is not None:
        t.raw_data = raw
    return t


F24 = np.arange(6, dtype=np.float32).tobytes()  # 2x3 float32


def _in_graph(t: onnx.TensorProto):
    def put(m, folder):
        m.graph.initializer.append(t)
    return put


def _in_constant(t: onnx.TensorProto):
    def put(m, folder):
        m.graph.node.insert(0, helper.make_node("Constant", [], ["k_unused"], name="k", value=t))
    return put


def _in_body(t: onnx.TensorProto, as_init: bool):
    def put(m, folder):
        if as_init:
            cm._with_if(m, [], [t])
        else:
            cm._with_if(m, [helper.make_node("Constant", [], ["k_body"], name="kb", value=t)])
    return put


def _in_function_default(t: onnx.TensorProto):
    def put(m, folder):
        fn = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                  [helper.make_opsetid("", 17)])
        a = helper.make_attribute("extra", t)
        fn.attribute_proto.append(a)
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        m.graph.node[2].op_type, m.graph.node[2].domain = "F", "local"
    return put


def _sparse(values: onnx.TensorProto, n: int = 3):
    def put(m, folder):
        sp = helper.make_sparse_tensor(values, numpy_helper.from_array(np.arange(n, dtype=np.int64), ""), [9])
        m.graph.sparse_initializer.append(sp)
    return put


def _with_data(data: bytes, *puts, name: str = "data.bin"):
    def put(m, folder):
        (folder / name).write_bytes(data)
        for p in puts:
            p(m, folder)
    return put


def _bn_gamma_external(data: bytes, length: int | None = None):
    """The BN's gamma (6 floats) moved to a data file."""
    def put(m, folder):
        (folder / "g.bin").write_bytes(data)
        g = next(t for t in m.graph.initializer if t.name == "bn_gamma")
        g.ClearField("raw_data")
        g.ClearField("float_data")
        g.data_location = T.EXTERNAL
        g.external_data.add(key="location", value="g.bin")
        if length is not None:
            g.external_data.add(key="length", value=str(length))
    return put


def _short_in_file(m, folder):
    t = next(t for t in m.graph.initializer if t.name == "bn_var")
    t.raw_data = t.raw_data[:-4]


def _private_key(m, folder):
    (folder / "data.bin").write_bytes(F24)
    t = _ext("pk", "data.bin")
    t.external_data.add(key="bnfold.stamp", value="bogus")
    m.graph.initializer.append(t)


G6 = np.linspace(0.5, 2, 6, dtype=np.float32).tobytes()

LOAD_CASES = {
    # raw data in the file
    "raw_exact": _in_graph(_tensor("t", T.FLOAT, [2, 3], F24)),
    "raw_short": _in_graph(_tensor("t", T.FLOAT, [2, 3], F24[:-1])),
    "raw_long": _in_graph(_tensor("t", T.FLOAT, [2, 3], F24 + b"\0")),
    "raw_empty_scalar": _in_graph(_tensor("t", T.FLOAT, [], b"")),
    "raw_scalar": _in_graph(_tensor("t", T.FLOAT, [], F24[:4])),
    "negative_dim": _in_graph(_tensor("t", T.FLOAT, [-2, 3], F24)),
    "two_negative_dims_fill": _in_graph(_tensor("t", T.FLOAT, [-2, -3], F24)),  # |prod| * 4 == 24 bytes
    "two_negative_dims_values": _in_graph(_tensor("t", T.FLOAT, [-2, -3], float_data=[1.0] * 6)),
    "zero_dim_float_data": _in_graph(_tensor("t", T.FLOAT, [0, 3], float_data=[1.0, 2.0])),
    "zero_dim_raw": _in_graph(_tensor("t", T.FLOAT, [0, 3], b"\0" * 4)),
    "zero_dim_empty": _in_graph(_tensor("t", T.FLOAT, [0, 3], b"")),
    "int4_exact": _in_graph(_tensor("t", T.INT4, [5], b"\x11\x22\x03")),
    "int4_short": _in_graph(_tensor("t", T.INT4, [5], b"\x11\x22")),
    "int4_long": _in_graph(_tensor("t", T.INT4, [5], b"\x11\x22\x03\x00")),
    "int4_values_short": _in_graph(_tensor("t", T.INT4, [5], int32_data=[1, 2])),
    "uint4_exact_even": _in_graph(_tensor("t", T.UINT4, [4], b"\x11\x22")),
    "unknown_dtype_raw": _in_graph(_tensor("t", 99, [2, 3], F24)),
    "unknown_dtype_empty": _in_graph(_tensor("t", 99, [2, 3])),
    "undefined_dtype_raw": _in_graph(_tensor("t", T.UNDEFINED, [2, 3], F24)),
    "string_ok": _in_graph(_tensor("t", T.STRING, [2], string_data=[b"a", b"b"])),
    "string_short": _in_graph(_tensor("t", T.STRING, [3], string_data=[b"a"])),
    "string_raw": _in_graph(_tensor("t", T.STRING, [2], b"xyz")),
    "raw_and_values_raw_ok": _in_graph(_tensor("t", T.FLOAT, [2, 3], F24, float_data=[1.0])),
    "raw_and_values_raw_short": _in_graph(_tensor("t", T.FLOAT, [2, 3], F24[:-4], float_data=[1.0] * 6)),
    "fp16_int32_data_short": _in_graph(_tensor("t", T.FLOAT16, [2, 3], int32_data=[1] * 5)),
    "complex64_float_data_ok": _in_graph(_tensor("t", T.COMPLEX64, [3], float_data=[1.0] * 6)),
    "complex64_float_data_short": _in_graph(_tensor("t", T.COMPLEX64, [3], float_data=[1.0] * 3)),
    "complex64_raw_short": _in_graph(_tensor("t", T.COMPLEX64, [3], F24[:-8])),
    "double_values_long": _in_graph(_tensor("t", T.DOUBLE, [2], double_data=[1.0] * 3)),
    "uint64_values_short": _in_graph(_tensor("t", T.UINT64, [2], uint64_data=[1])),
    "bf16_raw_short": _in_graph(_tensor("t", T.BFLOAT16, [3], b"\0" * 5)),
    "fp8_raw_long": _in_graph(_tensor("t", T.FLOAT8E4M3FN, [3], b"\0" * 4)),
    "huge_dims_raw": _in_graph(_tensor("t", T.FLOAT, [1 << 20, 1 << 10], F24)),
    "huge_dims_exactly_8mib_short": _in_graph(_tensor("t", T.FLOAT, [2 << 20], F24)),
    "just_over_8mib_short": _in_graph(_tensor("t", T.FLOAT, [(2 << 20) + 1], F24)),
    # elsewhere in the model
    "constant_short": _in_constant(_tensor("", T.FLOAT, [2, 3], F24[:-4])),
    "constant_two_negative_dims": _in_constant(_tensor("", T.FLOAT, [-2, -3], F24)),
    "constant_int4_short": _in_constant(_tensor("", T.INT4, [5], b"\x11")),
    "body_init_short": _in_body(_tensor("bi", T.FLOAT, [2, 3], F24[:-4]), as_init=True),
    "body_init_two_negative_dims": _in_body(_tensor("bi", T.FLOAT, [-2, -3], F24), as_init=True),
    "body_constant_long": _in_body(_tensor("", T.FLOAT, [2, 3], F24 + F24), as_init=False),
    "sparse_values_short": _sparse(_tensor("sv", T.FLOAT, [3], F24[:8])),
    "sparse_values_two_negative_dims": _sparse(_tensor("sv", T.FLOAT, [-1, -3], F24[:12])),
    "function_default_short": _in_function_default(_tensor("d", T.FLOAT, [2, 3], F24[:-4])),
    "function_default_two_negative_dims": _in_function_default(_tensor("d", T.FLOAT, [-2, -3], F24)),
    "function_default_unknown_dtype": _in_function_default(_tensor("d", 99, [2], b"\0" * 8)),
    # external data
    "ext_ok": _with_data(F24, _in_graph(_ext("e", "data.bin"))),
    "ext_no_location": _with_data(F24, _in_graph(_ext("e", None))),
    "ext_missing_file": _in_graph(_ext("e", "nothere.bin")),
    "ext_short_file": _with_data(F24[:-4], _in_graph(_ext("e", "data.bin"))),
    "ext_long_file": _with_data(F24 + F24, _in_graph(_ext("e", "data.bin"))),
    "ext_length_short": _with_data(F24, _in_graph(_ext("e", "data.bin", length=20))),
    "ext_offset_past_end": _with_data(F24, _in_graph(_ext("e", "data.bin", offset=400, length=24))),
    "ext_negative_dim": _with_data(F24, _in_graph(_ext("e", "data.bin", dims=(-2, 3)))),
    "ext_two_negative_dims": _with_data(F24, _in_graph(_ext("e", "data.bin", dims=(-2, -3)))),
    "ext_unknown_dtype": _with_data(F24, _in_graph(_ext("e", "data.bin", dt=99))),
    "ext_string": _with_data(F24, _in_graph(_ext("e", "data.bin", dt=T.STRING))),
    "ext_int4_short": _with_data(b"\x11", _in_graph(_ext("e", "data.bin", dims=(5,), dt=T.INT4))),
    "ext_with_raw_too": _with_data(F24, _in_graph(_ext("e", "data.bin", raw=F24[:-4]))),
    "ext_constant_short": _with_data(F24[:-4], _in_constant(_ext("", "data.bin"))),
    "ext_body_init_short": _with_data(F24[:-4], _in_body(_ext("bi", "data.bin"), as_init=True)),
    "ext_function_default_short": _with_data(F24[:-4], _in_function_default(_ext("d", "data.bin"))),
    "ext_private_key": _private_key,
    "bn_gamma_ext_ok": _bn_gamma_external(G6),
    "bn_gamma_ext_short": _bn_gamma_external(G6[:-4]),
    "bn_gamma_ext_long": _bn_gamma_external(G6 + G6),
    "bn_gamma_ext_length_short": _bn_gamma_external(G6, length=20),
    # mixed: a corrupt tensor in the file beside good external data, and the other way round
    "mixed_in_file_short_ext_ok": _with_data(F24, _in_graph(_ext("e", "data.bin")), _short_in_file),
    "mixed_in_file_two_negative_ext_ok": _with_data(F24, _in_graph(_ext("e", "data.bin")),
                                                    _in_graph(_tensor("t", T.FLOAT, [-2, -3], F24))),
    "mixed_in_file_huge_dims_ext_ok": _with_data(F24, _in_graph(_ext("e", "data.bin")),
                                                 _in_graph(_tensor("t", T.FLOAT, [4 << 20], F24))),
    "mixed_ext_short_constant_ok": _with_data(F24[:-4], _in_graph(_ext("e", "data.bin")),
                                              _in_constant(_tensor("", T.FLOAT, [2, 3], F24))),
}


def _write_load_cases(folder: Path) -> dict[str, str]:
    paths = {}
    for kind, put in LOAD_CASES.items():
        d = folder / kind
        d.mkdir()
        m = cm.base()
        put(m, d)
        p = d / "model.onnx"
        p.write_bytes(m.SerializeToString())
        paths[kind] = str(p)
    for kind in cm.KINDS:
        d = folder / f"cm_{kind}"
        d.mkdir()
        p = d / "model.onnx"
        p.write_bytes(cm.variant(kind).SerializeToString())
        paths[f"cm_{kind}"] = str(p)
    for kind in cm.EXTERNAL_KINDS:
        d = folder / f"cmx_{kind}" / "in"
        d.mkdir(parents=True)
        paths[f"cmx_{kind}"] = str(cm.external_variant(kind, d))
    return paths


_LOAD_SCRIPT = r"""
import json, sys
from bnfold.core.errors import BnfoldError
from bnfold.onnx.io import load_onnx
out = {}
for kind, path in json.loads(sys.argv[1]).items():
    for ext in (True, False):
        try:
            load_onnx(path, load_external=ext)
            v = "ok"
        except BnfoldError as e:
            v = "refused: " + str(e)
        except Exception as e:
            v = "crash: " + type(e).__name__ + ": " + str(e)[:200]
        out[kind + ("" if ext else "|lazy")] = v
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def load_verdicts(old_tree, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load_cases")
    paths = _write_load_cases(folder)
    before = {p: Path(p).read_bytes() for p in paths.values()}
    old = run_json(old_tree, _LOAD_SCRIPT, paths)
    new = run_json(ROOT, _LOAD_SCRIPT, paths)  # (the same script, on this checkout)
    assert {p: Path(p).read_bytes() for p in paths.values()} == before  # nothing rewritten
    return paths, old, new


def test_no_tensor_the_former_check_refused_is_accepted_now(load_verdicts):
    _, old, new = load_verdicts
    assert set(old) == set(new)
    loosened = {k: old[k] for k in old if old[k].startswith("refused") and not new[k].startswith("refused")}
    assert not loosened, loosened
    crashes = {k: v for k, v in new.items() if v.startswith("crash")}
    assert not crashes, crashes


def test_the_cases_really_tell_good_from_corrupt(load_verdicts):
    """(a harness that refused or accepted everything would prove nothing)"""
    _, old, new = load_verdicts
    for k in ("raw_exact", "raw_scalar", "int4_exact", "string_ok", "ext_ok", "bn_gamma_ext_ok",
              "raw_and_values_raw_ok", "complex64_float_data_ok", "cm_good", "cmx_constant_external_ok"):
        assert new[k] == "ok" == old[k], (k, new[k], old[k])
    for k in ("raw_short", "raw_long", "two_negative_dims_fill", "int4_short", "unknown_dtype_raw",
              "zero_dim_float_data", "function_default_two_negative_dims", "sparse_values_two_negative_dims",
              "mixed_in_file_two_negative_ext_ok", "body_init_two_negative_dims"):
        assert new[k].startswith("refused"), (k, new[k])
        assert new[k + "|lazy"].startswith("refused"), (k, new[k + "|lazy"])


def test_what_was_accepted_before_and_is_refused_now_is_only_stricter_bounds(load_verdicts):
    """The first walk bounds in-file tensors by the file's size even when the model has data files: the
    only verdicts that may go from accepted to refused are such dims."""
    _, old, new = load_verdicts
    tightened = {k for k in old if old[k] == "ok" and new[k].startswith("refused")}
    assert "mixed_in_file_huge_dims_ext_ok" in tightened  # (16 MiB of dims, 24 bytes of raw data, in the file)
    for k in tightened:
        assert "more than the whole file holds" in new[k], (k, new[k])


def test_the_command_line_refuses_what_the_fast_path_must_not_let_through(load_verdicts, tmp_path):
    """One line naming the file, exit 2, nothing written: two negative dims whose product fills the raw
    data exactly (the fast path's arithmetic alone would take it), beside good external data."""
    from tests.reliability.conftest import assert_one_line_error, snapshot
    from tests.reliability.conftest import bnfold as cli
    paths, _, _ = load_verdicts
    for kind, words in (("mixed_in_file_two_negative_ext_ok", "negative dimension"),
                        ("bn_gamma_ext_short", "")):
        src = Path(paths[kind])
        folder = tmp_path / kind
        folder.mkdir()
        for f in src.parent.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        before = snapshot(folder)
        r = cli(folder / "model.onnx", "--no-verify", timeout=120)
        assert_one_line_error(r, folder / "model.onnx", *([words] if words else []))
        assert snapshot(folder) == before


# -- fold: the batch's byte slices and unlink, on graphs that share names --------------------------

def _vi(name: str, elem: int = T.FLOAT, shape=(4,)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(shape))


FULL = (1, 4, 5, 5)


def _random_chain(seed: int) -> tuple[onnx.ModelProto, list[str]]:
    """Conv->BN pairs (and BN->BN, Conv->BN->Conv->BN) on 4 channels whose names are shared every way a
    graph may share them; the second value lists the features drawn (for failure messages)."""
    r = np.random.default_rng(seed)
    g = G(r)
    feats: list[str] = []
    outputs: list[tuple[str, int, tuple]] = []
    ir = int(r.choice([3, 4, 8]))
    names = ["", "dup", None]
    weights: list[str] = []
    bns: list[dict[str, str]] = []
    biases: list[str] = []
    param_inputs: list[str] = []
    x = "x"

    def name_of(default: str) -> str:
        pick = names[int(r.integers(3))]
        return default if pick is None else pick

    for i in range(int(r.integers(3, 7))):
        if r.random() < 0.2:  # a BN with no conv before it: folds backward into the conv after it, if alone
            x = g.bn(f"pre{i}", x, 4, eps=1e-3)
            feats.append(f"{i}:a BN before the conv")
            if r.random() < 0.3:
                x = g.node("Relu", [x], [f"r{i}"], name=name_of(f"relu{i}"))
        k = int(r.choice([1, 3]))
        if weights and r.random() < 0.3:
            w = weights[int(r.integers(len(weights)))]
            k = 1 if "_k1" in w else 3
            feats.append(f"{i}:shared weight")
        else:
            w = g.weight(f"w{i}_k{k}", (4, 4, k, k))
            weights.append(w)
        ins = [x, w]
        if r.random() < 0.6:
            if bns and r.random() < 0.12:
                b = bns[int(r.integers(len(bns)))][str(r.choice(["gamma", "beta", "mean"]))]
                feats.append(f"{i}:bias is an earlier BN's parameter")
            elif biases and r.random() < 0.3:
                b = biases[int(r.integers(len(biases)))]
                feats.append(f"{i}:shared bias")
            else:
                b = g.init(f"b{i}", r.normal(0, 1, 4))
                biases.append(b)
                if r.random() < 0.3:
                    g.node("Add", [b, b], [f"bsum{i}"], name=name_of(f"add{i}"))
                    outputs.append((f"bsum{i}", T.FLOAT, (4,)))
                    feats.append(f"{i}:bias read elsewhere")
            ins.append(b)
        x = y = g.node("Conv", ins, [f"c{i}"], name=name_of(f"conv{i}"), pads=[k // 2] * 4)
        if r.random() < 0.15:
            outputs.append((y, T.FLOAT, FULL))
            feats.append(f"{i}:conv output is a graph output")
        if r.random() < 0.2:
            g.node("Shape", [y], [f"shape{i}"], name=name_of(f"shape{i}"))
            outputs.append((f"shape{i}", T.INT64, (4,)))
            feats.append(f"{i}:shape reader")
        for j in range(1 + int(r.random() < 0.25)):  # BN, or BN->BN
            st = random_bn(r, 4)
            if bns and r.random() < 0.35:
                prev = bns[int(r.integers(len(bns)))]
                p = dict(prev)
                p.update({kk: g.init(f"bn{i}_{j}_{kk}", st[kk]) for kk in ("beta", "mean")
                          if r.random() < 0.5})
                feats.append(f"{i}.{j}:params shared with an earlier BN")
            else:
                p = {kk: g.init(f"bn{i}_{j}_{kk}", st[kk]) for kk in ("gamma", "beta", "mean", "var")}
                if r.random() < 0.2:
                    p["mean"] = p["var"]
                    feats.append(f"{i}.{j}:mean is var")
                if len(ins) > 2 and r.random() < 0.15:
                    p[str(r.choice(["gamma", "beta", "mean"]))] = ins[2]
                    feats.append(f"{i}.{j}:a parameter is the conv's bias")
                if r.random() < 0.15:
                    # gamma made by a constant subgraph
                    c = g.node("Constant", [], [f"k{i}_{j}"], name=name_of(f"kc{i}_{j}"),
                               value=numpy_helper.from_array(np.float32(r.uniform(0.5, 2)), ""))
                    p["gamma"] = g.node("Mul", [p["gamma"], c], [f"gm{i}_{j}"], name=name_of(f"gm{i}_{j}"))
                    feats.append(f"{i}.{j}:gamma from a constant subgraph")
                if r.random() < 0.1:
                    g.node("If", ["cond"], [f"if{i}_{j}"], name=f"if{i}_{j}",
                           then_branch=helper.make_graph([helper.make_node("Identity", [p["beta"]], ["t"])], "t",
                                                         [], [_vi("t")]),
                           else_branch=helper.make_graph([helper.make_node("Identity", [p["var"]], ["e"])], "e",
                                                         [], [_vi("e")]))
                    outputs.append((f"if{i}_{j}", T.FLOAT, (4,)))
                    feats.append(f"{i}.{j}:params read by a body")
                if r.random() < 0.1:
                    param_inputs.append(p["beta"])
                    feats.append(f"{i}.{j}:beta is a graph input")
            if r.random() < 0.1:
                g.node("Mul", [p["gamma"], p["gamma"]], [f"gg{i}_{j}"], name=name_of(f"gg{i}_{j}"))
                outputs.append((f"gg{i}_{j}", T.FLOAT, (4,)))
                feats.append(f"{i}.{j}:gamma read by a Mul")
            bns.append(p)
            x = g.node("BatchNormalization", [x, p["gamma"], p["beta"], p["mean"], p["var"]], [f"n{i}_{j}"],
                       name=name_of(f"bn{i}_{j}"), epsilon=float(r.choice([1e-5, 1e-3])))
            if r.random() < 0.2:
                outputs.append((x, T.FLOAT, FULL))
                feats.append(f"{i}.{j}:BN output is a graph output")
    if any(n.op_type == "If" for n in g.nodes):
        g.init("cond", np.array(bool(r.integers(2))), dtype=np.bool_)
    outputs.append((x, T.FLOAT, FULL))
    seen: set[str] = set()
    outs = [_vi(n, e, sh) for n, e, sh in outputs if not (n in seen or seen.add(n))]
    ins = [_vi("x", T.FLOAT, FULL)]
    inits = list(g.inits)
    init_names = {t.name for t in inits}
    if ir == 3:
        ins += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
        feats.append("IR 3")
    else:
        ins += [helper.make_tensor_value_info(n, T.FLOAT, [4]) for n in dict.fromkeys(param_inputs) if n in init_names]
    graph = helper.make_graph(g.nodes, "chain", ins, outs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="bnfold-tests")
    m.ir_version = ir
    onnx.checker.check_model(m)
    return m, feats


def _runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy onnxruntime loads: node names made unique (names compute nothing)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, n in enumerate(m.graph.node):
        n.name = f"{n.name}#{i}"
    return m


def _agree(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    x = np.random.default_rng(3).normal(0, 1, (1, 4, 5, 5)).astype(np.float32)
    model, folded = _runnable(model), _runnable(folded)
    want = dict(zip([o.name for o in model.graph.output], run_ort(model, {"x": x})))
    have = dict(zip([o.name for o in folded.graph.output], run_ort(folded, {"x": x})))
    assert set(want) == set(have)
    for k, a in want.items():
        b = have[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(a).max())), err_msg=k)


SEEDS = range(150)


@pytest.mark.parametrize("standalone", ["keep", "affine"])
def test_random_shared_name_chains_fold_alike_with_the_batch_on_and_off(standalone, monkeypatch):
    n_taken = n_folded = 0
    for seed in SEEDS:
        model, feats = _random_chain(seed)
        try:
            folded = same_either_way(model, monkeypatch, standalone=standalone)
            _agree(model, folded)
        except AssertionError as e:
            raise AssertionError(f"seed {seed}, {feats}: {e}") from None
        n_taken += taken(model, monkeypatch)
        n_folded += sum(n.op_type == "BatchNormalization" for n in model.graph.node) - count_ops(
            folded, "BatchNormalization")
    assert n_taken > 300 and n_folded >= n_taken  # (the batch really took many of these folds)


def test_verified_folds_of_shared_name_chains_match_either_way(monkeypatch):
    """With verification the model is borrowed (the fold works on a copy): same bytes, same report."""
    for seed in range(6):
        model, feats = _random_chain(1000 + seed)
        model = _runnable(model)  # (onnxruntime refuses two nodes of one name)
        try:
            same_either_way(model, monkeypatch, verify=True)
        except AssertionError as e:
            raise AssertionError(f"seed {1000 + seed}, {feats}: {e}") from None


def test_two_bns_with_one_gamma_and_mean_is_var(monkeypatch):
    g = G(np.random.default_rng(5))
    st = random_bn(g.rng, 4)
    for k in ("gamma", "beta", "var"):
        g.init(f"p_{k}", st[k])
    x = "x"
    for i in range(3):
        w = g.weight(f"w{i}", (4, 4, 3, 3))
        y = g.node("Conv", [x, w, g.init(f"b{i}", g.rng.normal(0, 1, 4))], [f"c{i}"], name=f"conv{i}", pads=[1] * 4)
        x = g.node("BatchNormalization", [y, "p_gamma", "p_beta", "p_var", "p_var"], [f"n{i}"], name=f"bn{i}")
    model = g.model([("x", [1, 4, 5, 5])], [(x, [1, 4, 5, 5])])
    assert taken(model, monkeypatch) == 3
    folded = same_either_way(model, monkeypatch)
    assert count_ops(folded, "BatchNormalization") == 0
    assert not {"p_gamma", "p_beta", "p_var"} & {t.name for t in folded.graph.initializer}
    _agree(model, folded)


def test_convs_sharing_a_weight_and_a_bias_fold_into_copies(monkeypatch):
    g = G(np.random.default_rng(6))
    w = g.weight("w", (4, 4, 1, 1))
    b = g.init("b", g.rng.normal(0, 1, 4))
    x = "x"
    for i in range(3):
        y = g.node("Conv", [x, w, b], [f"c{i}"], name=f"conv{i}")
        x = g.bn(f"bn{i}", y, 4)
    model = g.model([("x", [1, 4, 5, 5])], [(x, [1, 4, 5, 5])])
    folded = same_either_way(model, monkeypatch)
    assert count_ops(folded, "BatchNormalization") == 0
    _agree(model, folded)


# -- sweep: the one-loop settling against the plain walk (tests/helpers/sweep_reference.py) -------

def _fold_bytes(model: onnx.ModelProto, **kw) -> tuple[bytes, str]:
    res = bnfold.fold(model, **{"verify": False, **kw})
    report = res.report.to_dict()
    report.pop("timing_s", None)
    return res.model.SerializeToString(), json.dumps(report, default=str, sort_keys=True)


def _const_chain_into_gamma(ir: int, output_at: str | None, body_reads: str | None) -> onnx.ModelProto:
    """Conv->BN whose gamma and beta come out of constant subgraphs (Constant -> Mul -> Abs, Constant ->
    Identity), a released value at `output_at` a graph output, `body_reads` read by an If's body, and (IR
    4) the BN's mean an overridable initializer."""
    g = G(np.random.default_rng(9))
    st = random_bn(g.rng, 4)
    w = g.weight("w", (4, 4, 3, 3))
    y = g.node("Conv", ["x", w], ["c"], name="conv", pads=[1] * 4)
    g.node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(st["gamma"].astype(np.float32), ""))
    g.init("two", np.full(4, 2.0))
    gm = g.node("Mul", ["k", "two"], ["gm"], name="gm")
    ga = g.node("Abs", [gm], ["ga"], name="ga")
    kb = g.node("Constant", [], ["kb"], name="kb", value=numpy_helper.from_array(st["beta"].astype(np.float32), ""))
    be = g.node("Identity", [kb], ["be"], name="be")
    mean, var = g.init("mean", st["mean"]), g.init("var", st["var"])
    out = g.node("BatchNormalization", [y, ga, be, mean, var], ["n"], name="bn")
    outs = [("n", [1, 4, 5, 5])]
    if output_at:
        outs.append((output_at, [4]))
    if body_reads:
        g.init("cond", np.array(True), dtype=np.bool_)
        g.node("If", ["cond"], ["iff"], name="if",
               then_branch=helper.make_graph([helper.make_node("Identity", [body_reads], ["t"])], "t", [],
                                             [_vi("t")]),
               else_branch=helper.make_graph([helper.make_node("Identity", [body_reads], ["e"])], "e", [],
                                             [_vi("e")]))
        outs.append(("iff", [4]))
    m = g.model([("x", [1, 4, 5, 5])], [(out, [1, 4, 5, 5])] + [o for o in outs[1:]], opset=13, ir=max(ir, 4))
    if ir == 4:
        m.graph.input.append(helper.make_tensor_value_info("mean", T.FLOAT, [4]))
    elif ir == 3:
        m.ir_version = ir
        m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in m.graph.initializer)
    onnx.checker.check_model(m)
    return m


SWEEP_CASES = [(ir, at, body) for ir in (3, 4, 8) for at in (None, "gm", "ga", "two", "var", "kb")
               for body in (None, "gm", "two", "var", "k")]


def test_the_sweep_leaves_what_the_former_settling_left(monkeypatch):
    n_removed = 0
    for ir, at, body in SWEEP_CASES:
        model = _const_chain_into_gamma(ir, at, body)
        for standalone in ("keep", "affine"):
            got = _fold_bytes(model, standalone=standalone)
            with monkeypatch.context() as m:
                m.setattr(sweep_mod, "_dead_constants", walk_only)
                want = _fold_bytes(model, standalone=standalone)
            assert got == want, (ir, at, body, standalone)
        folded = onnx.load_from_string(got[0])
        n_removed += len(model.graph.node) - len(folded.graph.node)
        if ir != 4 and at is None and body is None:  # (the walk really ran: the constant subgraphs went)
            assert not {"k", "gm", "ga", "kb", "be"} & {n.name for n in folded.graph.node}, (ir, standalone)
            assert "two" not in {t.name for t in folded.graph.initializer}
        _agree(model, folded)
    assert n_removed > 2 * len(SWEEP_CASES)


def test_random_chains_sweep_as_before(monkeypatch):
    for seed in SEEDS:
        model, feats = _random_chain(seed)
        got = _fold_bytes(model)
        with monkeypatch.context() as m:
            m.setattr(sweep_mod, "_dead_constants", walk_only)
            want = _fold_bytes(model)
        assert got == want, (seed, feats)


# -- counts and readable names against 7ce0cad -----------------------------------------------------

def _meta(n: onnx.NodeProto, *scopes: str, key: str = "pkg.torch.onnx.name_scopes") -> onnx.NodeProto:
    e = n.metadata_props.add()
    e.key, e.value = key, repr(list(scopes)) if key == "pkg.torch.onnx.name_scopes" else scopes[0]
    return n


def _names_model(variant: int) -> onnx.ModelProto:
    """Constants (tensors, in both spellings of the default domain and another domain), If/Loop bodies
    holding Constants and scoped nodes, another domain's op with a graph, a model-local function with
    scoped nodes; `variant` moves the If before or after a main-graph node whose name spells a body label."""
    mk = helper.make_node
    f4 = numpy_helper.from_array(np.arange(4, dtype=np.float32), "")
    body_nodes = [_meta(mk("Constant", [], ["bk"], name="bk", value=f4), "", "blk", "blk.const", "aten.c"),
                  _meta(mk("Relu", ["bk"], ["t"], name="bn"), "", "blk", "blk.act", "aten.relu")]
    then_g = helper.make_graph(body_nodes, "then", [], [_vi("t")])
    inner = helper.make_graph([_meta(mk("Constant", [], ["ik"], name="ik", value=f4), "", "deep", "deep.k", "c"),
                               mk("Identity", ["ik"], ["ie"])], "inner", [], [_vi("ie")])
    else_g = helper.make_graph([mk("If", ["cond"], ["e"], name="nested", then_branch=inner, else_branch=inner)],
                               "else", [], [_vi("e")])
    iff = _meta(mk("If", ["cond"], ["iff"], name="if"), "", "top", "top.if", "aten.if")
    iff.attribute.extend([helper.make_attribute("then_branch", then_g), helper.make_attribute("else_branch", else_g)])
    loop_body = helper.make_graph(
        [_meta(mk("Constant", [], ["lk"], name="lk", value=f4), "", "loop", "loop.k", "c"),
         mk("Identity", ["cin"], ["cout"]), mk("Add", ["v", "lk"], ["vout"])], "loop",
        [_vi("i", T.INT64, []), _vi("cin", T.BOOL, []), _vi("v")], [_vi("cout", T.BOOL, []), _vi("vout")])
    loop = mk("Loop", ["trip", "", "iff"], ["lout"], name="loop", body=loop_body)
    clash = _meta(mk("Relu", ["x"], ["clash"], name="if/then_branch/bn"), "", "other", "other.act", "aten.relu")
    dup = [_meta(mk("Neg", ["x"], [f"d{i}"], name=""), "", "same", "same.neg", "aten.neg") for i in range(2)]
    consts = [mk("Constant", [], ["c1"], name="c1", value=numpy_helper.from_array(np.ones((2, 3), np.float32), "")),
              mk("Constant", [], ["c2"], name="c2", domain="ai.onnx",
                 value=numpy_helper.from_array(np.ones(5, np.int64), "")),
              mk("Constant", [], ["c3"], name="c3", value_float=1.0)]
    custom = mk("Custom", ["x"], ["cu"], name="cu", domain="com.example",
                g=helper.make_graph([_meta(mk("Constant", [], ["gk"], name="gk", value=f4), "", "cust", "cust.k", "c")],
                                    "cg", [], [_vi("gk")]),
                t=numpy_helper.from_array(np.ones(7, np.float32), ""))
    fcall = _meta(mk("F", ["x"], ["fo"], name="call", domain="local"), "", "fn", "fn.call", "f")
    main = consts + dup + [custom, fcall, loop]
    main = ([clash, iff] if variant % 2 == 0 else [iff, clash]) + main if variant < 2 else main + [iff, clash]
    g = helper.make_graph(main, "g", [_vi("x", T.FLOAT, [4])],
                          [_vi(o) for o in ("clash", "d0", "d1", "cu", "fo")] + [_vi("lout")],
                          [numpy_helper.from_array(np.array(True), "cond"),
                           numpy_helper.from_array(np.array(2, np.int64), "trip"),
                           numpy_helper.from_array(np.ones((3, 4), np.float32), "p")])
    fn = helper.make_function("local", "F", ["a"], ["b"],
                              [_meta(mk("Constant", [], ["fk"], name="fk", value=f4), "", "fnb", "fnb.k", "c"),
                               _meta(mk("Add", ["a", "fk"], ["b"], name="fadd"), "", "fnb", "fnb.add", "aten.add")],
                              [helper.make_opsetid("", 17)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1),
                                            helper.make_opsetid("com.example", 1)], functions=[fn])
    m.ir_version = 8
    return m


_COUNT_SCRIPT = r"""
import json, sys
import onnx
from bnfold.beforeafter import anatomy
from bnfold.onnx.names import readable_names
out = {}
for kind, path in json.loads(sys.argv[1]).items():
    m = onnx.load(path)
    a = anatomy(m, "onnx")
    out[kind] = {"ops": dict(a["ops"]), "parameters": a["parameters"], "names": list(readable_names(m).items())}
print(json.dumps(out))
"""


def _count_models() -> dict[str, onnx.ModelProto]:
    models = {f"names{v}": _names_model(v) for v in (0, 1, 2)}
    models.update({f"chain{s}": _random_chain(s)[0] for s in range(0, 150, 10)})
    models.update({f"sweep{i}": _const_chain_into_gamma(*SWEEP_CASES[i]) for i in range(0, len(SWEEP_CASES), 7)})
    models["corrupt_good"] = cm.variant("good")
    return models


def test_counts_and_readable_names_say_what_they_said(old_tree, tmp_path):
    from bnfold.beforeafter import anatomy
    from bnfold.onnx.names import readable_names
    models = _count_models()
    paths = {}
    for k, m in models.items():
        p = tmp_path / f"{k}.onnx"
        p.write_bytes(m.SerializeToString())
        paths[k] = str(p)
    old = run_json(old_tree, _COUNT_SCRIPT, paths)
    loaded_ok: list[str] = []
    for k, m in models.items():
        a = anatomy(m, "onnx")
        new = {"ops": dict(a["ops"]), "parameters": a["parameters"]}
        assert new == {"ops": old[k]["ops"], "parameters": old[k]["parameters"]}, k
        assert dict(readable_names(m)) == dict(old[k]["names"]), k
        # as a job counts it: the model its load returned, the initializers' sum from the load check (core/hold.py)
        with holding():
            try:
                loaded = load_onnx(paths[k])
            except bnfold.BnfoldError:
                continue  # (a few are built for the counts only: onnx's checker refuses them)
            a = anatomy(loaded, "onnx", as_loaded=True)
            assert noted(loaded, INITIALIZER_ELEMENTS) is not None, k
        assert {"ops": dict(a["ops"]), "parameters": a["parameters"]} == new, k
        loaded_ok.append(k)
    assert len(loaded_ok) >= len(models) - 3, sorted(set(models) - set(loaded_ok))
    assert old["names1"]["ops"]["Constant"] >= 3 and old["names1"]["ops"]["com.example.Custom"] == 1
    assert len(old["names1"]["names"]) >= 6  # (scoped nodes in bodies, the function and the main graph)


# (c33d6e2 walked a graph's bodies before its own scoped nodes: a main-graph node named like a body node's
# label took that label's path; the walk keeps graph order again)
def test_a_label_spelled_by_two_nodes_names_what_it_named_before(old_tree, tmp_path):
    from bnfold.onnx.names import readable_names
    m = _names_model(0)
    p = tmp_path / "m.onnx"
    p.write_bytes(m.SerializeToString())
    old = run_json(old_tree, _COUNT_SCRIPT, {"m": str(p)})
    assert dict(old["m"]["names"])["if/then_branch/bn"] == "blk.act"
    assert readable_names(m)["if/then_branch/bn"] == "blk.act"


# -- the output's mark: the digest computed in a thread from the load on ------------------------------

_HOOKED_CLI = r"""
import atexit, json, os, sys
import bnfold.batch as b
from bnfold.core import later
started = []
real = later.Later.__init__
def init(self, fn, *args, thread="bnfold", **kw):
    if thread == "bnfold-digest":
        started.append([str(a) for a in args[:1]])
    real(self, fn, *args, thread=thread, **kw)
later.Later.__init__ = init
touch = os.environ.get("ADV_TOUCH_BEFORE_WRITE")
if touch:
    deliver = b._deliver
    def _deliver(o, *a, **kw):
        with open(touch, "ab") as fh:  # the source rewritten once folded, before its output is written
            fh.write(b"")
        st = os.stat(touch)
        os.utime(touch, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        return deliver(o, *a, **kw)
    b._deliver = _deliver
atexit.register(lambda: open(os.environ["ADV_LOG"], "w").write(json.dumps(started)))
sys.argv = ["bnfold", *sys.argv[1:]]
from bnfold.cli import entry
entry()
"""


def _cli(tmp: Path, *args, touch: Path | None = None, timeout: float = 120):
    from tests.reliability.early import ENV
    for a, b in zip(args, args[1:]):
        if a == "-o" and not str(b).endswith("/"):
            Path(b).parent.mkdir(parents=True, exist_ok=True)
    log = tmp / f".log{len(list(tmp.glob('.log*')))}.json"
    env = {**ENV, "ADV_LOG": str(log), **({"ADV_TOUCH_BEFORE_WRITE": str(touch)} if touch else {})}
    r = subprocess.run([sys.executable, "-c", _HOOKED_CLI, *map(str, args)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    started = json.loads(log.read_text()) if log.exists() else None
    return r, started


def _sha(path: Path, companions=()) -> str:
    """marks.digest, spelled out: the file's bytes, then each data file's name, a zero byte and its bytes."""
    h = hashlib.sha256(path.read_bytes())
    for c in sorted(str(c) for c in companions):
        h.update(Path(c).name.encode() + b"\0" + Path(c).read_bytes())
    return h.hexdigest()


def _mark(path: Path) -> dict:
    from bnfold import marks
    m = marks.read(str(path))
    assert m is not None, path
    return m


def _model_file(folder: Path, name: str, seed: int, external: bool = False) -> Path:
    m = cm.base()
    rng = np.random.default_rng(seed)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        t.raw_data = (a * rng.uniform(0.9, 1.1, a.shape)).astype(a.dtype).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    if external:
        onnx.save(m, str(p), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    else:
        p.write_bytes(m.SerializeToString())
    return p


def test_the_mark_names_the_sources_digest_verified_or_not(tmp_path):
    src = _model_file(tmp_path / "in", "m.onnx", 1)
    ext = _model_file(tmp_path / "ext", "e.onnx", 2, external=True)
    datas = [p for p in ext.parent.iterdir() if p != ext]
    assert len(datas) >= 2  # (one file a tensor: the digest's order over them counts)
    for args in ([], ["--no-verify"]):
        for s, comp in ((src, ()), (ext, datas)):
            out = tmp_path / f"out{len(args)}" / s.name
            r, started = _cli(tmp_path, s, "-o", out, "-q", *args)
            assert r.returncode == 0, r.stderr[-2000:]
            assert started == [[str(s)]], started
            mark = _mark(out)
            assert mark["source_sha256"] == _sha(s, comp), (args, s)
            assert mark["verdict"] == (None if args else mark["verdict"])


def test_a_folder_run_with_a_bad_model_marks_every_good_output_and_exits(tmp_path):
    src = tmp_path / "in"
    good = [_model_file(src, f"m{i}.onnx", 10 + i) for i in range(3)]
    good.append(_model_file(src / "sub", "x.onnx", 20, external=True))
    bad = src / "bad.onnx"
    m = cm.variant("good")
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    bad.write_bytes(m.SerializeToString())
    out = tmp_path / "out"
    r, started = _cli(tmp_path, src, "-r", "-o", f"{out}/", "--keep-going", "-q")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(bad) in r.stdout + r.stderr
    assert sorted(s[0] for s in started) == sorted(map(str, good))  # (never for the bad one)
    for g in good:
        o = out / g.relative_to(src)
        comp = [p for p in g.parent.iterdir() if p.suffix != ".onnx"] if g.name == "x.onnx" else ()
        assert _mark(o)["source_sha256"] == _sha(g, comp), g
    assert not (out / "bad.onnx").exists()
    # without --keep-going: all or nothing, and the digests started for the good ones do not hold the exit
    out2 = tmp_path / "out2"
    r, started = _cli(tmp_path, src, "-r", "-o", f"{out2}/", "-q", "--no-verify")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out2.exists() or not any(out2.rglob("*.onnx"))


def test_a_source_rewritten_between_fold_and_write_is_refused(tmp_path):
    src = _model_file(tmp_path / "in", "m.onnx", 3)
    before = src.read_bytes()
    out = tmp_path / "out" / "m.onnx"
    r, started = _cli(tmp_path, src, "-o", out, "--no-verify", touch=src)
    from tests.reliability.conftest import assert_one_line_error
    assert started == [[str(src)]]
    assert_one_line_error(r, src, "changed while bnfold was running")
    assert not out.exists() and src.read_bytes() == before
    # a data file the model reads, rewritten the same way: the digest read it long before
    ext = _model_file(tmp_path / "ext", "e.onnx", 6, external=True)
    data = sorted(p for p in ext.parent.iterdir() if p != ext)[-1]
    out = tmp_path / "out" / "e.onnx"
    r, started = _cli(tmp_path, ext, "-o", out, "--no-verify", touch=data)
    assert started == [[str(ext)]]
    assert_one_line_error(r, ext, "changed while bnfold was running")
    assert not out.exists()


def test_a_dry_run_and_a_marked_source_start_no_digest(tmp_path):
    src = _model_file(tmp_path / "in", "m.onnx", 4)
    r, started = _cli(tmp_path, src, "--dry-run", "-q", "--no-verify")
    assert r.returncode == 0 and started == [], (r.stderr[-2000:], started)
    assert sorted(p.name for p in src.parent.iterdir()) == ["m.onnx"]
    first = tmp_path / "a" / "m.onnx"
    r, _ = _cli(tmp_path, src, "-o", first, "-q", "--no-verify")
    assert r.returncode == 0, r.stderr[-2000:]
    again = tmp_path / "b" / "m.onnx"
    r, started = _cli(tmp_path, first, "-o", again, "-q")
    assert r.returncode == 0 and started == [], (r.stderr[-2000:], started)
    assert _mark(again) == _mark(first) and _mark(first)["source_sha256"] == _sha(src)


def test_a_hostile_data_location_is_never_read_for_the_digest(tmp_path):
    """Loading refuses it before the digest thread starts: the file outside the folder keeps its access
    time (where the file system records reads) and no digest is started."""
    import time
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(6 * 3 * 3 * 3, dtype=np.float32).tobytes())
    folder = tmp_path / "deep" / "model"
    src = _model_file(folder, "m.onnx", 5)
    m = onnx.load(str(src))
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = T.EXTERNAL
    w.external_data.add(key="location", value="../../secret.bin")
    src.write_bytes(m.SerializeToString())
    old = time.time() - 3 * 86400
    st = secret.stat()
    os.utime(secret, (old, st.st_mtime))
    secret.read_bytes()
    records = secret.stat().st_atime > old + 1
    os.utime(secret, (old, st.st_mtime))
    r, started = _cli(tmp_path, src, "-o", tmp_path / "out.onnx", "--no-verify")
    from tests.reliability.conftest import assert_one_line_error
    assert_one_line_error(r, src, "outside the model's folder")
    assert started == []
    if records:
        assert secret.stat().st_atime <= old + 1, "the file outside the model's folder was read"
    assert not (tmp_path / "out.onnx").exists()


def test_a_torchscript_source_is_digested_the_same_way(tmp_path):
    torch = pytest.importorskip("torch")
    import warnings
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
    src = tmp_path / "in" / "m.pt"
    src.parent.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(m, torch.randn(1, 3, 8, 8)), str(src))
    out = tmp_path / "out" / "m.pt"
    r, started = _cli(tmp_path, src, "-o", out, "-q", "--input", "x:1x3x8x8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert started == [[str(src)]]
    mark = _mark(out)
    assert mark["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and mark["verdict"] == "passed"
