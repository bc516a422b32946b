"""Edge cases found by adversarial testing of the CLI, the verifier and the library API."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import main
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import ort_session
from tests.onnx.test_edge import mk


def _model(rng) -> onnx.ModelProto:
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], name="conv", pads=[1, 1, 1, 1])
    g.bn("bn", "c", 4, out="y")
    return g.model([("x", [1, 3, 6, 6])], [("y", [1, 4, 6, 6])])


def _one_line_error(err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], err


def test_negative_seed_is_a_one_line_usage_error(tmp_path, rng, capsys):
    p = tmp_path / "m.onnx"
    onnx.save(_model(rng), p)
    assert main([str(p), "--seed", "-1"]) == 2
    _one_line_error(capsys.readouterr().err, "--seed")


@pytest.mark.parametrize("opt", [["--atol", "nan"], ["--atol", "-1"], ["--rtol", "-1"], ["--atol", "y:-1"]])
def test_nonsense_tolerance_is_a_usage_error_not_a_verification_failure(tmp_path, rng, capsys, opt):
    p = tmp_path / "m.onnx"
    onnx.save(_model(rng), p)
    assert main([str(p), *opt]) == 2
    _one_line_error(capsys.readouterr().err, opt[0])


def test_output_onto_the_inputs_external_data_is_refused(tmp_path, rng, capsys):
    m = _model(rng)
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, location="ext.data", size_threshold=0)
    data = (tmp_path / "ext.data").read_bytes()
    code = main([str(src), "-o", str(tmp_path / "ext.data"), "-q"])
    assert (tmp_path / "ext.data").read_bytes() == data, "the input's weights were overwritten"
    assert code == 2
    _one_line_error(capsys.readouterr().err, "ext.data")
    assert not (tmp_path / "ext.folded.onnx").exists()


# ---- verification and library API ---------------------------------------------------------------
def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(m.graph.input) + list(m.graph.output):
        v.type.tensor_type.elem_type = TensorProto.DOUBLE
    del m.graph.value_info[:]
    return m


@pytest.mark.parametrize("seed", [35, 38, 39])
def test_division_by_the_folded_value_is_not_a_false_alarm(seed):
    """Conv -> BN -> Div(const, .): the fold is exact math and the folded model is *closer* to the
    float64 truth than the original, yet the verifier reports FAILED (CLI exit 1, nothing written):
    1/x near zero amplifies rounding far beyond the one-ulp weight-nudge noise estimate."""
    from onnx.reference import ReferenceEvaluator
    from bnfold.onnx.feeds import make_feeds
    rng = np.random.default_rng(seed)
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.bn("bn", "c", 4)
    g.node("Div", [g.init("a", rng.normal(2, 0.1, (4, 1, 1))), "bn_out"], ["y"])
    m = mk(g, [("x", [1, 3, 6, 6])], [("y", None)])
    res = bnfold.fold(m)
    feeds = make_feeds(m, seed=0)[0]
    truth = ReferenceEvaluator(_to_float64(m)).run(None, {k: v.astype(np.float64) for k, v in feeds.items()})[0]
    orig_err = np.abs(ort_session(m).run(None, feeds)[0] - truth).max()
    fold_err = np.abs(ort_session(res.model).run(None, feeds)[0] - truth).max()
    assert fold_err <= 2 * orig_err  # the folded model is as accurate as the original...
    assert res.report.verification.passed is True  # ...so the verifier must not reject it


def test_model_proto_with_unloaded_external_data_is_a_bnfold_error(tmp_path, rng):
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"])
    g.bn("bn", "c", 4, out="y")
    onnx.save(mk(g, [("x", [1, 3, 6, 6])], [("y", None)]), tmp_path / "a.onnx", save_as_external_data=True,
              location="a.bin", size_threshold=0)
    m = onnx.load(str(tmp_path / "a.onnx"), load_external_data=False)
    with pytest.raises(bnfold.BnfoldError):
        bnfold.fold(m)


# ---- MatMul + rank-raising Add: the BN's axis 1 is the MatMul's *row* axis ------------------------
def _branchy(scale_else: float) -> onnx.ModelProto:
    def br(name: str, scale: float) -> onnx.GraphProto:
        k = helper.make_node("Constant", [], [f"{name}_k"],
                             value=numpy_helper.from_array(np.full((1,), scale, np.float32), "k"))
        mul = helper.make_node("Mul", ["x", f"{name}_k"], [f"{name}_o"])
        return helper.make_graph([k, mul], name, [], [helper.make_tensor_value_info(f"{name}_o", TensorProto.FLOAT, None)])
    g = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=br("then", 2.0),
                                            else_branch=br("else", scale_else), name="if")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_check_covers_both_values_of_a_boolean_input(tmp_path, capsys, seed):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_branchy(3.0), a)
    onnx.save(_branchy(-3.0), b)  # differs whenever cond is False
    assert main(["check", str(a), str(b), "--seed", str(seed)]) == 1


# ---- missed fold: a reader that only looks at the shape is not a second use of the values --------
def test_several_models_one_bad_writes_nothing(tmp_path, rng, capsys):
    """DESIGN: exit 2 means nothing written. `bnfold good.onnx bad.onnx` writes good.folded.onnx first,
    then fails on bad.onnx with exit 2, leaving a file behind."""
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_model(rng), good)
    bad.write_bytes(b"PK\x03\x04 not a model")
    assert main([str(good), str(bad), "-q"]) == 2
    _one_line_error(capsys.readouterr().err, "bad.onnx")
    assert not (tmp_path / "good.folded.onnx").exists()
