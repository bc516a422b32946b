"""Adversarial tests of the load check's note (core/hold.py note/noted, onnx/validity.py INITIALIZER_ELEMENTS) that
the count of a model as loaded (beforeafter.anatomy(..., as_loaded=True)) uses instead of reading every
initializer's dims: the numbers must be the ones a count that reads the tensors gives, for every model the load
accepts, in the library and through the CLI's JSON report; and a note must serve only the model its load returned,
in its own holding() block."""
from __future__ import annotations

import contextvars
import gc
import json
import os
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.beforeafter import anatomy
from bnfold.core.hold import holding, noted
from bnfold.onnx import ondisk
from bnfold.onnx.io import load_onnx
from bnfold.onnx.validity import INITIALIZER_ELEMENTS, check_sizes
from tests.helpers.fold_corpus import CORPUS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = TensorProto.FLOAT
_rng = np.random.default_rng(11)


def _arr(*shape, dtype=np.float32):
    return _rng.standard_normal(shape).astype(dtype)


def _vi(name, elem=F, shape=("d",)):
    return helper.make_tensor_value_info(name, elem, shape)


def _body(tag: str, n: int, inputs=(), outputs=None, extra_nodes=()) -> onnx.GraphProto:
    """A body whose one initializer (n elements) is its output (Identity), plus what the caller adds."""
    w = f"{tag}_w"
    nodes = [*extra_nodes, helper.make_node("Identity", [w], [f"{tag}_o"])]
    return helper.make_graph(nodes, tag, list(inputs), outputs or [_vi(f"{tag}_o", F, [n])],
                             [numpy_helper.from_array(_arr(n), w)])


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 18),), ir=8, functions=(), **kw) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), **kw)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], functions=list(functions))
    m.ir_version = ir
    return m


def _counts(path: str) -> tuple[dict, dict]:
    """(the count a job makes of the model as loaded, in a block; the count that reads every tensor)."""
    with holding():
        m = load_onnx(path)
        fast = anatomy(m, "onnx", as_loaded=True)
        assert noted(m, INITIALIZER_ELEMENTS) is not None
    return fast, anatomy(onnx.load(path), "onnx")


def _saved(m: onnx.ModelProto, tmp_path, name="m.onnx", **kw) -> str:
    p = str(tmp_path / name)
    onnx.save(m, p, **kw)
    return p


# -- models the two counts must agree on ----------------------------------------------------------------------

