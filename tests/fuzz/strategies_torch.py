"""Hypothesis strategies: random PyTorch models built the way real code writes them, each BN labelled
"fold" or "keep" by construction (bnfold's documented rules), so a test can check every BN.

A model is a stem conv, a few blocks and a head. Every block starts from an activation of its input, so
no fold can reach across blocks and each label is exact. Blocks:

  conv_bn     Conv/ConvTranspose (nd 1-3, groups incl. depthwise with a multiplier, dilation, stride,
              output_padding, padding modes, bias or not) -> BN in a Sequential              fold
  bn_act      Conv -> a BN + activation module whose own forward calls F.batch_norm, then more
              (timm's BatchNormAct2d, a BatchNorm subclass like it for 1-D/3-D, or a plain module
              with buffers)                                                                   fold
  reads       Conv -> forward reads .shape/.size()/.dim()/.ndim/.numel() -> BN                 fold
  residual    BN(Conv(x)) + x                                                                 fold
  bn_conv     BN -> Conv with no zero padding (pad 0, or a reflect/replicate/circular mode)   fold (before)
  bn_pad      BN -> Conv that pads with zeros, or a ConvTranspose                               keep
  fanout      the conv output also feeds an addition                                          keep
  shared      one conv module called twice, a BN after each call                              keep
  tokens      (N,C,*S) -> (N,S,C) -> Linear on the 3-D tokens -> transpose/flatten -> BN1d    fold
  tokens_axis Linear on 3-D tokens -> BN1d over the token axis                                keep
  no_stats    Conv -> BN(track_running_stats=False)                                           keep
Heads: pool -> flatten -> Linear -> BN1d (fold), or -> BN1d -> Linear (fold, before).
The whole model may be float64, and its root forward may force torch.export or the module hooks.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

ACTS = [nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Hardswish]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
MAX_SPATIAL = {1: 14, 2: 9, 3: 6}


try:  # the real thing where timm is installed (the test extra installs it)
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover
    BatchNormAct2d = None


class BatchNormAct(nn.modules.batchnorm._BatchNorm):
    """timm's BatchNormAct2d in kind, for 1-D and 3-D (timm has only 2-D), or where timm is missing: a
    BatchNorm subclass whose forward calls F.batch_norm, then act."""

    def __init__(self, c: int, act: type[nn.Module], nd: int) -> None:
        super().__init__(c)
        self.nd, self.act, self.drop = nd, act(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == self.nd + 2, f"expected {self.nd + 2}-D input")
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch,
                         0.0 if self.momentum is None else self.momentum, self.eps)
        return self.act(self.drop(x))


def batch_norm_act(c: int, act: type[nn.Module], nd: int) -> nn.Module:
    """timm's own BatchNormAct2d (activation in place, as timm builds it) for 2-D inputs; BatchNormAct
    for the other ranks, or where timm is missing."""
    if nd == 2 and BatchNormAct2d is not None:
        return BatchNormAct2d(c, act_layer=act)
    return BatchNormAct(c, act, nd)


class NormAct(nn.Module):
    """A user's BN + activation block: its own buffers, F.batch_norm, then an activation and a scale."""

    def __init__(self, c: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-3)
        return self.act(y) * 1.5


class Block(nn.Module):
    """One block of the kinds in the module docstring; `kind` picks the forward."""

    def __init__(self, kind: str, act: type[nn.Module], **mods: Any) -> None:
        super().__init__()
        self.kind, self.act = kind, act()
        for k, v in mods.items():
            setattr(self, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x)
        k = self.kind
        if k in ("conv_bn", "bn_act", "no_stats"):
            return self.body(x)
        if k == "reads":
            y = self.conv(x)
            n, c = y.shape[0], y.size(1)
            torch._assert(y.dim() == x.ndim, "rank")
            torch._assert(y.numel() % (n * c) == 0, "size")
            return self.bn(y).reshape(y.shape).view_as(y)
        if k == "residual":
            return self.bn(self.conv(x)) + x
        if k in ("bn_conv", "bn_pad"):
            return self.conv(self.bn(x))
        if k == "fanout":
            y = self.conv(x)
            return self.bn(y) + y
        if k == "shared":
            return self.bn(self.conv(x)) + self.bn2(self.conv(x.flip(-1)))
        t = x.flatten(2).transpose(1, 2)  # (N, S, C)
        u = self.lin(t)  # (N, S, D): features last
        if k == "tokens_axis":
            return self.bn(u).transpose(1, 2).unflatten(2, x.shape[2:])
        if self.how == "flatten":
            v = self.bn(u.flatten(0, 1)).reshape_as(u).transpose(1, 2)
        else:
            v = self.bn(u.transpose(1, 2))
        return v.unflatten(2, x.shape[2:])  # (N, D, *S)


