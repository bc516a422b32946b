"""What the reports say, on real files: before/after counts, --bench latency, readable names from an
exporter's metadata, the quantized-model hint, the depth profile, --json documents on every error,
--help, and progress (a terminal, a log, -q, and a terminal without rich)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.cli import main
from tests.conftest import ROOT, SAMPLES, random_bn
from tests.helpers.cli_tty import run_with_tty_stderr


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


@pytest.fixture
def sample(tmp_path):
    def get(name: str):
        shutil.copy(os.path.join(SAMPLES, f"{name}.onnx"), tmp_path)
        return tmp_path / f"{name}.onnx"
    return get


def _ops(m: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in m.graph.node)


def _params(m: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer)


# -- before / after ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["skip_cases", "mlp"])
def test_before_after_counts_match_the_files(sample, name, capsys):
    src = sample(name)
    assert main([str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ba = doc["before_after"]
    a, b = onnx.load(str(src)), onnx.load(doc["output"])
    changed = {op: [_ops(a)[op], _ops(b)[op]] for op in set(_ops(a)) | set(_ops(b)) if _ops(a)[op] != _ops(b)[op]}
    assert ba["ops"] == changed and ba["ops"]["BatchNormalization"] == [_ops(a)["BatchNormalization"],
                                                                        len(doc["skipped"])]
    assert ba["parameters"] == [_params(a), _params(b)] and _params(b) < _params(a)
    assert ba["file_bytes"] == [os.path.getsize(src), os.path.getsize(doc["output"])]
    assert "latency_ms" not in ba


def test_text_report_shows_the_before_after_lines(sample):
    r = _cli(str(sample("resnet_block")))
    assert r.returncode == 0, r.stderr
    assert "ops            BatchNormalization 3 -> 0" in r.stdout
    assert "parameters     " in r.stdout and "file size      " in r.stdout and "%" in r.stdout


def test_bench_times_both_models_on_each_provider(sample, capsys):
    import onnxruntime as ort
    src = sample("mobilenet_block")
    assert main([str(src), "--bench", "--json", "-q"]) == 0
    lat = json.loads(capsys.readouterr().out)["before_after"]["latency_ms"]
    cpu = lat["CPUExecutionProvider"]
    assert cpu["ran"] is True and cpu["runs"] >= 5 and cpu["optimization"] == "ORT_ENABLE_ALL"
    assert cpu["original_ms"] > 0 and cpu["folded_ms"] > 0
    assert cpu["speedup"] == pytest.approx(cpu["original_ms"] / cpu["folded_ms"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert lat["CUDAExecutionProvider"]["ran"] is False and lat["CUDAExecutionProvider"]["why"]


def test_bench_text_line(sample):
    r = _cli(str(sample("mlp")), "--bench", "--providers", "cpu")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("latency"))
    assert "CPUExecutionProvider" in line and "ms ->" in line and "median of" in line


# -- readable names ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dynamo_onnx(tmp_path_factory):
    """A torch.onnx (dynamo) export whose BatchNorm nodes keep generated names and carry module paths."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(cout)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    model = torch.nn.Sequential()
    model.add_module("stem", Block(3, 4))
    model.add_module("layer1", torch.nn.Sequential(Block(4, 4), Block(4, 4)))
    rng = np.random.default_rng(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            st = random_bn(rng, m.num_features)
            m.weight.data, m.bias.data = torch.tensor(st["gamma"]).float(), torch.tensor(st["beta"]).float()
            m.running_mean.data, m.running_var.data = torch.tensor(st["mean"]).float(), torch.tensor(st["var"]).float()
    model.eval()
    path = tmp_path_factory.mktemp("dynamo") / "net.onnx"
    # optimize=False keeps the BatchNormalization nodes, as a training-mode or unoptimised export does
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=True, optimize=False, verbose=False)
    onnx.save(onnx.load(str(path)), str(path))  # one self-contained file (the exporter may write external data)
    return path