def _control_flow_model() -> onnx.ModelProto:
    """Initializers in the bodies of If, Loop, Scan and SequenceMap, one nested two deep (an If in a Loop body),
    Constants with value / value_floats / value_ints / sparse_value (a name used twice is refused by the load)."""
    inner_if = helper.make_node("If", ["lc"], ["in_y"], then_branch=_body("it", 2), else_branch=_body("ie", 2))
    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["lc"], ["lc_out"]), inner_if,
         helper.make_node("Identity", ["lw"], ["scan_o"])],
        "loop", [_vi("i", TensorProto.INT64, []), _vi("lc", TensorProto.BOOL, [])],
        [_vi("lc_out", TensorProto.BOOL, []), _vi("scan_o", F, [3])],
        [numpy_helper.from_array(_arr(3), "lw")])
    scan_body = helper.make_graph([helper.make_node("Add", ["s_in", "sw"], ["s_out"])], "scan",
                                  [_vi("s_in", F, [3])], [_vi("s_out", F, [3])],
                                  [numpy_helper.from_array(_arr(3), "sw")])
    smap_body = helper.make_graph([helper.make_node("Add", ["m_in", "mw"], ["m_out"])], "smap",
                                  [_vi("m_in", F, [3])], [_vi("m_out", F, [3])],
                                  [numpy_helper.from_array(_arr(3), "mw")])
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(_arr(2), "spv"),
                                       numpy_helper.from_array(np.array([0, 4], np.int64), "spi"), [5])
    nodes = [
        helper.make_node("If", ["c"], ["iy"], then_branch=_body("t", 4), else_branch=_body("e", 5)),
        helper.make_node("Loop", ["trip", "c"], ["loop_scan"], body=loop_body),
        helper.make_node("Scan", ["xs"], ["ys"], body=scan_body, num_scan_inputs=1),
        helper.make_node("SequenceConstruct", ["x3", "x3"], ["seq"]),
        helper.make_node("SequenceMap", ["seq"], ["seq_out"], body=smap_body),
        helper.make_node("Constant", [], ["k1"], value=numpy_helper.from_array(_arr(2, 3), "k1")),
        helper.make_node("Constant", [], ["k2"], value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Constant", [], ["k3"], value_ints=[1, 2]),
        helper.make_node("Constant", [], ["k4"], sparse_value=sparse),
    ]
    inits = [numpy_helper.from_array(np.array(2, np.int64), "trip"),
             numpy_helper.from_array(_arr(7), "w7"), numpy_helper.from_array(_arr(9), "w9")]
    return _model(nodes, [_vi("c", TensorProto.BOOL, []), _vi("xs", F, [2, 3]), _vi("x3", F, [3])],
                  [_vi(o) for o in ("iy", "loop_scan", "ys", "seq_out", "k1", "k2", "k3", "k4")], inits)


def _custom_domain_model() -> onnx.ModelProto:
    """Another domain's op holding one body (GRAPH) and two (GRAPHS), one of them with an If inside."""
    nested = helper.make_node("If", ["c"], ["n_o"], then_branch=_body("nt", 6), else_branch=_body("ne", 6))
    g2 = helper.make_graph([nested], "g2", [], [_vi("n_o", F, [6])], [numpy_helper.from_array(_arr(8), "g2w")])
    node = helper.make_node("Frob", ["c"], ["y"], domain="custom.ops", one=_body("one", 3))
    node.attribute.append(helper.make_attribute("many", [_body("m1", 4), g2]))
    return _model([node], [_vi("c", TensorProto.BOOL, [])], [_vi("y")],
                  [numpy_helper.from_array(_arr(2, 2), "w")], opsets=(("", 18), ("custom.ops", 1)))


_TWO_BIT = {getattr(TensorProto, n) for n in ("INT2", "UINT2") if hasattr(TensorProto, n)}


def _every_dtype_model(only=None) -> onnx.ModelProto:
    """An initializer of every data type onnx knows (raw data where it has one), zero-sized and scalar ones, and
    a zero-sized one whose other dim is 2**62 (no element, a product that fits nothing narrower than Python's)."""
    from onnx import helper as h
    inits = []
    for name, dt in TensorProto.DataType.items():
        if dt == TensorProto.UNDEFINED or (dt in _TWO_BIT) != (only is _TWO_BIT):
            continue  # (2-bit types: their own test below)
        if dt == TensorProto.STRING:
            inits.append(h.make_tensor(f"t_{name}", dt, [2], [b"ab", b""]))
            continue
        np_dt = h.tensor_dtype_to_np_dtype(dt)
        vals = np.zeros((3, 2), dtype=np_dt)
        inits.append(h.make_tensor(f"t_{name}", dt, [3, 2], vals.flatten().tolist()))
        inits.append(h.make_tensor(f"s_{name}", dt, [], [vals.flatten().tolist()[0]]))
    inits.append(numpy_helper.from_array(np.zeros((0, 5), np.float32), "zero"))
    big_zero = helper.make_tensor("big_zero", TensorProto.FLOAT, [0, 2 ** 62], [])
    inits.append(big_zero)
    return _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", F, [1])], [_vi("y", F, [1])], inits,
                  opsets=(("", onnx.defs.onnx_opset_version()),), ir=onnx.IR_VERSION)


def _ir3_model() -> onnx.ModelProto:
    """IR 3: every initializer also a graph input (main graph and an If body)."""
    then = _body("t", 4)
    then.input.append(_vi("t_w", F, [4]))
    m = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=_body("e", 4))],
               [_vi("c", TensorProto.BOOL, []), _vi("w", F, [3, 3])], [_vi("y")],
               [numpy_helper.from_array(_arr(3, 3), "w")], opsets=(("", 9),), ir=3)
    next(a for a in m.graph.node[0].attribute if a.name == "else_branch").g.input.append(_vi("e_w", F, [4]))
    return m


