"""Tests that try to break the fold pass's speed changes against what it did before them:

* the op-type census (GraphIndex.op_types) that lets fold_disguised and Regions.merge_all skip their scans:
  every corpus model (tests/helpers/fold_corpus.py: MatMul folds that insert an Add, --standalone affine,
  bodies, functions, regions.again after the per-BN loop, the retry loop) folds byte for byte as with a
  census that holds every affine and sum op (the scans always run, as before);
* the batched Conv->BN fold written out in OnnxFolder._fold_planned: the same model bytes and report with
  bnfold.onnx.batched.ENABLED on and off, for shared weights/biases, a weight that is a graph output, Shape/Size
  readers, BN outputs that are graph outputs, BN -> Mul/Add, chains, fan-out, unnamed and same-named nodes,
  IR 3, overridable initializers, float16/float64, borrowed weights (verify=True on an in-memory model),
  weights left on disk, If/Loop bodies, model-local functions; onnxruntime agrees with the original;
* the sweep's bulk settling of released initializers: the same bytes as the walk it replaced (a copy of
  the walk below), and what is kept (unused, overridable, graph-output, still-read initializers);
* the load checks after all_tensors skips the attributes no schema allows: every corrupt model of
  tests/helpers/corrupt_models.py is refused on both load-check paths, one line naming the file, the CLI
  exits 2 and writes nothing.

Found (fixed): LayerNormalization (opset 17 on) is the one default-domain op whose schema lets onnx's checker
pass attributes it does not know, so a tensor attribute of an unknown data type on it loaded once all_tensors
skipped the attributes of other ops than Constant/ConstantOfShape/If/Loop/Scan/SequenceMap (it reads every
node's again); a model-local function's default attribute values were never checked (they are now).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from onnx import helper, numpy_helper

import bnfold
import bnfold.onnx.io as onnx_io
from bnfold.cli import main
from bnfold.core.errors import BnfoldError
from bnfold.onnx import batched, ondisk, sweep as sweep_mod
from bnfold.onnx.graph import GraphIndex
from bnfold.onnx.multi import AFFINE_OPS, SUM_OPS
from tests.helpers import corrupt_models, fold_corpus
from tests.helpers.batch_check import same_either_way, taken
from tests.fuzz.strategies_onnx import cases
from tests.helpers.onnx_build import run_ort
from tests.helpers.sweep_reference import walk_only as _walk_only

NO_ORT = {"duplicate_names", "float64"}  # onnxruntime refuses two nodes of one name; has no float64 Conv
NAMES = sorted(fold_corpus.CORPUS)


def fold_bytes(model: onnx.ModelProto, **kw) -> tuple[bytes, dict]:
    res = bnfold.fold(model, **{"verify": False, **kw})
    report = res.report.to_dict()
    report.pop("timing_s", None)
    return res.model.SerializeToString(), json.loads(json.dumps(report, default=str))


def with_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the value_info an exporter writes (every inferred intermediate), as a copy."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    m.graph.value_info.extend(inferred.graph.value_info)
    assert len(m.graph.value_info) > 0
    return m


def agree(model: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict) -> None:
    a_all, b_all = run_ort(model, feeds), run_ort(folded, feeds)
    assert len(a_all) == len(b_all)
    for a, b in zip(a_all, b_all):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a64.shape == b64.shape
        tol = 2e-2 if a.dtype == np.float16 else 2e-4
        assert np.abs(a64 - b64).max() <= tol * max(1.0, float(np.abs(a64).max()))


def n_bns(model: onnx.ModelProto) -> int:
    def count(nodes):
        k = 0
        for n in nodes:
            k += n.op_type == "BatchNormalization"
            for a in n.attribute:
                for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                    k += count(g.node)
        return k
    return count(model.graph.node) + sum(count(f.node) for f in model.functions)


# -- the batch on and off, every corpus model; onnxruntime agrees ---------------------------------

@pytest.mark.parametrize("standalone", ["keep", "affine"])
@pytest.mark.parametrize("name", NAMES)
def test_the_corpus_folds_the_same_with_the_batch_on_and_off(name, standalone, monkeypatch):
    for k in (0, 1):
        model, feeds = fold_corpus.CORPUS[name](k)
        folded = same_either_way(model, monkeypatch, standalone=standalone)
        onnx.checker.check_model(folded)
        if name not in NO_ORT:
            agree(model, folded, feeds)


def test_the_corpus_really_takes_the_batch_where_it_should(monkeypatch):
    # (two runs of the ordinary path would prove nothing: the planned fold must be taken in these)
    for name in ("shared_bias", "weight_is_output", "shape_readers", "bn_out_is_output", "fan_out", "unnamed",
                 "duplicate_names", "ir3", "shared_params", "long_chain", "overridable_b"):
        model, _ = fold_corpus.CORPUS[name]()
        assert taken(model, monkeypatch) >= 1, name
    for name in ("float16", "float64", "mixed_float", "overridable_bn", "conv_out_also_read", "conv_out_is_output"):
        model, _ = fold_corpus.CORPUS[name]()
        assert taken(model, monkeypatch) == 0, name


def test_a_weight_and_bias_that_are_graph_outputs_keep_their_values(monkeypatch):
    model, feeds = fold_corpus.weight_is_output()
    folded = same_either_way(model, monkeypatch)
    before = dict(zip([o.name for o in model.graph.output], run_ort(model, feeds)))
    after = dict(zip([o.name for o in folded.graph.output], run_ort(folded, feeds)))
    assert set(after) == set(before)
    np.testing.assert_array_equal(after["w"], before["w"])  # the output still says the original weight
    np.testing.assert_array_equal(after["cb"], before["cb"])
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0


def test_shape_and_size_readers_of_the_conv_follow_it(monkeypatch):
    model, feeds = fold_corpus.shape_readers()
    folded = same_either_way(model, monkeypatch)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    for n in folded.graph.node:
        if n.op_type in ("Shape", "Size"):
            assert n.input[0] == conv.output[0]
    agree(model, folded, feeds)


def test_an_empty_bias_slot_is_filled_the_same_way_either_way(monkeypatch):
    model, feeds = fold_corpus.shared_bias()
    for n in model.graph.node:
        if n.op_type == "Conv":
            del n.input[2:]
            n.input.append("")  # Conv(x, w, ""): no bias, by an empty name
    folded = same_either_way(model, monkeypatch)
    assert taken(model, monkeypatch) == 2
    assert all(len(n.input) == 3 and n.input[2] for n in folded.graph.node if n.op_type == "Conv")
    agree(model, folded, feeds)


@pytest.mark.parametrize("tail", ["graph_output", "custom_domain", "twice", "activation"])
def test_a_bn_followed_by_a_mul_that_cannot_be_absorbed(tail, monkeypatch):
    b = fold_corpus.B(3)
    y = b.bn("bn", b.conv("c", "x"))
    outs = []
    if tail == "graph_output":  # the BN's output is both a graph output and read by a Mul by a constant
        m = b.node("Mul", [y, b.init("s", b.rng.uniform(0.5, 2, (fold_corpus.C, 1, 1)))], ["m"], name="mul")
        outs = [y, m]
    elif tail == "custom_domain":
        b.node("Relu", [y], ["r"], name="relu")
        b.nodes[-1].op_type, b.nodes[-1].domain = "Mul", "com.example"
        outs = ["r"]
    elif tail == "twice":  # Add(y, y): one node reading the BN's output twice
        outs = [b.node("Add", [y, y], ["a"], name="add")]
    else:  # Mul by an activation
        outs = [b.node("Mul", [y, "x"], ["m"], name="mul")]
    model = b.model(outs, domains=["com.example"] if tail == "custom_domain" else ())
    if tail == "custom_domain":
        folded = same_either_way(model, monkeypatch)
        return  # (onnxruntime has no com.example Mul)
    folded = same_either_way(model, monkeypatch)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    agree(model, folded, b.feeds())


def test_borrowed_weights_fold_the_same_with_verification(monkeypatch):
    """bnfold.fold on an in-memory model with verify=True folds a copy that borrows big weights (more than
    BORROW_MIN_ELEMENTS values, at most batched.MAX_ELEMENTS: the batch refuses borrowed ones)."""
    b = fold_corpus.B(5)
    c = 32
    w1 = b.init("w1", b.rng.normal(0, 0.1, (c, fold_corpus.C, 3, 3)))  # 1152 values: not borrowed
    w2 = b.init("w2", b.rng.normal(0, 0.05, (c, c, 3, 3)))  # 9216 values: borrowed
    bias = b.init("bias", b.rng.normal(0, 1, c))
    y = b.node("Conv", ["x", w1, bias], ["c1"], name="c1", pads=[1] * 4)
    st = fold_corpus.random_bn(b.rng, c)
    y = b.bn("bn1", y, params=[b.init(f"p1{k}", st[k]) for k in ("gamma", "beta", "mean", "var")])
    y = b.node("Conv", [y, w2, bias], ["c2"], name="c2", pads=[1] * 4)  # the bias shared with c1
    st = fold_corpus.random_bn(b.rng, c)
    y = b.bn("bn2", y, params=[b.init(f"p2{k}", st[k]) for k in ("gamma", "beta", "mean", "var")])
    y = b.node("Conv", [y, w2], ["c3"], name="c3", pads=[1] * 4)  # w2 shared too
    st = fold_corpus.random_bn(b.rng, c)
    y = b.bn("bn3", y, params=[b.init(f"p3{k}", st[k]) for k in ("gamma", "beta", "mean", "var")])
    model = b.model([y])
    before = model.SerializeToString()
    folded = same_either_way(model, monkeypatch, verify=True)
    assert model.SerializeToString() == before
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    agree(model, folded, b.feeds())
    res = bnfold.fold(model, verify=True)
    assert res.report.to_dict()["verification"]["passed"] is True


def test_weights_left_on_disk_fold_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(ondisk, "LAZY_TOTAL", 1)
    monkeypatch.setattr(ondisk, "LAZY_MIN", 256)
    model, feeds = fold_corpus.long_chain(2, n=6)
    path = tmp_path / "m.onnx"
    onnx.save(onnx.load_from_string(model.SerializeToString()), str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=64)
    data = (tmp_path / "m.data").read_bytes()
    loaded = onnx_io.load_onnx(str(path))
    assert any(ondisk.on_disk(t) for t in loaded.graph.initializer)
    assert taken(loaded, monkeypatch) == 0  # on-disk weights go the ordinary way
    outs = []
    for on in (True, False):
        monkeypatch.setattr(batched, "ENABLED", on)
        out = tmp_path / f"out_{on}.onnx"
        assert main([str(path), "-o", str(out), "--no-verify", "--json"]) == 0
        m = onnx.load(str(out))
        outs.append(m.SerializeToString())
        agree(model, m, feeds)
    assert outs[0] == outs[1]
    assert (tmp_path / "m.data").read_bytes() == data  # the input's data file untouched


@pytest.mark.parametrize("name", ["shape_readers", "bn_chain", "fan_out", "unnamed", "shared_bias",
                                  "bn_then_mul_add", "matmul_bn", "repvgg_add", "ir3", "long_chain", "backward"])
def test_value_info_of_folded_values_goes_the_same_either_way(name, monkeypatch):
    model, feeds = fold_corpus.CORPUS[name]()
    model = with_value_info(model)
    for sa in ("keep", "affine"):
        folded = same_either_way(model, monkeypatch, standalone=sa)
        onnx.checker.check_model(folded, full_check=True)
        described = {v.name for v in folded.graph.value_info}
        written = {o for n in folded.graph.node for o in n.output}
        assert described <= written  # no value_info of a value nobody writes any more
        agree(model, folded, feeds)


# -- the census: skipping a scan never misses a fold --------------------------------------------

def _full_census(monkeypatch) -> None:
    """Every index's census holds every affine and sum op: fold_disguised and merge_all always scan."""
    real = GraphIndex.build.__func__

    def build(cls, *a, **kw):
        ix = real(cls, *a, **kw)
        ix.op_types.update(AFFINE_OPS, SUM_OPS)
        return ix

    monkeypatch.setattr(GraphIndex, "build", classmethod(build))