class Net(nn.Module):
    """stem -> blocks -> head; `force` makes fx (and maybe torch.export) fail on the root forward."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, force: str) -> None:
        super().__init__()
        self.stem, self.blocks, self.head, self.force = stem, nn.Sequential(*blocks), head, force

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force == "export" and x.shape[-1] > 0:
            x = x * 1.0
        if self.force == "hooks" and x.sum() > -1e30:
            x = x * 1.0
        return self.head(self.blocks(self.stem(x)))


class Head(nn.Module):
    def __init__(self, nd: int, fc: nn.Linear, bn: nn.BatchNorm1d, bn_first: bool) -> None:
        super().__init__()
        self.nd, self.fc, self.bn, self.bn_first = nd, fc, bn, bn_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=tuple(range(2, 2 + self.nd))).flatten(1)
        return self.fc(self.bn(x)) if self.bn_first else self.bn(self.fc(x))


def _out_size(s: int, k: int, st_: int, p: int, d: int, transposed: bool, op: int) -> int:
    if transposed:
        return (s - 1) * st_ - 2 * p + d * (k - 1) + op + 1
    return (s + 2 * p - d * (k - 1) - 1) // st_ + 1


@st.composite
def conv_layer(draw: Any, nd: int, cin: int, s: int, *, transposed: bool | None = None,
               zero_pad: bool | None = None) -> tuple[nn.Module, int, int]:
    """A conv of `nd` dims reading `cin` channels of spatial size `s`: (conv, cout, output size)."""
    if transposed is None:
        transposed = draw(st.booleans()) if s <= MAX_SPATIAL[nd] - 2 else False
    g = draw(st.sampled_from([g for g in (1, 2, cin) if cin % g == 0]))
    cout = g * draw(st.integers(1, 3)) if g > 1 else draw(st.integers(2, 6))
    k = draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([1, 2])) if k == 3 else 1
    stride = draw(st.sampled_from([1, 2])) if s >= 5 else 1
    bias = draw(st.booleans())
    if transposed:
        p = draw(st.integers(0, d * (k - 1) // 2))
        op = draw(st.integers(0, max(stride, d) - 1))
        out = _out_size(s, k, stride, p, d, True, op)
        if out > MAX_SPATIAL[nd] or out < 2:
            stride, p, op, d, k = 1, 0, 0, 1, 1
            out = s
        return CONVT[nd](cin, cout, k, stride, p, op, groups=g, bias=bias, dilation=d), cout, out
    modes = ["zeros", "reflect", "replicate", "circular"]
    if zero_pad is None:
        p, mode = draw(st.integers(0, 2)), draw(st.sampled_from(modes))
    elif zero_pad:
        p, mode = draw(st.integers(1, 2)), "zeros"
    else:  # no zero ever reaches the kernel: no padding, or padding by copies of the input
        p = draw(st.integers(0, 2))
        mode = draw(st.sampled_from(modes[1:] if p else modes))
    if mode == "reflect":
        p = min(p, s - 1)
    out = _out_size(s, k, stride, p, d, False, 0)
    if out < 2:
        k, d, stride = 1, 1, 1
        out = _out_size(s, k, stride, p, d, False, 0)
    return CONV[nd](cin, cout, k, stride, p, dilation=d, groups=g, bias=bias, padding_mode=mode), cout, out


@st.composite
def block(draw: Any, nd: int, c: int, s: int) -> tuple[Block, dict[str, str], int, int]:
    """A block on (c, s): (block, {bn attribute path in the block: fold|keep}, channels, size out)."""
    kind = draw(st.sampled_from(["conv_bn", "bn_act", "reads", "residual", "bn_conv", "bn_pad", "fanout",
                                 "shared", "tokens", "tokens_axis", "no_stats"]))
    act = draw(st.sampled_from(ACTS))
    if kind in ("conv_bn", "reads", "fanout", "residual", "bn_act", "no_stats"):
        conv, cout, out = draw(conv_layer(nd, c, s, transposed=False if kind == "residual" else None))
        if kind == "residual" and (cout != c or out != s):
            conv, cout, out = CONV[nd](c, c, 3, 1, 1, padding_mode=draw(st.sampled_from(["zeros", "circular"]))), c, s
        if kind == "conv_bn":
            return Block(kind, act, body=nn.Sequential(conv, BN[nd](cout))), {"body.1": "fold"}, cout, out
        if kind == "no_stats":
            body = nn.Sequential(conv, BN[nd](cout, track_running_stats=False))
            return Block(kind, act, body=body), {"body.1": "keep"}, cout, out
        if kind == "bn_act":
            norm = batch_norm_act(cout, draw(st.sampled_from(ACTS)), nd) if draw(st.booleans()) else NormAct(
                cout, draw(st.sampled_from(ACTS)))
            return Block(kind, act, body=nn.Sequential(conv, norm)), {"body.1": "fold"}, cout, out
        label = "keep" if kind == "fanout" else "fold"
        return Block(kind, act, conv=conv, bn=BN[nd](cout)), {"bn": label}, cout, out
    if kind in ("bn_conv", "bn_pad"):
        pad = kind == "bn_pad" and draw(st.booleans())
        conv, cout, out = draw(conv_layer(nd, c, s, transposed=kind == "bn_pad" and not pad,
                                          zero_pad=pad if kind == "bn_pad" else False))
        return Block(kind, act, bn=BN[nd](c), conv=conv), {"bn": "fold" if kind == "bn_conv" else "keep"}, cout, out
    if kind == "shared":
        conv = CONV[nd](c, c, 3, 1, 1, bias=draw(st.booleans()))
        return Block(kind, act, conv=conv, bn=BN[nd](c), bn2=BN[nd](c)), {"bn": "keep", "bn2": "keep"}, c, s
    d = draw(st.integers(2, 6))
    tokens = s ** nd
    b = Block(kind, act, lin=nn.Linear(c, d, bias=draw(st.booleans())),
              bn=nn.BatchNorm1d(tokens if kind == "tokens_axis" else d))
    b.how = draw(st.sampled_from(["transpose", "flatten"]))
    if kind == "tokens_axis":
        return b, {"bn": "keep"}, d, s
    return b, {"bn": "fold"}, d, s


@st.composite
def models(draw: Any) -> tuple[nn.Module, torch.Tensor, dict[str, str], dict[str, Any]]:
    """(model in eval(), input, {BN name as bnfold reports it: fold|keep}, facts for statistics)."""
    nd = draw(st.sampled_from([2, 2, 1, 3]))
    s0 = draw(st.integers(4, MAX_SPATIAL[nd] - 2))
    cin = draw(st.integers(1, 4))
    stem, c, s = draw(conv_layer(nd, cin, s0, transposed=False))
    blocks, labels = [], {}
    for i in range(draw(st.integers(1, 3))):
        b, lab, c, s = draw(block(nd, c, s))
        blocks.append(b)
        labels.update({f"blocks.{i}.{k}": v for k, v in lab.items()})
    bn_first = draw(st.booleans())
    dout = draw(st.integers(2, 5))
    head = Head(nd, nn.Linear(c, dout), nn.BatchNorm1d(c if bn_first else dout), bn_first)
    labels["head.bn"] = "fold"
    force = draw(st.sampled_from(["fx"] * 6 + ["hooks"] * 3 + ["export"]))
    model = Net(stem, blocks, head, force)
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2 ** 16))
    model = randomize(model, seed).to(dtype).eval()
    x = torch.randn((2, cin) + (s0,) * nd, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64).to(dtype)
    facts = {"nd": nd, "dtype": str(dtype).removeprefix("torch."), "capture": force,
             "kinds": [b.kind for b in blocks]}
    return model, x, labels, facts


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Weights and BN statistics far from the defaults (mean != 0, var != 1, gamma with random sign,
    beta != 0), for every BN kind here (torch BNs, timm's BatchNormAct2d, BatchNormAct, NormAct)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            rm = getattr(m, "running_mean", None)
            if isinstance(rm, torch.Tensor):
                c = rm.numel()
                rm.copy_(torch.randn(c, generator=g) * 0.8 + 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2.5 + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, NormAct)) and getattr(m, "weight", None) is not None:
                c = m.weight.numel()
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(c, generator=g) * 1.5 + 0.5))
                m.bias.copy_(torch.randn(c, generator=g))
    return model
