"""Names a fold makes against every name a model can already hold, where tests/onnx/test_made_names.py does not
look: model-local functions (their inputs, values and node names), Loop body inputs, bodies nested in bodies,
sparse initializers, the Constant nodes a fold in a function or an IR 3 body writes, names with odd characters,
names one digit away from a made one, and models bnfold folded already (folded again and again).

GraphIndex keeps only the names holding MARK (graph.could_collide); every check here is the walk over the whole
output: value names unique across all scopes, the checker's full check, and a real onnxruntime session against
the original's."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx.graph import MARK, could_collide
from tests.helpers.fold_corpus import CORPUS


def _bodies(n: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in n.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def _scope_values(g: onnx.GraphProto) -> list[str]:
    """Value names defined in `g` and every body below it (duplicates kept; an IR 3 initializer-input once)."""
    inits = [t.name for t in g.initializer] + [s.values.name for s in g.sparse_initializer]
    out = inits + [v.name for v in g.input if v.name not in set(inits)]
    for n in g.node:
        out += [o for o in n.output if o]
        for b in _bodies(n):
            out += _scope_values(b)
    return out


def _node_names(g: onnx.GraphProto | onnx.FunctionProto) -> list[str]:
    """Node names of a graph or function and of every body below it."""
    out = []
    for n in g.node:
        out += [n.name] if n.name else []
        for b in _bodies(n):
            out += _node_names(b)
    return out


def _fn_values(fn: onnx.FunctionProto) -> list[str]:
    out = list(fn.input)
    for n in fn.node:
        out += [o for o in n.output if o]
        for b in _bodies(n):
            out += _scope_values(b)
    return out


def _fn_nodes(fn: onnx.FunctionProto) -> list[str]:
    return _node_names(fn)


def _every_name(m: onnx.ModelProto) -> set[str]:
    names = set(_scope_values(m.graph)) | set(_node_names(m.graph))
    names |= {v.name for v in (*m.graph.output, *m.graph.value_info)}
    for fn in m.functions:
        names |= set(_fn_values(fn)) | set(_fn_nodes(fn)) | set(fn.output) | {v.name for v in fn.value_info}
    names.discard("")
    return names


def _fold(m: onnx.ModelProto, standalone: str = "keep") -> onnx.ModelProto:
    return bnfold.fold(m, verify=False, standalone=standalone).model


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def _ones(k: int = 3) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(k, np.float32))


def _session(m: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _assert_sound(original: onnx.ModelProto, out: onnx.ModelProto, feeds: dict, where) -> None:
    """`out` (a fold of `original`): SSA across the main graph and its bodies and within each function, the full
    check, and the original's outputs from a real session."""
    values = _scope_values(out.graph)
    assert len(values) == len(set(values)), (where, sorted({v for v in values if values.count(v) > 1}))
    for fn in out.functions:
        fv = _fn_values(fn)
        assert len(fv) == len(set(fv)), (where, fn.name, sorted({v for v in fv if fv.count(v) > 1}))
    onnx.checker.check_model(out, full_check=True)
    sa, sb = _session(original), _session(out)
    inits = {t.name for t in original.graph.initializer}
    feeds = {**{i.name: np.ones(3, np.float32) for i in original.graph.input
                if i.name not in inits and i.name not in feeds}, **feeds}
    outs = [o.name for o in original.graph.output]
    for x, y in zip(sa.run(outs, feeds), sb.run(outs, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4, err_msg=str(where))


def _made(model: onnx.ModelProto, standalone: str) -> tuple[set[str], set[str]]:
    """(value names, node names) the fold of `model` makes, in any scope."""
    out = _fold(model, standalone)
    before_v = set(_scope_values(model.graph)) | {v for fn in model.functions for v in _fn_values(fn)}
    before_n = set(_node_names(model.graph)) | {v for fn in model.functions for v in _fn_nodes(fn)}
    after_v = set(_scope_values(out.graph)) | {v for fn in out.functions for v in _fn_values(fn)}
    after_n = set(_node_names(out.graph)) | {v for fn in out.functions for v in _fn_nodes(fn)}
    return after_v - before_v, after_n - before_n


def _bn_count(m: onnx.ModelProto) -> int:
    def count(g: onnx.GraphProto) -> int:
        return sum((n.op_type == "BatchNormalization") + sum(count(b) for b in _bodies(n)) for n in g.node)
    return count(m.graph) + sum(n.op_type == "BatchNormalization" for fn in m.functions for n in fn.node)


def _assert_made_are_new(planted: onnx.ModelProto, out: onnx.ModelProto, where, expect_new: bool = True) -> None:
    """The fold made some name, and no node name of `out` is repeated more often than `planted` repeated it (a
    made value equal to a taken one fails the SSA check of _assert_sound)."""
    assert not expect_new or _every_name(out) - _every_name(planted), where
    after = _node_names(out.graph) + [n for fn in out.functions for n in _fn_nodes(fn)]
    before = _node_names(planted.graph) + [n for fn in planted.functions for n in _fn_nodes(fn)]
    for nm in set(after):
        assert after.count(nm) <= max(before.count(nm), 1), (where, "node name repeated", nm)


# -- planting in roles the corpus test does not use --------------------------------------------------------------

def _with_function(m: onnx.ModelProto, fn: onnx.FunctionProto, call_inputs: list[str], call_outputs: list[str],
                   domain: str = "plant") -> onnx.ModelProto:
    """`m` with `fn` defined and called once (its outputs added as graph outputs, so it runs)."""
    m.functions.append(fn)
    if not any(o.domain == domain for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(domain, 1))
    m.graph.node.append(helper.make_node(fn.name, call_inputs, call_outputs, domain=domain, name=f"call_{fn.name}"))
    for o in call_outputs:
        m.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, [3]))
    return m


