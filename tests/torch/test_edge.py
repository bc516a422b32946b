"""Adversarial tests for the PyTorch path: architectures and edge cases people have, each fold checked
by running the folded model against the unfolded one (eval mode, BN statistics far from defaults, a
float64 reference), every BN with exactly one decision, and the input model left untouched."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

from bnfold.cli import main
from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.helpers.zoo_torch import randomize_bn

HOWS = ["module", "graph", "export", "script", "trace"]


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _bn_paths(model: nn.Module) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, _BatchNorm) or "batchnorm" in type(m).__name__.lower()}


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _untouched(model: nn.Module, snap) -> None:
    state, modes = snap
    now = model.state_dict()
    assert state.keys() == now.keys() and all(torch.equal(state[k], now[k]) for k in state)
    assert modes == [m.training for m in model.modules()]


def _run(model: nn.Module, xs: tuple, how: str):
    """Fold `model` given as itself or as a GraphModule / ExportedProgram / TorchScript module."""
    if how == "graph":
        obj = torch.fx.symbolic_trace(model)
    elif how == "export":
        obj = torch.export.export(model, xs)
    elif how == "script":
        obj = torch.jit.script(model)
    elif how == "trace":
        obj = torch.jit.trace(model, xs)
    else:
        obj = model
    res = torch_pass.fold(obj, example_inputs=xs, providers=["cpu"])
    folded = res.model.module() if how == "export" else res.model
    return res, folded


def _f64_close(model: nn.Module, folded, xs: tuple) -> None:
    """The folded model is no further from a float64 run of the original than the original itself."""
    ref_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        ref = _leaves(copy.deepcopy(ref_model).double()(*[x.double() if x.is_floating_point() else x for x in xs]))
        orig = _leaves(ref_model(*xs))
        new = _leaves(folded(*xs))
    assert len(ref) == len(orig) == len(new)
    for r, o, f in zip(ref, orig, new):
        e0 = (o.double() - r).abs().max().item()
        e1 = (f.double() - r).abs().max().item()
        assert e1 <= 2 * e0 + 8 * torch.finfo(o.dtype).eps * r.abs().max().item(), (e1, e0)


def _fold_checked(model: nn.Module, *xs: torch.Tensor, how: str = "module", bns: set[str] | None = None):
    """Fold, then check: one decision per BN (`bns`, default every BN module), verification passed,
    float64 check, input untouched."""
    snap = _snapshot(model)
    res, folded = _run(model, xs, how)
    names = [d.bn for d in res.report.decisions]
    assert len(names) == len(set(names)) and set(names) == (_bn_paths(model) if bns is None else bns), (
        names, res.report.to_dict())
    assert res.report.verification.passed is True, res.report.to_dict()
    _f64_close(model, folded, xs)
    _untouched(model, snap)
    return {d.bn: d for d in res.report.decisions}, res


def _nd(nd: int):
    return ([nn.Conv1d, nn.Conv2d, nn.Conv3d][nd - 1], [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][nd - 1],
            [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][nd - 1])


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


# Layers of every rank, grouped, transposed, on both sides of a BN ---------------------------------

@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("how", HOWS)
def test_conv_nd_grouped_multiplier_and_transposed(nd: int, how: str) -> None:
    C, B, CT = _nd(nd)
    torch.manual_seed(nd)
    # BN -> depthwise conv with channel multiplier 2 (no padding), BN after it; a bias-free grouped
    # conv; a grouped dilated ConvTranspose with output_padding
    model = randomize_bn(nn.Sequential(B(4), C(4, 8, 3, groups=4, dilation=2), B(8), nn.ReLU(),
                                       C(8, 6, 3, padding=1, groups=2, bias=False), B(6),
                                       CT(6, 4, 3, stride=2, groups=2, dilation=2, output_padding=1), B(4)), nd)
    d, _ = _fold_checked(model, _x(2, 4, *([6] * nd)), how=how)
    assert (d["0"].producer, d["0"].direction) == ("1", "before")
    assert d["2"].producer == "1" and d["5"].producer == "4" and d["7"].pattern == "ConvTranspose->BN"


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_bn_before_overlapping_conv_transpose_is_skipped(nd: int) -> None:
    C, B, CT = _nd(nd)
    model = randomize_bn(nn.Sequential(B(4), CT(4, 6, 3, stride=2, groups=2, dilation=2)), nd)
    d, _ = _fold_checked(model, _x(2, 4, *([5] * nd)))
    assert d["0"].reason is Reason.PADDING_BREAKS_BACKWARD_FOLD


def linear_on_seq(before: bool) -> nn.Sequential:
    """Linear over the last axis of (N, C, L) with L == C, BatchNorm1d over axis 1: must not fold."""
    return nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 5)) if before else nn.Sequential(nn.Linear(5, 5),
                                                                                          nn.BatchNorm1d(5))


class Untraceable(nn.Module):
    """A data-dependent branch: neither fx nor torch.export capture it, so module hooks do."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) if x.sum() > -1e9 else x


