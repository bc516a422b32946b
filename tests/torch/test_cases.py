"""The hard cases of issue 4, each with a numeric check of the folded model against the unfolded one."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.helpers.zoo_torch import randomize_bn


def _fold(model: nn.Module, *shape: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    randomize_bn(model, seed)
    x = torch.randn(*shape)
    res = torch_pass.fold(model, example_inputs=(x,), **kw)
    return res, x


def _by_bn(res) -> dict:
    return {d.bn: d for d in res.report.decisions}


def _assert_close(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    """An independent check besides the verifier: float64 reference, error no worse than the original's."""
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        e0 = (model(x).double() - ref).abs().max().item()
        e1 = (folded(x).double() - ref).abs().max().item()
    assert e1 <= 2 * e0 + 8 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (e1, e0)


class Seq(nn.Sequential):
    pass


# Transposed and grouped layers -------------------------------------------------------------------

@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 8), (6, 6, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_grouped_and_depthwise(nd: int, groups: int, cin: int, cout: int, bias: bool) -> None:
    ct = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][nd - 1]
    bn = [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][nd - 1]
    model = Seq(ct(cin, cout, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=bias, dilation=1), bn(cout))
    res, x = _fold(model, 2, cin, *([5] * nd))
    d = _by_bn(res)["1"]
    assert d.is_folded and d.pattern == "ConvTranspose->BN"
    assert isinstance(res.model[1], nn.Identity)
    assert res.report.verification.passed is True
    _assert_close(model, res.model, x)


