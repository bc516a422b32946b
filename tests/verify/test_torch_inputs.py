"""PyTorch: the report lists the inputs verification ran on, --save-inputs replays them bit for bit, and
models with 0-dim floating tensors (ReZero gates, quantization observers) verify without crashing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import bnfold
from bnfold.cli import main
from bnfold.core.errors import BnfoldError
from tests.helpers.zoo_torch import set_random_bn


def small(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return set_random_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                       nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4)), seed)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, image: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(image)) + shift.float().reshape(-1, 1, 1, 1)


X = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(2))


def test_the_report_lists_each_input_by_forwards_name_and_how_it_was_chosen():
    model = set_random_bn(TwoInputs())
    shift = torch.tensor([1, 3])
    ver = bnfold.fold(model, example_inputs=(X, shift)).report.verification
    assert list(ver.inputs) == ["image", "shift"]
    img, sh = ver.inputs["image"], ver.inputs["shift"]
    assert img["shape"] == [2, 3, 10, 10] and img["dtype"] == "float32" and sh["dtype"] == "int64"
    assert img["how"] == "example_inputs given" and img["batches"] == 3
    assert "negated" in img["variants"] and "fresh random" in img["variants"]
    assert ver.to_dict()["inputs"] == ver.inputs


def test_inputs_without_names_are_numbered():
    class Star(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, *xs: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(xs[0] + xs[1]))

    ver = bnfold.fold(set_random_bn(Star()), example_inputs=(X, X)).report.verification
    assert list(ver.inputs) == ["input_0", "input_1"] and ver.verdict == "passed"


def test_cli_input_shapes_say_they_came_from_input(tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save(small(), src)
    code = main([str(src), "--trust", "--input", "input:2x3x9x9", "--seed", "5", "--json", "--dry-run"])
    doc = json.loads(capsys.readouterr().out)
    entry = doc["verification"]["inputs"]["input"]
    assert code == 0 and entry["shape"] == [2, 3, 9, 9] and "--input" in entry["how"] and "seed 5" in entry["how"], entry


def test_a_programs_stored_example_inputs_are_named_as_such():
    ep = torch.export.export(small(), (X,), strict=False)
    ver = bnfold.fold(ep).report.verification
    [(name, entry)] = ver.inputs.items()
    assert entry["how"] == "the program's stored example inputs" and entry["shape"] == [2, 3, 10, 10], entry
    assert ver.verdict == "passed"


@pytest.mark.parametrize("command", ["fold", "check"])
def test_save_inputs_then_replay_is_bit_for_bit(tmp_path, capsys, command):
    src, folded, npz = tmp_path / "m.pt", tmp_path / "f.pt", tmp_path / "inputs.npz"
    torch.save(small(), src)
    if command == "check":
        assert main([str(src), "--trust", "--input", "input:2x3x12x12", "-o", str(folded), "--no-verify"]) == 0
        first = second = ["check", str(src), str(folded), "--trust"]
    else:
        first, second = [str(src), "--trust", "--dry-run"], [str(src), "--trust", "--dry-run"]
    capsys.readouterr()
    assert main(first + ["--input", "input:2x3x12x12", "--seed", "7", "--save-inputs", str(npz), "--json"]) == 0
    doc1 = json.loads(capsys.readouterr().out)
    with np.load(npz) as z:
        assert sorted(z.files) == ["input", "input@1", "input@2"] and z["input"].shape == (2, 3, 12, 12)
    assert main(second + ["--inputs", str(npz), "--json"]) == 0
    doc2 = json.loads(capsys.readouterr().out)
    entry = doc2["verification"]["inputs"]["input"]
    assert entry["how"] == f"from {npz}" and "3 batches from the file" in entry["variants"]
    o1 = doc1["verification"]["providers"]["torch-cpu"]["outputs"]
    o2 = doc2["verification"]["providers"]["torch-cpu"]["outputs"]
    for name in o1:
        for stat in ("max_abs", "ref_max_abs"):  # the noise run is seeded by --seed, not by the inputs
            assert o1[name][stat] == o2[name][stat], (name, stat, o1[name], o2[name])


def test_a_one_batch_npz_is_run_with_its_variants(tmp_path):
    npz = tmp_path / "real.npz"
    np.savez(npz, input=X.numpy())
    ver = bnfold.fold(small(), inputs_npz=str(npz)).report.verification
    assert ver.inputs["input"]["batches"] == 3 and ver.inputs["input"]["how"] == f"from {npz}"
    assert ver.verdict == "passed"


def test_save_inputs_refuses_non_tensor_inputs_before_any_work(tmp_path):
    class Listy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
            return self.bn(self.conv(torch.stack(images)))

    model = set_random_bn(Listy())
    with pytest.raises(BnfoldError, match="images.*not a tensor"):
        bnfold.check(model, model, example_inputs=([X[0], X[1]],), save_inputs=str(tmp_path / "x.npz"))
    assert not (tmp_path / "x.npz").exists()
    ver = bnfold.check(model, model, example_inputs=([X[0], X[1]],))
    assert ver.inputs["images"]["shape"] is None and len(ver.inputs["images"]["leaves"]) == 2


def test_bfloat16_inputs_save_and_replay(tmp_path):
    model = small().to(torch.bfloat16)
    npz = tmp_path / "bf16.npz"
    first = bnfold.fold(model, example_inputs=(X.to(torch.bfloat16),), save_inputs=str(npz))
    again = bnfold.fold(model, inputs_npz=str(npz))
    assert again.report.verification.inputs["input"]["dtype"] == "bfloat16"
    a, b = (r.report.verification.providers["torch-cpu"].outputs["output"] for r in (first, again))
    assert a["max_abs"] == b["max_abs"] and a["ref_max_abs"] == b["ref_max_abs"]


class ReZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.alpha = nn.Parameter(torch.tensor(0.25))
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return (y + self.alpha * self.bn2(self.conv2(y))) / self.temperature


def test_zero_dim_parameters_and_buffers_are_nudged_not_crashed_on():
    res = bnfold.fold(set_random_bn(ReZero()), example_inputs=(X,))
    ver = res.report.verification
    assert len(res.report.folded) == 2 and ver.verdict == "passed", ver.to_dict()
    assert ver.proofs == {"proven": 2, "failed": 0, "not_run": 0}


def test_qat_prepared_mobilenet_v2_verifies_without_crashing():
    """prepare_qat adds observers with 0-dim min/max buffers, which also update on every run in eval():
    verification runs, decides every BN, and says the model changes its own state."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = set_random_bn(torchvision.models.mobilenet_v2(weights=None, width_mult=0.35))
    model.train()
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    qat = torch.ao.quantization.prepare_qat(model).eval()
    assert any(t.dim() == 0 and t.is_floating_point() for t in qat.buffers()), "test setup: no 0-dim buffer"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = bnfold.fold(qat, example_inputs=(x,))
    ver = res.report.verification
    bns = [p for p, m in qat.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(d.bn for d in res.report.decisions) == sorted(bns)
    assert ver.verdict in ("passed", "failed", "inconclusive") and ver.providers["torch-cpu"].ran
    assert "stateful" in ver.providers["torch-cpu"].notes