@pytest.mark.parametrize("how", HOWS + ["hooks"])
@pytest.mark.parametrize("before", [False, True])
def test_linear_on_3d_never_folds_into_the_wrong_axis(how: str, before: bool) -> None:
    model = randomize_bn(linear_on_seq(before), 3)
    if how == "hooks":
        model = Untraceable(model).eval()
    d, res = _fold_checked(model, _x(2, 5, 5), how="module" if how == "hooks" else how)
    assert all(v.reason is Reason.AXIS_MISMATCH for v in d.values()), res.report.to_dict()


@pytest.mark.parametrize("how", ["module", "graph", "export", "hooks"])
def test_mlp_linear_bn1d_on_2d_folds_both_ways(how: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                       nn.Linear(5, 3)), 4)
    if how == "hooks":
        model = Untraceable(model).eval()
    d, _ = _fold_checked(model, _x(4, 6), how="module" if how == "hooks" else how)
    assert [v.pattern for v in d.values()] == ["BN->Linear", "Linear->BN"]


# Real architectures --------------------------------------------------------------------------------

class PreActBlock(nn.Module):
    """Pre-activation ResNet block: BN -> ReLU -> conv, so BNs have no producer or fold before a 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.conv1(F.relu(self.bn1(x)))
        o = self.conv2(F.relu(self.bn2(o))) + x
        return self.conv3(self.bn3(o))


@pytest.mark.parametrize("how", HOWS)
def test_pre_activation_block(how: str) -> None:
    model = randomize_bn(PreActBlock(), 5)
    d, _ = _fold_checked(model, _x(2, 4, 8, 8), how=how)
    assert d["bn1"].reason is Reason.NO_PRODUCER
    assert (d["bn2"].producer, d["bn2"].direction) == ("conv1", "after")
    if how in ("script", "trace"):  # compiled code is not edited, and conv3 has no bias to take the shift
        assert d["bn3"].reason is Reason.UNSUPPORTED_PRODUCER and d["bn3"].producer == "conv3"
    else:
        assert (d["bn3"].producer, d["bn3"].direction) == ("conv3", "before")


class Heads(nn.Module):
    """ModuleDict of nested Sequentials, a BN shared by two branches, a BN on the input feeding two
    convs, a BN output that is also a model output, an unused BN, two inputs and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({
            "a": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                               nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=None))),
            "b": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4, affine=False)),
            "unused": nn.BatchNorm2d(4)})
        self.shared, self.fan = nn.BatchNorm2d(4), nn.BatchNorm2d(3)
        self.c1, self.c2 = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)
        self.fc, self.bn_fc = nn.Linear(7, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, v: torch.Tensor, scale: float = 2.0) -> dict[str, torch.Tensor]:
        f = self.fan(x)
        a, b = self.blocks["a"](x), self.blocks["b"](x)
        return {"a": self.shared(a), "b": self.shared(b[..., 1:-1, 1:-1]), "f": self.c1(f) * scale + self.c2(f),
                "b_out": b, "v": self.bn_fc(self.fc(v))}


@pytest.mark.parametrize("how", ["module", "graph", "export"])
def test_containers_shared_fanout_outputs_and_two_inputs(how: str) -> None:
    model = randomize_bn(Heads(), 6)
    bns = _bn_paths(model) - ({"blocks.unused"} if how != "module" else set())  # tracing drops the unused BN
    d, res = _fold_checked(model, _x(2, 3, 8, 8), _x(2, 7, seed=1), how=how, bns=bns)
    for bn, conv in [("blocks.a.1", "blocks.a.0"), ("blocks.a.2.1", "blocks.a.2.0"), ("blocks.b.1", "blocks.b.0"),
                     ("bn_fc", "fc")]:
        assert d[bn].is_folded and d[bn].producer == conv, res.report.to_dict()
    assert d["shared"].reason is Reason.SHARED_PRODUCER
    assert d["fan"].reason in (Reason.PRODUCER_FANOUT, Reason.NO_PRODUCER)
    if how == "module":
        assert d["blocks.unused"].reason is Reason.NOT_CALLED


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass whose own forward calls F.batch_norm then an act."""

    def __init__(self, c: int, act: bool = True) -> None:
        super().__init__(c)
        self.drop, self.act = nn.Identity(), (nn.ReLU() if act else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4  # fx cannot trace this
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch,
                         0.0 if self.momentum is None else self.momentum, self.eps)
        return self.act(self.drop(x))


class D2FrozenBatchNorm2d(nn.Module):
    """detectron2's FrozenBatchNorm2d: an explicit affine when x needs grad, F.batch_norm otherwise."""

    def __init__(self, c: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for k, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(k, torch.full((c,), v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps)


def test_timm_batchnorm_act_and_detectron2_frozen_bn() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1, bias=False),
                          BatchNormAct2d(4, act=False), nn.Conv2d(4, 5, 3, groups=1), D2FrozenBatchNorm2d(5, eps=1e-3))
    randomize_bn(model, 7)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        fb = model[5]
        fb.running_mean.copy_(torch.randn(5, generator=g) + 0.5)
        fb.running_var.copy_(torch.rand(5, generator=g) * 2.5 + 0.5)
        fb.weight.copy_(-(torch.rand(5, generator=g) * 1.5 + 0.5))
        fb.bias.copy_(torch.randn(5, generator=g))
    d, res = _fold_checked(model, _x(2, 3, 8, 8))
    assert d["1"].producer == "0" and d["3"].producer == "2", res.report.to_dict()
    assert d["5"].is_folded or d["5"].reason is Reason.UNSUPPORTED_BN_MODE