@pytest.mark.parametrize("standalone", ["keep", "affine"])
def test_the_census_skips_no_fold_the_full_scans_make(standalone, monkeypatch):
    for name in NAMES:
        for k in (0, 1):
            model, _ = fold_corpus.CORPUS[name](k)
            with monkeypatch.context() as m:
                _full_census(m)
                want = fold_bytes(model, standalone=standalone)
            got = fold_bytes(model, standalone=standalone)
            assert got[1] == want[1], name
            assert got[0] == want[0], name


def test_folds_that_make_affine_ops_leave_them_for_the_next_pass(monkeypatch):
    """MatMul -> BN (no bias) inserts an Add, --standalone affine a Mul + Add, at the sweep: a graph without
    affine ops before folds nothing more this pass, and a second fold of the result folds what the new ops
    allow exactly as a full scan would."""
    for name, sa in (("matmul_bn", "keep"), ("backward", "affine"), ("bn_chain", "affine")):
        model, feeds = fold_corpus.CORPUS[name]()
        assert not {n.op_type for n in model.graph.node} & {"Mul", "Add", "Sub", "Div", "Sum"}
        once = onnx.load_from_string(fold_bytes(model, standalone=sa)[0])
        assert {n.op_type for n in once.graph.node} & {"Mul", "Add"}
        agree(model, once, feeds)
        twice = fold_bytes(once, standalone=sa)
        with monkeypatch.context() as m:
            _full_census(m)
            assert fold_bytes(once, standalone=sa) == twice


