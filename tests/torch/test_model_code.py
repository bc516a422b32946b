"""Model code as real libraries write it, in every capture (fx, torch.export, module hooks, and the model
given as a GraphModule or an ExportedProgram): metadata reads are not uses, layout ops between a layer
and its BN are looked through where the channel axis provably survives, a BN module whose own forward
calls F.batch_norm and then does more leaves no batch_norm call, tracing never leaks into the result,
0-dim parameters verify, and failed captures stay quiet. "Gone" is counted at run time (bn_calls)."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bnfold.core.decisions import Reason
from tests.helpers.frameworks import torch_pass
from tests.helpers.torch_threads import one_thread  # noqa: F401 (autouse: runs this module single-threaded)
from tests.helpers.zoo_torch import randomize_bn
from tests.torch.bn_calls import census
from tests.torch.test_edge import _fold_checked, _run, _x

# how the model reaches bnfold: "fx"/"export"/"hooks" force that capture of a plain nn.Module (see
# Forced); "graph" and "program" hand over a GraphModule / ExportedProgram
CAPTURES = ["fx", "export", "hooks", "graph", "program"]


class Forced(nn.Module):
    """`inner`, behind control flow that leaves bnfold one capture: a branch on a shape stops fx but not
    torch.export; a branch on values stops both, leaving the module hooks."""

    def __init__(self, inner: nn.Module, how: str) -> None:
        super().__init__()
        self.inner, self.how = inner, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "export" and x.shape[0] > 0:
            return self.inner(x)
        if self.how == "hooks" and x.sum() > -1e30:
            return self.inner(x)
        return self.inner(x)


def _fold(inner: nn.Module, x: torch.Tensor, how: str, bns: set[str] | None = None):
    """Fold `inner` reached the way `how` says; returns ({bn: decision}, result, what runs the folded model)."""
    inner = randomize_bn(inner, 5).eval()
    if how in ("graph", "program"):
        d, res = _fold_checked(inner, x, how={"graph": "graph", "program": "export"}[how], bns=bns)
        return d, res, res.model.module() if how == "program" else res.model
    model = Forced(inner, how).eval()
    prefixed = None if bns is None else {f"inner.{b}" if b else "inner" for b in bns}
    d, res = _fold_checked(model, x, bns=prefixed)
    assert res.report.info["capture"] == {"fx": "fx", "export": "export", "hooks": "module-hooks"}[how]
    return {k.removeprefix("inner.") if k != "inner" else "": v for k, v in d.items()}, res, res.model


def _producer(d) -> str | None:
    """The layer a BN folded into, named relative to the model handed to bnfold."""
    return d.producer.removeprefix("inner.") if d.producer else None


def _gone(folded: nn.Module, x: torch.Tensor, names: set[str], how: str) -> None:
    """None of the BNs `names` runs in `folded` (names are relative to the model handed to bnfold)."""
    left = set(census(folded, x).counts)
    pre = "inner." if how in ("fx", "export", "hooks") else ""
    assert not {pre + n for n in names} & left, left


# Metadata reads ----------------------------------------------------------------------------------

class ReadsMetadata(nn.Module):
    """Every way model code looks at a conv output without reading its values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        n, c, h, w = y.shape
        torch._assert(y.dim() == 4, "4-D")
        torch._assert(y.ndim == 4, "4-D")
        torch._assert(y.size(1) == c, "channels")
        torch._assert(y.numel() == n * c * h * w, "size")
        pad = y.new_zeros(1).to(y.dtype) + torch.zeros_like(y).sum() + y.size()[-1] * 0
        z = F.relu(self.bn(y)) + pad
        u = self.conv2(z)
        return self.bn2(u).reshape_as(u).view_as(u) * (u.shape[1] / u.size(1))


@pytest.mark.parametrize("how", CAPTURES)
def test_metadata_reads_are_not_uses(how: str) -> None:
    x = _x(2, 3, 6, 6)
    d, res, folded = _fold(ReadsMetadata(), x, how)
    assert _producer(d["bn"]) == "conv" and _producer(d["bn2"]) == "conv2", res.report.to_dict()
    _gone(folded, x, {"bn", "bn2"}, how)


