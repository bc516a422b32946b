"""The verifier's cheap paths compute what the plain ones did: onnxruntime sessions whose weights are
given as arrays (runtime._skeleton) run the same function bit for bit, the noise model given as nudged
arrays (noise.nudged_initializers) holds the very nudges perturbed() writes into a copy, and the
proofs' BLAS on one thread is restored after."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.onnx import runtime
from bnfold.onnx.noise import nudged_initializers, perturbed
from bnfold.onnx.protos import WithOutputs
from bnfold.verify import blas
from tests.helpers.onnx_build import G

CPU = "CPUExecutionProvider"


def _net(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> BN -> Relu -> Conv -> BN -> Gemm, weights both above and below runtime.ARRAY_MIN bytes."""
    g = G(rng)
    g.node("Conv", ["x", g.weight("w1", (32, 3, 3, 3)), g.weight("b1", (32,))], ["c1"], pads=[1, 1, 1, 1])
    g.bn("bn1", "c1", 32, out="r0")
    g.node("Relu", ["r0"], ["r1"])
    g.node("Conv", ["r1", g.weight("w2", (16, 32, 3, 3))], ["c2"], strides=[2, 2])
    g.bn("bn2", "c2", 16, out="b2")
    g.node("Flatten", ["b2"], ["f"])
    g.node("Gemm", ["f", g.weight("wg", (16 * 3 * 3, 10)), g.weight("bg", (10,))], ["y"])
    return g.model([("x", [2, 3, 8, 8])], [("y", [2, 10])])


def _plain(model: onnx.ModelProto, feeds, outputs=()):
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=[CPU])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def test_weights_as_arrays_run_the_same_function_bit_for_bit(rng):
    m = _net(rng)
    feeds = {"x": rng.normal(0.3, 1.2, (2, 3, 8, 8)).astype(np.float32)}
    src, names, arrays = runtime._skeleton(WithOutputs(m, ("r1", "c2")))
    assert "w2" in names and "wg" in names  # the big weights left the model's bytes
    assert len(src) < sum(a.nbytes for a in arrays)
    got = runtime.OrtRunner(WithOutputs(m, ("r1", "c2")), CPU).run(feeds)
    want = _plain(m, feeds, ("r1", "c2"))
    assert set(got) == set(want) == {"y", "r1", "c2"}
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_new_weights_as_arrays_are_the_model_with_those_weights(rng):
    m = _net(rng)
    feeds = {"x": rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)}
    new = {"w1": rng.normal(0, 0.3, (32, 3, 3, 3)).astype(np.float32),  # a big weight
           "bn2_mean": rng.normal(2, 1, 16).astype(np.float32)}         # and a small one
    got = runtime.OrtRunner(WithOutputs(m, ("c2",), new), CPU).run(feeds)
    replaced = onnx.ModelProto()
    replaced.CopyFrom(m)
    for t in replaced.graph.initializer:
        if t.name in new:
            t.CopyFrom(numpy_helper.from_array(new[t.name], t.name))
    want = _plain(replaced, feeds, ("c2",))
    assert not np.array_equal(want["y"], _plain(m, feeds)["y"])  # the new weights matter
    for k in want:
        assert np.array_equal(got[k], want[k]), k
    # other providers (and onnxruntime's own optimisations) get the model encoded with its new weights
    encoded = onnx.load_from_string(runtime._encoded(WithOutputs(m, ("c2",), new)))
    assert len(encoded.graph.node) == len(m.graph.node)
    enc = _plain(encoded, feeds)
    for k in want:
        assert np.array_equal(enc[k], want[k]), k
    assert m.SerializeToString() != replaced.SerializeToString()  # the original was never touched
    assert all(np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
               for t, u in zip(m.graph.initializer, _net(np.random.default_rng(1234)).graph.initializer))


def test_nudged_arrays_are_the_nudges_perturbed_makes(rng):
    m = _net(rng)
    for seed in (0, 7):
        weights = nudged_initializers(m, seed)
        copy = {t.name: numpy_helper.to_array(t) for t in perturbed(m, seed).graph.initializer}
        orig = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        assert set(weights) == {n for n in orig if not np.array_equal(copy[n], orig[n])}
        assert {"w1", "b1", "w2", "wg", "bg", "bn1_gamma", "bn2_var"} <= set(weights)
        for n, a in weights.items():
            assert a.dtype == copy[n].dtype and np.array_equal(a.view(np.uint32), copy[n].view(np.uint32)), n


def test_a_constant_weight_needs_the_built_noise_model(rng):
    m = _net(rng)
    w = next(t for t in m.graph.initializer if t.name == "wg")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["wg"], value=w))
    m.graph.initializer.remove(w)
    assert nudged_initializers(m, 0) is None  # perturbed() nudges the Constant: the arrays cannot say that
    res = bnfold.fold(m, providers=["cpu"])
    assert res.report.verification.passed is True
    assert res.report.verification.proofs["proven"] == 2


def test_noise_model_as_arrays_verifies_like_the_copy(rng, monkeypatch):
    """A fold verified with the noise model given as arrays gets the numbers the built copy gave: the same
    nudges run the same way, so the same noise, tolerances and errors, output by output and tensor by tensor."""
    import bnfold.onnx.verify as verify

    m = _net(rng)

    def report():
        ver = bnfold.fold(m, providers=["cpu"]).report.verification
        assert ver.passed is True and ver.proofs == {"proven": 2, "failed": 0, "not_run": 0}
        return ver.providers[CPU].outputs, ver.providers[CPU].notes["profile"]

    arrays = report()
    monkeypatch.setattr(verify, "nudged_initializers", lambda model, seed: None)  # the copy, as before
    copy = report()
    assert arrays == copy
    assert arrays[0]["y"]["noise_max_abs"] > 0


def test_one_blas_thread_is_restored(rng):
    pairs = blas._blas()
    before = [int(get()) for _, get in pairs]
    a, b = rng.normal(size=(300, 700)), rng.normal(size=(700, 50))
    with blas.one_thread():
        assert all(int(get()) == 1 for _, get in pairs)
        inside = a @ b
    assert [int(get()) for _, get in pairs] == before
    assert np.allclose(inside, a @ b, rtol=1e-12, atol=1e-12)


def test_weight_types_without_an_array_stay_in_the_model(rng):
    g = G(rng, dtype=np.float16)
    g.init("big16", rng.normal(0, 1, (64, 6, 6)))
    g.init("big_i16", rng.integers(-9, 9, (64, 6, 6)), dtype=np.int16)  # int16: not an array type here
    g.node("Add", ["x", "big16"], ["s"])
    g.node("Cast", ["big_i16"], ["i"], to=TensorProto.FLOAT16)
    g.node("Add", ["s", "i"], ["y"])
    m = g.model([("x", [64, 6, 6])], [("y", [64, 6, 6])])
    src, names, _ = runtime._skeleton(WithOutputs(m, ()))
    assert names == ["big16"]  # float16 goes as an array, int16 stays in the model's bytes
    feeds = {"x": rng.normal(0, 1, (64, 6, 6)).astype(np.float16)}
    assert np.array_equal(runtime.OrtRunner(m, CPU).run(feeds)["y"], _plain(m, feeds)["y"])
