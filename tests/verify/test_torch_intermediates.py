"""PyTorch: module outputs are compared, not only the model's outputs, and correct folds still pass.

A wrong candidate whose error a ReLU hides from the outputs must fail, naming the module path; a fold
made by bnfold or by torch's own fusers must pass `bnfold.check`, although the layer a BN was folded
into now carries the BN's output. nn.Modules, fx GraphModules and torch.export programs are compared
by module path; TorchScript only by its outputs, and the report says so.
"""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn

import bnfold
from tests.helpers.zoo_torch import set_random_bn

DEAD = 3  # the channel a ReLU always zeroes in the masked models below


class Masked(nn.Module):
    """conv -> bn -> relu -> conv -> bn -> relu -> mean -> linear; bn1's channel DEAD is always negative,
    so relu1 zeroes it and nothing after relu1 sees conv1's channel DEAD."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.head(self.relu2(self.bn2(self.conv2(y))).mean((2, 3)))


def masked(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = set_random_bn(Masked(), seed)
    with torch.no_grad():
        model.bn1.weight[DEAD], model.bn1.bias[DEAD] = 0.5, -30.0
    return model


def dead_channel(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """make() under torch.manual_seed(0), BN statistics from `seed`, and its `bn`'s channel DEAD always
    negative, so a ReLU after `bn` zeroes it."""
    torch.manual_seed(0)
    model = set_random_bn(make(), seed)
    with torch.no_grad():
        model.bn.weight[DEAD], model.bn.bias[DEAD] = 0.5, -30.0
    return model


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def _assert_masked(undamaged: nn.Module, candidate: nn.Module) -> None:
    """Test precondition: the candidate's damage never reaches the outputs on X and its variants."""
    from bnfold.torch.hooks import variants
    for (x,) in variants((X,), 0):
        with torch.no_grad():
            assert torch.equal(undamaged(x), candidate(x)), "test setup: the damage must be masked"


@pytest.mark.parametrize("edit", ["bias", "scale"])
def test_a_masked_edit_of_bnfolds_result_fails_and_is_named(edit):
    original = masked()
    folded = bnfold.fold(original, example_inputs=(X,)).model
    candidate = copy.deepcopy(folded)
    with torch.no_grad():
        if edit == "bias":
            candidate.conv1.bias[DEAD] += 0.25
        else:
            candidate.conv1.weight[DEAD] *= 1.001
    _assert_masked(folded, candidate)
    ver = bnfold.check(original, candidate, example_inputs=(X,))
    assert ver.verdict == "failed" and not ver, ver.to_dict()
    fd = ver.first_divergence
    assert fd["layer"] == "conv1" and fd["module"] == "Conv2d" and fd["max_abs"] > fd["atol"], fd
    assert "bn1" in fd["compared_with"]  # the folded layer carries bn1's value
    cpu = ver.providers["torch-cpu"]
    assert cpu.outputs["output"]["verdict"] == "passed" and "masked_divergence" in cpu.notes


def test_outputs_only_reports_the_masked_divergence_without_deciding():
    original = masked()
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        candidate.conv1.bias[DEAD] += 0.25
    ver = bnfold.check(original, candidate, example_inputs=(X,), outputs_only=True)
    assert ver.verdict == "passed"
    assert ver.providers["torch-cpu"].notes["ignored_divergence"]["layer"] == "conv1"