def test_a_value_read_still_counts() -> None:
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) * y.mean()  # y's values, not its shape

    d, _ = _fold_checked(randomize_bn(Reads(), 3), _x(2, 3, 6, 6))
    assert d["bn"].reason is Reason.PRODUCER_FANOUT


# Layout ops between the layer and the BN ------------------------------------------------------------

class LayoutBN(nn.Module):
    """Linear/Conv -> layout op(s) -> BatchNorm1d, as LeViT and friends write it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin, self.conv = nn.Linear(8, 6), nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm1d(2 if kind == "split" else 5 if kind == "direct" else 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "conv-flatten":  # (N, C, H, W) -> (N, C, HW): channels stay on axis 1
            y = self.conv(x[:, :75].reshape(x.shape[0], 3, 5, 5))
            return self.bn(y.flatten(2)).sum(-1)
        y = self.lin(x[:, :40].reshape(x.shape[0], 5, 8))  # (N, 5, 6): features last
        if k == "flatten":
            return self.bn(y.flatten(0, 1)).reshape_as(y)
        if k == "view":
            return self.bn(y.contiguous().view(-1, 6)).view(y.shape)
        if k == "transpose":
            return self.bn(y.transpose(1, 2)).transpose(1, 2)
        if k == "permute":
            return self.bn(y.permute(0, 2, 1).contiguous())
        if k == "direct":  # BatchNorm1d(5) normalises the 5 tokens, not the Linear's 6 features
            return self.bn(y)
        if k == "split":  # the 6 features split into 2 x 3: no channel of the BN is one feature
            return self.bn(y.reshape(-1, 2, 3))
        f = y.flatten(0, 1)  # "fanout": the flattened output is also read elsewhere
        return self.bn(f) + f


@pytest.mark.parametrize("how", CAPTURES)
@pytest.mark.parametrize("kind", ["flatten", "view", "transpose", "permute", "conv-flatten"])
def test_layer_layout_bn_folds(kind: str, how: str) -> None:
    x = _x(2, 80)
    d, res, folded = _fold(LayoutBN(kind), x, how, bns={"bn"})
    assert d["bn"].is_folded and _producer(d["bn"]) in ("lin", "conv"), res.report.to_dict()
    _gone(folded, x, {"bn"}, how)


@pytest.mark.parametrize("how", ["fx", "export", "hooks"])
@pytest.mark.parametrize("kind,reason", [("direct", Reason.AXIS_MISMATCH), ("split", Reason.AXIS_MISMATCH),
                                         ("fanout", Reason.PRODUCER_FANOUT)])
def test_layer_layout_bn_that_must_stay(kind: str, reason: Reason, how: str) -> None:
    x = _x(2, 80)
    d, res, _ = _fold(LayoutBN(kind), x, how, bns={"bn"})
    assert d["bn"].reason is reason, res.report.to_dict()


# BN modules whose own forward calls F.batch_norm -------------------------------------------------

class BNAct(nn.Module):
    """A BN + activation block as users write one: statistics as buffers, F.batch_norm, then more."""

    def __init__(self, c: int, branchy: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.act, self.branchy = nn.SiLU(), branchy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected 4-D")
        if self.branchy and x.shape[-1] > 1000:  # fx cannot trace this module, even alone
            x = x * 0.5
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-3)
        return self.act(x) * 2


class TwoCalls(nn.Module):
    """One module, two convs and two batch_norm calls in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2)
        for k in ("m1", "m2"):
            self.register_buffer(k, torch.randn(4))
        for k in ("v1", "v2"):
            self.register_buffer(k, torch.rand(4) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.batch_norm(self.c1(x), self.m1, self.v1, None, None, False, 0.0, 1e-5))
        return F.batch_norm(self.c2(y), self.m2, self.v2, None, None, False, 0.0, 1e-5) + x