@seed(20261130)
@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=cases(max_blocks=4))
def test_random_models_fold_alike_with_full_scans_and_the_old_sweep(case, monkeypatch):
    got = fold_bytes(case.model)
    with monkeypatch.context() as m:
        _full_census(m)
        m.setattr(sweep_mod, "_dead_constants", _walk_only)
        assert fold_bytes(case.model) == got


# -- the sweep: bulk settling against the walk it replaced (tests/helpers/sweep_reference.py) -------

@pytest.mark.parametrize("standalone", ["keep", "affine"])
def test_the_sweep_keeps_and_drops_what_the_walk_did(standalone, monkeypatch):
    for name in NAMES:
        model, _ = fold_corpus.CORPUS[name]()
        got = fold_bytes(model, standalone=standalone)
        with monkeypatch.context() as m:
            m.setattr(sweep_mod, "_dead_constants", _walk_only)
            want = fold_bytes(model, standalone=standalone)
        assert got == want, name


def _read_names(model: onnx.ModelProto, bodies: bool = True) -> set[str]:
    out: set[str] = set()

    def walk(g):
        for n in g.node:
            out.update(n.input)
            for a in n.attribute if bodies else ():
                for s in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                    walk(s)
        out.update(o.name for o in g.output)
    walk(model.graph)
    return out