@pytest.mark.parametrize("verify", [[], ["--no-verify"]], ids=["verified", "no-verify"])
def test_generated_node_names_get_the_module_path_from_the_file(dynamo_onnx, tmp_path, capsys, verify):
    # (--no-verify folds the loaded file in place: the BNs whose paths are reported are gone by then)
    src = tmp_path / "net.onnx"
    shutil.copy(dynamo_onnx, src)
    bns = [n.name for n in onnx.load(str(src)).graph.node if n.op_type == "BatchNormalization"]
    assert len(bns) == 3 and all("batch_norm" in n for n in bns), bns  # generated, unreadable
    assert main([str(src), "--json", "-q", *verify]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {d["bn"] for d in doc["folded"]} == set(bns), "the node name stays the identifier"
    assert sorted(d["module_path"] for d in doc["folded"]) == ["layer1.0.bn", "layer1.1.bn", "stem.bn"]
    assert sorted(d["into_module_path"] for d in doc["folded"]) == ["layer1.0.conv", "layer1.1.conv", "stem.conv"]
    assert main([str(src), "--dry-run", "-q"]) == 0
    text = capsys.readouterr().out
    assert "  layer1.0.bn [" in text and "folds into layer1.0.conv" in text


def test_files_without_exporter_metadata_keep_their_names(sample, capsys):
    assert main([str(sample("resnet_block")), "--json", "--dry-run"]) == 0
    for d in json.loads(capsys.readouterr().out)["folded"]:
        assert "module_path" not in d and "into_module_path" not in d


# -- quantized models ---------------------------------------------------------------------------------

def _qdq_model(rng) -> onnx.ModelProto:
    """x -> Conv -> QuantizeLinear -> DequantizeLinear -> BatchNorm -> y, as a QDQ quantizer leaves it."""
    st = random_bn(rng, 4)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    inits += [numpy_helper.from_array(st[k].astype(np.float32), k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["q"], name="quant"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dequant"),
             helper.make_node("BatchNormalization", ["dq", "gamma", "beta", "mean", "var"], ["y"], name="bn")]
    g = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_bn_after_dequantize_says_fold_before_quantizing(tmp_path, rng, capsys):
    src = tmp_path / "q.onnx"
    onnx.save(_qdq_model(rng), src)
    assert main([str(src), "--json", "--dry-run"]) == 0
    sk = json.loads(capsys.readouterr().out)["skipped"]
    assert [d["reason"] for d in sk] == ["UNSUPPORTED_PRODUCER"]
    assert "DequantizeLinear" in sk[0]["detail"] and "before quantiz" in sk[0]["detail"]


# -- the depth profile ----------------------------------------------------------------------------------

def test_profile_has_every_compared_tensor_in_depth_order(sample, capsys):
    src = sample("resnet_block")
    assert main([str(src), "--json", "--dry-run"]) == 0
    cpu = json.loads(capsys.readouterr().out)["verification"]["providers"]["CPUExecutionProvider"]
    prof = cpu["profile"]
    assert len(prof) == cpu["intermediates_compared"] + len(cpu["outputs"])
    assert [p["order"] for p in prof] == sorted(p["order"] for p in prof)
    assert all(p["max_abs"] <= p["atol"] for p in prof) and not any(p.get("divergence") for p in prof)
    assert {p["tensor"] for p in prof if p.get("output")} == set(cpu["outputs"])


def test_failing_profile_marks_the_first_divergence_and_measures_what_follows(sample, capsys):
    src = sample("resnet_block")
    assert main([str(src), "--json", "--dry-run", "--atol", "0", "--strict"]) == 1
    ver = json.loads(capsys.readouterr().out)["verification"]
    prof = ver["providers"]["CPUExecutionProvider"]["profile"]
    div = [p for p in prof if p.get("divergence")]
    assert [p["tensor"] for p in div] == [ver["first_divergence"]["tensor"]]
    after = [p for p in prof if p.get("after_divergence")]
    assert after and all(p["order"] > div[0]["order"] for p in after)


# -- --json always prints one document ----------------------------------------------------------------

@pytest.mark.parametrize("args", [["--no-such-option"], ["--batches", "0"], ["--standalone", "sideways"]])
def test_json_usage_errors_print_one_error_document(sample, args):
    r = _cli(str(sample("mlp")), "--json", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"schema", "error"} and doc["error"]["code"] == 2 and doc["error"]["message"]


def test_json_error_for_check_and_export(tmp_path):
    for args in (["check", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")],
                 ["export", str(tmp_path / "nope.pt2"), "--to", "onnx"]):
        r = _cli(*args, "--json")
        doc = json.loads(r.stdout)
        assert r.returncode == 2 and doc["error"]["code"] == 2 and doc["error"]["path"].startswith(str(tmp_path))


# -- --help ---------------------------------------------------------------------------------------------

def test_help_lists_the_batch_and_report_options(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for opt in ("MODEL|DIR", "-r, --recursive", "--keep-going", "--force", "--bench", "--html FILE", "OUT|DIR/"):
        assert opt in out, opt
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert "--html FILE" in capsys.readouterr().out


# -- progress ---------------------------------------------------------------------------------------------

def _with_tty_stderr(args: list[str], env: dict | None = None) -> tuple[int, str, str]:
    return run_with_tty_stderr(args, {"COLUMNS": "120", **(env or {})})


def test_progress_bar_on_a_terminal_for_a_batch(sample):
    a, b = sample("mlp"), sample("resnet_block")
    code, out, err = _with_tty_stderr([str(a), str(b), "--dry-run"])
    assert code == 0 and "summary" in out and "bnfold:" not in out
    # each finished model is printed above the live display at once; what the bar showed in between
    # depends on when it refreshed (10 times a second), so only the finished lines are asserted
    assert f"[1/2] {a}: dry run: nothing written" in err and f"[2/2] {b}: dry run: nothing written" in err
    assert "\x1b[" in err, "a live display draws with terminal control sequences"
    code, out, err = _with_tty_stderr([str(a), str(b), "--dry-run", "-q"])
    assert code == 0 and err.strip() == ""
    code, out, err = _with_tty_stderr([str(a), str(b), "--dry-run", "--json"])
    assert code == 0 and len(json.loads(out)["reports"]) == 2


def test_plain_lines_in_a_log_and_without_rich(sample, tmp_path):
    a, b = sample("mlp"), sample("resnet_block")
    r = _cli(str(a), str(b), "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and lines and all(ln.startswith("bnfold: [") for ln in lines), r.stderr
    assert "\x1b[" not in r.stderr and any(ln.endswith("dry run: nothing written") for ln in lines)
    # rich is optional: a terminal without it gets plain lines
    blocker = tmp_path / "norich"
    (blocker / "rich").mkdir(parents=True)
    (blocker / "rich" / "__init__.py").write_text("raise ImportError('rich is not installed')\n")
    code, out, err = _with_tty_stderr([str(a), "--dry-run"], env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert code == 0 and "bnfold: verifying on CPUExecutionProvider..." in err and "\x1b[" not in err
