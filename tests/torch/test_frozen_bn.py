"""Frozen BatchNorm (torchvision/detectron2 style): not an nn BatchNorm, but it must fold like one, in
every capture mode, and a BatchNorm-named module bnfold cannot understand must still get a Decision."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass


class FrozenBatchNorm2d(nn.Module):
    """Semantically torchvision.ops.misc.FrozenBatchNorm2d: statistics and affine are buffers."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), FrozenBatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), FrozenBatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), FrozenBatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), FrozenBatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class FrozenResNet(nn.Module):
    """A small ResNet-50-shaped network whose every norm is a FrozenBatchNorm2d, as in detection backbones."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False), FrozenBatchNorm2d(8)
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 16), Bottleneck(16, 4, 16))
        self.layer2 = Bottleneck(16, 8, 24, stride=2)
        self.fc = nn.Linear(24, 5)
        self.branchy = branchy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2, 1)
        if self.branchy and x.mean() > 10:  # value-dependent: neither fx nor torch.export can capture it
            y = y * 2
        y = self.layer2(self.layer1(y))
        return self.fc(y.mean((2, 3)))


def frozen_bns(model: nn.Module) -> dict[str, FrozenBatchNorm2d]:
    return {p: m for p, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics far from the defaults (mean ~ N(0.5,1), var ~ U(0.5,3), |gamma| ~ U(0.5,2) with random
    signs, beta ~ N(0,1)), so a fold that gets the channel order or the math wrong cannot hide."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for m in frozen_bns(model).values():
        c = m.weight.numel()
        m.running_mean.copy_(torch.randn(c, generator=g) + 0.5)
        m.running_var.copy_(torch.rand(c, generator=g) * 2.5 + 0.5)
        sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
        m.weight.copy_(sign * (torch.rand(c, generator=g) * 1.5 + 0.5))
        m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def float64_close(model: nn.Module, folded: nn.Module, x: torch.Tensor, ulps: float = 16.0) -> None:
    """Evaluated in float64, the folded model equals the original up to the rounding of its folded
    weights to their own dtype (`ulps` of that dtype, relative to the output's scale)."""
    dtype = next(folded.parameters()).dtype
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        got = copy.deepcopy(folded).double()(x.double())
    err = (got - ref).abs().max().item()
    assert err <= ulps * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item()), err


def conv_of(bn_path: str) -> str:
    """The conv a FrozenResNet BN follows: bnK after convK, downsample.1 after downsample.0."""
    head, _, leaf = bn_path.rpartition(".")
    conv = "conv" + leaf[2:] if leaf.startswith("bn") else "0"
    return f"{head}.{conv}" if head else conv


def _check_all_folded(model: nn.Module, res, x: torch.Tensor) -> None:
    decisions = {d.bn: d for d in res.report.decisions}
    expected = frozen_bns(model)
    assert set(decisions) == set(expected), res.report.to_dict()
    for path in expected:
        d = decisions[path]
        assert d.is_folded and d.pattern == "Conv->BN" and d.direction == "after", d
        assert d.producer == conv_of(path), d
    assert not frozen_bns(res.model), "a folded FrozenBatchNorm2d was left in the model"
    assert res.report.verification.passed is True, res.report.to_dict()["verification"]
    float64_close(model, res.model, x)
    assert frozen_bns(model), "the input model was mutated"


def test_frozen_resnet_folds_with_fx() -> None:
    model = randomize(FrozenResNet())
    x = torch.randn(2, 3, 32, 32)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert res.report.info["capture"] == "fx"
    _check_all_folded(model, res, x)
    assert type(res.model.layer1[0].bn2) is nn.Identity
    # folded in float64, nothing is rounded away: any layout or math slip would show far above 1e-12
    model64 = copy.deepcopy(model).double()
    res64 = torch_pass.fold(model64, example_inputs=(x.double(),))
    assert all(d.is_folded for d in res64.report.decisions) and res64.report.verification.passed is True
    float64_close(model64, res64.model, x, ulps=1e-12 / torch.finfo(torch.float64).eps)


def test_frozen_resnet_folds_with_module_hooks() -> None:
    model = randomize(FrozenResNet(branchy=True))
    x = torch.randn(2, 3, 32, 32)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert res.report.info["capture"] == "module-hooks"
    _check_all_folded(model, res, x)


class ShapeBranchFrozen(nn.Module):
    """Branches on a shape: fx cannot trace it, torch.export can, and traces into the frozen BN."""

    def __init__(self) -> None:
        super().__init__()
        self.body = FrozenResNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            x = x * 1.0
        return self.body(x)


def test_frozen_resnet_folds_with_torch_export_capture() -> None:
    model = randomize(ShapeBranchFrozen())
    x = torch.randn(2, 3, 32, 32)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert res.report.info["capture"] == "export"
    _check_all_folded(model, res, x)


def test_exported_program_and_graph_module_fold_frozen_bn() -> None:
    model = randomize(FrozenResNet())
    x = torch.randn(2, 3, 32, 32)
    ep = torch.export.export(model, (x,), strict=False)
    res = torch_pass.fold(ep, example_inputs=(x,))
    d = {k.bn: k for k in res.report.decisions}
    assert set(d) == set(frozen_bns(model)) and all(v.is_folded for v in d.values()), res.report.to_dict()
    assert res.report.verification.passed is True
    float64_close(model, res.model.module(), x)
    names = {str(n.target) for n in res.model.graph.nodes}
    assert not any("rsqrt" in t for t in names), "a frozen BN's ops are still in the folded program"

    gm = ep.module()
    res = torch_pass.fold(gm, example_inputs=(x,))
    d = {k.bn: k for k in res.report.decisions}
    assert set(d) == set(frozen_bns(model)) and all(v.is_folded for v in d.values()), res.report.to_dict()
    assert res.report.verification.passed is True
    float64_close(model, res.model, x)