def _plant(model: onnx.ModelProto, names: list[str], role: str) -> onnx.ModelProto:
    m = _copy(model)
    g = m.graph
    if role == "function_value":  # each name a value inside a model-local function
        nodes = [helper.make_node("Constant", [], [nm], value=_ones()) for nm in names]
        nodes.append(helper.make_node("Sum", list(names), ["pf_out"]))
        fn = helper.make_function("plant", "PF", [], ["pf_out"], nodes, [helper.make_opsetid("", 17)])
        return _with_function(m, fn, [], ["pf_called"])
    if role == "function_io":  # the names as a function's own input and output names
        fn = helper.make_function("plant", "PIO", [names[0]], [names[-1]] if len(names) > 1 else ["pio_o"],
                                  [helper.make_node("Identity", [names[0]], [names[-1]] if len(names) > 1
                                                    else ["pio_o"])], [helper.make_opsetid("", 17)])
        g.node.append(helper.make_node("Constant", [], ["pio_in"], value=_ones()))
        return _with_function(m, fn, ["pio_in"], ["pio_called"])
    if role == "function_node_name":
        nodes = [helper.make_node("Constant", [], [f"pfn_{k}"], name=nm, value=_ones()) for k, nm in enumerate(names)]
        nodes.append(helper.make_node("Sum", [f"pfn_{k}" for k in range(len(names))], ["pfn_out"]))
        fn = helper.make_function("plant", "PFN", [], ["pfn_out"], nodes, [helper.make_opsetid("", 17)])
        return _with_function(m, fn, [], ["pfn_called"])
    if role in ("loop_input", "nested_body_value", "body_node_name"):
        vi = lambda n, t=TensorProto.FLOAT, s=(3,): helper.make_tensor_value_info(n, t, list(s))  # noqa: E731
        if role == "loop_input":  # the names as the carried values of a Loop body
            body_in = [vi("pl_i", TensorProto.INT64, ()), vi("pl_c", TensorProto.BOOL, ())] + [vi(nm) for nm in names]
            body_nodes = [helper.make_node("Identity", ["pl_c"], ["pl_co"])]
            body_nodes += [helper.make_node("Identity", [nm], [f"pl_o{k}"]) for k, nm in enumerate(names)]
            body_out = [vi("pl_co", TensorProto.BOOL, ())] + [vi(f"pl_o{k}") for k in range(len(names))]
        elif role == "nested_body_value":  # the names as values of an If body inside a Loop body
            inner = helper.make_graph([helper.make_node("Constant", [], [nm], value=_ones()) for nm in names]
                                      + [helper.make_node("Sum", list(names), ["pl_inner"])], "inner", [],
                                      [vi("pl_inner")])
            other = helper.make_graph([helper.make_node("Constant", [], ["pl_other"], value=_ones())], "other", [],
                                      [vi("pl_other")])
            body_in = [vi("pl_i", TensorProto.INT64, ()), vi("pl_c", TensorProto.BOOL, ()), vi("pl_v0")]
            body_nodes = [helper.make_node("Identity", ["pl_c"], ["pl_co"]),
                          helper.make_node("If", ["pl_c"], ["pl_if"], then_branch=inner, else_branch=other),
                          helper.make_node("Add", ["pl_v0", "pl_if"], ["pl_o0"])]
            body_out = [vi("pl_co", TensorProto.BOOL, ()), vi("pl_o0")]
            names = ["pl_v0"]
        else:  # the names as node names inside a Loop body
            body_in = [vi("pl_i", TensorProto.INT64, ()), vi("pl_c", TensorProto.BOOL, ()), vi("pl_v0")]
            body_nodes = [helper.make_node("Identity", ["pl_c"], ["pl_co"])]
            prev = "pl_v0"
            for k, nm in enumerate(names):
                body_nodes.append(helper.make_node("Relu", [prev], [f"pl_r{k}"], name=nm))
                prev = f"pl_r{k}"
            body_nodes.append(helper.make_node("Identity", [prev], ["pl_o0"]))
            body_out = [vi("pl_co", TensorProto.BOOL, ()), vi("pl_o0")]
            names = ["pl_v0"]
        body = helper.make_graph(body_nodes, "plant_body", body_in, body_out)
        g.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "pl_trip"),
                              numpy_helper.from_array(np.array(True), "pl_cond")])
        g.node.append(helper.make_node("Constant", [], ["pl_start"], value=_ones()))
        outs = [f"pl_final{k}" for k in range(len(names))]
        g.node.append(helper.make_node("Loop", ["pl_trip", "pl_cond"] + ["pl_start"] * len(names), outs,
                                       name="pl_loop", body=body))
        g.output.extend(vi(o) for o in outs)
        return m
    if role == "sparse_initializer":
        for nm in names:
            g.sparse_initializer.append(helper.make_sparse_tensor(
                numpy_helper.from_array(np.array([1.0], np.float32), nm),
                numpy_helper.from_array(np.array([0], np.int64), ""), [3]))
        return m
    raise AssertionError(role)


