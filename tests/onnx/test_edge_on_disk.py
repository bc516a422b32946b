"""Adversarial tests for the "big weights stay on disk" path of the ONNX pipeline (onnx_io.on_disk).

The 1 GiB / 1 MiB thresholds are lowered so small models take that path. Every test folds through a
public surface (CLI or bnfold.fold/save/check), reads what was written back with onnx's own loader
(independent of bnfold's bookkeeping) and compares it with the original in onnxruntime, optimisations
off; inputs must keep their bytes and no temporary file may be left anywhere. `route` picks how the
verifier and save_onnx treat the model: as it is (< 2 GB, written inline) or as if over 2 GB.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx import ondisk as onnx_io
from bnfold.onnx.io import load_onnx, save_onnx
from bnfold.cli import main
from bnfold.core.errors import BnfoldError
from bnfold.onnx.feeds import make_feeds
from tests.conftest import random_bn
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function, ort_session

ROUTES = ["inline", "over_2gb"]


@pytest.fixture(autouse=True)
def lazy_everywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(onnx_io, "LAZY_TOTAL", 1)
    monkeypatch.setattr(onnx_io, "LAZY_MIN", 256)
    # a verifier's scratch folders land here, so a leftover is seen (and other sessions' are not)
    scratch = tmp_path / "_systmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield
    assert os.listdir(scratch) == [], "temporary files left behind"


def use_route(monkeypatch, route: str) -> None:
    if route == "over_2gb":
        monkeypatch.setattr(onnx_io, "TWO_GB", 4096)  # every test model here is larger


def tree(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (scratch folder excluded)."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, folder)
            if not rel.startswith("_systmp"):
                out[rel] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def write_external(model: onnx.ModelProto, path, location: str | None = None) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or os.path.basename(str(path)) + ".data", size_threshold=64)


def write_scattered(model: onnx.ModelProto, path, sub: str = "weights", skew: int = 3,
                    no_length: tuple[str, ...] = ()) -> None:
    """External data as other exporters lay it out: one file per tensor in a subfolder, each tensor
    behind `skew` junk bytes (offsets not aligned), some stubs without a `length` key."""
    folder = os.path.dirname(str(path))
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.nbytes < 64:
            continue
        loc = f"{sub}/{t.name}.bin"
        raw = numpy_helper.from_array(a, t.name).raw_data
        with open(os.path.join(folder, loc), "wb") as fh:
            fh.write(b"\x7f" * skew + raw)
        keys = [("location", loc), ("offset", str(skew))] + ([] if t.name in no_length else [("length", str(len(raw)))])
        stub = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims),
                                data_location=TensorProto.EXTERNAL)
        for k, v in keys:
            e = stub.external_data.add()
            e.key, e.value = k, v
        t.CopyFrom(stub)
    onnx.save_model(m, str(path))


def written(path) -> onnx.ModelProto:
    """What a consumer sees: onnx's own loader, external data resolved next to `path`."""
    m = onnx.load(str(path))
    keys = {e.key for t in onnx.load(str(path), load_external_data=False).graph.initializer for e in t.external_data}
    assert keys <= {"location", "offset", "length"}, keys  # bnfold's private key never reaches a file
    return m