def test_frozen_bn_fold_is_idempotent_and_eps_is_read() -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, eps=0.5),
                                    nn.ConvTranspose2d(4, 6, 3, groups=2), FrozenBatchNorm2d(6, eps=1e-3),
                                    nn.Flatten(), nn.Linear(6 * 32 * 32, 7)))
    x = torch.randn(2, 3, 32, 32)
    res = torch_pass.fold(model, example_inputs=(x,))
    d = {k.bn: k for k in res.report.decisions}
    assert d["1"].is_folded and d["3"].pattern == "ConvTranspose->BN", res.report.to_dict()
    assert res.report.verification.passed is True
    float64_close(model, res.model, x)
    again = torch_pass.fold(res.model, example_inputs=(x,))
    assert again.report.decisions == []


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Named and shaped like a frozen BN, but its forward adds an activation: it must not be folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return F.relu(x * scale + shift)


class WeirdBatchNorm(nn.Module):
    """BatchNorm by name only: statistics of the wrong shape and none of running_var."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, 1))
        self.register_buffer("running_mean", torch.randn(c))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean.reshape(1, -1, 1, 1)) * self.weight.reshape(1, -1, 1, 1)


class OddShapes(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        for k in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(k, torch.rand(c) + 0.5)
        self.running_var = torch.rand(1, c, 1, 1) + 0.5
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, 1, 1) / (self.running_var + self.eps).sqrt()


OddShapes.__name__ = "MyBatchNormVariant"


@pytest.mark.parametrize("shape_branch", [False, True], ids=["fx", "export"])
def test_batchnorm_named_modules_that_are_not_understood_get_a_reason(shape_branch: bool) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.act_bn = nn.Conv2d(3, 4, 3), FrozenBatchNormAct2d(4)
            self.c2, self.weird = nn.Conv2d(4, 4, 1), WeirdBatchNorm(4)
            self.c3, self.odd = nn.Conv2d(4, 4, 1), OddShapes(4)
            self.c4, self.good = nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if shape_branch and x.shape[-1] > 4:
                x = x * 1.0
            return self.good(self.c4(self.odd(self.c3(self.weird(self.c2(self.act_bn(self.c1(x))))))))

    model = randomize(Net())
    x = torch.randn(2, 3, 16, 16)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert res.report.info["capture"] == ("export" if shape_branch else "fx")
    d = {k.bn: k for k in res.report.decisions}
    assert set(d) == {"act_bn", "weird", "odd", "good"}, res.report.to_dict()
    assert d["act_bn"].reason is Reason.UNSUPPORTED_BN_MODE and "not weight*(x-running_mean)" in d["act_bn"].detail
    assert d["weird"].reason is Reason.NO_RUNNING_STATS, d["weird"]
    assert d["odd"].reason is Reason.UNSUPPORTED_BN_MODE and "1-D" in d["odd"].detail, d["odd"]
    assert d["good"].is_folded and d["good"].producer == "c4"
    assert type(res.model.act_bn) is FrozenBatchNormAct2d and type(res.model.weird) is WeirdBatchNorm
    assert res.report.verification.passed is True
    float64_close(model, res.model, x)


def test_frozen_bn_in_train_mode_that_uses_batch_stats_is_training_mode() -> None:
    class TrainableFrozenBatchNorm2d(FrozenBatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return super().forward(x)

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), TrainableFrozenBatchNorm2d(4)))
    model[1].train()
    x = torch.randn(2, 3, 8, 8)
    res = torch_pass.fold(model, example_inputs=(x,))
    d = {k.bn: k for k in res.report.decisions}
    assert d["1"].reason is Reason.TRAINING_MODE, res.report.to_dict()
    assert res.report.verification.passed is True


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_frozen_bn_folds_and_act_variant_is_kept(how: str) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 3, 3), FrozenBatchNorm2d(3, eps=0.5), nn.Conv2d(3, 3, 1),
                                    FrozenBatchNormAct2d(3), FrozenResNet()))
    x = torch.randn(2, 3, 32, 32)
    sm = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    res = torch_pass.fold(sm, example_inputs=(x,))
    d = {k.bn: k for k in res.report.decisions}
    expected = set(frozen_bns(model)) | {"3"}
    assert set(d) == expected, res.report.to_dict()
    assert d["3"].reason is Reason.UNSUPPORTED_BN_MODE, d["3"]
    assert all(d[k].is_folded for k in expected - {"3"}), res.report.to_dict()
    assert d["1"].producer == "0" and d["4.layer1.0.bn3"].producer == "4.layer1.0.conv3"
    assert res.report.verification.passed is True
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        err = (res.model(x).double() - ref).abs().max().item()
    # float32 model against a float64 reference: the folded model may not be worse than the original
    with torch.no_grad():
        err0 = (model(x).double() - ref).abs().max().item()
    assert err <= 2 * err0 + 16 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (err, err0)