def _stats(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.named_buffers():
            if "mean" in name or name.startswith("m"):
                t.copy_(torch.randn(t.shape, generator=g) + 0.5)
            elif "var" in name or name.startswith("v"):
                t.copy_(torch.rand(t.shape, generator=g) * 2.5 + 0.5)
        for name, p in m.named_parameters():
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(-(torch.rand(p.shape, generator=g) * 1.5 + 0.5))
            elif name.endswith("bias") and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("how", CAPTURES)
def test_bn_act_modules_leave_no_batch_norm_call(how: str) -> None:
    from timm.layers import BatchNormAct2d
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.Conv2d(4, 4, 1, bias=False),
                          _stats(BNAct(4), 1), TwoCalls())
    _stats(inner[4], 2)
    x = _x(2, 3, 7, 7)
    d, res, folded = _fold(inner, x, how, bns={"1", "3", "4.m1", "4.m2"})
    assert all(v.is_folded for v in d.values()), res.report.to_dict()
    assert len(res.report.folded) == 4 and _producer(d["1"]) == "0" and _producer(d["3"]) == "2"
    assert not census(folded, x).calls
    if how in ("fx", "export", "hooks"):
        kept = folded.inner
        assert type(folded) is Forced and type(kept) is nn.Sequential
        assert isinstance(kept[1], torch.fx.GraphModule) and isinstance(kept[1].act, nn.ReLU)
        assert "traced copy" in d["1"].extra["note"]
        buf = io.BytesIO()  # the rewritten modules pickle and copy like any module
        torch.save(folded, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=False)
        assert torch.equal(back(x), folded(x)) and torch.equal(copy.deepcopy(folded)(x), folded(x))


@pytest.mark.parametrize("how", ["export", "hooks"])
def test_bn_act_module_fx_cannot_trace_is_kept_honestly(how: str) -> None:
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), _stats(BNAct(4, branchy=True), 3))
    x = _x(2, 3, 6, 6)
    d, res, folded = _fold(inner, x, how, bns={"1"})
    assert d["1"].reason is Reason.UNSUPPORTED_BN_MODE and "trace" in d["1"].detail, res.report.to_dict()
    assert census(folded, x).counts == {"inner.1": 1}


class TraceSensitive(BNAct):
    """Computes something else when traced: fx hands forward a Proxy, which is no Tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x * 0.5
        return super().forward(x)


@pytest.mark.parametrize("how", ["fx", "hooks"])
def test_bn_act_module_whose_traced_copy_differs_is_kept(how: str) -> None:
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), _stats(TraceSensitive(4), 5))
    x = _x(2, 3, 6, 6)
    d, res, folded = _fold(inner, x, how, bns={"1"})
    assert type(folded.inner[1]) is TraceSensitive and census(folded, x).counts == {"inner.1": 1}
    if how == "fx":  # the trace misses the multiplication: only running the traced copy shows it
        assert d["1"].reason is Reason.UNSUPPORTED_BN_MODE and "something else" in d["1"].detail, d["1"]
    else:  # the hooks see the real code: a multiplication between the conv and the BN
        assert d["1"].reason is Reason.UNSUPPORTED_PRODUCER, d["1"]


def test_bn_act_module_with_hooks_is_kept() -> None:
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), _stats(BNAct(4), 4))
    seen = []
    inner[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    d, res, folded = _fold(inner, _x(2, 3, 6, 6), "fx", bns={"1"})
    assert d["1"].reason is Reason.UNSUPPORTED_BN_MODE and "hooks" in d["1"].detail
    seen.clear()
    folded(_x(2, 3, 6, 6))
    assert seen, "the user's hook must still run"


# Tracing never leaks into the result -------------------------------------------------------------

class CachesOnSelf(nn.Module):
    """Stores a tensor computed in forward on the module, as LeViT's attention_bias_cache does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.cache: dict[str, torch.Tensor] = {}
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.scale.reshape(1, -1, 1, 1) * 2
        y = self.bn(self.conv(x)) * self.cache[key]
        self.last = y
        return y


def _foreign(obj, depth: int = 0) -> list[str]:
    if depth > 4:
        return []
    if isinstance(obj, torch.fx.Proxy) or type(obj).__name__ in ("FakeTensor", "FunctionalTensor"):
        return [type(obj).__name__]
    if isinstance(obj, dict):
        return [f for v in obj.values() for f in _foreign(v, depth + 1)]
    if isinstance(obj, (list, tuple)):
        return [f for v in obj for f in _foreign(v, depth + 1)]
    return []