def fold_cli(src, out, *extra: str) -> onnx.ModelProto:
    """Fold with the CLI; the report must say verification passed, on the route the test asked for."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([str(src), "-o", str(out), "--json", *extra]) == 0
    ver = json.loads(buf.getvalue())["verification"]
    assert ver["passed"] is True, ver
    big = "over 2 GB" in json.dumps(ver["providers"]["CPUExecutionProvider"])
    assert big == (onnx_io.TWO_GB < 1 << 20), ver
    return written(out)


def n_bn(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


# -- models ---------------------------------------------------------------------------------------

def backward_net(rng) -> onnx.ModelProto:
    """BN on the graph input (folds into the 1x1 conv after it), a BN between ReLU and a padded conv
    (no fold either way: Mul+Add with --standalone affine), Conv->BN, and BN before a Gemm. The
    64-channel BNs have their parameters on disk too."""
    g = G(rng)
    x = g.bn("bn_in", "x", 64)
    x = g.node("Conv", [x, g.weight("w1", (64, 64, 1, 1))], ["c1"], name="conv1")
    x = g.node("Relu", [x], ["r1"], name="relu1")
    x = g.bn("bn_sa", x, 64)
    x = g.node("Conv", [x, g.weight("w2", (16, 64, 3, 3)), g.weight("b2", (16,))], ["c2"], name="conv2",
               pads=[1] * 4)
    x = g.bn("bn2", x, 16)
    x = g.node("GlobalAveragePool", [x], ["gap"], name="gap")
    x = g.node("Flatten", [x], ["flat"], name="flat")
    x = g.node("Relu", [x], ["r2"], name="relu2")
    x = g.bn("bn_g", x, 16)
    g.node("Gemm", [x, g.weight("fc_w", (10, 16)), g.weight("fc_b", (10,))], ["y"], name="fc", transB=1)
    return g.model([("x", [2, 64, 6, 6])], [("y", [2, 10])])


def scoped_net(rng) -> onnx.ModelProto:
    """An fp16 weight behind Cast, a weight behind two Identities, and an outer on-disk weight read
    by both branches of an If (Conv->BN in one, Conv->Relu in the other)."""
    g = G(rng)
    w16 = g.init("w16", rng.normal(0, 0.3, (8, 4, 3, 3)), np.float16)
    g.node("Cast", [w16], ["w16_f"], name="cast_w", to=TensorProto.FLOAT)
    x = g.bn("bn_a", g.node("Conv", ["x", "w16_f"], ["ca"], name="conv_a", pads=[1] * 4), 8)
    g.node("Identity", [g.weight("w_id", (8, 8, 3, 3))], ["w_id1"], name="id1")
    g.node("Identity", ["w_id1"], ["w_id2"], name="id2")
    x = g.bn("bn_b", g.node("Conv", [x, "w_id2"], ["cb"], name="conv_b", pads=[1] * 4), 8)
    w_outer = g.weight("w_outer", (8, 8, 3, 3))
    st = {k: g.init(f"bn_t_{k}", v) for k, v in random_bn(rng, 8).items()}
    out_t = helper.make_tensor_value_info("t_y", TensorProto.FLOAT, [1, 8, 8, 8])
    out_e = helper.make_tensor_value_info("e_y", TensorProto.FLOAT, [1, 8, 6, 6])
    then = helper.make_graph([
        helper.make_node("Conv", [x, w_outer], ["t_c"], name="t_conv", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["t_c", st["gamma"], st["beta"], st["mean"], st["var"]], ["t_y"],
                         name="t_bn")], "then", [], [out_t])
    other = helper.make_graph([
        helper.make_node("Conv", [x, w_outer], ["e_c"], name="e_conv"),
        helper.make_node("Relu", ["e_c"], ["e_y"], name="e_relu")], "else", [], [out_e])
    g.node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)
    m = g.model([("x", [1, 4, 8, 8])], [("y", [1, 8, None, None])])
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, [1]))
    return m


def dense_net(rng, dtype) -> onnx.ModelProto:
    """Gemm->BN and MatMul+Add->BN in `dtype` (onnxruntime has no fp64 Conv on CPU)."""
    g = G(rng, dtype)
    x = g.bn("bn1", g.node("Gemm", ["x", g.weight("fc1", (48, 32)), g.weight("fc1_b", (48,))], ["g1"], name="fc1",
                           transB=1), 48)
    x = g.node("MatMul", [x, g.weight("mm", (48, 40))], ["mm_o"], name="mm")
    x = g.node("Add", [x, g.weight("mm_b", (40,))], ["mm_add"], name="mm_add")
    g.bn("bn2", x, 40, out="y")
    return g.model([("x", [3, 32])], [("y", [3, 40])])


def shared_net(rng) -> onnx.ModelProto:
    """One weight read by a Conv->BN (folds: needs its own copy) and by a Conv without BN."""
    g = G(rng)
    w = g.weight("w_both", (8, 8, 3, 3))
    a = g.bn("bn_a", g.node("Conv", ["x", w], ["ca"], name="conv_a", pads=[1] * 4), 8)
    b = g.node("Conv", ["x", w], ["cb"], name="conv_b", pads=[1] * 4)
    g.node("Mul", [a, b], ["y"], name="mul")  # a product, not a sum: the two convs are not one block to merge
    return g.model([("x", [1, 8, 6, 6])], [("y", [1, 8, 6, 6])])


def plain_net(rng) -> onnx.ModelProto:
    g = G(rng)
    x = g.bn("bn0", g.node("Conv", ["x", g.weight("w0", (16, 3, 3, 3))], ["c0"], name="conv0", pads=[1] * 4), 16)
    x = g.node("Conv", [x, g.weight("w_keep", (16, 16, 1, 1))], ["c1"], name="conv_keep")
    g.bn("bn1", g.node("Conv", [x, g.weight("w2", (8, 16, 3, 3))], ["c2"], name="conv2"), 8, out="y")
    return g.model([("x", [1, 3, 8, 8])], [("y", [1, 8, 6, 6])])


# -- folds through the CLI, both verification routes -----------------------------------------------

@pytest.mark.parametrize("route", ROUTES)
def test_backward_and_standalone_affine_folds_from_disk(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    model = backward_net(rng)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    write_external(model, src)
    before = tree(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = fold_cli(src, tmp_path / "out" / "f.onnx", "--standalone", "affine")
    assert tree(tmp_path / "in") == before
    assert n_bn(out) == 0
    assert_same_function(model, out)
    assert set(tree(tmp_path / "out")) <= {"f.onnx", "f.onnx.data"}


@pytest.mark.parametrize("route", ROUTES)
def test_weights_behind_cast_identity_and_read_by_if_branches(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    model = scoped_net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    lazy = load_onnx(str(src))
    assert {t.name for t in lazy.graph.initializer if onnx_io.on_disk(t)} >= {"w16", "w_id", "w_outer"}
    before = tree(tmp_path)
    res = bnfold.fold(str(src))
    assert res.report.verification.passed is True, res.report.verification.to_dict()
    assert {d.bn for d in res.report.decisions if d.is_folded} == {"bn_a", "bn_b", "branch/then_branch/t_bn"}
    bnfold.save(res, str(tmp_path / "f.onnx"))
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    out = written(tmp_path / "f.onnx")
    for cond in (True, False):  # both branches, whatever make_feeds draws
        feeds = make_feeds(model, seed=5)[0]
        feeds["cond"] = np.array([cond])
        ref = ort_session(model).run(None, feeds)[0]
        got = ort_session(out).run(None, feeds)[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("route", ROUTES)
def test_ir3_model_whose_initializers_are_graph_inputs(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    model = plain_net(rng)
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 8))
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    before = tree(tmp_path)
    out = fold_cli(src, tmp_path / "f.onnx")
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert n_bn(out) == 0 and out.ir_version == 3
    inits = {t.name for t in out.graph.initializer}
    assert inits <= {i.name for i in out.graph.input}  # IR 3: still declared as inputs, none dangling
    assert {i.name for i in out.graph.input} - inits == {"x"}
    assert_same_function(model, out)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_fp16_and_fp64_weights_on_disk(tmp_path, monkeypatch, route, dtype):
    use_route(monkeypatch, route)
    model = dense_net(np.random.default_rng(7), dtype)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    assert all(onnx_io.on_disk(t) for t in load_onnx(str(src)).graph.initializer if t.name in ("fc1", "mm"))
    out = fold_cli(src, tmp_path / "f.onnx")
    assert n_bn(out) == 0
    assert {t.data_type for t in out.graph.initializer} == {helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}
    assert_same_function(model, out, rel=3e-2 if dtype == np.float16 else 1e-9)


@pytest.mark.parametrize("route", ROUTES)
def test_int8_weights_on_disk_are_dequantized_once_and_copied_bit_exact(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    g = G(rng)
    g.init("wq", rng.integers(-127, 128, (16, 4, 3, 3)), np.int8)
    g.init("wq_keep", rng.integers(-127, 128, (16, 16, 1, 1)), np.int8)
    g.init("sc", np.array(0.02), np.float32)
    g.node("DequantizeLinear", ["wq", "sc"], ["wf"], name="dq")
    g.node("DequantizeLinear", ["wq_keep", "sc"], ["wf_keep"], name="dq_keep")
    x = g.bn("bn", g.node("Conv", ["x", "wf"], ["c"], name="conv", pads=[1] * 4), 16)
    g.node("Conv", [x, "wf_keep"], ["y"], name="conv_keep")
    model = g.model([("x", [1, 4, 6, 6])], [("y", [1, 16, 6, 6])], opset=13)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    out = fold_cli(src, tmp_path / "f.onnx")
    assert n_bn(out) == 0
    keep = next(t for t in out.graph.initializer if t.name == "wq_keep")
    assert keep.data_type == TensorProto.INT8
    assert numpy_helper.to_array(keep).tobytes() == numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "wq_keep")).tobytes()
    assert_same_function(model, out)


def test_int4_weights_on_disk_load_and_fold(rng, tmp_path):
    """A 4-bit weight takes half a byte per element in its data file."""
    import ml_dtypes
    g = G(rng)
    g.inits.append(numpy_helper.from_array(rng.integers(-8, 8, (16, 8, 3, 3)).astype(ml_dtypes.int4), "w_q"))
    g.init("w_s", np.array(0.05), np.float32)
    g.node("DequantizeLinear", ["w_q", "w_s"], ["w_f"], name="dq")
    g.bn("bn", g.node("Conv", ["x", "w_f"], ["c"], name="conv", pads=[1] * 4), 16, out="y")
    model = g.model([("x", [1, 8, 8, 8])], [("y", [1, 16, 8, 8])], opset=21, ir=10)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    out = fold_cli(src, tmp_path / "f.onnx")
    assert n_bn(out) == 0
    assert_same_function(model, out)


@pytest.mark.parametrize("route", ROUTES)
def test_weight_shared_by_folded_and_unfolded_conv_stays_intact(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    model = shared_net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    out = fold_cli(src, tmp_path / "f.onnx")
    assert n_bn(out) == 0
    w = next(n for n in out.graph.node if n.name == "conv_b").input[1]
    assert w == "w_both"
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == w)),
                                  numpy_helper.to_array(model.graph.initializer[0]))
    assert_same_function(model, out)


@pytest.mark.parametrize("route", ROUTES)
def test_scattered_unaligned_data_files_without_length_keys(rng, tmp_path, monkeypatch, route):
    use_route(monkeypatch, route)
    model = plain_net(rng)
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    write_scattered(model, src, no_length=("w0", "w2"))
    lazy = load_onnx(str(src))
    assert {t.name for t in lazy.graph.initializer if onnx_io.on_disk(t)} == {"w0", "w_keep", "w2"}
    before = tree(tmp_path / "in")
    (tmp_path / "out").mkdir()
    out = fold_cli(src, tmp_path / "out" / "f.onnx")
    assert tree(tmp_path / "in") == before
    assert n_bn(out) == 0
    assert_same_function(model, out)


# -- CLI modes that write nothing, and check --------------------------------------------------------

def test_dry_run_json_writes_nothing_and_reports_every_bn(rng, tmp_path, capsys):
    model = backward_net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    before = tree(tmp_path)
    assert main([str(src), "--dry-run", "--json", "--standalone", "affine"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert tree(tmp_path) == before
    names = [d["bn"] for d in doc["folded"]] + [d["bn"] for d in doc["skipped"]]
    assert sorted(names) == ["bn2", "bn_g", "bn_in", "bn_sa"]
    assert doc["verification"]["passed"] is True
    # the folded model the dry run judged is what a real run writes
    out = fold_cli(src, tmp_path / "f.onnx", "--standalone", "affine")
    assert n_bn(out) == 0
    assert_same_function(model, out)


@pytest.mark.parametrize("route", ROUTES)
def test_check_between_two_on_disk_files(rng, tmp_path, monkeypatch, route, capsys):
    use_route(monkeypatch, route)
    model = plain_net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    folded = tmp_path / "f.onnx"
    res = bnfold.fold(str(src), verify=False)
    save_onnx(res.model, str(folded), external_data=True, size_threshold=64)
    assert main(["check", str(src), str(folded), "-q"]) == 0
    # a candidate off by 1 % in one output channel of its (on-disk) kept weight
    bad = load_onnx(str(folded))
    t = next(t for t in bad.graph.initializer if t.name == "w_keep")
    assert onnx_io.on_disk(t)
    a = onnx_io.tensor_value(t).copy()
    a[5] *= 1.01
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    save_onnx(bad, str(tmp_path / "bad.onnx"), external_data=True, size_threshold=64)
    capsys.readouterr()
    assert main(["check", str(src), str(tmp_path / "bad.onnx"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["verification"]["passed"] is False
    assert_same_function(model, written(folded))


# -- library: paths, cwd, several saves --------------------------------------------------------------

def test_relative_path_cwd_change_and_several_saves(rng, tmp_path, monkeypatch):
    model = plain_net(rng)
    (tmp_path / "a" / "in").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    write_external(model, tmp_path / "a" / "in" / "m.onnx")
    before = tree(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "a")
    res = bnfold.fold(os.path.join("in", "m.onnx"))
    assert res.report.verification.passed is True
    monkeypatch.chdir(tmp_path / "b")  # the data file is now at another relative path
    bnfold.save(res, "inline.onnx")
    save_onnx(res.model, "ext.onnx", external_data=True, size_threshold=64)
    save_onnx(res.model, "ext2.onnx", external_data=True, size_threshold=64, all_tensors_to_one_file=False)
    bnfold.save(res, str(tmp_path / "a" / "beside.onnx"))  # next to the input's folder, not in it
    for f in ("inline.onnx", "ext.onnx", "ext2.onnx", str(tmp_path / "a" / "beside.onnx")):
        assert_same_function(model, written(f))
    assert {k: v for k, v in tree(tmp_path / "a").items() if k in before} == before
    names = set(tree(tmp_path / "b"))
    per_tensor = {n for n in names if n.startswith("ext2.onnx.data.")}
    assert len(per_tensor) >= 3 and names - per_tensor == {"inline.onnx", "ext.onnx", "ext.onnx.data", "ext2.onnx"}


def test_fold_of_a_fold_output_with_external_data_is_a_no_op(rng, tmp_path, monkeypatch):
    use_route(monkeypatch, "over_2gb")
    model = plain_net(rng)
    write_external(model, tmp_path / "m.onnx")
    first = fold_cli(tmp_path / "m.onnx", tmp_path / "f.onnx")
    assert os.path.exists(tmp_path / "f.onnx.data")
    before = tree(tmp_path)
    res = bnfold.fold(str(tmp_path / "f.onnx"))
    assert res.report.folded == [] and res.report.verification.passed is True
    with pytest.raises(BnfoldError, match="f.onnx.data|same as the input"):
        bnfold.save(res, str(tmp_path / "f.onnx"))  # the input itself, and the data file it reads from
    assert tree(tmp_path) == before
    bnfold.save(res, str(tmp_path / "g.onnx"))
    assert_same_function(first, written(tmp_path / "g.onnx"), rel=0)
    assert_same_function(model, written(tmp_path / "g.onnx"))


# -- the data file changes between load and save -----------------------------------------------------

def _folded_then(tmp_path, rng, damage) -> tuple[onnx.ModelProto, bnfold.FoldResult]:
    model = plain_net(rng)
    write_external(model, tmp_path / "m.onnx")
    res = bnfold.fold(str(tmp_path / "m.onnx"), verify=False)
    assert [t.name for t in res.model.graph.initializer if onnx_io.on_disk(t)] == ["w_keep"]
    damage(tmp_path / "m.onnx.data", tmp_path)
    return model, res


def _saved_or_refused(model, res, out, external: bool) -> None:
    """Saving must either write the right model or refuse with a BnfoldError, leaving nothing."""
    folder = os.path.dirname(out)
    before = set(os.listdir(folder))
    try:
        save_onnx(res.model, out, external_data=external, size_threshold=64)
    except BnfoldError:
        assert set(os.listdir(folder)) == before
        return
    assert_same_function(model, written(out))


@pytest.mark.parametrize("external", [False, True])
def test_data_file_deleted_after_fold_is_a_clean_error(rng, tmp_path, external):
    model, res = _folded_then(tmp_path, rng, lambda data, _: os.unlink(data))
    with pytest.raises(BnfoldError, match="m.onnx.data"):
        save_onnx(res.model, str(tmp_path / "f.onnx"), external_data=external, size_threshold=64)
    assert sorted(os.listdir(tmp_path)) == ["_systmp", "m.onnx"]


@pytest.mark.parametrize("external", [False, True])
def test_data_file_truncated_after_fold(rng, tmp_path, external):
    def cut(data, folder):
        stub = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        t = next(t for t in stub.graph.initializer if t.name == "w_keep")
        offset = int(next(e.value for e in t.external_data if e.key == "offset"))
        data.write_bytes(data.read_bytes()[:offset + 10])
    model, res = _folded_then(tmp_path, rng, cut)
    _saved_or_refused(model, res, str(tmp_path / "f.onnx"), external)


@pytest.mark.parametrize("external", [False, True])
def test_data_file_replaced_after_fold(rng, tmp_path, external):
    def replace(data, folder):
        os.unlink(data)  # onnx appends to an existing data file; start from none
        write_external(plain_net(np.random.default_rng(99)), folder / "m.onnx")
    model, res = _folded_then(tmp_path, rng, replace)
    _saved_or_refused(model, res, str(tmp_path / "f.onnx"), external)


# -- what a file may claim ---------------------------------------------------------------------------

@pytest.mark.parametrize("lazy", [True, False])
def test_a_file_carrying_bnfolds_private_key_is_read_like_onnx_reads_it(rng, tmp_path, monkeypatch, lazy):
    """onnx.save_model(result.model) of a lazy model writes the private key into the file; a file
    moved (or crafted) so that the key names another folder must still mean what onnx reads."""
    if not lazy:
        monkeypatch.setattr(onnx_io, "LAZY_TOTAL", 1 << 30)
    model = plain_net(rng)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    write_external(model, tmp_path / "A" / "m.onnx")
    write_external(plain_net(np.random.default_rng(99)), tmp_path / "B" / "m.onnx")  # same layout, other values
    stub = onnx.load(str(tmp_path / "A" / "m.onnx"), load_external_data=False)
    for t in stub.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            e = t.external_data.add()
            e.key, e.value = "bnfold.base_dir", str(tmp_path / "B")
    onnx.save_model(stub, str(tmp_path / "A" / "m.onnx"))
    with pytest.warns(UserWarning):  # onnx ignores the unknown key, with a warning
        as_onnx_reads_it = onnx.load(str(tmp_path / "A" / "m.onnx"))
    assert_same_function(model, as_onnx_reads_it, rel=0)
    out = fold_cli(tmp_path / "A" / "m.onnx", tmp_path / "f.onnx")
    assert_same_function(model, out)


def test_output_onto_the_inputs_data_file_is_refused(rng, tmp_path):
    """A data file may carry any name, .onnx included: writing the output over it destroys the input."""
    model = plain_net(rng)
    write_external(model, tmp_path / "a.onnx", location="b.onnx")
    before = tree(tmp_path)
    assert main([str(tmp_path / "a.onnx"), "-o", str(tmp_path / "b.onnx"), "-q"]) == 2
    assert tree(tmp_path) == before
    assert_same_function(model, onnx.load(str(tmp_path / "a.onnx")), rel=0)


def test_two_models_reading_one_data_file_in_one_run(rng, tmp_path):
    a, b = plain_net(rng), backward_net(rng)
    write_external(a, tmp_path / "a.onnx", location="shared.data")
    write_external(b, tmp_path / "b.onnx", location="shared.data")  # onnx appends: one file, two models
    assert sorted(os.listdir(tmp_path)) == ["_systmp", "a.onnx", "b.onnx", "shared.data"]
    before = tree(tmp_path)
    assert main([str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "-q", "--standalone", "affine"]) == 0
    assert {k: v for k, v in tree(tmp_path).items() if k in before} == before
    assert sorted(tree(tmp_path)) == sorted([*before, "a.folded.onnx", "b.folded.onnx"])
    assert_same_function(a, written(tmp_path / "a.folded.onnx"))
    assert_same_function(b, written(tmp_path / "b.folded.onnx"))