def _function_model() -> onnx.ModelProto:
    """A model-local function with a Constant, a Loop whose body holds an initializer, and a default value."""
    loop_body = helper.make_graph([helper.make_node("Identity", ["lc"], ["lc2"]),
                                   helper.make_node("Identity", ["fw"], ["fo"])], "fl",
                                  [_vi("i", TensorProto.INT64, []), _vi("lc", TensorProto.BOOL, [])],
                                  [_vi("lc2", TensorProto.BOOL, []), _vi("fo", F, [5])],
                                  [numpy_helper.from_array(_arr(5), "fw")])
    fn = helper.make_function("local", "fn", ["n", "c"], ["y", "k"], [
        helper.make_node("Loop", ["n", "c"], ["y"], body=loop_body),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_arr(4), "fk"))],
        [helper.make_opsetid("", 18)])
    return _model([helper.make_node("fn", ["n", "c"], ["y", "k"], domain="local")],
                  [_vi("n", TensorProto.INT64, []), _vi("c", TensorProto.BOOL, [])], [_vi("y"), _vi("k")],
                  [numpy_helper.from_array(_arr(2, 5), "w")], opsets=(("", 18), ("local", 1)), functions=[fn])


def _graph_on_plain_op_model(attr_name="__body") -> onnx.ModelProto:
    """A default-domain op that is neither control flow nor a Constant (Softplus) with a GRAPH attribute whose name
    starts with '__': onnx's checker lets such 'internal' attributes through on any op (and checks the graph),
    so the load accepts it. Its body holds a 7-element initializer; the main graph one of 6."""
    node = helper.make_node("Softplus", ["x"], ["y"])
    node.attribute.append(helper.make_attribute(attr_name, _body("b", 7)))
    return _model([node], [_vi("x", F, [3])], [_vi("y", F, [3])], [numpy_helper.from_array(_arr(2, 3), "w")])


def _constant_with_graph_model() -> onnx.ModelProto:
    """A Constant that also holds an '__'-named body (both counts enter a Constant's graphs) and its value."""
    node = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(_arr(3), "v"))
    node.attribute.append(helper.make_attribute("__body", _body("cb", 5)))
    return _model([node], [], [_vi("y", F, [3])], [numpy_helper.from_array(_arr(2, 3), "w")])


def _many_initializers_model(n=10_050) -> onnx.ModelProto:
    """More initializers than io.STRUCTURE_CHECK_MAX: the load takes its other checking path."""
    inits = [numpy_helper.from_array(np.full((i % 3 + 1,), i, np.float32), f"w{i}") for i in range(n)]
    return _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", F, [1])], [_vi("y", F, [1])], inits)


MODELS = {"constant_with_graph": _constant_with_graph_model, "many_initializers": _many_initializers_model,
          "control_flow": _control_flow_model, "custom_domain": _custom_domain_model,
          "every_dtype": _every_dtype_model, "ir3": _ir3_model, "function": _function_model}


@pytest.mark.parametrize("name", list(MODELS))
def test_odd_models_count_the_same(name, tmp_path):
    p = _saved(MODELS[name](), tmp_path)
    fast, slow = _counts(p)
    assert fast == slow
    assert slow["parameters"] > 0


def test_control_flow_counts_every_body(tmp_path):
    """The numbers themselves (so a count that skips a body in both paths is caught too): main 1 + 7 + 9, If 4 + 5,
    Loop 3 + inner If 2 + 2, Scan 3, SequenceMap 3, Constant value 6 (value_floats, value_ints, sparse_value: not
    tensors in 't', not counted)."""
    fast, slow = _counts(_saved(_control_flow_model(), tmp_path))
    assert fast["parameters"] == slow["parameters"] == 1 + 7 + 9 + 4 + 5 + 3 + 2 + 2 + 3 + 3 + 6


def test_external_data_in_bodies_counts_the_same(tmp_path, monkeypatch):
    """Every tensor of the control-flow model in a data file: read in, then left on disk (LAZY_TOTAL)."""
    p = _saved(_control_flow_model(), tmp_path, save_as_external_data=True, all_tensors_to_one_file=True,
               location="w.data", size_threshold=0)
    fast, slow = _counts(p)
    assert fast == slow
    monkeypatch.setattr(ondisk, "LAZY_TOTAL", 1)
    fast2, _ = _counts(p)
    assert fast2 == slow


def test_external_data_that_fails_to_load_leaves_no_note(tmp_path):
    m = CORPUS["bn_chain"](2)[0]
    p = _saved(m, tmp_path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
               size_threshold=0)
    with open(tmp_path / "w.data", "r+b") as fh:
        fh.truncate(8)
    with holding():
        with pytest.raises(bnfold.BnfoldError):
            load_onnx(p)
        # a good load afterwards in the same block counts right
        q = _saved(CORPUS["fan_out"](1)[0], tmp_path, "q.onnx")
        good = load_onnx(q)
        assert anatomy(good, "onnx", as_loaded=True) == anatomy(onnx.load(q), "onnx")


