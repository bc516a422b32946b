"""What makes ONNX folding fast must not change what it computes: imports, file encoding, borrowed copies,
the load-time check, and the windows the local proofs are replayed on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.core import kernel
from bnfold.core.decisions import Reason
from bnfold.core.errors import BnfoldError
from bnfold.onnx import io as onnx_io
from bnfold.onnx import batched, proofs, protos, replay, windows
from bnfold.onnx.ondisk import tensor_value
from bnfold.onnx.protos import copy_borrowing, fill_borrowed
from tests.conftest import SAMPLES
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import fold_verified, ort_session

HEAVY = ("onnxruntime", "onnx.reference", "bnfold.verify", "bnfold.onnx.verify", "bnfold.onnx.proofs",
         "bnfold.onnx.runtime", "bnfold.onnx.feeds", "bnfold.onnx.noise", "bnfold.onnx.divergence", "torch",
         "tensorflow", "keras", "jax")


@pytest.mark.parametrize("flags", [["--no-verify"], ["--no-verify", "--dry-run"], ["--no-verify", "--json"]])
def test_a_run_without_verification_imports_no_verification_machinery(tmp_path, flags):
    out = tmp_path / "out.onnx"
    code = ("import sys, bnfold.cli as c; rc = c.main(sys.argv[1:]); import json;"
            f"heavy = {HEAVY!r};"
            "print('IMPORTED', json.dumps(sorted(m for m in sys.modules if m.startswith(heavy)))); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, os.path.join(SAMPLES, "resnet_block.onnx"), *flags, "-q", "-o",
                        str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(SAMPLES)})
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("IMPORTED"))
    assert json.loads(line.split(" ", 1)[1]) == []
    assert out.exists() != ("--dry-run" in flags)


def _big_model(rng, channels: int = 176) -> onnx.ModelProto:
    """Conv->BN layers whose weights (>= 1 MiB) go through the hand-framed encoding and the borrowed copy."""
    g = G(rng)
    x = "x"
    for i in range(3):
        g.node("Conv", [x, g.weight(f"w{i}", (channels, channels, 3, 3), 0.05), g.weight(f"b{i}", (channels,))],
               [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1])
        x = g.bn(f"bn{i}", f"c{i}", channels, out=f"y{i}")
    g.node("Relu", [x], ["y"], name="relu")
    m = g.model([("x", [1, channels, 6, 6])], [("y", [1, channels, 6, 6])])
    m.doc_string = "doc"
    m.graph.doc_string = "graph doc"
    onnx.helper.set_model_props(m, {"k": "v"})
    m.graph.value_info.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, [1, channels, 6, 6]))
    m.graph.initializer[0].doc_string = "a weight"
    return m


def test_hand_framed_encoding_is_protobufs_own_byte_for_byte(rng, tmp_path):
    m = _big_model(rng)
    assert sum(numpy_helper.to_array(t).nbytes >= onnx_io.FRAME_MIN for t in m.graph.initializer) == 3
    path = tmp_path / "m.onnx"
    onnx_io.write_inline(m, str(path))
    assert path.read_bytes() == m.SerializeToString()
    assert onnx_io.serialize(m) == m.SerializeToString()


def test_serialized_extra_outputs_are_merged_by_onnxruntime(rng):
    m = _big_model(rng)
    want = ["c0", "y1", "y"]  # one a graph output already
    sess = ort_session_bytes(onnx_io.serialize(m, want))
    assert [o.name for o in sess.get_outputs()] == ["y", "c0", "y1"]
    x = {"x": rng.normal(size=(1, 176, 6, 6)).astype(np.float32)}
    ref = ort_session(m).run(None, x)[0]
    assert np.array_equal(sess.run(None, x)[0], ref)
    parsed = onnx.ModelProto.FromString(onnx_io.serialize(m, want))
    assert [o.name for o in parsed.graph.output] == ["y", "c0", "y1"]


def ort_session_bytes(data: bytes):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def test_tensors_the_framing_cannot_vouch_for_are_left_to_protobuf(rng, tmp_path):
    m = _big_model(rng)
    t = m.graph.initializer[0]
    t.raw_data = t.raw_data[:-4]  # data shorter than its shape says: written as it is, not re-framed wrongly
    path = tmp_path / "short.onnx"
    onnx_io.write_inline(m, str(path))
    assert path.read_bytes() == m.SerializeToString()
    unknown = _big_model(rng)
    data = unknown.SerializeToString() + b"\xf8\x07\x05"  # field 127, from some newer writer
    unknown = onnx.ModelProto.FromString(data)
    onnx_io.write_inline(unknown, str(path))
    assert path.read_bytes() == data


def test_the_output_guard_finds_data_files_without_parsing_and_without_false_negatives(rng, tmp_path):
    m = _big_model(rng)
    inline = tmp_path / "inline.onnx"
    onnx.save(m, str(inline))
    assert onnx_io.external_files(str(inline)) == set()
    ext = tmp_path / "ext.onnx"
    onnx.save_model(m, str(ext), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    assert onnx_io.external_files(str(ext)) == {str((tmp_path / "weights.bin").resolve())}
    # the word in a node name: a false alarm the full parse settles
    m = _big_model(rng)  # (onnx.save_model made the other one's weights external)
    m.graph.node[0].name = "location"
    onnx.save(m, str(inline))
    assert onnx_io.external_files(str(inline)) == set()


@pytest.mark.parametrize("where", ["raw data", "doc string", "external"])
def test_the_field_walk_skips_only_raw_data(rng, tmp_path, monkeypatch, where):
    monkeypatch.setattr(onnx_io, "WALK_MIN", 0)  # walk even this small file
    m = _big_model(rng)
    t = m.graph.initializer[0]
    if where == "raw data":
        t.raw_data = b"location" + t.raw_data[8:]
    elif where == "doc string":
        t.doc_string = "see location"
    path = tmp_path / "m.onnx"
    if where == "external":
        onnx.save_model(m, str(path), save_as_external_data=True, location="w.bin", size_threshold=1024)
    else:
        onnx.save(m, str(path))
    with open(path, "rb") as fh:
        assert onnx_io._mentions(onnx_io._File(fh), b"location") == (where != "raw data")


def test_tensor_value_reads_every_plain_type_as_numpy_helper_does(rng):
    for dtype in (np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.bool_):
        for shape in ((), (5,), (2, 3), (0, 4), (2, 1, 3)):
            a = (rng.normal(size=shape) * 50).astype(dtype)
            t = numpy_helper.from_array(a, "t")
            got, want = tensor_value(t), numpy_helper.to_array(t)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    t = helper.make_tensor("f", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])  # float_data, not raw
    assert np.array_equal(tensor_value(t), [1.0, 2.0, 3.0])


def test_a_borrowed_copy_folds_the_same_and_never_touches_the_original(rng):
    m = _big_model(rng)
    # conv2's weight also feeds an unfolded conv: shared, it must be copied on write and kept intact
    m.graph.node.append(helper.make_node("Conv", ["y", "w2"], ["z"], name="other", pads=[1, 1, 1, 1]))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 176, 6, 6]))
    before = m.SerializeToString()
    copy, borrowed = copy_borrowing(m)
    assert set(borrowed) == {"w0", "w1", "w2"} and not copy.graph.initializer[0].HasField("raw_data")
    fill_borrowed(copy, borrowed)
    assert copy.SerializeToString() == before
    res = fold_verified(m)
    assert m.SerializeToString() == before
    assert [t.name for t in res.model.graph.initializer][:2] == ["w0", "b0"]
    by_name = {t.name: t for t in res.model.graph.initializer}
    original = {t.name: t for t in m.graph.initializer}
    assert np.array_equal(numpy_helper.to_array(by_name["w2"]), numpy_helper.to_array(original["w2"]))
    assert {d.bn for d in res.report.folded} == {"bn0", "bn1", "bn2"}  # conv2 got its own copy of w2
    assert not np.array_equal(numpy_helper.to_array(by_name["w0"]), numpy_helper.to_array(original["w0"]))


def test_a_dry_run_and_a_failed_fold_leave_borrowed_weights_whole(rng, monkeypatch):
    m = _big_model(rng)
    res = bnfold.fold(m, verify=False, dry_run=True)
    assert res.model is m
    monkeypatch.setattr(kernel, "round_to", _overflowing(kernel.round_to))
    res = bnfold.fold(m, verify=False)
    assert {d.reason for d in res.report.skipped} == {Reason.DTYPE_OVERFLOW}
    assert res.model.SerializeToString() == m.SerializeToString()


def _overflowing(real):
    def round_to(x, dtype, what):
        from bnfold.core.decisions import Skip
        raise Skip(Reason.DTYPE_OVERFLOW, f"planted: {what}")
    return round_to


def test_the_load_check_keeps_its_verdicts(rng, tmp_path, monkeypatch):
    g = G(rng)
    g.node("MatMul", ["x", g.weight("w", (4, 4))], ["y"], name="mm")
    m = g.model([("x", [2, 4])], [("y", [2, 4])], opset=7, ir=3)  # IR 3: "w" should be an input too
    path = tmp_path / "ir3.onnx"
    onnx.save(m, str(path))
    monkeypatch.setattr(onnx_io, "STRUCTURE_CHECK_MAX", 0)  # the fast check first, for every model
    assert onnx_io.load_onnx(str(path)).graph.initializer[0].name == "w"  # accepted, as always
    m.graph.node[0].op_type = "NoSuchOp"
    onnx.save(m, str(path))
    with pytest.raises(BnfoldError, match="invalid ONNX model"):
        onnx_io.load_onnx(str(path))


# -- the windows of the local proofs ---------------------------------------------------------------

def _conv_region(rng, kernel_shape, strides, dilations, pads, group=1, c=4):
    g = G(rng)
    k = tuple(kernel_shape)
    g.node("Conv", ["x", g.weight("w", (6, c // group, *k)), g.weight("b", (6,))], ["c"], name="conv",
           kernel_shape=list(k), strides=list(strides), dilations=list(dilations), pads=list(pads), group=group)
    g.bn("bn", "c", 6, out="y")
    return g


@pytest.mark.parametrize("kernel_shape,strides,dilations,pads", [
    ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)), ((3, 5), (2, 1), (1, 2), (0, 2, 1, 3)), ((1, 1), (2, 2), (1, 1), (0, 0, 0, 0)),
    ((7, 7), (2, 2), (1, 1), (3, 3, 3, 3)), ((3,), (1,), (2,), (2, 1)), ((2, 2, 2), (1, 2, 1), (1, 1, 1), (1,) * 6)])
def test_a_window_replays_exactly_that_part_of_the_whole(rng, kernel_shape, strides, dilations, pads):
    """The replay on the cut input with pads 0 equals the same window of the replay of the whole."""
    nd = len(kernel_shape)
    g = _conv_region(rng, kernel_shape, strides, dilations, pads)
    spatial = (19, 17, 9)[:nd]
    m = g.model([("x", [2, 4, *spatial])], [("y", None)])
    graph = proofs._Graph(m)
    nodes, inits = graph.region(("x",), "y")
    x = rng.normal(size=(2, 4, *spatial))
    whole = replay.run(m, nodes, inits, "y", {"x": x}, pads={})
    cut_x, cut, new_pads = windows.shrink((nodes, inits), (nodes, inits), "x", x, whole)
    cut_whole = whole[cut]
    assert cut_x.shape[0] == 1 and new_pads and cut_x.size < x.size
    part = replay.run(m, nodes, inits, "y", {"x": cut_x}, pads=new_pads)
    assert part.shape == cut_whole.shape
    np.testing.assert_allclose(part, cut_whole, rtol=1e-12, atol=1e-12)


def test_no_window_when_the_region_mixes_positions_or_samples(rng):
    g = _conv_region(rng, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    g.node("Add", ["y", g.weight("plane", (1, 6, 8, 8))], ["z"], name="plane_add")  # varies with position
    m = g.model([("x", [2, 4, 8, 8])], [("z", None)])
    nodes, inits = proofs._Graph(m).region(("x",), "z")
    x = rng.normal(size=(2, 4, 8, 8))
    cut_x, _, pads = windows.shrink((nodes, inits), (nodes, inits), "x", x, np.zeros((2, 6, 8, 8)))
    assert cut_x.shape == (1, 4, 8, 8) and not pads  # one sample still suffices; positions do not
    g = _conv_region(rng, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1))
    g.node("Add", ["y", g.weight("per_item", (2, 6, 1, 1))], ["z"], name="item_add")  # varies with the item
    m = g.model([("x", [2, 4, 8, 8])], [("z", None)])
    nodes, inits = proofs._Graph(m).region(("x",), "z")
    cut_x, _, pads = windows.shrink((nodes, inits), (nodes, inits), "x", x, np.zeros((2, 6, 8, 8)))
    assert cut_x.shape[0] == 2 and pads


@pytest.mark.parametrize("how", ["scale", "bias", "axis", "group"])
def test_planted_errors_are_caught_on_a_window(rng, monkeypatch, how):
    """Large feature maps: the proofs run on windows, and still catch one damaged fold among several."""
    from tests.helpers.fold_damage import damage
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (16, 8, 3, 3))], ["c1"], name="conv1", pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 16, out="y1")
    g.node("Conv", ["y1", g.weight("w2", (16, 4, 3, 3))], ["c2"], name="conv2", group=4, pads=[1, 1, 1, 1],
           strides=[2, 2])
    g.bn("bn2", "c2", 16, out="y2")
    g.node("Conv", ["y2", g.weight("w3", (8, 16, 1, 1))], ["c3"], name="conv3")
    g.bn("bn3", "c3", 8, out="y")
    model = g.model([("x", [2, 8, 40, 40])], [("y", [2, 8, 20, 20])])
    clean = bnfold.fold(model)
    assert clean.report.verification.proofs == {"proven": 3, "failed": 0, "not_run": 0}
    real, calls = kernel.fold_after, []

    def wrong(*a, **k):
        f = real(*a, **k)
        calls.append(1)
        return damage(f, how, 4) if len(calls) == 2 else f
    monkeypatch.setattr(kernel, "fold_after", wrong)
    monkeypatch.setattr(batched, "ENABLED", False)  # planted in the one-BN kernel: the batch would bypass it
    res = bnfold.fold(model, strict=True)
    assert res.report.verification.proofs["failed"] == 1
    [blamed] = res.report.verification.blame
    assert blamed["bn"] == "bn2" and blamed["max_abs"] > blamed["bound"]


@pytest.mark.parametrize("verify", [False, True])
def test_an_owned_model_is_folded_in_place_only_when_nothing_needs_the_original(rng, verify):
    """The command line hands its freshly loaded model over (owned=True): without verification it is folded in
    place (no copy); with verification the original stays as it was and the result is another model."""
    from bnfold import api
    from bnfold.core.options import Options
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (6, 3, 3, 3)), g.weight("b", (6,))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 6, out="y")
    m = g.model([("x", [2, 3, 8, 8])], [("y", None)])
    before = m.SerializeToString()
    res = api.fold_with(m, Options(verify=verify, providers=("cpu",)), owned=True)
    assert not any(n.op_type == "BatchNormalization" for n in res.model.graph.node)
    if verify:
        assert res.report.verification.passed is True
        assert res.model is not m and m.SerializeToString() == before
    else:
        assert res.model is m
    m2 = g.model([("x", [2, 3, 8, 8])], [("y", None)])
    assert api.fold_with(m2, Options(verify=False)).model is not m2  # not owned: a copy, as the API promises


def test_no_window_when_x_also_reaches_the_output_around_the_conv(rng):
    """A re-parameterisable block: conv branch + identity BN branch of the same x, summed. Cutting x for
    the conv would leave the identity branch whole (shapes that no longer add up): positions stay whole."""
    g = _conv_region(rng, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), c=6)
    g.bn("bn_id", "x", 6, out="ident")
    g.node("Add", ["y", "ident"], ["z"], name="sum")
    m = g.model([("x", [2, 6, 8, 8])], [("z", None)])
    nodes, inits = proofs._Graph(m).region(("x",), "z")
    x = rng.normal(size=(2, 6, 8, 8))
    whole = replay.run(m, nodes, inits, "z", {"x": x}, pads={})
    cut_x, cut, pads = windows.shrink((nodes, inits), (nodes, inits), "x", x, whole)
    assert cut_x.shape[2:] == (8, 8) and not pads
    np.testing.assert_allclose(replay.run(m, nodes, inits, "z", {"x": cut_x}, pads=pads), whole[cut], rtol=1e-12)


# -- the attributes the load check skips -------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(protos.SCHEMA_CHECKED))
def test_the_checker_refuses_an_unknown_attribute_on_every_op_the_size_check_skips(op):
    """protos.all_tensors skips the attributes of these ops, trusting onnx's checker (which load_onnx runs after
    the size check) to refuse any tensor among them: it must, in every opset where the op has a schema."""
    from onnx import defs

    seen = 0
    for version in range(1, defs.onnx_opset_version() + 1):
        try:
            schema = defs.get_schema(op, version, "")
        except defs.SchemaError:
            continue
        if schema.since_version != version or schema.deprecated:
            continue
        seen += 1
        node = helper.make_node(op, [f"i{k}" for k in range(schema.min_input)],
                                [f"o{k}" for k in range(max(1, schema.min_output))])
        node.attribute.append(helper.make_attribute("bnfold_unknown", numpy_helper.from_array(np.zeros(2, np.float32))))
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version, ctx.opset_imports = 8, {"": version}
        with pytest.raises(onnx.checker.ValidationError, match="Unrecognized attribute"):
            onnx.checker.check_node(node, ctx, onnx.checker.C.LexicalScopeContext())
    assert seen, op
