"""Big external-data models stay on disk: load_onnx leaves each big weight in its data file, a fold
reads only the weights it changes, and saving copies the others file to file. The 1 GiB threshold
is lowered here so small models take the same code path; the memory it saves on a > 2 GB model is
measured by benchmarks/bench_onnx_external.py."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import bnfold
from bnfold.onnx import ondisk as onnx_io
from bnfold.cli import main
from bnfold.core.errors import BnfoldError
from bnfold.onnx.io import load_onnx, save_onnx
from bnfold.onnx.ondisk import has_on_disk, on_disk, tensor_value
from bnfold.onnx.noise import nudge_by_name as _nudge_by_name, perturbed_lazily as _perturbed
from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import assert_same_function


@pytest.fixture(autouse=True)
def small_thresholds(monkeypatch):
    monkeypatch.setattr(onnx_io, "LAZY_TOTAL", 1)
    monkeypatch.setattr(onnx_io, "LAZY_MIN", 256)


def net(rng, dtype=np.float32) -> onnx.ModelProto:
    """Conv->BN, a weight shared by two Conv->BN (each fold writes a copy under a new name), a conv
    without BN (its weight is written unchanged) and a Gemm->BN at the end."""
    g = G(rng, dtype)
    x = g.node("Conv", ["x", g.weight("w0", (16, 3, 3, 3)), g.weight("b0", (16,))], ["c0"], name="conv0", pads=[1] * 4)
    x = g.bn("bn0", x, 16)
    shared = g.weight("w_shared", (16, 16, 3, 3))
    a = g.bn("bnA", g.node("Conv", [x, shared], ["cA"], name="convA", pads=[1] * 4), 16)
    b = g.bn("bnB", g.node("Conv", [x, shared], ["cB"], name="convB", pads=[1] * 4), 16)
    x = g.node("Mul", [a, b], ["sum"], name="add")  # a product: two folds, not one block to merge
    x = g.node("Conv", [x, g.weight("w_plain", (16, 16, 1, 1))], ["plain"], name="conv_plain")  # no BN: unchanged
    x = g.node("GlobalAveragePool", [x], ["gap"], name="gap")
    x = g.node("Flatten", [x], ["flat"], name="flat")
    x = g.node("Gemm", [x, g.weight("fc_w", (24, 16)), g.weight("fc_b", (24,))], ["fc"], name="fc", transB=1)
    g.bn("bn_fc", x, 24, out="y")
    return g.model([("x", [2, 3, 8, 8])], [("y", [2, 24])])


def write_external(model: onnx.ModelProto, path, location: str | None = None) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location or os.path.basename(path) + ".data", size_threshold=64)


def digest(folder) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))
            if (folder / f).is_file()}


def test_big_weights_stay_on_disk_and_read_back_exactly(rng, tmp_path):
    model = net(rng)
    write_external(model, tmp_path / "m.onnx")
    lazy = load_onnx(str(tmp_path / "m.onnx"))
    big = {t.name for t in lazy.graph.initializer if on_disk(t)}
    assert big == {"w0", "w_shared", "w_plain", "fc_w"}  # 1024 bytes and up; BN vectors are loaded
    assert all(not t.HasField("raw_data") for t in lazy.graph.initializer if t.name in big)
    for t in lazy.graph.initializer:
        want = numpy_helper.to_array(next(u for u in model.graph.initializer if u.name == t.name))
        np.testing.assert_array_equal(tensor_value(t), want)
    assert_same_function(model, onnx_io.loaded(lazy), rel=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_float_types_read_back_exactly(rng, tmp_path, dtype):
    model = net(rng, dtype)
    write_external(model, tmp_path / "m.onnx")
    lazy = load_onnx(str(tmp_path / "m.onnx"))
    t = next(t for t in lazy.graph.initializer if t.name == "w_shared")
    assert on_disk(t)
    want = numpy_helper.to_array(next(u for u in model.graph.initializer if u.name == "w_shared"))
    got = tensor_value(t)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_bf16_weight_reads_back_exactly(tmp_path):
    bf = onnx.helper.make_tensor("w", TensorProto.BFLOAT16, [512], np.linspace(-3, 3, 512).astype(np.float32))
    (tmp_path / "w.bin").write_bytes(b"\0" * 100 + numpy_helper.to_array(bf).tobytes())
    stub = onnx.TensorProto(name="w", data_type=TensorProto.BFLOAT16, dims=[512], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "100"), ("length", "1024"), (onnx_io._BASE_KEY, str(tmp_path)),
                 (onnx_io._STAMP_KEY, onnx_io._stamp(str(tmp_path / "w.bin")))):
        e = stub.external_data.add()
        e.key, e.value = k, v
    assert on_disk(stub)
    got = tensor_value(stub)
    assert got.dtype.name == "bfloat16"
    np.testing.assert_array_equal(got.astype(np.float32), numpy_helper.to_array(bf).astype(np.float32))


@pytest.mark.parametrize("verify", [False, True])
def test_cli_folds_on_disk_model_and_leaves_the_input_alone(rng, tmp_path, verify):
    model = net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    before = digest(tmp_path)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    assert main([str(src), "-o", str(out), "-q", *([] if verify else ["--no-verify"])]) == 0
    assert digest(tmp_path) == before
    folded = onnx_io.loaded(load_onnx(str(out)))
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    assert_same_function(model, folded)


def test_library_fold_keeps_unchanged_weights_on_disk(rng, tmp_path):
    model = net(rng)
    write_external(model, tmp_path / "m.onnx")
    res = bnfold.fold(str(tmp_path / "m.onnx"))
    assert res.report.verification.passed is True, res.report.verification.to_dict()
    assert all(d.status == "folded" for d in res.report.decisions), [d.to_dict() for d in res.report.decisions]
    still = {t.name for t in res.model.graph.initializer if on_disk(t)}
    assert still == {"w_plain"}  # not folded: never read into memory
    for name in ("w0", "fc_w"):  # folded in place: now held in memory
        t = next(t for t in res.model.graph.initializer if t.name == name)
        assert t.HasField("raw_data") and not t.external_data
    assert_same_function(model, onnx_io.loaded(res.model))
    # saved both ways: inline (fits in one protobuf) and with external data
    save_onnx(res.model, str(tmp_path / "inline.onnx"))
    assert not os.path.exists(tmp_path / "inline.onnx.data")
    inline = onnx.load(str(tmp_path / "inline.onnx"))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in inline.graph.initializer)
    assert_same_function(model, inline)
    save_onnx(res.model, str(tmp_path / "ext.onnx"), external_data=True, size_threshold=64)
    ext = onnx.load(str(tmp_path / "ext.onnx"))  # onnx's own loader: no trace of bnfold's bookkeeping key
    written = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    assert all(e.key in ("location", "offset", "length") for t in written.graph.initializer for e in t.external_data)
    assert_same_function(model, ext)


def test_saving_onto_the_data_file_the_weights_come_from_is_refused(rng, tmp_path, capsys):
    model = net(rng)
    src = tmp_path / "a.onnx"
    write_external(model, src, location="b.onnx.data")  # b.onnx would write b.onnx.data
    before = digest(tmp_path)
    res = bnfold.fold(str(src), verify=False)
    with pytest.raises(BnfoldError, match="b.onnx.data"):
        save_onnx(res.model, str(tmp_path / "b.onnx"), external_data=True)
    assert digest(tmp_path) == before
    assert main([str(src), "-o", str(tmp_path / "b.onnx"), "-q", "--no-verify"]) == 0  # fits: written inline
    assert not os.path.exists(tmp_path / "b.onnx.data") or digest(tmp_path)["b.onnx.data"] == before["b.onnx.data"]
    assert_same_function(model, load_onnx(str(tmp_path / "b.onnx")))


def test_truncated_data_file_is_exit_2_naming_the_tensor(rng, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    write_external(net(rng), src)
    data = tmp_path / "m.onnx.data"
    stub = next(t for t in onnx.load(str(src), load_external_data=False).graph.initializer if t.name == "fc_w")
    offset = int(next(e.value for e in stub.external_data if e.key == "offset"))
    data.write_bytes(data.read_bytes()[:offset + 10])  # the on-disk weight fc_w is cut short
    assert main([str(src), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and "Traceback" not in err
    assert "'fc_w'" in err and "m.onnx.data" in err
    assert not os.path.exists(tmp_path / "m.folded.onnx")


def test_over_two_gb_route_from_disk_verifies_and_catches_a_wrong_fold(rng, tmp_path, monkeypatch):
    model = net(rng)
    src = tmp_path / "m.onnx"
    write_external(model, src)
    size = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    monkeypatch.setattr(onnx_io, "TWO_GB", size // 2)  # the files route, as for a real > 2 GB model
    res = bnfold.fold(str(src))
    ver = res.report.verification
    assert ver.passed is True, ver.to_dict()
    assert "over 2 GB" in ver.providers["CPUExecutionProvider"].notes["note"]
    out = tmp_path / "f.onnx"
    bnfold.save(res, str(out))
    assert os.path.exists(str(out) + ".data")
    # a candidate whose on-disk weight is off in one output channel fails, read from its own files
    bad = load_onnx(str(out))
    assert has_on_disk(bad)
    t = next(t for t in bad.graph.initializer if t.name == "w_shared")
    a = tensor_value(t).copy()
    a[3] *= 1.01
    t.CopyFrom(numpy_helper.from_array(a, t.name))
    save_onnx(bad, str(tmp_path / "bad.onnx"), external_data=True)
    assert main(["check", str(src), str(tmp_path / "bad.onnx"), "-q"]) == 1
    assert main(["check", str(src), str(out), "-q"]) == 0


def test_noise_model_nudges_on_disk_weights_by_about_one_ulp_the_same_way_every_time(rng, tmp_path):
    model = net(rng)
    write_external(model, tmp_path / "m.onnx")
    lazy = load_onnx(str(tmp_path / "m.onnx"))
    noise, later = _perturbed(lazy, 0)
    assert later == {"w0", "w_shared", "w_plain", "fc_w"}
    runs = []
    for k in range(2):
        (tmp_path / f"n{k}").mkdir()
        em = onnx_io.for_session(noise, str(tmp_path / f"n{k}"), "noise", _nudge_by_name(0), later)
        assert em.folder == str(tmp_path / f"n{k}")
        runs.append({t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"n{k}" / "noise.onnx")).graph.initializer})
    for name in sorted(later):
        want = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))
        got = runs[0][name]
        assert not np.array_equal(got, want)
        assert np.all(np.abs(got.astype(np.float64) - want) <= 2 * np.spacing(np.abs(want)))
        np.testing.assert_array_equal(runs[1][name], got)
    # the original, loaded with its weights on disk, is used where it lies: nothing written
    (tmp_path / "o").mkdir()
    em = onnx_io.for_session(lazy, str(tmp_path / "o"), "original")
    assert em.folder == str(tmp_path) and os.listdir(tmp_path / "o") == []
    assert not any(e.key.startswith("bnfold.") for t in em.proto.graph.initializer for e in t.external_data)


def test_over_two_gb_route_still_compares_intermediates(rng, tmp_path, monkeypatch):
    """A channel a ReLU always cuts on the test inputs: only an intermediate shows the damage."""
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (64, 3, 1, 1)), g.init("b", np.r_[np.zeros(63), -100.0])], ["c"], name="conv")
    g.node("Relu", ["c"], ["y"], name="relu")
    model = g.model([("x", [1, 3, 4, 4])], [("y", [1, 64, 4, 4])])
    write_external(model, tmp_path / "m.onnx")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    w = next(t for t in bad.graph.initializer if t.name == "w")
    a = numpy_helper.to_array(w).copy()
    a[63] *= 1.002
    w.CopyFrom(numpy_helper.from_array(a, "w"))
    write_external(bad, tmp_path / "bad.onnx")
    monkeypatch.setattr(onnx_io, "TWO_GB", 512)  # both models take the split route
    ver = bnfold.check(str(tmp_path / "m.onnx"), str(tmp_path / "bad.onnx"))
    cpu = ver.providers["CPUExecutionProvider"]
    assert "over 2 GB" in cpu.notes["note"] and cpu.notes["intermediates_compared"] >= 1
    assert ver.passed is False and cpu.outputs["y"]["passed"] is True
    assert ver.first_divergence["tensor"] == "c"
    assert bnfold.check(str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx")).passed is True


def test_over_two_gb_route_leaves_no_temporary_folder_and_sweeps_a_killed_runs(rng, tmp_path, monkeypatch):
    """The over-2 GB route writes the candidate's and the noise model's weights to a temporary folder in
    the system's temp dir: removed after the run, and one left by a killed run (its process gone) is
    removed by the next run."""
    import subprocess
    import sys
    import tempfile

    from bnfold.core import files

    monkeypatch.setenv("TMPDIR", str(tmp_path / "sys_tmp"))
    (tmp_path / "sys_tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile reads TMPDIR again
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / "sys_tmp" / f".bnfold-verify.bnfold-tmp-{files._host_tag()}-{dead}-abcdefgh"
    stale.mkdir()
    (stale / "noise.data").write_bytes(b"\0" * 64)
    g = G(rng)
    g.node("Conv", ["x", g.weight("w", (64, 3, 1, 1)), g.weight("b", (64,))], ["c"], name="conv")
    g.bn("bn", "c", 64, out="y")
    model = g.model([("x", [1, 3, 4, 4])], [("y", [1, 64, 4, 4])])
    write_external(model, tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_io, "TWO_GB", 512)
    ver = bnfold.check(str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"))
    cpu = ver.providers["CPUExecutionProvider"]
    assert "over 2 GB" in cpu.notes["note"] and ver.passed is True
    assert list((tmp_path / "sys_tmp").iterdir()) == []  # the stale folder swept, its own removed