SUBSET = ["shared_weight", "matmul_bn", "standalone_then_layer", "bn_chain", "if_bodies", "loop_body", "function",
          "backward", "repvgg_add", "weight_is_output", "if_bodies_affine", "shared_params"]
ROLES = ["function_value", "function_io", "function_node_name", "loop_input", "nested_body_value",
         "body_node_name"]


@pytest.mark.parametrize("standalone", ["keep", "affine"])
@pytest.mark.parametrize("name", SUBSET)
def test_made_names_avoid_names_in_functions_and_nested_bodies(name, standalone):
    model, feeds = CORPUS[name](11)
    made_v, made_n = _made(model, standalone)
    made = sorted(made_v | made_n)
    assert made, name
    for role in ROLES:
        planted = _plant(model, made, role)
        onnx.checker.check_model(planted, full_check=True)
        out = _fold(planted, standalone)
        where = (name, standalone, role)
        # no name this fold made is one the planted model had (in any scope): each made value is defined once
        _assert_sound(planted, out, feeds, where)
        _assert_made_are_new(planted, out, where)


# (sparse initializers hold names too: both the index's set and scopes.all_names read them)
@pytest.mark.parametrize("name", ["matmul_bn", "bn_chain"])
def test_made_names_avoid_sparse_initializer_names(name):
    model, feeds = CORPUS[name](5)
    made_v, _ = _made(model, "affine")
    planted = _plant(model, sorted(made_v), "sparse_initializer")
    onnx.checker.check_model(planted, full_check=True)
    _session(planted)  # (onnxruntime runs the planted model)
    out = _fold(planted, "affine")
    _assert_sound(planted, out, feeds, (name, "sparse"))


