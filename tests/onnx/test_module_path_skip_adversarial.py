"""The load's search of a file for the two metadata keys readable_names reads (names.note_recorded), against the
walk: wherever a key can hide (bodies at any depth, functions, bodies of functions, external data files), whatever
else spells the key (a node name, an attribute, a doc string, model metadata, another key's value), and whatever
happens to the loaded model before readable_names runs (the library's fold of a path or a model in a caller's
holding() block, the command line on one file or a folder, --no-verify, --dry-run, --keep-going).

The reference is always readable_names on a fresh onnx.load of the file outside any block (no note: every node
looked at), and a report's module paths with the search turned off."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
import bnfold.onnx.io as io_mod
import bnfold.onnx.names as names_mod
from bnfold.cli import main
from bnfold.core.hold import holding, noted
from bnfold.onnx.io import load_onnx
from bnfold.onnx.names import NAMESPACE_KEY, SCOPES_KEY, readable_names
from tests.conftest import random_bn

NOTE = names_mod._NONE_RECORDED
KEYS = (SCOPES_KEY, NAMESPACE_KEY)


def _vi(n, s=(4,), t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(n, t, list(s))


def _tag(n: onnx.NodeProto, path: str, key: str = SCOPES_KEY) -> onnx.NodeProto:
    e = n.metadata_props.add()
    e.key = key
    e.value = repr(["", path, "aten.op"]) if key == SCOPES_KEY else f": pkg.M/{path}: pkg.Mod/op: aten.op"
    return n


def _loop(body_nodes, name="loop", inp="v40", out="v41") -> onnx.NodeProto:
    body = helper.make_graph(body_nodes + [helper.make_node("Identity", ["cin"], ["cout"])], f"{name}_body",
                             [_vi("i", (), TensorProto.INT64), _vi("cin", (), TensorProto.BOOL), _vi("lv")],
                             [_vi("cout", (), TensorProto.BOOL), _vi("lo")])
    return helper.make_node("Loop", ["trip", "", inp], [out], name=name, body=body)


def _if(then_nodes, then_out, name="if") -> onnx.NodeProto:
    """An If on a constant condition (declared in the scope: `ifc`) whose branches read `lv` from outside."""
    then = helper.make_graph(then_nodes, f"{name}_then", [], [_vi(then_out)])
    other = helper.make_graph([helper.make_node("Relu", ["lv"], [f"{name}_eo"], name=f"{name}_e")], f"{name}_else",
                              [], [_vi(f"{name}_eo")])
    return helper.make_node("If", ["ifc"], ["lo"], name=name, then_branch=then, else_branch=other)


def _model(where: str, key: str = SCOPES_KEY) -> onnx.ModelProto:
    """A 40-Relu chain (a file searched at load) plus, by `where`, one node somewhere that records a path."""
    nodes = [helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"], name=f"r{i}") for i in range(40)]
    nodes[0].input[0] = "x"
    functions, extra_opsets = [], []
    fn_opsets = [helper.make_opsetid("", 17)]
    if where == "main_last":
        _tag(nodes[-1], "blocks.39.act", key)
    elif where == "loop_if":  # an If inside a Loop body, the path on a node of the If's then branch
        ifc = helper.make_node("Constant", [], ["ifc"], value=numpy_helper.from_array(np.array(True)))
        inner = _if([_tag(helper.make_node("Relu", ["lv"], ["deep"], name="deep_relu"), "loop.branch.act", key)],
                    "deep")
        nodes.append(_loop([ifc, inner]))
    elif where == "loop_loop":  # a Loop inside a Loop body
        inner_body = [_tag(helper.make_node("Relu", ["lv"], ["lo"], name="inner_relu"), "outer.inner.act", key)]
        inner = _loop(inner_body, "inner", inp="lv", out="lo")
        inner.input[0] = "trip"
        nodes.append(_loop([inner]))
    elif where == "scan":
        body = helper.make_graph([_tag(helper.make_node("Relu", ["sx"], ["sy"], name="scan_relu"), "scan.act", key),
                                  helper.make_node("Identity", ["st"], ["st_o"])], "scan_body",
                                 [_vi("st", (1,)), _vi("sx", ())], [_vi("st_o", (1,)), _vi("sy", ())])
        nodes.append(helper.make_node("Constant", [], ["s0"], value=numpy_helper.from_array(np.zeros(1, np.float32))))
        nodes.append(helper.make_node("Scan", ["s0", "v40"], ["s_fin", "v41"], name="scan", body=body,
                                      num_scan_inputs=1))
    elif where in ("function", "function_if"):
        if where == "function":
            fnodes = [_tag(helper.make_node("Relu", ["a"], ["b"], name="fr"), "fn.act", key)]
        else:  # the path on a node in an If body inside the function
            ifc = helper.make_node("Constant", [], ["ifc"], value=numpy_helper.from_array(np.array(True)))
            lv = helper.make_node("Identity", ["a"], ["lv"])
            fnodes = [ifc, lv, _if([_tag(helper.make_node("Relu", ["lv"], ["fdeep"], name="fdeep"), "fn.if.act", key)],
                                   "fdeep"), helper.make_node("Identity", ["lo"], ["b"])]
        functions.append(helper.make_function("local", "F", ["a"], ["b"], fnodes, fn_opsets))
        extra_opsets.append(helper.make_opsetid("local", 1))
        nodes.append(helper.make_node("F", ["v40"], ["v41"], name="call", domain="local"))
    elif where == "function_called_twice_unused":  # a function nobody calls still counts for the walk
        functions.append(helper.make_function("local", "G", ["a"], ["b"],
                                              [_tag(helper.make_node("Relu", ["a"], ["b"], name="gr"), "g.act", key)],
                                              fn_opsets))
        extra_opsets.append(helper.make_opsetid("local", 1))
    elif where == "node_named_key":  # the key spelled as a node name, a value name and a doc string only
        nodes[3].name = key
        nodes[4].doc_string = key
        nodes[5].output[0] = key
        nodes[6].input[0] = key
    elif where == "other_key_value":  # the key spelled as another key's value, and as part of a longer key
        e = nodes[2].metadata_props.add()
        e.key, e.value = "source", key
        e = nodes[3].metadata_props.add()
        e.key, e.value = f"x.{key}.y", repr(["", "not.read", "op"])
    elif where == "model_metadata":
        pass  # (the key goes into the model's own metadata, below)
    elif where == "bad_value":  # the key with a value readable_names cannot read: no path either way
        e = nodes[8].metadata_props.add()
        e.key, e.value = key, "[unclosed" if key == SCOPES_KEY else "no-slash"
    elif where != "nowhere":
        raise AssertionError(where)
    last = nodes[-1].output[-1]
    g = helper.make_graph(nodes, "g", [_vi("x")], [_vi(last)], [numpy_helper.from_array(np.array(2, np.int64), "trip")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), *extra_opsets], functions=functions)
    m.ir_version = 8
    if where == "model_metadata":
        e = m.metadata_props.add()
        e.key, e.value = key, repr(["", "model.level", "op"])
    return m


WHERE = ["main_last", "loop_if", "loop_loop", "scan", "function", "function_if", "function_called_twice_unused",
         "node_named_key", "other_key_value", "model_metadata", "bad_value", "nowhere"]
HAS_PATH = {"main_last", "loop_if", "loop_loop", "scan", "function", "function_if", "function_called_twice_unused"}


def _spells_a_key(path) -> bool:
    data = open(path, "rb").read()
    return any(k.encode() in data for k in KEYS)


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("where", WHERE)
def test_the_search_agrees_with_the_walk(tmp_path, where, key):
    m = _model(where, key)
    onnx.checker.check_model(m, full_check=True)
    p = str(tmp_path / "m.onnx")
    onnx.save(m, p)
    walked = readable_names(onnx.load(p))
    assert bool(walked) == (where in HAS_PATH), walked
    with holding():
        loaded = load_onnx(p)
        assert readable_names(loaded) == walked
        # a note only where the file never spells a key (the 40-node file is small enough to be searched)
        assert (noted(loaded, NOTE) is True) == (not _spells_a_key(p))
        if walked:
            assert noted(loaded, NOTE) is None


@pytest.mark.parametrize("where", ["main_last", "loop_if", "function_if", "nowhere"])
def test_external_data_files_do_not_hide_a_key(tmp_path, where):
    """Weights in a data file (the model file itself is tiny: searched); the keys live in the model file."""
    m = _model(where)
    rng = np.random.default_rng(0)
    m.graph.initializer.extend(numpy_helper.from_array(rng.normal(size=64).astype(np.float32), f"w{k}")
                               for k in range(6))
    p = str(tmp_path / "m.onnx")
    onnx.save(m, p, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").exists()
    walked = readable_names(onnx.load(p))
    with holding():
        loaded = load_onnx(p)
        assert readable_names(loaded) == walked
        assert bool(walked) == (where != "nowhere")


def test_a_key_only_in_the_data_file_is_not_a_path(tmp_path):
    """A data file that happens to hold the key's bytes (a weight's raw data) is never searched: still no path,
    and the walk agrees."""
    m = _model("nowhere")
    raw = np.frombuffer(SCOPES_KEY.encode().ljust(28, b"\0"), np.float32).copy()
    m.graph.initializer.append(numpy_helper.from_array(raw, "spells"))
    p = str(tmp_path / "m.onnx")
    onnx.save(m, p, save_as_external_data=True, location="m.data", size_threshold=0)
    assert SCOPES_KEY.encode() in (tmp_path / "m.data").read_bytes()
    with holding():
        assert readable_names(load_onnx(p)) == readable_names(onnx.load(p)) == {}


# -- a noted model and other objects ----------------------------------------------------------------------------

def test_a_copy_of_a_noted_model_is_walked(tmp_path):
    p = str(tmp_path / "plain.onnx")
    onnx.save(_model("nowhere"), p)
    with holding():
        a = load_onnx(p)
        assert noted(a, NOTE) is True
        b = onnx.ModelProto()
        b.CopyFrom(a)
        _tag(b.graph.node[12], "copied.act")
        assert readable_names(b) == {"r12": "copied.act"}
        c = onnx.ModelProto.FromString(b.SerializeToString())
        assert readable_names(c) == {"r12": "copied.act"}
        assert readable_names(a) == {}


def test_the_fold_result_of_a_noted_model_is_not_noted(tmp_path):
    """With verification the fold works on a copy; the report's paths come from the model as loaded."""
    p = str(tmp_path / "plain.onnx")
    onnx.save(_model("nowhere"), p)
    with holding():
        a = load_onnx(p)
        res = bnfold.fold(a)
        assert res.model is not a and noted(res.model, NOTE) is None