def _plain_op_variant(how: str) -> onnx.ModelProto:
    m = _graph_on_plain_op_model()
    if how == "graphs":  # the same body in a GRAPHS attribute
        a = m.graph.node[0].attribute[0]
        m.graph.node[0].attribute[0].CopyFrom(helper.make_attribute("__bodies", [a.g]))
    elif how == "in_if_body":  # the Softplus inside an If's body, itself inside the main graph
        sp = m.graph.node[0]
        then = helper.make_graph([sp], "then", [], [_vi("y", F, [3])])
        els = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [], [_vi("y2", F, [3])])
        del m.graph.node[:]
        m.graph.node.append(helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els))
        m.graph.input.append(_vi("c", TensorProto.BOOL, []))
    return m


@pytest.mark.parametrize("how", ["graph", "graphs", "in_if_body"])
def test_graph_attribute_on_a_plain_op_counts_the_same(how, tmp_path):
    """A body in an '__'-named attribute of a plain op (the checker checks it, no runtime runs it): counted by
    neither (the load check's sum used to take it: 13 against 6)."""
    fast, slow = _counts(_saved(_plain_op_variant(how), tmp_path))
    assert slow["parameters"] == 6
    assert fast == slow


@pytest.mark.skipif(not _TWO_BIT, reason="this onnx has no 2-bit types")
@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_two_bit_tensors_load(raw, tmp_path):
    """Four elements a byte, in raw data and in int32_data (the load check took them for a byte each)."""
    m = _every_dtype_model(only=_TWO_BIT)
    if raw:  # the same tensors as raw data: 6 elements, 4 a byte, 2 bytes
        for t in m.graph.initializer:
            n = int(np.prod(t.dims))
            t.ClearField("int32_data")
            t.raw_data = bytes((n + 3) // 4)
    p = _saved(m, tmp_path)
    assert onnx.numpy_helper.to_array(onnx.load(p).graph.initializer[0]).shape == (3, 2)
    fast, slow = _counts(p)
    assert fast == slow


def test_graph_attribute_on_a_schema_checked_op_counts_the_same(tmp_path):
    """The same body on an op the load check skips (Identity is schema-checked): neither count enters it."""
    m = _graph_on_plain_op_model()
    m.graph.node[0].op_type = "Identity"
    fast, slow = _counts(_saved(m, tmp_path))
    assert fast == slow and slow["parameters"] == 6


# -- the CLI's JSON report --------------------------------------------------------------------------------

def _cli(*args: str) -> tuple[int, dict]:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "bnfold", *args, "--json"], check=False, capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=240)
    return r.returncode, json.loads(r.stdout)


def _reports(doc: dict) -> list[dict]:
    return doc.get("reports", [doc])


def _check_before(rep: dict) -> None:
    want = anatomy(onnx.load(rep["model"]), "onnx")
    ba = rep["before_after"]
    assert ba["parameters"][0] == want["parameters"], rep["model"]
    if "total_ops" in ba:
        assert ba["total_ops"][0] == sum(want["ops"].values()), rep["model"]
    for op, (before, _) in ba["ops"].items():
        assert want["ops"].get(op, 0) == before, (rep["model"], op)


def test_cli_folder_of_models_with_different_counts(tmp_path):
    """One run over many models (each count different from the one before it) with --keep-going and without
    verification: each report's 'before' is what reading that file's tensors says, its 'after' the output's."""
    names = ["bn_chain", "fan_out", "if_bodies", "loop_body", "function", "long_chain", "constant_weights", "ir3"]
    d = tmp_path / "models"
    d.mkdir()
    for i, n in enumerate(names):
        onnx.save(CORPUS[n](i)[0], str(d / f"{i:02d}_{n}.onnx"))
    onnx.save(_control_flow_model(), str(d / "90_control_flow.onnx"))
    onnx.save(_custom_domain_model(), str(d / "91_custom.onnx"))
    _, doc = _cli(str(d), "--no-verify", "--keep-going")
    reps = [r for r in _reports(doc) if r.get("before_after")]
    assert len(reps) >= 8
    counts = set()
    for rep in reps:
        _check_before(rep)
        counts.add(rep["before_after"]["parameters"][0])
        out = rep.get("output")
        if out:
            assert rep["before_after"]["parameters"][1] == anatomy(onnx.load(out), "onnx")["parameters"]
    assert len(counts) >= 6  # (the models really differ: a note from model 1 used for model 2 would show)