@pytest.mark.parametrize("name", ["shared_params", "unused_initializers", "overridable_w", "overridable_bn",
                                  "constant_weights", "shared_weight", "if_bodies", "ir3", "weight_is_output"])
def test_what_the_sweep_keeps(name, monkeypatch):
    model, _ = fold_corpus.CORPUS[name]()
    folded = same_either_way(model, monkeypatch)
    read = _read_names(folded)
    inputs = {i.name for i in folded.graph.input}
    orig_read = _read_names(model)
    for t in folded.graph.initializer:  # nothing kept that nobody reads, unless it was so before or a caller may feed it
        assert t.name in read or t.name in inputs or t.name not in orig_read, (name, t.name)
    kept = {t.name for t in folded.graph.initializer}
    for t in model.graph.initializer:
        if t.name not in orig_read or t.name in inputs:  # unused before, or overridable: stays
            assert t.name in kept, (name, t.name)
        if t.name in {o.name for o in model.graph.output}:
            assert t.name in kept, (name, t.name)
    missing = _read_names(folded, bodies=False) - kept - inputs - {o for n in folded.graph.node for o in n.output} - {""}
    assert not missing, (name, missing)
    if name == "constant_weights":  # the Constant -> Cast weight and the Constant statistics are gone
        assert not any(n.op_type in ("Constant", "Cast") for n in folded.graph.node)
    if name == "shared_params":  # m3 is a graph output, g3 read by an Identity: both keep their values
        orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        now = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
        for k in ("m3", "g3"):
            np.testing.assert_array_equal(now[k], orig[k])