@pytest.mark.parametrize("how", ["fx", "export"])
def test_traced_values_never_stay_in_the_model(how: str) -> None:
    x = _x(2, 3, 6, 6)
    model = randomize_bn(CachesOnSelf(), 6).eval()
    before = _foreign([vars(m) for m in model.modules()])
    d, res, folded = _fold(model, x, how, bns={"bn"})
    assert d["bn"].is_folded
    assert not before and not _foreign([vars(m) for m in folded.modules()])
    assert not _foreign([vars(m) for m in model.modules()]), "the input model got traced values"
    folded.to(torch.float64)  # walking the module tree works (a leaked Proxy broke .to() and deepcopy)


# Parameters and buffers of every shape verify ----------------------------------------------------

class ReZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.alpha = nn.Parameter(torch.tensor(0.25))
        self.register_buffer("temperature", torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1, keepdim=True) + self.alpha * self.bn(self.conv(x)) / self.temperature


@pytest.mark.parametrize("how", ["fx", "hooks"])
def test_zero_dim_parameters_and_buffers_verify(how: str) -> None:
    d, res, _ = _fold(ReZero(), _x(2, 3, 6, 6), how)
    assert d["bn"].is_folded and res.report.verification.passed is True


# Quiet -------------------------------------------------------------------------------------------

def test_failed_captures_print_nothing_and_are_reported_one_line_each(capfd) -> None:
    x = _x(2, 3, 6, 6)
    res = torch_pass.fold(Forced(randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 7), "hooks"),
                          example_inputs=(x,), providers=["cpu"])
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out[:300], err[:300])
    falls = res.report.info["capture_fallbacks"]
    assert [f.split(":")[0] for f in falls] == ["fx", "export"]
    assert all("\n" not in f and len(f) <= 400 for f in falls)


def test_keyword_program_verifies_without_future_warnings() -> None:
    from tests.torch.test_edge_fixes import KwargNet
    model = randomize_bn(KwargNet(), 8)
    ep = torch.export.export(model, (_x(2, 3, 6, 6),), kwargs={"shift": _x(1, seed=1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        res = torch_pass.fold(ep, providers=["cpu"])
    assert res.report.folded and res.report.verification.passed is True


# A bias-free conv subclass with its own forward ----------------------------------------------------

class PadConv(nn.Conv2d):
    """timm's Conv2dSame in spirit: pads by hand, then F.conv2d with the module's own bias."""

    def __init__(self, cin: int, cout: int, uses_bias: bool = True) -> None:
        super().__init__(cin, cout, 3, stride=2, bias=False)
        self.uses_bias = uses_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = max(0, (x.shape[-1] + 1) // 2 * 2 - x.shape[-1] + 1)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return F.conv2d(x, self.weight, self.bias if self.uses_bias else None, self.stride, 0)


@pytest.mark.parametrize("uses_bias", [True, False])
def test_bias_free_conv_subclass_gets_a_bias_only_if_its_forward_adds_it(uses_bias: bool) -> None:
    inner = nn.Sequential(PadConv(3, 4, uses_bias), nn.BatchNorm2d(4))
    x = _x(2, 3, 7, 7)
    d, res, folded = _fold(inner, x, "export", bns={"1"})
    if uses_bias:
        assert _producer(d["1"]) == "0" and folded.inner[0].bias is not None
        _gone(folded, x, {"1"}, "export")
    else:
        assert d["1"].reason is Reason.UNSUPPORTED_PRODUCER, res.report.to_dict()


def test_program_capture_runs_match() -> None:
    """The same model handed over as an ExportedProgram folds the same BNs as the module itself."""
    x = _x(2, 3, 7, 7)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), _stats(BNAct(4), 9))
    res, _ = _run(randomize_bn(copy.deepcopy(inner), 9), (x,), "export")
    assert [f.bn for f in res.report.folded] == ["1"]