@pytest.mark.parametrize("nd", [1, 3])
def test_conv_1d_3d_grouped_dilated(nd: int) -> None:
    conv = [nn.Conv1d, None, nn.Conv3d][nd - 1]
    bn = [nn.BatchNorm1d, None, nn.BatchNorm3d][nd - 1]
    model = Seq(conv(4, 8, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"), bn(8))
    res, x = _fold(model, 2, 4, *([7] * nd))
    assert _by_bn(res)["1"].is_folded and res.report.verification.passed
    _assert_close(model, res.model, x)


# Axis checks -------------------------------------------------------------------------------------

class Linear3D(nn.Module):
    """Linear over the last axis of (N, 8, 8), BatchNorm1d(8) over axis 1: equal sizes, wrong axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_linear_on_3d_input_with_equal_sizes_is_not_folded() -> None:
    res, x = _fold(Linear3D(), 2, 8, 8)
    d = _by_bn(res)["bn"]
    assert not d.is_folded and d.reason is Reason.AXIS_MISMATCH
    assert res.report.verification.passed is True
    _assert_close(res.model, res.model, x)


def test_linear_axis_unknown_without_example_inputs() -> None:
    model = randomize_bn(Linear3D(), 1)
    res = torch_pass.fold(model, verify=False)
    assert _by_bn(res)["bn"].reason is Reason.AXIS_MISMATCH
    assert res.report.verification.skipped_reason == "verification off"


def test_linear_on_2d_input_folds() -> None:
    model = Linear3D()
    res, x = _fold(model, 4, 8)
    assert _by_bn(res)["bn"].pattern == "Linear->BN" and res.report.verification.passed
    _assert_close(model, res.model, x)


# Shared and fanned-out producers -----------------------------------------------------------------

class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 2.0)


def test_conv_called_twice_is_not_folded_in_place() -> None:
    model = ConvTwice()
    res, x = _fold(model, 2, 4, 6, 6)
    d = _by_bn(res)["bn"]
    assert d.reason is Reason.SHARED_PRODUCER and "2 places" in d.detail
    assert res.report.verification.passed is True
    assert torch.equal(res.model.conv.weight, model.conv.weight)


class Fanout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor):
        c = self.conv(x)
        c2 = self.conv2(x)
        return self.bn(c) + c, self.bn2(c2), c2


def test_fanout_and_intermediate_output() -> None:
    res, x = _fold(Fanout(), 2, 3, 6, 6)
    d = _by_bn(res)
    assert d["bn"].reason is Reason.PRODUCER_FANOUT
    assert d["bn2"].reason is Reason.INTERMEDIATE_IS_OUTPUT
    assert res.report.verification.passed is True
    assert set(res.report.verification.providers["torch-cpu"].outputs) == {"output.0", "output.1", "output.2"}


# BN kinds ----------------------------------------------------------------------------------------

def test_track_running_stats_false_stays() -> None:
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    res, x = _fold(model, 2, 3, 6, 6)
    assert _by_bn(res)["1"].reason is Reason.NO_RUNNING_STATS
    assert isinstance(res.model[1], nn.BatchNorm2d) and res.report.verification.passed


def test_affine_false_sync_bn_and_subclasses() -> None:
    class MyConv(nn.Conv2d):
        pass

    class MyBN(nn.BatchNorm2d):
        pass

    model = Seq(MyConv(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                nn.Conv2d(4, 5, 1), nn.SyncBatchNorm(5), nn.Conv2d(5, 6, 1, bias=False), MyBN(6))
    res, x = _fold(model, 2, 3, 6, 6)
    d = _by_bn(res)
    assert all(d[k].is_folded for k in ("1", "4", "6")), res.report.to_dict()
    assert res.report.verification.passed is True
    _assert_close(model, res.model, x)


class WeightStandardized(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_conv_subclass_with_own_forward_is_not_folded() -> None:
    res, x = _fold(Seq(WeightStandardized(3, 4, 3), nn.BatchNorm2d(4)), 2, 3, 6, 6)
    assert _by_bn(res)["1"].reason is Reason.NON_CONSTANT_PARAM
    assert res.report.verification.passed is True


class FunctionalConv(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(6)) if bias else None
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.conv2d(x, self.w, self.b, padding=1))


def test_functional_conv_producer() -> None:
    model = FunctionalConv(bias=True)
    res, x = _fold(model, 2, 3, 6, 6)
    d = _by_bn(res)["bn"]
    assert d.is_folded and d.producer == "w" and res.report.verification.passed
    _assert_close(model, res.model, x)
    # without a bias argument the user's code has nowhere to put the shift
    res, x = _fold(FunctionalConv(bias=False), 2, 3, 6, 6)
    assert _by_bn(res)["bn"].reason is Reason.UNSUPPORTED_PRODUCER
    assert res.report.verification.passed is True


def test_public_api_folds_torch_modules(tmp_path) -> None:
    import bnfold
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    randomize_bn(model, 4)
    x = torch.randn(1, 3, 6, 6)
    res = bnfold.fold(model, example_inputs=(x,))
    assert res.report.framework == "torch" and len(res.report.folded) == 1 and res.report.verification.passed
    path = str(tmp_path / "m.pt")
    bnfold.save(res, path)
    assert os.path.exists(path) and res.report.output == path


class FunctionalBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.register_buffer("mean", torch.randn(5) + 0.5)
        self.register_buffer("var", torch.rand(5) * 2.5 + 0.5)
        self.gamma = nn.Parameter(torch.rand(5) * 1.5 + 0.5)
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3))


def test_functional_batch_norm_with_buffers() -> None:
    model = FunctionalBN()
    res, x = _fold(model, 2, 3, 7, 7)
    # the call is the root model's own code: removing it would change the model's class, and a call that
    # still runs is not folded
    (d,) = res.report.skipped
    assert d.reason is Reason.UNSUPPORTED_BN_MODE and "symbolic_trace" in d.detail and not res.report.folded
    assert res.report.verification.passed is True
    # inside a submodule the module is replaced by a traced copy without the call
    wrapped = nn.Sequential(model, nn.ReLU())
    res1, _ = _fold(wrapped, 2, 3, 7, 7)
    assert [f.bn for f in res1.report.folded] == ["0.mean"] and res1.report.verification.passed
    assert type(res1.model) is nn.Sequential and "traced copy" in res1.report.folded[0].extra["note"]
    assert not [n for n in res1.model[0].graph.nodes if n.target is F.batch_norm]
    _assert_close(wrapped, res1.model, x)
    # in a GraphModule the call itself is removed
    gm = torch.fx.symbolic_trace(model)
    res2 = torch_pass.fold(gm, example_inputs=(x,))
    assert len(res2.report.folded) == 1 and res2.report.verification.passed
    assert not [n for n in res2.model.graph.nodes if n.target is F.batch_norm]


# Folding into the following layer ----------------------------------------------------------------

class BNFirst(nn.Module):
    def __init__(self, padding: int = 0, mode: str = "zeros") -> None:
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=padding, padding_mode=mode, groups=1)
        self.bn_fc = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(self.bn_in(x))).mean((2, 3))
        return self.fc(self.bn_fc(y))


def test_bn_before_conv_and_linear() -> None:
    model = BNFirst()
    res, x = _fold(model, 2, 3, 8, 8)
    d = _by_bn(res)
    assert d["bn_in"].pattern == "BN->Conv" and d["bn_in"].direction == "before"
    assert d["bn_fc"].pattern == "BN->Linear" and d["bn_fc"].direction == "before"
    assert res.report.verification.passed is True
    _assert_close(model, res.model, x)


def test_bn_before_padded_conv() -> None:
    res, x = _fold(BNFirst(padding=1), 2, 3, 8, 8)
    assert _by_bn(res)["bn_in"].reason is Reason.PADDING_BREAKS_BACKWARD_FOLD
    assert res.report.verification.passed is True
    # reflect padding copies the input, so the shifted border is exact
    model = BNFirst(padding=1, mode="reflect")
    res, x = _fold(model, 2, 3, 8, 8)
    assert _by_bn(res)["bn_in"].is_folded and res.report.verification.passed
    _assert_close(model, res.model, x)


# Capture fallbacks -------------------------------------------------------------------------------

class Branchy(nn.Module):
    """Data-dependent control flow: conv2 runs with bn2 on one branch and without it on the other."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if x.mean() > 0:
            y = self.bn2(self.conv2(y))
        else:
            y = self.conv2(y)
        out = self.bn3(self.conv3(y))
        if out.abs().max() > 1e6:  # reads bn3's output, not conv3's: no obstacle
            out = out / 2
        return out


def test_data_dependent_control_flow_uses_module_hooks() -> None:
    model = Branchy()
    res, x = _fold(model, 2, 3, 6, 6)
    x = x.abs()  # take the branch with bn2
    res = torch_pass.fold(model, example_inputs=(x,))
    assert res.report.info["capture"] == "module-hooks"
    assert len(res.report.info["capture_fallbacks"]) == 2
    d = _by_bn(res)
    assert d["bn1"].is_folded and d["bn3"].is_folded
    assert d["bn2"].reason is Reason.PRODUCER_FANOUT and "control flow" in d["bn2"].detail
    for inp in (x, -x):
        assert torch_pass.check(model, res.model, example_inputs=(inp,)).passed is True


class ShapeBranch(nn.Module):
    """Branches on a shape: torch.fx cannot trace it, torch.export can (it specialises the shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc, self.bn_fc = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        if x.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        return self.bn_fc(self.fc(y.mean((2, 3))))


def test_untraceable_by_fx_uses_torch_export() -> None:
    model = ShapeBranch()
    res, x = _fold(model, 2, 3, 8, 8)
    assert res.report.info["capture"] == "export" and res.report.info["capture_fallbacks"][0].startswith("fx")
    d = _by_bn(res)
    assert d["bn"].producer == "conv" and d["bn_fc"].producer == "fc"
    assert isinstance(res.model.bn, nn.Identity) and type(res.model) is ShapeBranch
    assert res.report.verification.passed is True
    _assert_close(model, res.model, x)


class ReadsConvOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        if c.sum() > 0:  # this decision must keep seeing the unnormalised value
            return self.bn(c)
        return -self.bn(c)


def test_hooks_see_a_branch_condition_on_the_producer_output() -> None:
    res, x = _fold(ReadsConvOutput(), 2, 3, 6, 6)
    assert res.report.info["capture"] == "module-hooks"
    assert _by_bn(res)["bn"].reason is Reason.PRODUCER_FANOUT
    assert res.report.verification.passed is True


# Dtypes and bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_module(dtype: torch.dtype) -> None:
    model = Seq(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False),
                nn.BatchNorm2d(4))
    randomize_bn(model, 2)
    model = model.to(dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert len(res.report.folded) == 2 and res.report.verification.passed is True
    assert res.model[0].weight.dtype == dtype and res.model[3].bias.dtype == dtype
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        e0 = (model(x).double() - ref).abs().max().item()
        e1 = (res.model(x).double() - ref).abs().max().item()
    assert e1 <= 2 * e0, (e1, e0)


def test_fp16_overflow_is_skipped() -> None:
    model = Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    randomize_bn(model, 0)
    with torch.no_grad():
        model[0].weight.fill_(1000.0)  # s ~ 100-200: W * s > 65504
        model[1].running_var.fill_(1e-4)
        model[1].eps = 1e-5
    model = model.half()
    res = torch_pass.fold(model, example_inputs=(torch.randn(1, 3, 4, 4).half() * 1e-3,))
    assert _by_bn(res)["1"].reason is Reason.DTYPE_OVERFLOW
    assert torch.equal(res.model[0].weight, model[0].weight) and isinstance(res.model[1], nn.BatchNorm2d)


def test_non_finite_statistics() -> None:
    model = Seq(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    randomize_bn(model, 0)
    model[1].running_var[2] = float("nan")
    res = torch_pass.fold(model, example_inputs=(torch.randn(1, 3, 4, 4),), verify=False)
    assert _by_bn(res)["1"].reason is Reason.NON_FINITE_PARAM


def test_training_mode() -> None:
    model = Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    randomize_bn(model, 0)
    model.train()
    x = torch.randn(2, 3, 6, 6)
    res = torch_pass.fold(model, example_inputs=(x,))
    assert "eval" in res.report.info["eval_mode"] and len(res.report.folded) == 2
    assert model.training and not res.model.training
    assert torch_pass.check(model.eval(), res.model, example_inputs=(x,)).passed is True
    # a BN deliberately left in train() inside an eval() model keeps using batch statistics
    model.eval()
    model[3].train()
    res = torch_pass.fold(model, example_inputs=(x,))
    d = _by_bn(res)
    assert d["1"].is_folded and d["3"].reason is Reason.TRAINING_MODE
    assert res.model[3].training and res.report.verification.passed is True


def test_shared_conv_in_a_graph_module_is_cloned_for_the_bn_call_site() -> None:
    model = randomize_bn(ConvTwice(), 3)
    x = torch.randn(2, 4, 6, 6)
    gm = torch.fx.symbolic_trace(model)
    res = torch_pass.fold(gm, example_inputs=(x,))
    d = _by_bn(res)["bn"]
    assert d.is_folded and "own copy" in d.extra["note"]
    assert res.report.verification.passed is True
    _assert_close(model, res.model, x)
    # the same through torch.export, where the two calls share one weight tensor
    ep = torch.export.export(model, (x,))
    res = torch_pass.fold(ep)
    assert _by_bn(res)["bn"].is_folded and res.report.verification.passed is True