@pytest.mark.parametrize("flags", [(), ("--dry-run",), ("--dry-run", "--no-verify")],
                         ids=["verify", "dry-run", "dry-run-no-verify"])
def test_cli_one_model(flags, tmp_path):
    p = _saved(CORPUS["if_bodies"](4)[0], tmp_path)
    rc, doc = _cli(p, *flags)
    assert rc == 0
    _check_before(_reports(doc)[0])


def test_cli_graph_attribute_on_a_plain_op(tmp_path):
    p = _saved(_graph_on_plain_op_model(), tmp_path)
    rc, doc = _cli(p, "--no-verify", "--dry-run")
    assert rc == 0
    _check_before(_reports(doc)[0])


# -- the note's lifetime -------------------------------------------------------------------------------------

def _corpus_file(tmp_path, name="bn_chain", seed=1, fname="m.onnx") -> str:
    return _saved(CORPUS[name](seed)[0], tmp_path, fname)


def test_a_model_reloaded_after_a_change_gets_a_new_note(tmp_path):
    """The same path loaded twice in one block, the file rewritten in between: each model its own count."""
    p = _corpus_file(tmp_path)
    with holding():
        a = load_onnx(p)
        onnx.save(CORPUS["long_chain"](2)[0], p)
        b = load_onnx(p)
        assert anatomy(b, "onnx", as_loaded=True) == anatomy(onnx.load(p), "onnx")
        assert anatomy(a, "onnx", as_loaded=True) == anatomy(a, "onnx")
        assert anatomy(a, "onnx")["parameters"] != anatomy(b, "onnx")["parameters"]


def test_a_second_check_of_the_same_object_replaces_its_note(tmp_path):
    """check_sizes runs twice on one model when external data is read: the later sum is the one kept."""
    p = _corpus_file(tmp_path)
    with holding():
        m = load_onnx(p)
        del m.graph.initializer[-1]
        check_sizes(m, p, None)
        assert anatomy(m, "onnx", as_loaded=True) == anatomy(m, "onnx")


def test_a_model_changed_after_its_load_keeps_its_load_count(tmp_path):
    """Documented hazard, not a promise: as_loaded is the caller's word that the model is exactly what the load
    returned. A library caller who changes it in a holding() block and still says as_loaded gets the count of the
    file as loaded (the CLI counts right after the load, nothing in between)."""
    p = _corpus_file(tmp_path)
    with holding():
        m = load_onnx(p)
        loaded = anatomy(m, "onnx")["parameters"]
        removed = int(np.prod(m.graph.initializer[0].dims))
        del m.graph.initializer[0]
        assert anatomy(m, "onnx")["parameters"] == loaded - removed
        assert anatomy(m, "onnx", as_loaded=True)["parameters"] == loaded  # stale, by contract
        assert anatomy(m, "onnx", as_loaded=False)["parameters"] == loaded - removed


