"""Multi-branch blocks of nn.Modules merged into one conv (bnfold/torch/blocks.py): real timm models in
their training form against timm's own reparameterize_model, hand-made blocks of every branch kind,
and near-misses that must stay as they are (their BNs fold alone)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import bnfold
from bnfold.core.decisions import Reason
from bnfold.torch.blocks import MERGED
from tests.torch.real_models import calibrate, timm_model
from tests.torch.test_edge import _f64_close


def _counts(m: nn.Module) -> tuple[int, int]:
    mods = list(m.modules())
    return (sum(isinstance(x, nn.modules.conv._ConvNd) for x in mods), sum(isinstance(x, _BatchNorm) for x in mods))


def _rep(d) -> bool:
    return d.is_folded and d.pattern.startswith("RepBlock(") and d.direction == "merge"


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8", "repghostnet_050", "repvit_m0_9"])
def test_timm_training_form_merges_to_timms_own_counts(name: str) -> None:
    from timm.utils.model import reparameterize_model
    model, xs = timm_model(name, seed=3)
    bns = {p for p, m in model.named_modules() if isinstance(m, _BatchNorm)}
    res = bnfold.fold(model, example_inputs=xs)
    timm_conv, timm_bn = _counts(reparameterize_model(copy.deepcopy(model)))
    conv, bn = _counts(res.model)
    assert conv <= timm_conv and bn <= timm_bn, (conv, bn, timm_conv, timm_bn)
    # RepGhost's branches read an intermediate of its module, not the module's input: not merged (yet), its
    # fusion BNs fold alone, which already leaves fewer BNs than timm's own reparameterisation
    merges = name != "repghostnet_050"
    assert conv < _counts(model)[0] or not merges
    assert type(res.model) is type(model)  # the user's root class is kept
    ds = res.report.decisions
    assert {d.bn for d in ds} == bns and any(_rep(d) for d in ds) == merges
    if name in ("repvgg_a0", "mobileone_s0"):  # every BN sits in a block
        assert all(_rep(d) for d in ds)
    folded = [d for d in ds if d.is_folded]
    ver = res.report.verification
    assert ver.verdict == "passed" and ver.proofs == {"proven": len(folded), "failed": 0, "not_run": 0}
    assert all(d.proof["passed"] for d in folded)
    _f64_close(model, res.model, xs)
    # the caller's model is untouched, and bnfold's output folds to itself
    assert _counts(model)[1] == len(bns)
    if name != "repvgg_a0":
        return
    again = bnfold.fold(res.model, example_inputs=xs)
    assert not any(d.is_folded for d in again.report.decisions) and _counts(again.model) == (conv, bn)


class Block(nn.Module):
    """kxk + 1x1 (+ 1xk, kx1) conv branches with BNs, an identity BN, a scaled identity, a BN after the sum."""

    def __init__(self, c: int, groups: int = 1, stride: int = 1, dims: int = 2, identity: bool = True,
                 asym: bool = False, final_bn: bool = False, scalar: bool = False) -> None:
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.k3 = nn.Sequential(Conv(c, c, 3, stride, 1, groups=groups, bias=False), BN(c))
        self.k1 = nn.Sequential(Conv(c, c, 1, stride, 0, groups=groups, bias=True), BN(c))
        self.asym = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, (1, 3), stride, (0, 1), groups=groups), BN(c)),
                                   nn.Sequential(nn.Conv2d(c, c, (3, 1), stride, (1, 0), groups=groups))]) \
            if asym else None
        self.id_bn = BN(c) if identity and stride == 1 else None
        self.final = BN(c) if final_bn else None
        self.scalar = scalar
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k3(x) + self.k1(x)
        if self.asym is not None:
            y = y + self.asym[0](x) - self.asym[1](x)
        if self.id_bn is not None:
            y = y + self.id_bn(x)
        if self.scalar:
            y = 0.5 * (y + x) - 1.0
        if self.final is not None:
            y = self.final(y)
        return self.act(y)


class Net(nn.Module):
    def __init__(self, block: nn.Module, c: int = 8, dims: int = 2) -> None:
        super().__init__()
        Conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.stem = Conv(3, c, 3, padding=1)
        self.block = block
        self.head = Conv(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


def _x(dims: int, n: int = 2) -> torch.Tensor:
    return torch.randn((n, 3) + (12,) * dims, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3


def _fold(block: nn.Module, dims: int = 2):
    net = Net(block, dims=dims)
    xs = (_x(dims),)
    calibrate(net, (_x(dims, 4),), seed=1)
    res = bnfold.fold(net, example_inputs=xs)
    assert res.report.verification.verdict == "passed", res.report.verification
    _f64_close(net, res.model, xs)
    return net, res


@pytest.mark.parametrize("kw", [dict(), dict(groups=4), dict(groups=8), dict(dims=1), dict(dims=3), dict(asym=True),
                                dict(final_bn=True), dict(scalar=True), dict(identity=False, stride=2),
                                dict(asym=True, groups=2, final_bn=True, scalar=True)],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_hand_made_blocks_merge_into_one_conv(kw) -> None:
    net, res = _fold(Block(8, **kw), kw.get("dims", 2))
    block = res.model.block
    assert isinstance(getattr(block, MERGED), nn.modules.conv._ConvNd)
    assert _counts(block) == (1, 0)
    bns = {p for p, m in net.named_modules() if isinstance(m, _BatchNorm)}
    ds = res.report.decisions
    assert {d.bn for d in ds} == bns and all(_rep(d) and d.producer == "block" for d in ds)
    assert all(d.proof["passed"] for d in ds)
    assert type(res.model) is Net and res.model.stem is not net.stem


def _plain_folds(net: nn.Module, res) -> None:
    """No merge: every BN decided on its own (a Conv->BN fold, or skipped where no layer takes it)."""
    assert not any(_rep(d) for d in res.report.decisions)
    assert not hasattr(res.model.block, MERGED)
    assert type(res.model.block) is type(net.block)


class Strides(Block):
    """A 1x1 branch of another stride: the branches do not read one grid (it does not even sum as is,
    so the 1x1 reads a strided view the same size)."""

    def __init__(self, c: int) -> None:
        super().__init__(c, identity=False)
        self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, 1, 0), nn.BatchNorm2d(c))
        self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.k3(x) + self.k1(x)[..., ::2, ::2])


class OffCentre(nn.Module):
    """A 2x2 'same' conv (pads 0, 1) next to a 3x3 with pads 1: its taps lie inside the 3x3's, off-centre."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 2, 1, "same"), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


