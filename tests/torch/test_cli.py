"""The command line on PyTorch files: exit codes, JSON, written files, refusals."""
from __future__ import annotations

import json
import os

import onnx
import pytest
import torch

from bnfold.cli import main
from tests.helpers.zoo_torch import build, example_input


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchcli")
    model, x = build("resnet_bottleneck", seed=6), example_input("resnet_bottleneck")
    torch.export.save(torch.export.export(model, (x,)), str(d / "r.pt2"))
    torch.jit.save(torch.jit.script(model), str(d / "ts.pt"))
    torch.save(model, str(d / "whole.pt"))
    torch.save(model.state_dict(), str(d / "sd.pth"))
    return d, model, x


def test_fold_pt2_writes_a_verified_program(files, capsys) -> None:
    d, model, x = files
    src = str(d / "r.pt2")
    before = open(src, "rb").read()
    assert main([src, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out = str(d / "r.folded.pt2")
    assert doc["framework"] == "torch" and doc["output"] == out and doc["capture"] == "export-program"
    assert len(doc["folded"]) == 13 and doc["verification"]["passed"] is True
    assert open(src, "rb").read() == before
    folded = torch.export.load(out).module()
    assert (folded(x) - model(x)).abs().max().item() < 1e-4


def test_torchscript_needs_an_input_shape(files, capsys) -> None:
    d, model, x = files
    src = str(d / "ts.pt")
    assert main([src]) == 2
    assert "--input" in capsys.readouterr().err
    assert main([src, "--input", "x:2x3x32x32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["capture"] == "torchscript" and doc["verification"]["passed"] is True
    assert os.path.exists(str(d / "ts.folded.pt"))


def test_refusals_exit_2_and_write_nothing(files, capsys) -> None:
    d, _, _ = files
    assert main([str(d / "whole.pt"), "--input", "x:1x3x32x32"]) == 2
    assert "--trust" in capsys.readouterr().err
    assert main([str(d / "sd.pth"), "--trust", "--input", "x:1x3x32x32"]) == 2
    assert "state_dict" in capsys.readouterr().err
    assert not os.path.exists(str(d / "whole.folded.pt")) and not os.path.exists(str(d / "sd.folded.pth"))


def test_export_to_onnx(files, capsys) -> None:
    d, _, _ = files
    out = str(d / "exported.onnx")
    assert main(["export", str(d / "r.pt2"), "--to", "onnx", "-o", out, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"] == out and doc["verification"]["providers"]["CPUExecutionProvider"]["passed"] is True
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    assert not [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