# -- the Constant nodes a fold writes where no initializer can live ------------------------------------------

# (a fold that must write Constant nodes, in an IR 3 body or a function, names them like no node already there)
@pytest.mark.parametrize("where", ["ir3_body", "function"])
def test_constant_node_names_avoid_existing_node_names(where):
    name = "if_bodies_ir3" if where == "ir3_body" else "function"
    model, feeds = CORPUS[name](3)
    out = _fold(model)
    made_nodes = sorted(set(_node_names(out.graph) + [n for fn in out.functions for n in _fn_nodes(fn)])
                        - set(_node_names(model.graph) + [n for fn in model.functions for n in _fn_nodes(fn)]))
    assert made_nodes and all(n.endswith("_const") for n in made_nodes), made_nodes
    planted = _copy(model)
    for nm in made_nodes:  # a node of that name in the very scope the Constant is written to
        plain = helper.make_node("Constant", [], [f"{nm}_v"], name=nm, value=_ones())
        if where == "function":
            planted.functions[0].node.insert(0, plain)
        else:
            ifn = next(n for n in planted.graph.node if n.op_type == "If")
            body = next(a.g for a in ifn.attribute if a.g.node[0].name.startswith(nm[0]))
            body.node.insert(0, plain)
    onnx.checker.check_model(planted, full_check=True)
    out = _fold(planted)
    _assert_sound(planted, out, feeds, where)
    _assert_made_are_new(planted, out, where)


# -- odd names ----------------------------------------------------------------------------------------------

def _renamed(model: onnx.ModelProto, rename) -> onnx.ModelProto:
    """`model` with every value and node name of the main graph and its bodies passed through `rename`."""
    m = _copy(model)

    def fix(g: onnx.GraphProto) -> None:
        for t in g.initializer:
            t.name = rename(t.name)
        for v in (*g.input, *g.output, *g.value_info):
            v.name = rename(v.name)
        for n in g.node:
            n.input[:] = [rename(i) if i else i for i in n.input]
            n.output[:] = [rename(o) if o else o for o in n.output]
            if n.name:
                n.name = rename(n.name)
            for b in _bodies(n):
                fix(b)

    fix(m.graph)
    return m


ODD = {
    "newline": lambda s: f"{s}\n",
    "newline_mark": lambda s: f"{s}\n{MARK}",  # every name holds MARK after a newline
    "mark_prefix": lambda s: f"{MARK}{s}",
    "mark_split": lambda s: f"{s}_bnf\nold",  # (joined with newlines: never a MARK of its own)
    "unicode": lambda s: f"{s}·ß名",
    "spaces_slashes": lambda s: f"a/ {s} :0",
    "made_looking": lambda s: f"{s}{MARK}",  # every name looks made already
    "made_looking_k": lambda s: f"{s}{MARK}2",
}


@pytest.mark.parametrize("style", sorted(ODD))
@pytest.mark.parametrize("name", ["shared_weight", "matmul_bn", "standalone_then_layer", "if_bodies", "loop_body",
                                  "ir3"])
def test_odd_names_fold_to_sound_models(name, style):
    model, feeds = CORPUS[name](2)
    odd = _renamed(model, ODD[style])
    feeds = {ODD[style](k): v for k, v in feeds.items()}
    onnx.checker.check_model(odd, full_check=True)
    for standalone in ("keep", "affine"):
        out = _fold(odd, standalone)
        _assert_sound(odd, out, feeds, (name, style, standalone))
        _assert_made_are_new(odd, out, (name, style, standalone))