def test_a_bn_statistic_read_by_a_body_stays(monkeypatch):
    b = fold_corpus.B(7)
    y = b.bn("bn", b.conv("c", "x"))
    body_nodes = [helper.make_node("ReduceSum", ["bn_gamma"], ["t_sum"], name="t_sum"),  # an outer statistic
                  helper.make_node("Add", [y, "t_sum"], ["t_add"], name="t_add"),
                  helper.make_node("Identity", ["t_add"], ["t_out"], name="t_id")]
    then_g = helper.make_graph(body_nodes, "then", [],
                               [helper.make_tensor_value_info("t_out", fold_corpus.F, None)])
    else_g = helper.make_graph([helper.make_node("Identity", [y], ["e_out"], name="e_id")], "else", [],
                               [helper.make_tensor_value_info("e_out", fold_corpus.F, None)])
    cond = b.init("cond", np.array(True), np.bool_)
    b.node("If", [cond], ["yy"], name="if", then_branch=then_g, else_branch=else_g)
    b.out("yy", list(fold_corpus.X))
    model = b.model([])
    folded = same_either_way(model, monkeypatch)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert "bn_gamma" in {t.name for t in folded.graph.initializer}
    agree(model, folded, b.feeds())


# -- load checks: every corrupt model refused, on both paths ------------------------------------

def _outcome(path: Path, threshold: int, monkeypatch) -> tuple[str, str]:
    monkeypatch.setattr(onnx_io, "STRUCTURE_CHECK_MAX", threshold)
    try:
        onnx_io.load_onnx(str(path))
        return "ok", ""
    except BnfoldError as e:
        return "error", str(e)


@pytest.mark.parametrize("kind", corrupt_models.KINDS)
def test_every_corrupt_tensor_is_refused_on_both_load_paths(kind, tmp_path, monkeypatch):
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(corrupt_models.variant(kind).SerializeToString())
    got = [_outcome(path, t, monkeypatch) for t in (10 ** 9, 0)]
    assert got[0] == got[1]
    if kind == "good":
        assert got[0][0] == "ok"
        return
    verdict, msg = got[0]
    assert verdict == "error" and str(path) in msg and "\n" not in msg, got


@pytest.mark.parametrize("kind", corrupt_models.EXTERNAL_KINDS)
def test_external_data_in_odd_places_is_refused_without_reading_outside(kind, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(24))
    path = corrupt_models.external_variant(kind, folder)
    got = [_outcome(path, t, monkeypatch) for t in (10 ** 9, 0)]
    assert got[0] == got[1]
    verdict, msg = got[0]
    if kind == "constant_external_ok":  # (refused once: only initializers were asked whether they lived in a file)
        assert verdict == "ok", got
        return
    assert verdict == "error" and str(path) in msg and "\n" not in msg, got


