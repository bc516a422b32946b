"""PyTorch files and programs: .pt2, TorchScript, pickled modules, state_dicts; ONNX export; devices."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from bnfold.core.decisions import Reason
from bnfold.core.errors import BnfoldError
from tests.helpers.frameworks import torch_pass
from tests.helpers.zoo_torch import build, example_input


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    return build("resnet_basic", seed=2), example_input("resnet_basic", seed=4)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def test_exported_program_fold_save_load(resnet, tmp_path) -> None:
    model, x = resnet
    ep = torch.export.export(model, (x,))
    before = {k: v.clone() for k, v in ep.state_dict.items()}
    res = torch_pass.fold(ep)
    assert all(torch.equal(before[k], v) for k, v in ep.state_dict.items())
    assert isinstance(res.model, torch.export.ExportedProgram)
    assert len(res.report.folded) == 9 and not res.report.skipped
    assert res.report.verification.passed is True
    targets = [n.target for n in res.model.graph.nodes if n.op == "call_function"]
    assert not [t for t in targets if "batch_norm" in str(t)]
    assert [n for n in ep.graph.nodes if "batch_norm" in str(n.target)]  # the input program is untouched
    path = str(tmp_path / "m.pt2")
    torch_pass.save(res.model, path)
    back = torch_pass.load(path)
    assert _max_diff(back.module()(x), model(x)) < 1e-4
    assert torch_pass.example_inputs_for(back)[0].shape == x.shape


def test_exported_program_keeps_dynamic_batch(resnet) -> None:
    model, x = resnet
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    res = torch_pass.fold(ep)
    x5 = torch.randn(5, *x.shape[1:])
    assert res.report.verification.passed is True
    assert _max_diff(res.model.module()(x5), model(x5)) < 1e-4


def test_torchscript_roundtrip_and_fold(resnet, tmp_path) -> None:
    model, x = resnet
    path = str(tmp_path / "m.pt")
    torch.jit.save(torch.jit.trace(model, (x,)), path)
    sm = torch_pass.load(path)
    assert isinstance(sm, torch.jit.ScriptModule)
    res = torch_pass.fold(sm, example_inputs=(x,))
    assert isinstance(res.model, torch.jit.ScriptModule)
    assert len(res.report.decisions) == 9 and res.report.verification.passed is True
    out = str(tmp_path / "m.folded.pt")
    torch_pass.save(res.model, out)
    assert _max_diff(torch.jit.load(out)(x), model(x)) < 1e-4


def test_scripted_module_folds_weights_and_keeps_code() -> None:
    model, x = build("mobilenet_v3", seed=1), example_input("mobilenet_v3")
    sm = torch.jit.script(model)
    res = torch_pass.fold(sm, example_inputs=(x,))
    assert len(res.report.folded) == 13 and res.report.verification.passed is True
    assert "TorchScript" in res.report.info["torchscript"]
    folded_stem = getattr(res.model.stem, "0").weight
    assert not torch.equal(folded_stem, model.stem[0].weight)
    assert torch.equal(getattr(sm.stem, "0").weight, model.stem[0].weight)  # the input is untouched


def test_pickled_module_needs_trust(resnet, tmp_path) -> None:
    model, x = resnet
    path = str(tmp_path / "whole.pt")
    torch.save(model, path)
    with pytest.raises(BnfoldError, match="--trust") as e:
        torch_pass.load(path)
    assert path in str(e.value)
    loaded = torch_pass.load(path, trust=True)
    assert isinstance(loaded, nn.Module) and _max_diff(loaded(x), model(x)) == 0.0
    out = str(tmp_path / "whole.folded.pt")
    torch_pass.save(torch_pass.fold(loaded, example_inputs=(x,)).model, out)
    assert _max_diff(torch_pass.load(out, trust=True)(x), model(x)) < 1e-4


def test_state_dict_missing_and_corrupt_files(resnet, tmp_path) -> None:
    model, _ = resnet
    sd = str(tmp_path / "weights.pth")
    torch.save(model.state_dict(), sd)
    with pytest.raises(BnfoldError, match="state_dict"):
        torch_pass.load(sd, trust=True)
    with pytest.raises(BnfoldError, match="no such file"):
        torch_pass.load(str(tmp_path / "nope.pt2"))
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(BnfoldError, match="bad.pt2"):
        torch_pass.load(str(bad))
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(BnfoldError, match="bad.pt"):
        torch_pass.load(str(bad_pt), trust=True)


def test_example_inputs_for(resnet, tmp_path) -> None:
    model, x = resnet
    (t,) = torch_pass.example_inputs_for(model, input_specs=[("x", (1, 3, 16, 16), "float16")])
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float16
    npz = str(tmp_path / "in.npz")
    np.savez(npz, x=x.numpy())
    (t2,) = torch_pass.example_inputs_for(model, inputs_npz=npz)
    assert torch.equal(t2, x)
    with pytest.raises(BnfoldError, match="--input"):
        torch_pass.example_inputs_for(model)


def test_export_onnx_verifies_against_the_original(tmp_path) -> None:
    model, x = build("densenet", seed=1), example_input("densenet")
    out = str(tmp_path / "d.onnx")
    res = torch_pass.export_onnx(model, out, example_inputs=(x,))
    rep = res.report
    assert rep.output == out and os.path.exists(out)
    ver = rep.verification
    cpu = ver.providers["CPUExecutionProvider"]
    assert ver.passed is True and cpu.ran and cpu.notes["reference"] == "torch-cpu"
    assert not ver.providers["CUDAExecutionProvider"].ran or ver.providers["CUDAExecutionProvider"].passed
    proto = onnx.load(out)
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert n_bn == len(rep.skipped) > 0  # the BNs bnfold kept, and only those
    assert torch_pass.check(model, out, example_inputs=(x,)).passed is True
    # an ONNX file from a wrongly folded model is caught
    wrong = build("densenet", seed=1)
    with torch.no_grad():
        wrong.classifier.weight[3].mul_(1.002)
    torch_pass.export_onnx(wrong, str(tmp_path / "w.onnx"), example_inputs=(x,), verify=False)
    assert torch_pass.check(model, str(tmp_path / "w.onnx"), example_inputs=(x,)).passed is False


def test_providers() -> None:
    model, x = build("mlp"), example_input("mlp")
    res = torch_pass.fold(model, example_inputs=(x,), providers=["cpu"])
    assert list(res.report.verification.providers) == ["torch-cpu"]
    with pytest.raises(BnfoldError):
        torch_pass.fold(model, example_inputs=(x,), providers=["tpu"])
    if not torch.cuda.is_available():
        res = torch_pass.fold(model, example_inputs=(x,))
        cuda = res.report.verification.providers["torch-cuda"]
        assert not cuda.ran and "CUDA" in cuda.why
        with pytest.raises(BnfoldError, match="cuda"):
            torch_pass.fold(model, example_inputs=(x,), providers=["cuda"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_model_folds_and_verifies_on_both_devices() -> None:
    model = build("resnext", seed=3).cuda()
    x = example_input("resnext").cuda()
    res = torch_pass.fold(model, example_inputs=(x,))
    ver = res.report.verification
    assert ver.providers["torch-cpu"].passed and ver.providers["torch-cuda"].passed
    assert next(res.model.parameters()).is_cuda and next(model.parameters()).is_cuda
    assert not [d for d in res.report.skipped if d.reason is not Reason.UNSUPPORTED_PRODUCER]