# BN kinds and modes ------------------------------------------------------------------------------

def test_bn_kinds_and_a_model_in_train_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.Conv2d(4, 6, 1, groups=2), nn.SyncBatchNorm(6, momentum=None), nn.ReLU(),
                          nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4, eps=0.1))
    randomize_bn(model, 9).train()
    x = _x(4, 3, 6, 6)
    snap = _snapshot(model)
    res = torch_pass.fold(model, example_inputs=(x,), providers=["cpu"])
    _untouched(model, snap)  # still in train(), statistics not updated by bnfold's own runs
    d = {v.bn: v for v in res.report.decisions}
    assert set(d) == _bn_paths(model) and "eval" in res.report.info["eval_mode"]
    assert d["4"].reason is Reason.NO_RUNNING_STATS and isinstance(res.model[4], nn.BatchNorm2d)
    assert all(d[k].is_folded for k in ("1", "6", "9")) and not res.model.training
    assert res.report.verification.passed is True
    _f64_close(copy.deepcopy(model).eval(), res.model, (x,))


class FunctionalNet(nn.Module):
    """F.conv2d / F.batch_norm written in forward, statistics held by a BN module and by plain buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.w, self.b = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3), nn.Parameter(torch.randn(6))
        self.register_buffer("rm", torch.randn(6) + 0.5)
        self.register_buffer("rv", torch.rand(6) * 2.5 + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training, 0.1, bn.eps)
        return F.batch_norm(F.conv2d(y, self.w, self.b, stride=2, groups=2), self.rm, self.rv, None, None, False, 0.0,
                            1e-3)


@pytest.mark.parametrize("how", ["module", "graph", "export"])
def test_functional_conv_and_batch_norm(how: str) -> None:
    model = randomize_bn(FunctionalNet(), 10)
    d, res = _fold_checked(model, _x(2, 3, 9, 9), how=how, bns={"bn", "rm"})  # "rm": the buffers' owner
    if how == "module":  # calls in the root model's own forward cannot be removed without changing its class
        assert {v.reason for v in d.values()} == {Reason.UNSUPPORTED_BN_MODE}, res.report.to_dict()
        # one level down they can: the submodule becomes a traced copy without the calls
        d, res = _fold_checked(nn.Sequential(model), _x(2, 3, 9, 9), how=how, bns={"0.bn", "0.rm"})
    assert len(res.report.folded) == 2 and not res.report.skipped, res.report.to_dict()


def test_weight_norm_parametrized_conv() -> None:
    torch.manual_seed(11)
    model = randomize_bn(nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4),
                                       nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)),
                                       nn.BatchNorm1d(3)), 11)
    d, _ = _fold_checked(model, _x(2, 3, 3, 3))
    assert all(v.is_folded or v.reason is Reason.NON_CONSTANT_PARAM for v in d.values())


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("how", ["module", "script"])
def test_padding_modes_both_directions(mode: str, how: str) -> None:
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode),
                                       nn.BatchNorm2d(4)), 12)
    d, _ = _fold_checked(model, _x(2, 3, 7, 7), how=how)
    assert d["2"].producer == "1" and d["2"].direction == "after"
    if mode == "zeros":
        assert d["0"].reason is Reason.PADDING_BREAKS_BACKWARD_FOLD
    else:  # the border copies input values, which the affine map commutes with
        assert d["0"].direction == "before"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_conv1d_linear_and_fp32_bn_in_a_half_model(dtype: torch.dtype) -> None:
    torch.manual_seed(13)
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 5),
                                       nn.BatchNorm1d(5)), 13).to(dtype)
    d, res = _fold_checked(model, _x(2, 3, 8).to(dtype))
    assert len(res.report.folded) == 2 and res.model[0].weight.dtype == dtype
    mixed = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 14).half()
    mixed[1].float()  # a common recipe: half model, BN kept in fp32
    d, res = _fold_checked(mixed, _x(2, 3, 6, 6).half())
    assert d["1"].is_folded and res.model[0].weight.dtype == torch.float16


def test_channels_last_model_folds() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 16, 3, groups=8, padding=1), nn.BatchNorm2d(16)), 15)
    model = model.to(memory_format=torch.channels_last)
    d, res = _fold_checked(model, _x(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert len(res.report.folded) == 2


def test_exported_program_two_inputs_dynamic_batch_dict_output() -> None:
    model = randomize_bn(Heads(), 16)
    x, v = _x(3, 3, 8, 8), _x(3, 7, seed=1)
    batch = torch.export.Dim("batch", min=2, max=8)
    ep = torch.export.export(model, (x, v), dynamic_shapes=({0: batch}, {0: batch}))
    res = torch_pass.fold(ep, providers=["cpu"])
    assert res.report.verification.passed is True and len(res.report.folded) == 4
    x5, v5 = _x(5, 3, 8, 8, seed=2), _x(5, 7, seed=3)
    _f64_close(model, res.model.module(), (x5, v5))


def test_wrapped_models_data_parallel_compiled_and_lazy() -> None:
    torch.manual_seed(17)
    inner = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(6, 5)), 17)
    x = _x(2, 3, 8, 8)
    d, _ = _fold_checked(nn.DataParallel(inner).eval(), x)
    assert d["module.1"].producer == "module.0"
    d, _ = _fold_checked(torch.compile(inner, backend="eager"), x)
    assert d["_orig_mod.1"].producer == "_orig_mod.0"
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(3), nn.LazyBatchNorm1d())
    lazy(x)  # materialise the lazy modules: they become Conv2d / BatchNorm2d / Linear / BatchNorm1d
    d, _ = _fold_checked(randomize_bn(lazy, 18), x)
    assert d["1"].producer == "0" and d["4"].producer == "3"


# Command line -------------------------------------------------------------------------------------

def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge_torch_cli")
    torch.manual_seed(19)
    model = randomize_bn(nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 4, 1),
                                       nn.BatchNorm1d(4, track_running_stats=False)), 19)
    torch.save(model, str(d / "whole.pt"))
    torch.jit.save(torch.jit.script(model), str(d / "s.ts"))
    return d, model


def test_cli_pickled_module_refused_without_trust_and_folded_with_it(pickled) -> None:
    d, model = pickled
    src = str(d / "whole.pt")
    code, out, err = _cli([src, "--input", "x:2x3x8"])
    assert code == 2 and "--trust" in err and src in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(str(d / "whole.folded.pt"))
    code, out, err = _cli(["export", src, "--to", "onnx", "--input", "x:2x3x8"])
    assert code == 2 and "--trust" in err and not os.path.exists(str(d / "whole.folded.onnx"))
    code, out, _ = _cli([src, "--trust", "--input", "x:2x3x8", "--dry-run", "--json"])
    assert code == 0 and json.loads(out)["verification"]["passed"] is True
    assert not os.path.exists(str(d / "whole.folded.pt"))
    code, out, _ = _cli([src, "--trust", "--input", "x:2x3x8", "--json"])
    doc = json.loads(out)
    assert code == 0 and [f["bn"] for f in doc["folded"]] == ["1"]
    assert [(s["bn"], s["reason"]) for s in doc["skipped"]] == [("4", "NO_RUNNING_STATS")]
    folded = torch_pass.load(str(d / "whole.folded.pt"), trust=True)
    _f64_close(model, folded, (_x(2, 3, 8),))


@pytest.mark.parametrize("src", ["whole.pt", "s.ts"])
def test_cli_export_to_onnx_keeps_only_the_skipped_bn(pickled, src) -> None:
    import numpy as np
    import onnx
    import onnxruntime as ort
    d, model = pickled
    out = str(d / (src + ".onnx"))
    code, text, err = _cli(["export", str(d / src), "--to", "onnx", "--trust", "--input", "x:2x3x8", "-o", out, "--json"])
    doc = json.loads(text)
    assert code == 0 and doc["verification"]["passed"] is True, err
    proto = onnx.load(out)
    # TorchScript code is not edited: its folded BN stays as an identity BatchNormalization
    assert sum(n.op_type == "BatchNormalization" for n in proto.graph.node) == (2 if src == "s.ts" else 1)
    x = _x(2, 3, 8, seed=5)
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