class ReadElsewhere(nn.Module):
    """A branch's value is also read after the sum."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.b(x)
        return (self.a(x) + b) * torch.sigmoid(b)


class TrainingBN(Block):
    """The identity BN is left in train(): it normalises with batch statistics, not an affine map."""

    def __init__(self, c: int) -> None:
        super().__init__(c)

    def train(self, mode: bool = True) -> "TrainingBN":
        super().train(mode)
        self.id_bn.train()
        return self


@pytest.mark.parametrize("cls", [Strides, OffCentre, ReadElsewhere])
def test_near_misses_stay_exact(cls) -> None:
    net, res = _fold(cls(8))
    _plain_folds(net, res)
    folded = [d for d in res.report.decisions if d.is_folded]
    assert folded and all(d.pattern == "Conv->BN" for d in folded)


class NearMissWithIdentity(Block):
    """A RepVGG block whose 3x3 branch reads another grid (dilation 2) or pads other than with zeros: the
    block stays; its conv BNs fold alone, and the identity BN, which has no layer of its own, says why."""

    def __init__(self, c: int, how: str = "dilation") -> None:
        super().__init__(c)
        if how == "dilation":  # a 3x3 on a dilation-2 grid beside a plain 3x3: no one kernel holds both
            self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(c))
            self.k1 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c))
        else:
            self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False, padding_mode=how), nn.BatchNorm2d(c))


@pytest.mark.parametrize("how,why", [("dilation", "dilations differ"), ("reflect", "padding_mode='reflect'"),
                                     ("circular", "padding_mode='circular'")])
def test_a_near_miss_names_its_reason_on_the_identity_bn(how: str, why: str) -> None:
    net, res = _fold(NearMissWithIdentity(8, how))
    _plain_folds(net, res)
    by = {d.bn: d for d in res.report.decisions}
    ident = by["block.id_bn"]
    assert not ident.is_folded and ident.reason is Reason.BRANCH_MISMATCH and why in ident.detail, ident
    assert by["block.k3.1"].is_folded and by["block.k1.1"].is_folded


def test_a_branch_bn_in_train_mode_stays_and_the_rest_merges() -> None:
    net, res = _fold(TrainingBN(8))
    by = {d.bn: d for d in res.report.decisions}
    assert by["block.k3.1"].pattern == by["block.k1.1"].pattern == "RepBlock(2 branches)->Conv"
    assert not by["block.id_bn"].is_folded
    assert res.model.block.id_bn.training and not res.model.block.training


def test_a_block_that_is_the_model_itself_keeps_its_class() -> None:
    net = Block(8)
    x = torch.randn(2, 8, 10, 10)
    calibrate(net, (torch.randn(4, 8, 10, 10),), seed=2)
    res = bnfold.fold(net, example_inputs=(x,))
    assert type(res.model) is Block and not any(_rep(d) for d in res.report.decisions)
    assert res.report.verification.verdict == "passed"


def test_merged_block_without_example_inputs() -> None:
    net = Net(Block(8, groups=2, asym=True))
    calibrate(net, (_x(2, 4),), seed=4)
    res = bnfold.fold(net)
    assert all(_rep(d) for d in res.report.decisions)
    with torch.no_grad():
        x = _x(2)
        torch.testing.assert_close(res.model(x), net(x), rtol=1e-4, atol=1e-4 * float(net(x).abs().max()))


def test_functional_batch_norm_identity_branch() -> None:
    class FBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, 1, 1)
            self.register_buffer("m", torch.randn(c))
            self.register_buffer("v", torch.rand(c) + 0.5)
            self.w = nn.Parameter(torch.randn(c))
            self.b = nn.Parameter(torch.randn(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.conv(x) + F.batch_norm(x, self.m, self.v, self.w, self.b, False, 0.1, 1e-3))

    net, res = _fold(FBlock(8))
    assert _counts(res.model.block) == (1, 0)
    assert [d.pattern for d in res.report.decisions if d.bn.startswith("block")] == ["RepBlock(2 branches)->Conv"]