def test_could_collide_finds_every_marked_name_whatever_the_characters():
    names = ["a", "b\n_bnf", "old", "_bnfold", "x_bnfold2", "\n_bnfold\n", "", "y_bnfol", "d", "é_bnfold"]
    got = could_collide(names, {"z_bnfold": 1, "q": 2}, [])
    assert sorted(got) == sorted([n for n in names if MARK in n] + ["z_bnfold"])
    assert could_collide(["b_bnf", "old"], ["x_bnfol", "d"]) == []  # (the joins hold no MARK)


# -- names one step away from a made one --------------------------------------------------------------------

@pytest.mark.parametrize("role", ["initializer", "node_output", "node_name"])
@pytest.mark.parametrize("standalone", ["keep", "affine"])
@pytest.mark.parametrize("name", ["shared_weight", "matmul_bn", "standalone_then_layer", "if_bodies", "function"])
def test_names_next_to_made_ones(name, standalone, role):
    """The made names themselves and the same with a counter (x_bnfold2..4), cut short (x_bnfol) or grown
    (x_bnfold_), as main-graph initializers nobody reads, outputs of Constant nodes (no value_info, no graph
    output: only the node says so) or node names: the fold's own names skip exactly the taken ones."""
    model, feeds = CORPUS[name](4)
    made_v, made_n = _made(model, standalone)
    near = sorted({v for m in made_v | made_n for v in (m, f"{m}2", f"{m}3", f"{m}4", m[:-1], f"{m}_", f"{m}22")})
    planted = _copy(model)
    for k, nm in enumerate(near):
        if role == "initializer":
            planted.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float32), nm))
        elif role == "node_output":
            planted.graph.node.append(helper.make_node("Constant", [], [nm], value=_ones()))
        else:
            planted.graph.node.append(helper.make_node("Constant", [], [f"near_{k}"], name=nm, value=_ones()))
    out = _fold(planted, standalone)
    _assert_sound(planted, out, feeds, (name, standalone, role))
    _assert_made_are_new(planted, out, (name, standalone, role))


# -- bnfold's own output folded again ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["shared_weight", "matmul_bn", "standalone_then_layer", "bn_chain", "if_bodies",
                                  "if_bodies_affine", "loop_body", "function", "backward", "repvgg_add", "ir3",
                                  "if_bodies_ir3", "shared_params", "bn_then_mul_add"])