def test_library_fold_inside_a_callers_block(tmp_path, monkeypatch):
    """bnfold.fold(path, verify=False) inside a block the caller opened loads the model (its note lands in the
    caller's block) and folds that very object in place: the fold forgets the model's notes first, so even a
    count that says as_loaded of the result reads what it holds now (it used to give the count before the
    fold). With verification the result is another object (no note)."""
    from bnfold.onnx import io
    p = _corpus_file(tmp_path, "bn_chain", 3)
    want_before = anatomy(onnx.load(p), "onnx")["parameters"]
    loaded = []
    real = io.load_onnx
    monkeypatch.setattr(io, "load_onnx", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    with holding():
        res = bnfold.fold(p, verify=False)
        after = anatomy(res.model, "onnx")["parameters"]
        assert after < want_before
        assert res.model is loaded[-1]  # folded in place
        assert anatomy(res.model, "onnx", as_loaded=True)["parameters"] == after  # (the fold forgot the note)
        res = bnfold.fold(p, verify=True)
        assert res.model is not loaded[-1]
        assert anatomy(res.model, "onnx", as_loaded=True)["parameters"] == after


def test_nested_blocks_and_threads_see_only_their_own_notes(tmp_path):
    p = _corpus_file(tmp_path)
    want = anatomy(onnx.load(p), "onnx")
    seen = {}
    with holding():
        m = load_onnx(p)

        def in_thread():  # a new thread starts with an empty context: nothing noted, the count reads
            seen["plain"] = (noted(m, INITIALIZER_ELEMENTS), anatomy(m, "onnx", as_loaded=True))

        def in_copied_context():  # a copy of the block's context shares its notes (same model: same count)
            seen["copied"] = (noted(m, INITIALIZER_ELEMENTS), anatomy(m, "onnx", as_loaded=True))

        t1 = threading.Thread(target=in_thread)
        t2 = threading.Thread(target=contextvars.copy_context().run, args=(in_copied_context,))
        for t in (t1, t2):
            t.start()
            t.join()
        with holding():
            assert noted(m, INITIALIZER_ELEMENTS) is None
            inner = load_onnx(_corpus_file(tmp_path, "fan_out", 2, "inner.onnx"))
            assert anatomy(inner, "onnx", as_loaded=True) == anatomy(inner, "onnx")
        assert noted(inner, INITIALIZER_ELEMENTS) is None  # the inner block's note ended with it
        assert noted(m, INITIALIZER_ELEMENTS) == want["parameters"]
    assert seen["plain"][0] is None and seen["plain"][1] == want
    assert seen["copied"][0] == want["parameters"] and seen["copied"][1] == want


def test_the_block_lets_go_of_its_models(tmp_path):
    """The note keeps its model alive (its id() stays its own) only until the block ends."""
    p = _corpus_file(tmp_path)
    with holding():
        m = load_onnx(p)
        inside = sys.getrefcount(m)
    gc.collect()
    assert sys.getrefcount(m) < inside
    assert noted(m, INITIALIZER_ELEMENTS) is None


def test_a_note_is_not_read_for_a_new_model_at_a_reused_id(tmp_path):
    """A model noted in an inner block is freed when that block ends; a model made next, in the outer block,
    often at the same address, must not get its count."""
    p, q = _corpus_file(tmp_path), _corpus_file(tmp_path, "long_chain", 4, "q.onnx")
    want_q = anatomy(onnx.load(q), "onnx")
    reused = 0
    with holding():
        for _ in range(30):
            with holding():
                m = load_onnx(p)
                old = id(m)
                del m
            gc.collect()
            m = onnx.load(q)  # not through load_onnx: no note of its own
            reused += id(m) == old
            assert anatomy(m, "onnx", as_loaded=True) == want_q
            del m


_SIX_BIT = [getattr(TensorProto, n) for n in ("FLOAT6E2M3", "FLOAT6E3M2") if hasattr(TensorProto, n)]


@pytest.mark.skipif(not _SIX_BIT, reason="this onnx has no 6-bit types")
@pytest.mark.parametrize("n", [1, 4, 5, 8, 13])
@pytest.mark.parametrize("raw", [False, True], ids=["typed", "raw"])
def test_six_bit_tensors_load_and_short_ones_do_not(n, raw, tmp_path):
    """6-bit floats: packed without gaps in raw data (ceil(6n/8) bytes), one value an entry in int32_data, as
    onnx's helper writes them; one byte short is refused as corrupt."""
    from bnfold import BnfoldError
    from bnfold.onnx.io import load_onnx
    inits = []
    for k, dt in enumerate(_SIX_BIT):
        t = helper.make_tensor(f"t{k}", dt, [n], [0.5] * n)
        if raw:
            arr = numpy_helper.to_array(t)
            t = numpy_helper.from_array(arr, f"t{k}")
            assert t.data_type == dt and len(t.raw_data) == (6 * n + 7) // 8
        inits.append(t)
    g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("t0", _SIX_BIT[0], [n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    p = _saved(m, tmp_path)
    fast, slow = _counts(p)
    assert fast == slow and slow["parameters"] == n * len(_SIX_BIT)
    t = m.graph.initializer[0]
    if raw:
        t.raw_data = t.raw_data[:-1]
    else:
        del t.int32_data[-1]
    short = tmp_path / "short.onnx"
    short.write_bytes(m.SerializeToString())
    with pytest.raises(BnfoldError, match="the file is corrupt|invalid ONNX model"):
        load_onnx(str(short))
