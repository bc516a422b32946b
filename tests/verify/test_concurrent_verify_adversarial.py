"""Adversarial tests of the overlapped ONNX verification: the noise model's weights drawn in a thread
(core/later.py's Later) and the local proofs started after the original's run, judging each fold's folded side
once the candidate's values arrive (proofs.prove with a Future).

The deferred proofs must give exactly what the proofs with every value at hand give (the same proof dicts,
counts and blame) whatever the timing and PENDING_BYTES; planted wrong folds must still be caught; fault
paths must end (each such test runs in a subprocess with a timeout, so a hang fails instead of blocking).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.core import kernel
from bnfold.core.errors import BnfoldError
from bnfold.onnx import batched, proofs
from tests.conftest import ROOT, SAMPLES
from tests.helpers.fold_damage import damage
from tests.helpers.onnx_build import G


# ---------------------------------------------------------------------------------------------- helpers

class Recorded:
    """The arguments of the first proofs.prove call of a verification (the values it was given)."""

    def __init__(self, args: tuple) -> None:
        self.original, self.folded, self.decisions, self.captured, cf = args[:5]
        self.future = cf

    @property
    def captured_folded(self) -> dict:
        cf = self.future
        return dict(cf.result(timeout=30)) if isinstance(cf, Future) else dict(cf or {})


@pytest.fixture
def record(monkeypatch):
    """Spy on proofs.prove (the real one runs): the list of its calls' arguments."""
    calls: list[Recorded] = []
    real = proofs.prove

    def spy(*a, **k):
        calls.append(Recorded(a))
        return real(*a, **k)
    monkeypatch.setattr(proofs, "prove", spy)
    return calls


def fresh(decisions):
    ds = copy.deepcopy(decisions)
    for d in ds:
        d.proof = None
    return ds


def proven(rec: Recorded, captured_folded, captured=None):
    """prove() on fresh copies of the decisions: (counts, blame, every folded decision's proof)."""
    ds = fresh(rec.decisions)
    counts, blame = proofs.prove(rec.original, rec.folded, ds, rec.captured if captured is None else captured,
                                 captured_folded)
    return counts, blame, [(d.bn, d.proof) for d in ds if d.is_folded]


def later(values, delay: float) -> Future:
    """A Future set from another thread after `delay` seconds."""
    f: Future = Future()

    def set_it():
        time.sleep(delay)
        f.set_result(values)
    threading.Thread(target=set_it, daemon=True).start()
    return f


def done_future(values) -> Future:
    f: Future = Future()
    f.set_result(values)
    return f


def whole(rec: Recorded, cf: dict, captured=None):
    """The reference: every fold proven by _prove_one with every value at hand (the folded witness's shape
    known before any cut), as the proofs were before they were deferred."""
    captured = rec.captured if captured is None else captured
    og, fg = proofs._Graph(rec.original), proofs._Graph(rec.folded)
    out = []
    for d in rec.decisions:
        if not d.is_folded or d.site is None:
            continue
        xs = proofs.site_inputs(d.site)
        if any(x not in captured for x in xs):
            continue
        p = proofs._prove_one(og, fg, xs, d.site[1], {x: captured[x] for x in xs}, captured.get(d.site[1]),
                              cf.get(d.site[1]),
                              {x: cf.get(x, None if x in fg.producer else captured[x]) for x in xs})
        out.append((d.bn, p))
    return out


def merge_model(rng) -> onnx.ModelProto:
    """A BN after the Add of two conv branches (a merge site with two inputs) and a conv on the graph input."""
    g = G(rng)
    g.node("Relu", ["x"], ["a"])
    g.node("Sigmoid", ["x"], ["b"])
    g.node("Conv", ["a", g.weight("w1", (6, 4, 3, 3))], ["c1"], pads=[1, 1, 1, 1])
    g.node("Conv", ["b", g.weight("w2", (6, 4, 1, 1))], ["c2"])
    g.node("Add", ["c1", "c2"], ["s"])
    g.bn("bn1", "s", 6, out="y1")
    g.node("Conv", ["x", g.weight("w3", (6, 4, 3, 3))], ["c3"], pads=[1, 1, 1, 1])
    g.bn("bn2", "c3", 6, out="y2")
    g.node("Add", ["y1", "y2"], ["y"])
    return g.model([("x", [1, 4, 8, 8])], [("y", [1, 6, 8, 8])])