def test_folding_a_folded_model_again(name):
    """A folded model holds made names in every scope; new BNs are spliced in after each fold (a BN whose
    statistics are random, after the graph's first output), so every round has something to make names for."""
    model, feeds = CORPUS[name](9)
    rng = np.random.default_rng(0)
    current = model
    for rnd in range(3):
        standalone = "affine" if rnd % 2 else "keep"
        out = _fold(current, standalone)
        _assert_sound(current, out, feeds, (name, rnd))
        _assert_made_are_new(current, out, (name, rnd), expect_new=rnd == 0 or _bn_count(current) > 0)
        current = _with_new_bn(out, rng, rnd)
    out = _fold(current, "affine")
    onnx.checker.check_model(out, full_check=True)
    _assert_made_are_new(current, out, (name, "last"), expect_new=_bn_count(current) > 0)
    sa, sb = _session(current), _session(out)
    outs = [o.name for o in current.graph.output]
    for x, y in zip(sa.run(outs, feeds), sb.run(outs, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


def _with_new_bn(m: onnx.ModelProto, rng, rnd: int) -> onnx.ModelProto:
    """`m` with a Conv -> BN (named as bnfold names what it makes) after its first output, which it replaces."""
    m = _copy(m)
    g = m.graph
    c = 4
    shape = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    if len(shape) != 4 or shape[1] != c:
        return m  # (a MatMul's output: folded again as it is)
    y = g.output[0].name
    tag = f"{y}{MARK}" if rnd == 0 else f"r{rnd}{MARK}{rnd}"
    w = numpy_helper.from_array(rng.normal(0, 0.3, (c, c, 1, 1)).astype(np.float32), f"{tag}_w")
    stats = [numpy_helper.from_array(v.astype(np.float32), f"{tag}_{k}") for k, v in
             (("g", rng.uniform(0.5, 2, c)), ("b", rng.normal(0, 1, c)), ("m", rng.normal(0.5, 1, c)),
              ("v", rng.uniform(0.5, 3, c)))]
    g.initializer.extend([w, *stats])
    if m.ir_version < 4:
        g.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in [w, *stats])
    g.node.extend([helper.make_node("Conv", [y, w.name], [f"{tag}_c"], name=f"{tag}_conv"),
                   helper.make_node("BatchNormalization", [f"{tag}_c"] + [t.name for t in stats], [f"{tag}_y"],
                                    name=f"{tag}_bn")])
    out0 = onnx.ValueInfoProto()
    out0.CopyFrom(g.output[0])
    out0.name = f"{tag}_y"
    g.output.insert(0, out0)
    del g.output[1]
    return m


# -- empty names and function value_info ------------------------------------------------------------------------

def _empty_named(rng) -> tuple[onnx.ModelProto, dict]:
    """Unnamed Conv (an empty bias input: optional, spelled "") -> unnamed BN -> Relu, twice."""
    from tests.conftest import random_bn
    inits, nodes, y = [], [], "x"
    for k in range(2):
        st = random_bn(rng, 4)
        inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), f"w{k}"))
        inits += [numpy_helper.from_array(st[s].astype(np.float32), f"{s}{k}") for s in ("gamma", "beta", "mean", "var")]
        nodes += [helper.make_node("Conv", [y, f"w{k}", ""], [f"c{k}"]),
                  helper.make_node("BatchNormalization", [f"c{k}", f"gamma{k}", f"beta{k}", f"mean{k}", f"var{k}"],
                                   [f"b{k}"]),
                  helper.make_node("Relu", [f"b{k}"], [f"r{k}"])]
        y = f"r{k}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 3, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m, {"x": rng.normal(size=(2, 4, 3, 3)).astype(np.float32)}


@pytest.mark.parametrize("standalone", ["keep", "affine"])
def test_unnamed_nodes_and_empty_inputs(standalone):
    model, feeds = _empty_named(np.random.default_rng(6))
    onnx.checker.check_model(model, full_check=True)
    made_v, made_n = _made(model, standalone)
    assert made_v and "" not in made_v | made_n
    for role in ("node_output", "node_name"):
        planted = _copy(model)
        for k, nm in enumerate(sorted(made_v | made_n)):
            planted.graph.node.append(helper.make_node("Constant", [], [nm] if role == "node_output" else [f"e_{k}"],
                                                       name="" if role == "node_output" else nm, value=_ones()))
        out = _fold(planted, standalone)
        _assert_sound(planted, out, feeds, (standalone, role))
        _assert_made_are_new(planted, out, (standalone, role))
        again = _fold(out, standalone)  # (nothing left to fold: unchanged and sound)
        _assert_sound(planted, again, feeds, (standalone, role, "again"))


# (a model-local function's own value_info names are taken too)
def test_made_names_avoid_a_functions_value_info():
    model, feeds = CORPUS["function"](8)
    made_v, _ = _made(model, "keep")
    planted = _copy(model)
    for nm in sorted(made_v):
        planted.functions[0].value_info.append(helper.make_tensor_value_info(nm, TensorProto.INT64, [7]))
    onnx.checker.check_model(planted, full_check=True)
    out = _fold(planted)
    _assert_sound(planted, out, feeds, "function value_info")
    taken = {v.name for v in planted.functions[0].value_info}
    assert not set(_fn_values(out.functions[0])) & taken
