"""Adversarial tests of core/hold.py: a job keeps the protobuf wrappers of its model's repeated fields
alive within holding(), nothing outside it; a run with holding gives the same files and reports as one
without (the command line's folder runs, --keep-going beside a bad model, in-place folds whose swept
initializers stay held, external data left on disk, verification)."""
from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import gc
import hashlib
import io
import json
import os
import threading
import weakref
from contextlib import redirect_stdout

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold
import bnfold.batch
from bnfold.beforeafter import anatomy
from bnfold.cli import main
from bnfold.core import hold as hold_mod
from bnfold.core.hold import hold, holding
from bnfold.onnx import ondisk
from bnfold.onnx.io import load_onnx
from tests.helpers.onnx_build import G


class Obj:  # a weakref-able stand-in for a wrapper
    pass


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "TensorProto")


def held():
    return hold_mod._HELD.get()


# ---------------------------------------------------------------------------------------------------
# models

def chain(rng, pairs: int, c: int = 2, hw: int = 3) -> onnx.ModelProto:
    """Conv(+bias)->BN pairs: 6 initializers a pair."""
    g = G(rng)
    x = "x"
    for i in range(pairs):
        x = g.node("Conv", [x, g.weight(f"w{i}", (c, c, 1, 1)), g.weight(f"b{i}", (c,))], [f"c{i}"], name=f"conv{i}")
        x = g.bn(f"bn{i}", x, c, out="y" if i == pairs - 1 else None)
    return g.model([("x", [1, c, hw, hw])], [("y", [1, c, hw, hw])])


def branchy(rng) -> onnx.ModelProto:
    """A shared weight under two Conv->BN (each fold writes its own copy, the original is swept), a
    standalone BN and a Gemm->BN."""
    g = G(rng)
    x = g.node("Conv", ["x", g.weight("w0", (8, 3, 3, 3)), g.weight("b0", (8,))], ["c0"], name="conv0", pads=[1] * 4)
    x = g.bn("bn0", x, 8)
    shared = g.weight("w_shared", (8, 8, 3, 3))
    a = g.bn("bnA", g.node("Conv", [x, shared], ["cA"], name="convA", pads=[1] * 4), 8)
    b = g.bn("bnB", g.node("Conv", [x, shared], ["cB"], name="convB", pads=[1] * 4), 8)
    x = g.node("Mul", [a, b], ["prod"], name="prod")
    x = g.node("Relu", [x], ["r"], name="relu")
    x = g.bn("bn_alone", x, 8)
    x = g.node("GlobalAveragePool", [x], ["gap"], name="gap")
    x = g.node("Flatten", [x], ["flat"], name="flat")
    x = g.node("Gemm", [x, g.weight("fc_w", (6, 8)), g.weight("fc_b", (6,))], ["fc"], name="fc", transB=1)
    g.bn("bn_fc", x, 6, out="y")
    return g.model([("x", [2, 3, 8, 8])], [("y", [2, 6])])