def test_a_changed_plain_attribute_in_tensor_free_code_is_not_excused():
    """Code that holds no tensors cannot change a function unless its attributes differ: a candidate with
    another factor on the dead channel fails at that module, although its input agrees."""
    class Scale(nn.Module):
        def __init__(self, factors: tuple[float, ...]) -> None:
            super().__init__()
            self.factors = factors

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tensor(self.factors).reshape(1, -1, 1, 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.scale = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), Scale((0.5,) * 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.scale(self.bn(self.conv(x)))))

    original = dead_channel(Net, 1)
    candidate = copy.deepcopy(original)
    candidate.scale.factors = tuple(0.7 if i == DEAD else 0.5 for i in range(8))
    _assert_masked(original, candidate)
    ver = bnfold.check(original, candidate, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "scale", ver.to_dict()


def test_a_swapped_submodule_class_inside_tensor_free_code_is_not_excused():
    """A candidate whose conv inside a tensor-free block is another class (so not compared itself) must
    still fail at the block: not every call inside it agreed."""
    class Hacked(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = super().forward(x)
            return y + (torch.arange(y.shape[1]) == DEAD).float().reshape(1, -1, 1, 1)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * 2.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.bn, self.head = Block(), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(self.block(x))))

    original = dead_channel(Net, 1)
    candidate = copy.deepcopy(original)
    hacked = Hacked(3, 8, 3, padding=1)
    hacked.load_state_dict(original.block.conv.state_dict())
    candidate.block.conv = hacked
    _assert_masked(original, candidate)
    ver = bnfold.check(original, candidate, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "block", ver.to_dict()


def test_a_graph_module_candidate_is_compared_by_module_path():
    """torch.fx's own Conv+BN fusion (a GraphModule whose BN calls are gone) passes; the same with conv1's
    dead channel scaled fails at conv1."""
    from torch.fx.experimental.optimization import fuse
    original = masked()
    fused = fuse(copy.deepcopy(original))
    ver = bnfold.check(original, fused, example_inputs=(X,))
    assert ver.verdict == "passed", ver.to_dict()
    assert ver.providers["torch-cpu"].notes["intermediates_compared"] >= 4
    edited = copy.deepcopy(fused)
    with torch.no_grad():
        edited.conv1.weight[DEAD] *= 1.001
    _assert_masked(fused, edited)
    ver = bnfold.check(original, edited, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "conv1", ver.to_dict()


def test_exported_programs_are_compared_by_module_path():
    original = masked()
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        candidate.conv1.bias[DEAD] += 0.25
    _assert_masked(original, candidate)
    ep_o = torch.export.export(original, (X,), strict=False)
    ep_c = torch.export.export(candidate, (X,), strict=False)
    ver = bnfold.check(ep_o, ep_c, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "conv1", ver.to_dict()
    folded = bnfold.fold(ep_o, example_inputs=(X,))
    assert folded.report.verification.verdict == "passed", folded.report.verification.to_dict()
    assert folded.report.verification.providers["torch-cpu"].notes["intermediates_compared"] >= 4


def test_torchscript_is_compared_by_its_outputs_and_says_so():
    original = torch.jit.script(masked())
    ver = bnfold.check(original, original, example_inputs=(X,))
    note = ver.providers["torch-cpu"].notes["intermediates"]
    assert ver.verdict == "passed" and "TorchScript" in note and "outputs" in note


def test_other_tools_folds_of_resnet18_pass_check():
    """Folds made by torch.ao.quantization.fuse_modules, torch.fx's fuse and bnfold itself: every layer
    a BN went into carries the BN's value, which is what it is compared with."""
    torchvision = pytest.importorskip("torchvision")
    from torch.ao.quantization import fuse_modules
    from torch.fx.experimental.optimization import fuse
    torch.manual_seed(0)
    model = set_random_bn(torchvision.models.resnet18(weights=None), 2)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    pairs = [[p, p.replace("conv", "bn")] for p, m in model.named_modules() if isinstance(m, nn.Conv2d)
             and "downsample" not in p] + [[p, p[:-1] + "1"] for p, m in model.named_modules()
                                             if p.endswith("downsample.0")]
    candidates = {"fuse_modules": fuse_modules(copy.deepcopy(model), pairs), "fx.fuse": fuse(copy.deepcopy(model)),
                  "bnfold": bnfold.fold(model, example_inputs=(x,), verify=False).model}
    for name, cand in candidates.items():
        assert not any(isinstance(m, nn.BatchNorm2d) for m in cand.modules()), f"test setup: {name} kept a BN"
        ver = bnfold.check(model, cand, example_inputs=(x,))
        assert ver.verdict == "passed", (name, ver.to_dict())
        assert ver.providers["torch-cpu"].notes["intermediates_compared"] >= 20, name


def test_a_container_ending_in_a_bn_folded_into_the_next_layer_carries_the_bn_input():
    """block = conv -> relu -> bn; the bn folds backward into the 1x1 conv after the block, so the block now
    hands on the relu's output: it is compared with the original bn's input, and the fold verifies."""
    torch.manual_seed(0)
    model = set_random_bn(nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)), nn.Conv2d(8, 4, 1)), 5)
    res = bnfold.fold(model, example_inputs=(X,))
    [d] = res.report.folded
    assert (d.bn, d.producer, d.direction) == ("0.2", "1", "before")
    ver = res.report.verification
    assert ver.verdict == "passed" and ver.proofs == {"proven": 1, "failed": 0, "not_run": 0}, ver.to_dict()
    assert ver.providers["torch-cpu"].notes["intermediates_compared"] == 4  # 0, 0.0, 0.1, 1
    wrong = copy.deepcopy(res.model)
    with torch.no_grad():
        wrong[1].bias[0] += 1e-3
    ver = bnfold.check(model, wrong, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "1", ver.to_dict()


def test_a_module_called_twice_is_compared_call_by_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.shared = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(torch.relu(self.shared(self.bn(self.conv(x)))))

    torch.manual_seed(0)
    original = set_random_bn(Twice(), 6)
    res = bnfold.fold(original, example_inputs=(X,))
    assert res.report.verification.verdict == "passed", res.report.verification.to_dict()
    wrong = copy.deepcopy(res.model)
    with torch.no_grad():
        wrong.conv.weight.mul_(1.0005)
    ver = bnfold.check(original, wrong, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "conv", ver.to_dict()


def test_a_masked_error_on_a_branch_only_a_variant_takes_fails():
    """The example input takes branch a; only its negated variant runs branch b, whose damaged conv a ReLU
    hides from the outputs: still a failed check, naming b's conv."""
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.bn, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x) if x.sum() > 0 else self.b(x)
            return self.head(torch.relu(self.bn(y)))

    original = dead_channel(Branchy, 2)
    candidate = copy.deepcopy(original)
    with torch.no_grad():
        candidate.b.bias[DEAD] += 0.25
    x = X.abs()
    _assert_masked(original, candidate)
    ver = bnfold.check(original, candidate, example_inputs=(x,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "b", ver.to_dict()


@pytest.mark.parametrize("how", ["forward", "hook"])
def test_a_replaced_forward_or_an_added_hook_is_not_excused(how):
    """Same class, no tensors, inputs agree: still another function when the instance's forward was
    replaced or a hook changes its output."""
    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.gate, self.head = Gate(), nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.gate(self.bn(self.conv(x)))))

    original = dead_channel(Net, 3)
    candidate = copy.deepcopy(original)
    bump = lambda y: y + 0.1 * (torch.arange(8) == DEAD).float().reshape(1, -1, 1, 1)  # noqa: E731
    if how == "forward":
        candidate.gate.forward = lambda x: bump(x * 2.0)
    else:
        candidate.gate.register_forward_hook(lambda mod, args, out: bump(out))
    _assert_masked(original, candidate)
    ver = bnfold.check(original, candidate, example_inputs=(X,))
    assert ver.verdict == "failed" and ver.first_divergence["layer"] == "gate", ver.to_dict()