def test_a_constant_whose_value_lives_in_a_data_file_is_read_and_the_model_folds(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = corrupt_models.external_variant("constant_external_ok", folder)
    model = onnx_io.load_onnx(str(path))
    const = next(n for n in model.graph.node if n.op_type == "Constant")
    np.testing.assert_array_equal(numpy_helper.to_array(const.attribute[0].t).reshape(-1), np.arange(6))
    out = tmp_path / "out.onnx"
    assert main([str(path), "-o", str(out)]) == 0
    folded = onnx.load(str(out))
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


@pytest.mark.parametrize("kind", ["conv_tensor_attribute_short", "if_body_relu_tensor_attribute",
                                  "function_constant_short", "custom_domain_tensors_attribute_short",
                                  "constant_sparse_indices_short", "conv_graph_attribute"])
@pytest.mark.parametrize("threshold", [0, 10 ** 9])
def test_the_command_line_refuses_a_corrupt_model_in_one_line_and_writes_nothing(kind, threshold, tmp_path,
                                                                                 monkeypatch, capsys):
    monkeypatch.setattr(onnx_io, "STRUCTURE_CHECK_MAX", threshold)
    path = tmp_path / f"{kind}.onnx"
    data = corrupt_models.variant(kind).SerializeToString()
    path.write_bytes(data)
    out = tmp_path / "out.onnx"
    assert main([str(path), "-o", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "\n" not in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == [path.name]
    assert path.read_bytes() == data


def test_a_layer_norm_model_without_the_odd_attribute_loads(tmp_path, monkeypatch):
    m = corrupt_models.base()
    corrupt_models._layer_norm(m, corrupt_models.short())
    del m.graph.node[-1].attribute[-1]  # (only axis left)
    path = tmp_path / "ln.onnx"
    path.write_bytes(m.SerializeToString())
    assert [_outcome(path, t, monkeypatch)[0] for t in (10 ** 9, 0)] == ["ok", "ok"]


@pytest.mark.parametrize("threshold", [0, 10 ** 9])
def test_a_tensor_of_unknown_type_on_a_layer_norm_is_refused(threshold, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(onnx_io, "STRUCTURE_CHECK_MAX", threshold)
    path = tmp_path / "ln.onnx"
    path.write_bytes(corrupt_models.variant("layer_norm_attribute_unknown_dtype").SerializeToString())
    out = tmp_path / "out.onnx"
    assert main([str(path), "-o", str(out), "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert "data type 99" in err and str(path) in err
    assert not out.exists()


def test_a_conv_weight_read_by_a_body_keeps_its_value(monkeypatch):
    model, feeds = fold_corpus.weight_read_by_body()
    folded = same_either_way(model, monkeypatch)
    assert taken(model, monkeypatch) == 1  # the planned fold: its weight goes under a new name
    orig = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    now = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    for k in ("c_w", "bn_mean"):
        np.testing.assert_array_equal(now[k], orig[k])
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.input[1] != "c_w"
    agree(model, folded, feeds)


def test_ir3_bodies_get_constants_the_same_way_either_way(monkeypatch):
    model, feeds = fold_corpus.if_bodies_ir3()
    folded = same_either_way(model, monkeypatch)
    onnx.checker.check_model(folded)
    for a in next(n for n in folded.graph.node if n.op_type == "If").attribute:
        assert not a.g.initializer  # (IR 3: a body holds no initializers)
        assert not any(n.op_type == "BatchNormalization" for n in a.g.node)
    inputs = {i.name for i in folded.graph.input}
    assert all(t.name in inputs for t in folded.graph.initializer)  # IR 3: every initializer an input
    agree(model, folded, feeds)


@pytest.mark.parametrize("threshold", [0, 10 ** 9])
def test_a_tensor_of_unknown_type_on_a_layer_norm_in_a_function_is_refused(threshold, tmp_path, monkeypatch):
    path = tmp_path / "fn_ln.onnx"
    path.write_bytes(corrupt_models.variant("function_layer_norm_attribute_unknown_dtype").SerializeToString())
    verdict, msg = _outcome(path, threshold, monkeypatch)
    assert verdict == "error" and "data type 99" in msg


@pytest.mark.parametrize("threshold", [0, 10 ** 9])
def test_a_corrupt_default_attribute_of_a_function_is_refused(threshold, tmp_path, monkeypatch):
    path = tmp_path / "fn_default.onnx"
    path.write_bytes(corrupt_models.variant("function_attribute_default_short").SerializeToString())
    verdict, msg = _outcome(path, threshold, monkeypatch)
    assert verdict == "error" and str(path) in msg


# -- random chains that share names across roles --------------------------------------------------

def _random_chain(r: np.random.Generator) -> tuple[onnx.ModelProto, dict]:
    """Conv -> BN pairs (some BNs doubled, some convs without bias) whose weights, biases and statistics are
    drawn from small shared pools (a name may be a weight of two convs, a bias and a BN statistic at once),
    with Shape readers, graph outputs, Mul/Add/Sub/Div by constants, unnamed nodes and IR 3 or 8."""
    b = fold_corpus.B(int(r.integers(1 << 30)))
    c = fold_corpus.C
    weights = [b.w(f"w{k}") for k in range(int(r.integers(1, 4)))]
    vecs = [b.init(f"v{k}", b.rng.uniform(0.5, 2.0, c)) for k in range(int(r.integers(2, 6)))]
    outs, y = [], "x"
    for k in range(int(r.integers(2, 7))):
        bias = vecs[int(r.integers(len(vecs)))] if r.random() < 0.6 else None
        conv = b.conv(f"c{k}", y, w=weights[int(r.integers(len(weights)))], b=bias, named=r.random() < 0.7)
        params = [vecs[int(r.integers(len(vecs)))] for _ in range(4)] if r.random() < 0.5 else None
        y = b.bn(f"bn{k}", conv, params=params, named=r.random() < 0.7)
        if r.random() < 0.2:
            y = b.bn(f"bn{k}b", y)
        roll = r.random()
        if roll < 0.15:
            s = b.node("Shape", [conv], [f"s{k}"], name=f"shape{k}")
            y = b.node("Reshape", [y, s], [f"r{k}"], name=f"reshape{k}")
        elif roll < 0.3:
            outs.append(y)
        elif roll < 0.45:
            op = ("Mul", "Add", "Sub", "Div")[int(r.integers(4))]
            k3 = b.init(f"k{k}", b.rng.uniform(0.5, 2.0, (c, 1, 1)))
            y = b.node(op, [y, k3], [f"a{k}"], name=f"aff{k}")
        elif roll < 0.55:
            outs.append(conv)  # the conv's own output a graph output too: no fold
        if r.random() < 0.3:
            y = b.node("Relu", [y], [f"relu{k}"], name=f"relu{k}")
    outs.append(y)
    outs = list(dict.fromkeys(outs))
    ir = 3 if r.random() < 0.2 else 8
    m = b.model(outs, ir=ir, opset=9 if ir == 3 else 17, inits_as_inputs="all" if ir == 3 else ())
    return m, b.feeds()


@pytest.mark.parametrize("k", range(40))
def test_random_shared_name_chains(k, monkeypatch):
    model, feeds = _random_chain(np.random.default_rng(1000 + k))
    folded = same_either_way(model, monkeypatch)
    onnx.checker.check_model(folded)
    got = fold_bytes(model)
    with monkeypatch.context() as m:
        _full_census(m)
        m.setattr(sweep_mod, "_dead_constants", _walk_only)
        assert fold_bytes(model) == got
    agree(model, folded, feeds)