def run_model(path_or_model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def digest(folder) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


_VOLATILE = {"timing_s", "seconds", "wall_s", "elapsed_s", "bench"}


def scrub(doc, *roots: str):
    """A report without its timings, with the run's folders named alike."""
    if isinstance(doc, dict):
        return {k: scrub(v, *roots) for k, v in doc.items() if k not in _VOLATILE}
    if isinstance(doc, list):
        return [scrub(v, *roots) for v in doc]
    if isinstance(doc, str):
        for i, r in enumerate(roots):
            doc = doc.replace(r, f"<root{i}>")
        return doc
    return doc


@contextlib.contextmanager
def no_holding():
    yield


def cli(argv, monkeypatch=None, hold_on: bool = True):
    """main(argv) in process with --json: (exit code, report); hold_on=False opens no holding() block."""
    with contextlib.ExitStack() as st:
        if not hold_on:
            mp = st.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(bnfold.batch, "holding", no_holding)
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main([*argv, "--json", "-q"])
    return code, json.loads(buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# 2. the context itself

def test_outside_any_block_hold_keeps_nothing():
    o = Obj()
    r = weakref.ref(o)
    assert hold(o) is o and held() is None
    del o
    assert r() is None


def test_nested_blocks_keep_to_themselves_and_the_outer_list_survives():
    a, b, c = Obj(), Obj(), Obj()
    ra, rb, rc = weakref.ref(a), weakref.ref(b), weakref.ref(c)
    with holding():
        outer = held()
        hold(a)
        with holding():
            inner = held()
            assert inner is not outer and inner == []
            hold(b)
            assert outer == [a] and inner == [b]
        assert held() is outer and outer == [a]
        hold(c)
        del inner, b
        assert rb() is None  # the inner block's items went with it
        del a, c
        assert ra() is not None and rc() is not None  # the outer block's still held
        outer = None
    assert held() is None
    assert ra() is None and rc() is None


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_an_exception_inside_a_block_still_releases(exc):
    o = Obj()
    r = weakref.ref(o)
    with pytest.raises(exc):
        with holding():
            with holding():
                hold(o)
                del o
                raise exc("boom")
    assert held() is None
    gc.collect()  # (the traceback's frames are gone with pytest.raises' info only when it is dropped)
    assert r() is None


def test_a_generator_left_suspended_in_its_block_releases_when_closed():
    """Generators run in their caller's context (Python < 3.14): while one is suspended inside its
    block, the caller sees that block's list; closing it ends the block and frees what it held."""
    def gen():
        with holding():
            hold(Obj())
            yield held()
            yield held()
    g = gen()
    lst = next(g)
    r = weakref.ref(lst[0])
    assert held() is lst
    g.close()
    del lst
    assert held() is None and r() is None


def test_threads_started_in_a_block_do_not_add_to_the_callers_list():
    seen = []

    def work():
        seen.append(held())
        hold(Obj())

    with holding():
        mine = held()
        t = threading.Thread(target=work)
        t.start()
        t.join()
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda _: work(), range(4)))
        assert mine == []
        assert all(s is not mine for s in seen)
    assert held() is None


def test_copied_context_shares_the_list_and_nests():
    o, p = Obj(), Obj()
    ro, rp = weakref.ref(o), weakref.ref(p)
    with holding():
        mine = held()
        ctx = contextvars.copy_context()
        ctx.run(hold, o)  # the copy sees the caller's list
        assert mine == [o]

        def nested(item, outer):
            with holding():
                hold(item)
                assert held() is not outer
            return held()
        assert ctx.run(nested, p, mine) is mine
        with concurrent.futures.ThreadPoolExecutor(1) as ex:  # a thread given the copy adds to it
            ex.submit(contextvars.copy_context().run, hold, p).result()
        assert mine == [o, p]
        del o, p, ctx, mine
    gc.collect()
    assert ro() is None and rp() is None


# ---------------------------------------------------------------------------------------------------
# 1. library calls keep nothing beyond their call

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """~3000 initializers (500 pairs) on disk and in memory."""
    m = chain(np.random.default_rng(7), 500)
    p = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(m, str(p))
    return m, str(p)


def test_library_calls_leave_no_wrappers_behind(big):
    model, path = big
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del model
    base = live_tensors()
    calls = {
        "fold(model, verify=False)": lambda: bnfold.fold(m, verify=False),
        "fold(path, verify=False)": lambda: bnfold.fold(path, verify=False),
        "load_onnx": lambda: load_onnx(path),
        "anatomy": lambda: anatomy(m, "onnx"),
    }
    kept = {}
    for name, call in calls.items():
        out = call()
        assert held() is None, name
        kept[name] = live_tensors() - base
        del out
    assert all(v < 50 for v in kept.values()), kept  # a held list would keep ~3000


def test_the_count_sees_what_a_block_holds(big):
    """The measure above can fail: inside holding(), the same calls keep thousands alive."""
    model, _ = big
    base = live_tensors()
    with holding():
        res = bnfold.fold(model, verify=False)
        inside = live_tensors() - base
    after = live_tensors() - base
    assert inside > 2500
    del res
    assert after < 50