def test_a_model_changed_after_its_load_through_the_library(dynamo_files):
    """bnfold.load leaves no note behind (notes live only inside bnfold's own job blocks, core/hold.py), so a caller
    who changes the loaded model before bnfold.fold gets the paths its nodes record."""
    plain, scoped = dynamo_files["plain"], dynamo_files["scoped"]
    want = _paths_of(bnfold.fold(onnx.load(str(scoped))).report)
    assert want
    m = bnfold.load(str(plain))
    assert noted(m, NOTE) is None
    m.ParseFromString(open(scoped, "rb").read())
    assert _paths_of(bnfold.fold(m).report) == want


# -- real exports: the library and the command line ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamo_files(tmp_path_factory):
    """A torch.onnx dynamo export (BNs with generated names, module paths in metadata), the same file with every
    node's metadata dropped, and both as long files (many nodes for their bytes: searched at load)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, 1)
            self.bn = torch.nn.BatchNorm2d(cout)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("stem", Block(2, 2))
    model.add_module("layer1", torch.nn.Sequential(*[Block(2, 2) for _ in range(3)]))
    rng = np.random.default_rng(3)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            st = random_bn(rng, mod.num_features)
            mod.weight.data, mod.bias.data = torch.tensor(st["gamma"]).float(), torch.tensor(st["beta"]).float()
            mod.running_mean.data, mod.running_var.data = (torch.tensor(st["mean"]).float(),
                                                          torch.tensor(st["var"]).float())
    model.eval()
    d = tmp_path_factory.mktemp("dyn")
    scoped = d / "scoped.onnx"
    torch.onnx.export(model, (torch.randn(1, 2, 4, 4),), str(scoped), dynamo=True, optimize=False, verbose=False)
    m = onnx.load(str(scoped))
    for n in m.graph.node:  # (stack traces dropped: a short file for its nodes, searched at load)
        keep = [(e.key, e.value) for e in n.metadata_props if e.key in KEYS]
        del n.metadata_props[:]
        for k, v in keep:
            e = n.metadata_props.add()
            e.key, e.value = k, v
    onnx.save(m, str(scoped))  # one self-contained file
    for n in m.graph.node:
        del n.metadata_props[:]
    for fn in m.functions:
        for n in fn.node:
            del n.metadata_props[:]
    plain = d / "plain.onnx"
    onnx.save(m, str(plain))
    assert not _spells_a_key(plain) and _spells_a_key(scoped)
    for p in (plain, scoped):  # both small for their nodes: the load searches them
        assert p.stat().st_size < names_mod._SEARCH_BYTES_PER_NODE * len(onnx.load(str(p)).graph.node)
    return {"plain": plain, "scoped": scoped}


def _paths_of(report) -> dict:
    """bn -> the module path fields of its decision (a Report, or a report's JSON dict)."""
    rows = report.decisions if hasattr(report, "decisions") else [
        d for k in ("folded", "kept", "decisions") for d in report.get(k, []) if isinstance(d, dict)]
    out = {}
    for d in rows:
        extra = d.extra if hasattr(d, "extra") else d
        bn = d.bn if hasattr(d, "bn") else d["bn"]
        out[bn] = {k: extra[k] for k in ("module_path", "into_module_path", "producer_module_path") if k in extra}
    return out


def _expected(path) -> dict:
    """The walk's paths for each BN (and the layer it folds into) of a fresh load."""
    names = readable_names(onnx.load(str(path)))
    res = bnfold.fold(onnx.load(str(path)), verify=False)
    out = {}
    for d in res.report.decisions:
        row = {}
        if d.bn in names:
            row["module_path"] = names[d.bn]
        if d.producer and d.producer in names:
            row["into_module_path" if d.is_folded else "producer_module_path"] = names[d.producer]
        out[d.bn] = row
    return out


@pytest.mark.parametrize("kw", [{}, {"verify": False}, {"dry_run": True}], ids=["verify", "no-verify", "dry-run"])
@pytest.mark.parametrize("in_block", [False, True], ids=["plain", "in-block"])
def test_library_fold_of_a_path(dynamo_files, kw, in_block):
    scoped, plain = dynamo_files["scoped"], dynamo_files["plain"]
    want = _expected(scoped)
    assert sorted(r["module_path"] for r in want.values()) == ["layer1.0.bn", "layer1.1.bn", "layer1.2.bn", "stem.bn"]

    def run():
        got_s = _paths_of(bnfold.fold(str(scoped), **kw).report)
        got_p = _paths_of(bnfold.fold(str(plain), **kw).report)
        got_s2 = _paths_of(bnfold.fold(str(scoped), **kw).report)  # after a noted model in the same block
        return got_s, got_p, got_s2

    if in_block:
        with holding():
            got_s, got_p, got_s2 = run()
    else:
        got_s, got_p, got_s2 = run()
    assert got_s == want == got_s2
    assert all(v == {} for v in got_p.values()) and len(got_p) == len(want)


def test_library_fold_of_models_loaded_in_one_block(dynamo_files):
    """Both models loaded (one noted), then folded, in either order, with and without verification."""
    scoped, plain = dynamo_files["scoped"], dynamo_files["plain"]
    want = _expected(scoped)
    with holding():
        a, b = bnfold.load(str(plain)), bnfold.load(str(scoped))
        assert noted(a, NOTE) is True and noted(b, NOTE) is None
        assert _paths_of(bnfold.fold(b).report) == want
        assert all(v == {} for v in _paths_of(bnfold.fold(a).report).values())
        assert _paths_of(bnfold.fold(b, verify=False).report) == want


def _cli_json(argv, capsys) -> list[dict]:
    code = main([*argv, "--json", "-q"])
    doc = json.loads(capsys.readouterr().out)
    reports = doc.get("reports", [doc])
    return code, reports


@pytest.mark.parametrize("flags", [[], ["--no-verify"], ["--dry-run"], ["--keep-going"], ["--keep-going", "--no-verify"]],
                         ids=["verify", "no-verify", "dry-run", "keep-going", "keep-going-no-verify"])
def test_cli_folder_of_models_with_and_without_paths(dynamo_files, tmp_path, capsys, monkeypatch, flags):
    """A folder: the plain file sorts first (its note must not reach the scoped one), then the scoped file, then
    the plain one again under another name; with --keep-going a broken file among them. The same run with the
    search turned off must report the same paths, and both the walk's."""
    src = tmp_path / "models"
    src.mkdir()
    shutil.copy(dynamo_files["plain"], src / "a_plain.onnx")
    shutil.copy(dynamo_files["scoped"], src / "b_scoped.onnx")
    shutil.copy(dynamo_files["plain"], src / "c_plain.onnx")
    if "--keep-going" in flags:
        (src / "b_zbroken.onnx").write_bytes(b"\x08\x07not a model")
    want = _expected(dynamo_files["scoped"])

    def run(out):
        code, reports = _cli_json([str(src), "-o", f"{out}/", *flags], capsys)
        return code, {r["model"].rsplit("/", 1)[-1]: _paths_of(r) for r in reports if r.get("model")}

    code, got = run(tmp_path / "out1")
    monkeypatch.setattr(io_mod, "note_recorded", lambda model, data: None)  # the search off: every model walked
    code2, walked = run(tmp_path / "out2")
    assert code == code2
    assert got == walked
    assert got["b_scoped.onnx"] == want
    for f in ("a_plain.onnx", "c_plain.onnx"):
        assert got[f] and all(v == {} for v in got[f].values())


@pytest.mark.parametrize("flags", [[], ["--no-verify"], ["--dry-run"]], ids=["verify", "no-verify", "dry-run"])
def test_cli_single_files_one_after_another(dynamo_files, tmp_path, capsys, flags):
    """Several files named on one command line (plain, scoped, plain): each its own job."""
    files = []
    for k, which in enumerate(["plain", "scoped", "plain"]):
        dst = tmp_path / f"{k}_{which}.onnx"
        shutil.copy(dynamo_files[which], dst)
        files.append(str(dst))
    code, reports = _cli_json(files, capsys)
    assert code == 0
    want = _expected(dynamo_files["scoped"])
    got = {r["model"].rsplit("/", 1)[-1]: _paths_of(r) for r in reports}
    assert got["1_scoped.onnx"] == want
    assert all(v == {} for v in got["0_plain.onnx"].values()) and all(v == {} for v in got["2_plain.onnx"].values())