def torch_model_onnx(tmp_path) -> onnx.ModelProto:
    """A small torchvision ResNet exported by torch.onnx.export (dynamo=False), BN statistics calibrated."""
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    net.eval()
    path = str(tmp_path / "r18.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), path, dynamo=False, opset_version=17,
                      do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    return onnx.load(path)


MODELS = ["resnet_block", "mobilenet_block", "mlp", "skip_cases", "decoder", "fp16", "merge", "resnet18"]


def load_model(name: str, tmp_path) -> onnx.ModelProto:
    if name == "merge":
        return merge_model(np.random.default_rng(7))
    if name == "resnet18":
        return torch_model_onnx(tmp_path)
    return onnx.load(os.path.join(SAMPLES, f"{name}.onnx"))


# --------------------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("name", MODELS)
def test_deferred_proofs_equal_the_proofs_with_every_value_at_hand(name, tmp_path, record, monkeypatch):
    model = load_model(name, tmp_path)
    res = bnfold.fold(model)
    assert res.report.verification.verdict == "passed"
    rec = record[0]
    assert isinstance(rec.future, Future)  # verify hands prove() the candidate's values as a Future
    cf = rec.captured_folded
    assert cf, "the candidate's values reached the proofs"
    ref = proven(rec, cf)
    assert ref[0]["proven"] >= 1 and ref[0]["failed"] == 0
    # the proofs verify itself made (proof thread, future set by the main thread) are the same
    assert [(d.bn, d.proof) for d in rec.decisions if d.is_folded] == ref[2]
    # the proofs as they were made before deferral: each with every value at hand
    assert whole(rec, cf) == ref[2]
    assert proven(rec, None) == proven(rec, done_future({}))  # nothing of the candidate: the same either way
    for pending in (0, 1, 1 << 40):
        monkeypatch.setattr(proofs, "PENDING_BYTES", pending)
        assert proven(rec, done_future(cf)) == ref
        assert proven(rec, later(cf, 0.05)) == ref
        assert proven(rec, cf) == ref


def test_a_folded_witness_of_another_shape_is_judged_whole(tmp_path, record, monkeypatch):
    """The cut is made on the guess that the folded witness has the original's shape: when it has not, the
    fold is judged whole, as _prove_one judges it, both when the Future is already set and set later."""
    bnfold.fold(load_model("resnet_block", tmp_path))
    rec = record[0]
    cf = rec.captured_folded
    sites = [d.site for d in rec.decisions if d.is_folded and d.site is not None]
    for cut_axis in (0, -1):
        odd = dict(cf)
        for _, y in sites:
            w = np.asarray(cf[y])
            odd[y] = np.concatenate([w, w], axis=cut_axis)  # another shape, the same rank
        ref = whole(rec, odd)
        assert all("not_run" in p or p.get("passed") is False for _, p in ref)
        for pending in (0, 1 << 40):
            monkeypatch.setattr(proofs, "PENDING_BYTES", pending)
            got = proven(rec, later(odd, 0.02))
            assert got[2] == ref
            assert got == proven(rec, odd)


def test_a_folded_witness_of_another_rank_or_missing(tmp_path, record):
    bnfold.fold(merge_model(np.random.default_rng(3)))
    rec = record[0]
    cf = rec.captured_folded
    ys = [d.site[1] for d in rec.decisions if d.is_folded]
    for change in ("flat", "missing", "scalar", "xs_missing", "xs_other_shape"):
        odd = dict(cf)
        for y in ys:
            if change == "flat":
                odd[y] = np.asarray(cf[y]).reshape(-1)
            elif change == "missing":
                odd.pop(y)
            elif change == "scalar":
                odd[y] = np.float32(1.0)
        for d in rec.decisions:
            for x in proofs.site_inputs(d.site):
                if change == "xs_missing":
                    odd.pop(x, None)
                elif change == "xs_other_shape" and x in odd:
                    odd[x] = np.asarray(odd[x])[..., :-1]
        ref = whole(rec, odd)
        got = proven(rec, later(odd, 0.02))
        assert got[2] == ref, change
        if change in ("flat", "missing", "scalar"):
            assert got[0]["proven"] == 0 and got[0]["not_run"] == len(ys), (change, got)
        else:  # the folded side's own input only matters when the replay on the original's input disagrees
            assert got[0]["proven"] == len(ys), (change, got)


def test_merge_site_and_graph_input_site(record):
    bnfold.fold(merge_model(np.random.default_rng(11)))
    rec = record[0]
    sites = {d.bn: d.site for d in rec.decisions if d.is_folded}
    assert sites == {"bn1": (("a", "b"), "y1"), "bn2": ("x", "y2")}
    cf = rec.captured_folded
    # a graph input's value is the same in both models: taken from the original's when the candidate's lacks it
    no_x = {k: v for k, v in cf.items() if k != "x"}
    assert proven(rec, later(no_x, 0.02)) == proven(rec, cf)
    assert all(p.get("passed") for _, p in proven(rec, later(no_x, 0.02))[2])


def test_a_future_that_fails_propagates_and_does_not_hang(tmp_path, record):
    bnfold.fold(load_model("resnet_block", tmp_path))
    rec = record[0]
    f: Future = Future()

    def fail():
        time.sleep(0.02)
        f.set_exception(RuntimeError("candidate exploded"))
    threading.Thread(target=fail, daemon=True).start()
    with pytest.raises(RuntimeError, match="candidate exploded"):
        proofs.prove(rec.original, rec.folded, fresh(rec.decisions), rec.captured, f)


# ------------------------------------------------------------------------------------------- planted damage

@pytest.fixture
def damage_second_fold(monkeypatch):
    def plant(how: str) -> None:
        monkeypatch.setattr(batched, "ENABLED", False)
        real, calls = kernel.fold_after, []

        def wrong(*a, **k):
            f = real(*a, **k)
            calls.append(1)
            return damage(f, how) if len(calls) == 2 else f
        monkeypatch.setattr(kernel, "fold_after", wrong)
    return plant


@pytest.mark.parametrize("pending", [0, 1 << 40])
@pytest.mark.parametrize("how", ["scale", "bias", "axis"])
def test_a_planted_wrong_fold_is_caught_named_and_reverted(how, pending, monkeypatch, damage_second_fold, record):
    monkeypatch.setattr(proofs, "PENDING_BYTES", pending)
    src = os.path.join(SAMPLES, "resnet_block.onnx")
    clean = bnfold.fold(src)
    record.clear()
    damage_second_fold(how)
    res = bnfold.fold(src)
    rep = res.report
    assert rep.verification.verdict == "passed"
    [reverted] = rep.reverted
    assert reverted.bn == clean.report.folded[1].bn
    first = record[0]
    failed = [d for d in first.decisions if d.is_folded and d.proof and d.proof.get("passed") is False]
    assert [d.bn for d in failed] == [reverted.bn]
    # the deferred verdict on the damaged model equals the one with every value at hand
    cf = first.captured_folded
    assert [(d.bn, d.proof) for d in first.decisions if d.is_folded] == whole(first, cf)


def test_a_wrong_fold_at_a_merge_site_is_caught_with_the_values_late(record):
    model = merge_model(np.random.default_rng(5))
    bnfold.fold(model)
    rec = record[0]
    bad = copy.deepcopy(rec.folded)
    w1 = next(t for t in bad.graph.initializer if t.name in {n.input[1] for n in bad.graph.node
                                                             if n.op_type == "Conv" and n.input[0] == "a"})
    a = onnx.numpy_helper.to_array(w1).copy()
    a[2] *= np.float32(1.0001)
    w1.CopyFrom(onnx.numpy_helper.from_array(a, w1.name))
    from tests.helpers.onnx_build import run_ort
    names = sorted(proofs.needed_inputs(rec.decisions) - {"x"})
    import onnxruntime as ort  # the damaged model's own values, as verify would capture them
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    m = copy.deepcopy(bad)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    cf = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": rec.captured["x"]})))
    assert run_ort(bad, {"x": rec.captured["x"]})  # the damaged model runs
    ds = fresh(rec.decisions)
    counts, blame = proofs.prove(rec.original, bad, ds, rec.captured, later(cf, 0.05))
    assert counts == {"proven": 1, "failed": 1, "not_run": 0}
    assert [b["bn"] for b in blame] == ["bn1"] and blame[0]["max_abs"] > blame[0]["bound"]


# ------------------------------------------------------------------------------------------ determinism

def test_the_same_fold_twice_gives_the_same_report(tmp_path, monkeypatch):
    model = load_model("merge", tmp_path)

    def doc(pending):
        monkeypatch.setattr(proofs, "PENDING_BYTES", pending)
        d = bnfold.fold(model).report.to_dict()
        d.pop("timing_s")
        return json.dumps(d, sort_keys=True, default=str)
    first = doc(1 << 40)
    assert doc(1 << 40) == first
    assert doc(0) == first


# ------------------------------------------------------------------------- fault paths (in a subprocess)

def run_script(body: str, timeout: float = 45) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter with this worktree's bnfold; a hang fails the test (timeout)."""
    code = "import sys\nsys.path.insert(0, %r)\n" % ROOT + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - the failure this guards against
        pytest.fail(f"hung (killed after {timeout} s): {(e.stderr or b'')[-2000:]!r}")


PRELUDE = """
import copy, os, threading, numpy as np, onnx, bnfold
from bnfold.core.options import Options
from bnfold.onnx import proofs, verify
from tests.conftest import SAMPLES
calls = []
real = proofs.prove
def spy(*a, **k):
    calls.append(a)
    return real(*a, **k)
proofs.prove = spy
orig = onnx.load(os.path.join(SAMPLES, "resnet_block.onnx"))
res = bnfold.fold(orig)
decisions = [copy.deepcopy(d) for d in calls[0][2]]
folded = res.model
def extra_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(("bnfold-proofs", "bnfold-noise")))
"""
# verify `bad` against the original with the fold's decisions, then list the verification threads still alive
VERIFY_BAD = """
try:
    verify.verify_onnx(orig, bad, Options.of(), [copy.deepcopy(d) for d in decisions])
    print("NO ERROR")
except bnfold.BnfoldError as e:
    print("ERROR", e)
import time; time.sleep(0.3)
print("THREADS", extra_threads())
"""


def test_a_candidate_that_fails_to_run_with_proofs_waiting_ends():
    """The proofs start after the original's run and wait for the candidate's values: when the candidate cannot
    run, the verification raises the one-line error and the proof thread is released (not left waiting)."""
    r = run_script(PRELUDE + """
bad = copy.deepcopy(folded)
out = bad.graph.output[0].name
for n in bad.graph.node:
    for i, o in enumerate(n.output):
        if o == out:
            n.output[i] = "pre_out"
bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array([7, -1], np.int64), "odd_shape"))
bad.graph.node.append(onnx.helper.make_node("Reshape", ["pre_out", "odd_shape"], ["pre_out2"]))
bad.graph.node.append(onnx.helper.make_node("Reshape", ["pre_out2", "shape_back"], [out]))
bad.graph.initializer.append(onnx.numpy_helper.from_array(np.array(
    [d.dim_value for d in orig.graph.output[0].type.tensor_type.shape.dim], np.int64), "shape_back"))
""" + VERIFY_BAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ERROR onnxruntime failed to run the candidate" in r.stdout, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


def test_a_candidate_that_fails_to_load_ends():
    r = run_script(PRELUDE + """
bad = copy.deepcopy(folded)
bad.graph.node[0].op_type = "NoSuchOp"
try:
    bnfold.check(orig, bad)
    print("NO ERROR")
except bnfold.BnfoldError as e:
    print("ERROR", e)
""" + VERIFY_BAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ERROR onnxruntime cannot load the candidate") == 2, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


def verify_with_a_fault(target: str, raise_: str):
    """verify_onnx in a fresh interpreter with `target` (a module attribute) replaced by a function that runs
    `raise_`; prints what reached the caller and the bnfold threads left after it."""
    return run_script(PRELUDE + f"""
def boom(*a, **k):
    {raise_}
{target} = boom
try:
    verify.verify_onnx(orig, folded, Options.of(), [copy.deepcopy(d) for d in decisions])
    print("NO ERROR")
except BaseException as e:
    print("RAISED", type(e).__name__, e)
import time; time.sleep(0.3)
print("THREADS", extra_threads())
""")


@pytest.mark.parametrize("error", ["ValueError", "KeyboardInterrupt", "BnfoldError"])
def test_the_noise_model_raising_ends_the_verification(error):
    exc = "bnfold.BnfoldError" if error == "BnfoldError" else error
    r = verify_with_a_fault("verify._noise_model", f'raise {exc}("nudges failed")')
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"RAISED {error} nudges failed" in r.stdout, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


def test_the_proofs_raising_ends_the_verification():
    r = verify_with_a_fault("proofs._replay", 'raise KeyboardInterrupt("stop")')
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RAISED KeyboardInterrupt stop" in r.stdout, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


def test_an_original_that_cannot_run_at_the_default_size_retries_with_the_proofs_on_one_size():
    """A dynamic model that only runs from 128 pixels up (a 65x65 kernel): verify retries at a larger
    size; the proofs must be made once, on the larger size's values of both models, and end."""
    r = run_script("""
import copy, threading, numpy as np, onnx, bnfold
from onnx import helper
from bnfold.onnx import proofs
from tests.helpers.onnx_build import G
shapes = []
real = proofs.prove
def spy(orig, folded, ds, captured, cf):
    out = real(orig, folded, ds, captured, cf)
    got = cf.result() if hasattr(cf, "result") else cf
    shapes.append((captured["x"].shape, sorted({np.shape(v)[-1] for k, v in got.items() if np.ndim(v) == 4 and k != "y"})))
    return out
proofs.prove = spy
g = G(np.random.default_rng(2))
g.node("Conv", ["x", g.weight("w", (4, 3, 3, 3))], ["c"], pads=[1, 1, 1, 1])
g.bn("bn", "c", 4, out="b")
g.node("Conv", ["b", g.weight("w2", (4, 4, 3, 3))], ["c2"], pads=[1, 1, 1, 1])
g.bn("bn2", "c2", 4, out="b2")
g.node("Conv", ["b2", g.weight("w3", (2, 4, 65, 65), 0.01)], ["y"], strides=[16, 16])
m = g.model([("x", [1, 3, "H", "W"])], [("y", [1, 2, "h", "w"])])
msgs = []
res = bnfold.fold(m, progress=lambda s: msgs.append(str(s)))
v = res.report.verification
print("VERDICT", v.verdict, v.proofs)
print("SHAPES", shapes)
print("RETRY", any("trying 128" in s for s in msgs))
import time; time.sleep(0.3)
print("THREADS", sorted(t.name for t in threading.enumerate() if t.name.startswith(("bnfold-proofs", "bnfold-noise"))))
""")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VERDICT passed {'proven': 2, 'failed': 0, 'not_run': 0}" in r.stdout, r.stdout
    assert "RETRY True" in r.stdout, r.stdout
    assert "SHAPES [((1, 3, 128, 128), [128])]" in r.stdout, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


def test_the_cli_json_report_is_the_same_twice(tmp_path):
    """Two runs of the command give the same JSON report (proof numbers, noise, tolerances), timings aside."""
    src = tmp_path / "m.onnx"
    onnx.save(merge_model(np.random.default_rng(9)), str(src))

    def once(k):
        out = tmp_path / f"o{k}.onnx"
        r = subprocess.run([sys.executable, "-m", "bnfold", str(src), "-o", str(out), "--json"], capture_output=True,
                           text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, r.stderr[-2000:]
        doc = json.loads(r.stdout)
        doc.pop("timing_s")
        doc.pop("output")
        return doc
    a, b = once(1), once(2)
    assert a["verification"]["local_proofs"]["proven"] == 2
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_errors_raised_by_check_are_bnfold_errors():
    """A candidate that cannot load, checked through the library: a BnfoldError, the process not held by threads."""
    orig = onnx.load(os.path.join(SAMPLES, "resnet_block.onnx"))
    bad = copy.deepcopy(orig)
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BnfoldError, match="cannot load the candidate"):
        bnfold.check(orig, bad)


def test_the_candidates_values_come_from_the_same_batch_as_the_originals(record):
    """With several batches, the proofs' original values and the candidate's are of the first batch both."""
    bnfold.fold(os.path.join(SAMPLES, "resnet_block.onnx"), batches=3)
    rec = record[0]
    cf = rec.captured_folded
    ys = [d.site[1] for d in rec.decisions if d.is_folded]
    for y in ys:
        a, b = np.asarray(rec.captured[y], np.float64), np.asarray(cf[y], np.float64)
        assert a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 1e-4 * (1 + np.max(np.abs(a))), y
    assert whole(rec, cf) == [(d.bn, d.proof) for d in rec.decisions if d.is_folded]


def test_a_candidate_that_cannot_output_its_intermediates_falls_back_and_ends():
    """The original ran with its intermediates (the proofs started on them); the candidate cannot give its
    intermediates (planted in bnfold's own _run_all): verify compares the outputs only, and the proofs that
    wait for the candidate's values get the plain run's, never hang, never pass on another model's values."""
    r = run_script(PRELUDE + """
from bnfold.onnx.protos import WithOutputs
real_run_all = verify._run_all
def run_all(model, provider, feeds, label, *a, **k):
    if label == "candidate" and isinstance(model, WithOutputs) and model.names:
        raise bnfold.BnfoldError("onnxruntime cannot load the candidate: (planted) an intermediate cannot be an output")
    return real_run_all(model, provider, feeds, label, *a, **k)
verify._run_all = run_all
ds = [copy.deepcopy(d) for d in decisions]
outs = {o.name for o in orig.graph.output}
v = verify.verify_onnx(orig, folded, Options.of(), ds)
print("VERDICT", v.verdict, v.proofs, v.providers["CPUExecutionProvider"].notes.get("intermediates_compared"))
ok = all(("not_run" in d.proof) != (d.site[1] in outs) for d in ds if d.is_folded)
print("PROOFS_OK", ok, [(d.bn, d.site[1] in outs, sorted(d.proof)) for d in ds if d.is_folded])
import time; time.sleep(0.3)
print("THREADS", extra_threads())
""")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "VERDICT passed" in r.stdout and "PROOFS_OK True" in r.stdout, r.stdout
    assert "THREADS []" in r.stdout, r.stdout


@pytest.mark.parametrize("at", ["original", "candidate", "noise model"])
def test_ctrl_c_at_any_run_exits_130_and_leaves_no_waiting_thread(at, tmp_path):
    """A real SIGINT delivered as onnxruntime is about to run `at` (the proofs may be waiting for the
    candidate's values, the noise weights may still be drawn): the command says 'interrupted', exits 130,
    writes nothing, and the interpreter ends (no thread left waiting on a Future nobody sets)."""
    out = tmp_path / "out.onnx"
    r = run_script(f"""
import os, signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell that started the suite in the background ignores it)
from bnfold.onnx import verify
from bnfold.cli import main
from tests.conftest import SAMPLES
real_run_all = verify._run_all
def run_all(model, provider, feeds, label, *a, **k):
    if label == {at!r}:
        os.kill(os.getpid(), signal.SIGINT)
    return real_run_all(model, provider, feeds, label, *a, **k)
verify._run_all = run_all
code = main([os.path.join(SAMPLES, "mobilenet_block.onnx"), "-o", {str(out)!r}])
import time; time.sleep(0.3)
print("CODE", code)
print("THREADS", sorted(t.name for t in threading.enumerate() if t.name.startswith(("bnfold-proofs", "bnfold-noise"))))
""")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "CODE 130" in r.stdout and "THREADS []" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists()


@pytest.mark.parametrize("slow", ["candidate", "noise weights", "both"])
def test_the_report_does_not_depend_on_which_thread_is_late(slow, monkeypatch):
    """The candidate's run late (the proofs replay everything and wait) or the noise weights late (the noise
    run waits for them): the same report, proof numbers, noise and tolerances, as with no delay."""
    from bnfold.onnx import verify
    model = merge_model(np.random.default_rng(21))

    def report():
        d = bnfold.fold(model, batches=2).report.to_dict()
        d.pop("timing_s")
        return json.dumps(d, sort_keys=True, default=str)
    base = report()
    real_run_all, real_noise = verify._run_all, verify._noise_model

    def run_all(model, provider, feeds, label, *a, **k):
        if label == "candidate" and slow in ("candidate", "both"):
            time.sleep(0.15)
        return real_run_all(model, provider, feeds, label, *a, **k)

    def noise(*a, **k):
        if slow in ("noise weights", "both"):
            time.sleep(0.15)
        return real_noise(*a, **k)
    monkeypatch.setattr(verify, "_run_all", run_all)
    monkeypatch.setattr(verify, "_noise_model", noise)
    monkeypatch.setattr(proofs, "PENDING_BYTES", 0)
    assert report() == base