def test_a_verified_library_fold_keeps_nothing_and_agrees_with_one_in_a_block(tmp_path, rng):
    p = str(tmp_path / "m.onnx")
    onnx.save(branchy(rng), p)
    base = live_tensors()
    plain = bnfold.fold(p)
    assert held() is None and live_tensors() - base < 50
    with holding():
        inside = bnfold.fold(p)
    assert plain.report.verification.passed is True
    assert inside.report.verification.verdict == plain.report.verification.verdict
    assert scrub(inside.report.to_dict()) == scrub(plain.report.to_dict())
    assert inside.model.SerializeToString() == plain.model.SerializeToString()


# ---------------------------------------------------------------------------------------------------
# 3./5. the command line: folder runs with and without holding

def make_folder(root, rng, bad: bool = False):
    os.makedirs(root)
    onnx.save(branchy(rng), os.path.join(root, "a.onnx"))
    onnx.save(chain(rng, 300), os.path.join(root, "b.onnx"))
    onnx.save(chain(rng, 7, c=4), os.path.join(root, "c.onnx"))
    if bad:
        raw = open(os.path.join(root, "b.onnx"), "rb").read()
        open(os.path.join(root, "b_bad.onnx"), "wb").write(raw[: len(raw) // 2])


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_folder_run_same_files_and_report_with_and_without_holding(tmp_path, verify):
    src = str(tmp_path / "src")
    make_folder(src, np.random.default_rng(3))
    outs = {}
    for on in (True, False):
        out = str(tmp_path / f"out_{on}")
        code, doc = cli([src, "-o", out + "/", *([] if verify else ["--no-verify"])], hold_on=on)
        outs[on] = (code, scrub(doc, out, src), digest(out))
    assert outs[True][0] == 0
    assert len(outs[True][2]) == 3
    assert outs[True] == outs[False]


def test_keep_going_beside_a_bad_model_same_files_and_report(tmp_path):
    src = str(tmp_path / "src")
    make_folder(src, np.random.default_rng(4), bad=True)
    outs = {}
    for on in (True, False):
        out = str(tmp_path / f"out_{on}")
        code, doc = cli([src, "-o", out + "/", "--keep-going"], hold_on=on)
        outs[on] = (code, scrub(doc, out, src), digest(out))
    assert outs[True][0] == 2
    assert sorted(outs[True][2]) == ["a.onnx", "b.onnx", "c.onnx"]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("keep_going", [True, False], ids=["keep-going", "all-or-nothing"])
def test_job_ones_wrappers_are_gone_when_job_two_starts(tmp_path, monkeypatch, keep_going):
    """By the next job's start nothing of the 1800 initializers of the first is alive: the job's held
    lists went with its block (without --keep-going its folded model waits for the write, unwrapped)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    onnx.save(chain(rng, 300), str(src / "a.onnx"))
    onnx.save(chain(rng, 3), str(src / "b.onnx"))
    counts = []
    real = bnfold.batch._fold

    def counting(j, *a, **k):
        counts.append(live_tensors())
        out = real(j, *a, **k)
        counts.append(live_tensors())
        return out
    monkeypatch.setattr(bnfold.batch, "_fold", counting)
    code, _ = cli([str(src), "-o", str(tmp_path / "out") + "/", "--no-verify", *(["--keep-going"] * keep_going)])
    assert code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["a.onnx", "b.onnx"]
    start1, end1, start2, _ = counts
    assert start2 - start1 < 50, counts
    assert end1 - start1 < 2000, counts  # the job's block ended before the count after it


# ---------------------------------------------------------------------------------------------------
# 4. in-place folds whose swept initializers were held save correctly

def check_saved(path, original, feeds):
    m = onnx.load(path)
    onnx.checker.check_model(m)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    assert n_bn < sum(n.op_type == "BatchNormalization" for n in original.graph.node)
    names = {t.name for t in m.graph.initializer}
    used = {i for n in m.graph.node for i in n.input}
    assert names <= used  # swept initializers are gone from the file
    for got, want in zip(run_model(path, feeds), run_model(original, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_in_place_fold_in_a_block_saves_what_one_without_saves(tmp_path, rng):
    model = branchy(rng)
    opts = bnfold.core.options.Options.of(verify=False)
    files = {}
    for on in (True, False):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        ctx = holding() if on else contextlib.nullcontext()
        with ctx:
            before = hold(m.graph.initializer[:]) if on else None  # every wrapper, swept ones too
            res = bnfold.api.fold_with(m, opts, owned=True)
            assert res.model is m
            if on:
                swept = {t.name for t in before} - {t.name for t in m.graph.initializer}
                assert swept  # the held list outlives messages the sweep took out
            out = str(tmp_path / f"f_{on}.onnx")
            bnfold.api.save(res, out)
        files[on] = open(out, "rb").read()
    assert files[True] == files[False]
    feeds = {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    check_saved(str(tmp_path / "f_True.onnx"), model, feeds)


def test_cli_in_place_fold_output_loads_checks_and_runs(tmp_path, rng):
    model = branchy(rng)
    p = str(tmp_path / "m.onnx")
    onnx.save(model, p)
    outs = {}
    for on in (True, False):
        out = str(tmp_path / f"o_{on}.onnx")
        code, _ = cli([p, "-o", out, "--no-verify"], hold_on=on)
        assert code == 0
        outs[on] = open(out, "rb").read()
    assert outs[True] == outs[False]
    feeds = {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    check_saved(str(tmp_path / "o_True.onnx"), model, feeds)


@pytest.mark.parametrize("split", [True, False], ids=["written-split", "written-inline"])
@pytest.mark.parametrize("lazy", [True, False], ids=["left-on-disk", "read-in"])
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "no-verify"])
def test_external_data_model_same_files_with_and_without_holding(tmp_path, rng, monkeypatch, lazy, verify, split):
    if split:  # the output takes the > 2 GB route (save_external), as over_two_gb decides it
        monkeypatch.setattr(ondisk, "TWO_GB", 2048)
    if lazy:
        monkeypatch.setattr(ondisk, "LAZY_TOTAL", 1)
        monkeypatch.setattr(ondisk, "LAZY_MIN", 256)
    model = branchy(rng)
    src = tmp_path / "src"
    src.mkdir()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(src / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=64)
    if lazy:  # the big weights are left where they are
        assert any(ondisk.on_disk(t) for t in load_onnx(str(src / "m.onnx")).graph.initializer)
    outs = {}
    for on in (True, False):
        out = tmp_path / f"out_{on}"
        code, doc = cli([str(src / "m.onnx"), "-o", str(out) + "/", *([] if verify else ["--no-verify"])],
                        hold_on=on)
        assert code == 0, doc
        outs[on] = (scrub(doc, str(out), str(src)), digest(out))
    assert outs[True] == outs[False]
    assert any(f.endswith(".data") for f in outs[True][1]) == split
    feeds = {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    check_saved(str(tmp_path / "out_True" / "m.onnx"), model, feeds)


# ---------------------------------------------------------------------------------------------------
# the fold corpus's odd corners (bodies, functions, shared and unused initializers, IR 3...) through the CLI

def corpus_folder(root):
    from tests.helpers.fold_corpus import CORPUS, if_bodies_ir3, weight_read_by_body
    os.makedirs(root)
    builders = {**CORPUS, "if_bodies_ir3": if_bodies_ir3, "weight_read_by_body": weight_read_by_body}
    for name, build in builders.items():
        onnx.save(build(11)[0], os.path.join(root, f"{name}.onnx"))
    return len(builders)


@pytest.mark.parametrize("mode", [[], ["--no-verify"], ["--dry-run"], ["--standalone", "affine"]],
                         ids=["verified", "no-verify", "dry-run", "affine"])
def test_corpus_folder_same_files_and_report_with_and_without_holding(tmp_path, mode):
    src = str(tmp_path / "src")
    n = corpus_folder(src)
    outs = {}
    for on in (True, False):
        out = str(tmp_path / f"out_{on}")
        code, doc = cli([src, "-o", out + "/", "--keep-going", *mode], hold_on=on)
        outs[on] = (code, scrub(doc, out, src), digest(out) if os.path.isdir(out) else {})
    assert outs[True] == outs[False]
    # onnxruntime cannot load two of them (same-named nodes; float64 Conv): refused when verified
    refused = {"duplicate_names.onnx", "float64.onnx"} if mode != ["--no-verify"] else set()
    doc = outs[True][1]
    assert {os.path.basename(e["path"]) for e in doc.get("errors", [])} == refused
    assert len(outs[True][2]) == (0 if mode == ["--dry-run"] else n - len(refused))
    assert held() is None


def test_self_healing_run_same_with_and_without_holding(tmp_path, rng, monkeypatch):
    """A damaged fold is reverted and the rest re-verified (self-healing folds the held model again)."""
    from bnfold.core import kernel
    from bnfold.onnx import batched
    from tests.helpers.fold_damage import damage
    monkeypatch.setattr(batched, "ENABLED", False)
    real = kernel.fold_after
    src = tmp_path / "m.onnx"
    onnx.save(branchy(rng), str(src))
    outs = {}
    for on in (True, False):
        calls = []

        def wrong(*a, **k):
            f = real(*a, **k)
            calls.append(1)
            return damage(f, "scale") if len(calls) == 2 else f
        monkeypatch.setattr(kernel, "fold_after", wrong)
        out = tmp_path / f"o_{on}.onnx"
        code, doc = cli([str(src), "-o", str(out)], hold_on=on)
        monkeypatch.setattr(kernel, "fold_after", real)
        outs[on] = (code, scrub(doc, str(out)), out.read_bytes())
    assert outs[True][0] == 0
    assert "VERIFICATION_FAILED" in json.dumps(outs[True][1])
    assert outs[True] == outs[False]


def test_one_model_folded_twice_in_one_block_as_outside(rng):
    """The second fold finds the first's wrappers (and those of the copies it made) held."""
    model = branchy(rng)
    ref = model.SerializeToString()
    outside = [bnfold.fold(model, verify=False).model.SerializeToString() for _ in range(2)]
    with holding():
        inside = [bnfold.fold(model, verify=False).model.SerializeToString() for _ in range(2)]
        verified = bnfold.fold(model)
    assert inside == outside and outside[0] == outside[1]
    assert model.SerializeToString() == ref  # the input is never changed
    assert verified.report.verification.passed is True
    assert verified.model.SerializeToString() == outside[0]


@pytest.mark.parametrize("keep_going", [True, False], ids=["keep-going", "all-or-nothing"])
def test_an_interrupt_in_a_job_releases_its_held_lists(tmp_path, monkeypatch, keep_going):
    """Ctrl-C while job 1 counts its model: exit 130, and nothing the job's block held stays alive."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(chain(np.random.default_rng(6), 300), str(src / "a.onnx"))
    real = bnfold.batch.anatomy
    seen = []

    def interrupted(model, fw, **kw):
        out = real(model, fw, **kw)
        seen.append(len(held() or []))
        if len(seen) == 2:  # the count of the folded model, after the fold
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(bnfold.batch, "anatomy", interrupted)
    base = live_tensors()
    code, doc = cli([str(src), "-o", str(tmp_path / "out") + "/", "--no-verify", *(["--keep-going"] * keep_going)])
    assert code == 130 and "interrupted" in doc["error"]["message"]
    assert seen[0] > 0  # the block held the load's lists when it was interrupted
    assert held() is None
    assert live_tensors() - base < 50
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_the_switch_the_comparisons_use_turns_holding_off(tmp_path, rng, monkeypatch):
    """The runs compared above differ in what they hold: the job's counts find the load's lists held with
    holding on and nothing with it off (else the comparisons would compare a run with itself)."""
    p = str(tmp_path / "m.onnx")
    onnx.save(branchy(rng), p)
    real = bnfold.batch.anatomy
    seen = []

    def spy(model, fw, **kw):
        seen.append(None if held() is None else len(held()))
        return real(model, fw, **kw)
    monkeypatch.setattr(bnfold.batch, "anatomy", spy)
    for on in (True, False):
        code, _ = cli([p, "-o", str(tmp_path / f"o_{on}.onnx"), "--no-verify"], hold_on=on)
        assert code == 0
    assert len(seen) == 4 and all(n and n > 0 for n in seen[:2]) and seen[2:] == [None, None], seen
