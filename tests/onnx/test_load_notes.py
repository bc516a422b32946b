"""The load check's sum of a model's initializer elements (core/hold.py: note/noted), which the count of the
model as loaded uses instead of reading every tensor's dims again: the same numbers as a count that reads them,
on every kind of tensor a load meets (bodies' initializers, Constant nodes, sparse initializers, strings,
external data read in or left on disk, a tensor too big for the exact raw-size check, a scalar), and never
used for anything but the very model that load returned, in that job."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.beforeafter import anatomy
from bnfold.core.hold import holding, note, noted
from bnfold.onnx import ondisk
from bnfold.onnx import names as names_mod
from bnfold.onnx.io import load_onnx
from bnfold.onnx.names import NAMESPACE_KEY, SCOPES_KEY, readable_names
from bnfold.onnx.validity import INITIALIZER_ELEMENTS
from tests.helpers.fold_corpus import CORPUS, if_bodies_ir3, weight_read_by_body


def _counted_as_loaded(path: str) -> tuple[dict, dict]:
    """(the count a job makes of the loaded model, the count that reads every tensor) of one file."""
    with holding():
        m = load_onnx(path)
        fast = anatomy(m, "onnx", as_loaded=True)
        assert noted(m, INITIALIZER_ELEMENTS) is not None
    slow = anatomy(load_onnx(path), "onnx")
    return fast, slow


@pytest.mark.parametrize("name", [*CORPUS, "if_bodies_ir3", "weight_read_by_body"])
def test_the_fold_corpus_counts_the_same(name, tmp_path):
    build = {**CORPUS, "if_bodies_ir3": if_bodies_ir3, "weight_read_by_body": weight_read_by_body}[name]
    p = str(tmp_path / "m.onnx")
    onnx.save(build(5)[0], p)
    fast, slow = _counted_as_loaded(p)
    assert fast == slow
    assert slow["parameters"] > 0


def _odd_tensors_model() -> onnx.ModelProto:
    """Every kind of tensor the size check meets, in the main graph and in an If body."""
    rng = np.random.default_rng(3)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    body_init = numpy_helper.from_array(f(4), "body_w")
    then = helper.make_graph([helper.make_node("Add", ["big_row", "body_w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])], [body_init])
    els = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(f(4), "c"))],
                            "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    nodes = [
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(f(2, 3), "k")),
        helper.make_node("ReduceSum", ["k"], ["ks"], keepdims=0),
        helper.make_node("Greater", ["ks", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=els),
        helper.make_node("Add", ["y", "big_row"], ["z"]),
    ]
    inits = [
        numpy_helper.from_array(np.float32(0.0), "zero"),                       # a scalar: no dims, one element
        numpy_helper.from_array(f(4), "big_row"),
        numpy_helper.from_array(f(3 << 20), "big"),                            # 12 MiB: over the exact raw-size check
        helper.make_tensor("typed", TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0]),  # typed fields, no raw data
        helper.make_tensor("names", TensorProto.STRING, [3], [b"a", b"bc", b""]),     # strings: no item size
        numpy_helper.from_array(np.zeros((0, 5), np.float32), "empty"),         # zero elements
    ]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(f(2), "sp"),
                                       numpy_helper.from_array(np.array([1, 3], np.int64), "sp_i"), [6])
    g = helper.make_graph(nodes, "odd", [], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])], inits,
                          sparse_initializer=[sparse])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_every_kind_of_tensor_counts_the_same(tmp_path):
    p = str(tmp_path / "odd.onnx")
    onnx.save(_odd_tensors_model(), p)
    fast, slow = _counted_as_loaded(p)
    assert fast == slow
    # initializers of both graphs (1 + 4 + 3M + 4 + 3 + 0, and the body's 4) and the two Constants (6 + 4);
    # the sparse initializer is not a stored dense weight in either count
    assert slow["parameters"] == 1 + 4 + (3 << 20) + 4 + 3 + 0 + 4 + 6 + 4


@pytest.mark.parametrize("lazy", [False, True], ids=["read-in", "left-on-disk"])
def test_external_data_counts_the_same(tmp_path, monkeypatch, lazy):
    """Tensors in a data file: read in after the first size check (which skips them), or left on disk."""
    m = _odd_tensors_model()
    p = str(tmp_path / "ext.onnx")
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=16)
    assert os.path.exists(tmp_path / "ext.data")
    if lazy:
        monkeypatch.setattr(ondisk, "LAZY_TOTAL", 1)  # every external tensor stays in its file
    fast, slow = _counted_as_loaded(p)
    assert fast == slow
    assert slow["parameters"] == 1 + 4 + (3 << 20) + 4 + 3 + 0 + 4 + 6 + 4


def test_the_note_is_for_that_model_in_that_block_only(tmp_path):
    p = str(tmp_path / "m.onnx")
    onnx.save(CORPUS["bn_chain"](1)[0], p)
    m = load_onnx(p)  # outside a block: nothing noted, the count reads the tensors
    assert noted(m, INITIALIZER_ELEMENTS) is None
    with holding():
        a = load_onnx(p)
        b = onnx.ModelProto()
        b.CopyFrom(a)  # another model with the same contents, never loaded in this block
        assert noted(a, INITIALIZER_ELEMENTS) is not None and noted(b, INITIALIZER_ELEMENTS) is None
        with holding():  # a nested block (a job inside a job) sees only its own notes
            assert noted(a, INITIALIZER_ELEMENTS) is None
        del b.graph.initializer[:]  # the copy changed: its count reads what it holds now
        assert anatomy(b, "onnx", as_loaded=True)["parameters"] == anatomy(b, "onnx")["parameters"]
    assert noted(a, INITIALIZER_ELEMENTS) is None  # the block is over


def test_notes_survive_only_for_their_owner():
    """An id() is reused once its object is gone: the block keeps the owner, so a note is never read for
    another object that got the same id()."""
    class Owner:
        pass
    with holding():
        o = Owner()
        note(o, "k", 1)
        ident = id(o)
        del o
        others = [Owner() for _ in range(1000)]
        assert all(noted(x, "k") is None for x in others)
        assert not any(id(x) == ident for x in others)  # the owner is still alive: its id() is not reused
    note(Owner(), "k", 2)  # outside a block: nothing is kept
    assert noted(Owner(), "k") is None


def test_a_functions_bodies_are_not_counted_by_either(tmp_path):
    """A model-local function whose If holds a body with an initializer: the load check reads that tensor too,
    but neither count takes a function's insides for the model's parameters."""
    rng = np.random.default_rng(9)
    body_w = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fw")
    then = helper.make_graph([helper.make_node("Identity", ["fw"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [5])], [body_w])
    els = helper.make_graph([helper.make_node("Constant", [], ["e"], value=numpy_helper.from_array(
        np.zeros(5, np.float32), "e"))], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [5])])
    fn = helper.make_function("local", "pick", ["c"], ["y"],
                              [helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)],
                              [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("pick", ["c"], ["y"], domain="local")], "g",
                          [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
                          [numpy_helper.from_array(np.ones((2, 3), np.float32), "unused")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[fn])
    m.ir_version = 8
    p = str(tmp_path / "fn.onnx")
    onnx.save(m, p)
    fast, slow = _counted_as_loaded(p)
    assert fast == slow and slow["parameters"] == 6


def test_a_fold_in_place_forgets_what_the_load_noted(tmp_path):
    """The command line's fold without verification changes the loaded model itself: from there on its notes
    would be stale, so the fold drops them (and only them)."""
    from bnfold.core.hold import forget
    from bnfold.core.options import Options
    from bnfold.onnx.fold import fold_onnx
    p, q = str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")
    onnx.save(CORPUS["bn_chain"](2)[0], p)
    onnx.save(CORPUS["shared_weight"](2)[0], q)
    with holding():
        a, b = load_onnx(p), load_onnx(q)
        assert noted(a, INITIALIZER_ELEMENTS) is not None and noted(b, INITIALIZER_ELEMENTS) is not None
        res = fold_onnx(a, Options(verify=False), copy=False)
        assert res.model is a and noted(a, INITIALIZER_ELEMENTS) is None
        assert noted(b, INITIALIZER_ELEMENTS) is not None
        assert anatomy(a, "onnx", as_loaded=True) == anatomy(a, "onnx")
        forget(b)
        assert noted(b, INITIALIZER_ELEMENTS) is None


# -- module paths: the load's search of the file for the keys readable_names reads ---------------------

def _scoped(n: onnx.NodeProto, path: str, key: str = SCOPES_KEY) -> onnx.NodeProto:
    e = n.metadata_props.add()
    e.key = key
    e.value = repr(["", path, "aten.op"]) if key == SCOPES_KEY else f": pkg.M/{path}: pkg.Mod/op: aten.op"
    return n


def _paths_model(where: str, key: str = SCOPES_KEY) -> onnx.ModelProto:
    """A chain of Relus with one node that records a module path, `where`: in the main graph, in a Loop's body,
    in a model-local function, or nowhere (only another metadata key)."""
    vi = lambda n, s=(4,), t=TensorProto.FLOAT: helper.make_tensor_value_info(n, t, list(s))  # noqa: E731
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"r{i}") for i in range(40)]
    nodes[0].input[0] = "x"
    functions = []
    if where == "main":
        _scoped(nodes[7], "blocks.7.act", key)
    elif where == "nowhere":
        e = nodes[7].metadata_props.add()
        e.key, e.value = "source", "blocks.7.act"
    elif where == "body":
        body = helper.make_graph([_scoped(helper.make_node("Relu", ["lv"], ["lo"], name="inner"), "loop.act", key),
                                  helper.make_node("Identity", ["cin"], ["cout"])], "body",
                                 [vi("i", (), TensorProto.INT64), vi("cin", (), TensorProto.BOOL), vi("lv")],
                                 [vi("cout", (), TensorProto.BOOL), vi("lo")])
        nodes.append(helper.make_node("Loop", ["trip", "", "v40"], ["v41"], name="loop", body=body))
    elif where == "function":
        functions.append(helper.make_function("local", "F", ["a"], ["b"],
                                              [_scoped(helper.make_node("Relu", ["a"], ["b"], name="fr"), "fn.act", key)],
                                              [helper.make_opsetid("", 17)]))
        nodes.append(helper.make_node("F", ["v40"], ["v41"], name="call", domain="local"))
    last = nodes[-1].output[0]
    g = helper.make_graph(nodes, "g", [vi("x")], [vi(last)],
                          [numpy_helper.from_array(np.array(2, np.int64), "trip")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=functions)
    m.ir_version = 8
    return m


@pytest.mark.parametrize("key", [SCOPES_KEY, NAMESPACE_KEY])
@pytest.mark.parametrize("where", ["main", "body", "function", "nowhere"])
def test_module_paths_of_a_loaded_file_are_the_walks(tmp_path, where, key):
    p = str(tmp_path / "m.onnx")
    onnx.save(_paths_model(where, key), p)
    walked = readable_names(onnx.load(p))  # (no block: no note, every node looked at)
    assert bool(walked) == (where != "nowhere"), walked
    with holding():
        m = load_onnx(p)
        assert readable_names(m) == walked
        assert (noted(m, names_mod._NONE_RECORDED) is True) == (where == "nowhere")  # (a 40-node file is searched)


def test_module_paths_are_found_in_a_long_file_with_few_nodes(tmp_path):
    # a file too long for its nodes is not searched: the walk still finds the path
    m = _paths_model("main")
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(200_000, np.float32), "big"))
    p = str(tmp_path / "m.onnx")
    onnx.save(m, p)
    with holding():
        loaded = load_onnx(p)
        assert noted(loaded, names_mod._NONE_RECORDED) is None
        assert readable_names(loaded) == readable_names(onnx.load(p)) != {}


def test_the_no_module_paths_note_is_for_that_model_only(tmp_path):
    plain, scoped = str(tmp_path / "plain.onnx"), str(tmp_path / "scoped.onnx")
    onnx.save(_paths_model("nowhere"), plain)
    onnx.save(_paths_model("main"), scoped)
    with holding():
        a = load_onnx(plain)
        b = onnx.load(scoped)  # the same graph with a path, never loaded by load_onnx
        b.graph.node[7].ClearField("metadata_props")
        _scoped(b.graph.node[9], "blocks.9.act")
        assert readable_names(a) == {}
        assert readable_names(b) == {"r9": "blocks.9.act"}
