"""Tiny hand-written PyTorch models of the torchvision/timm kind, for fold and export tests.

torchvision is not installable here, so each family is rebuilt by hand with the features that make
BN folding hard: grouped/depthwise convs, SE blocks, pre-activation BN, concatenation, channel
shuffle, transposed convs and Linear -> BatchNorm1d. All take a (N, 3, 32, 32) input except the MLP
(N, 16). `randomize_bn` moves BN statistics far from defaults, since default BN is an identity that
hides layout bugs; `set_random_bn` does the same with `tests.conftest.random_bn`'s draws.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.conftest import random_bn


def cbr(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act: type[nn.Module] | None = nn.ReLU,
        bias: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=bias), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ResNet ------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + idt)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + idt)


class ResNet(nn.Module):
    def __init__(self, bottleneck: bool = False, groups: int = 1, widths: tuple[int, ...] = (8, 16, 32),
                 blocks: tuple[int, ...] = (1, 1, 1), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if bottleneck:
                    cout = w * 2
                    layers.append(Bottleneck(cin, w, cout, stride, groups))
                else:
                    cout = w
                    layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# MobileNet / EfficientNet ------------------------------------------------------------------------

class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4, gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(c // r, 4), 1)
        self.fc2 = nn.Conv2d(max(c // r, 4), c, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3,
                 act: type[nn.Module] = nn.ReLU6, se: bool = False, se_gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(cbr(cin, mid, 1, act=act))
        layers.append(cbr(mid, mid, k, stride, g=mid, act=act))
        if se:
            layers.append(SqueezeExcite(mid, gate=se_gate))
        layers += [nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNet(nn.Module):
    """v2: ReLU6, no SE. v3: hardswish, SE with hardsigmoid. EfficientNet-ish: SiLU, SE, k=5."""

    def __init__(self, version: str = "v2", num_classes: int = 10) -> None:
        super().__init__()
        act = {"v2": nn.ReLU6, "v3": nn.Hardswish, "eff": nn.SiLU}[version]
        se = version != "v2"
        gate = nn.Hardsigmoid if version == "v3" else nn.Sigmoid
        k = 5 if version == "eff" else 3
        self.stem = cbr(3, 8, 3, 2, act=act)
        cfg = [(8, 8, 1, 1), (8, 12, 2, 4), (12, 12, 1, 4), (12, 16, 2, 4)]
        self.blocks = nn.Sequential(*[InvertedResidual(a, b, s, e, k, act, se, gate) for a, b, s, e in cfg])
        self.head = cbr(16, 32, 1, act=act)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


# DenseNet (pre-activation: BN -> ReLU -> Conv, concatenation) -------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 12, 3, 1, 1, bias=False)
        self.norm0 = nn.BatchNorm2d(12)
        c = 12
        layers: list[nn.Module] = []
        for stage in range(2):
            for _ in range(2):
                layers.append(DenseLayer(c, growth))
                c += growth
            if stage == 0:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*layers)
        self.norm5 = nn.BatchNorm2d(c)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm0(self.conv0(x)))
        x = F.relu(self.norm5(self.features(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ShuffleNetV2 ------------------------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(cbr(cin, cin, 3, stride, g=cin, act=None), cbr(cin, half, 1))
        else:
            self.branch1 = nn.Identity()
        bin_ = cin if stride > 1 else half
        self.branch2 = nn.Sequential(cbr(bin_, half, 1), cbr(half, half, 3, stride, g=half, act=None),
                                     cbr(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.branch2(b)), 1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = cbr(3, 8, 3, 2)
        self.stages = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1), ShuffleUnit(16, 32, 2))
        self.conv5 = cbr(32, 32, 1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


# RegNet (grouped bottlenecks with SE) ------------------------------------------------------------

class RegNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = cbr(3, 8, 3, 2)
        blocks: list[nn.Module] = []
        cin = 8
        for w, s in ((16, 2), (32, 2)):
            blocks.append(_RegBlock(cin, w, s, group_width=8))
            cin = w
        self.trunk = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(self.stem(x)).mean((2, 3)))


class _RegBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, group_width: int) -> None:
        super().__init__()
        self.a = cbr(cin, cout, 1)
        self.b = cbr(cout, cout, 3, stride, g=cout // group_width)
        self.se = SqueezeExcite(cout)
        self.c = cbr(cout, cout, 1, act=None)
        self.proj = cbr(cin, cout, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.proj(x) + self.c(self.se(self.b(self.a(x)))))


# GoogLeNet / Inception ---------------------------------------------------------------------------

class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pp: int) -> None:
        super().__init__()
        self.branch1 = cbr(cin, c1, 1)
        self.branch2 = nn.Sequential(cbr(cin, c3r, 1), cbr(c3r, c3, 3))
        self.branch3 = nn.Sequential(cbr(cin, c5r, 1), cbr(c5r, c5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, pp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = cbr(3, 8, 3, 2)
        self.inc3a = Inception(8, 4, 4, 8, 2, 4, 4)
        self.inc3b = Inception(20, 8, 8, 12, 2, 4, 4)
        self.fc = nn.Linear(28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc3b(F.max_pool2d(self.inc3a(self.conv1(x)), 2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# VGG-BN ------------------------------------------------------------------------------------------

class VGGBN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        cfg: list[int | str] = [8, "M", 16, "M", 32, 32, "M"]
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * 16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# Decoder with grouped / depthwise ConvTranspose2d -> BN ------------------------------------------

class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = cbr(3, 8, 3, 2)
        self.up1 = nn.ConvTranspose2d(8, 12, 4, 2, 1, groups=2, bias=True)
        self.bn1 = nn.BatchNorm2d(12)
        # depthwise with channel multiplier 2, odd output_padding and dilation
        self.up2 = nn.ConvTranspose2d(12, 24, 3, 2, 1, output_padding=1, groups=12, bias=False, dilation=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.up3 = nn.ConvTranspose2d(24, 24, 3, 1, 2, groups=24, dilation=2)
        self.bn3 = nn.BatchNorm2d(24)
        self.out = nn.Conv2d(24, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.up1(self.enc(x))))
        x = F.relu(self.bn2(self.up2(x)))
        x = self.bn3(self.up3(x))
        return self.out(x)


# MLP with Linear -> BatchNorm1d ------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(),
                                 nn.Linear(32, 24, bias=False), nn.BatchNorm1d(24), nn.GELU(),
                                 nn.Linear(24, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet_basic": lambda: ResNet(bottleneck=False),
    "resnet_bottleneck": lambda: ResNet(bottleneck=True, widths=(8, 8, 16)),
    "resnext": lambda: ResNet(bottleneck=True, groups=4, widths=(8, 16, 16)),
    "mobilenet_v2": lambda: MobileNet("v2"),
    "mobilenet_v3": lambda: MobileNet("v3"),
    "efficientnet": lambda: MobileNet("eff"),
    "densenet": DenseNet,
    "shufflenet_v2": ShuffleNetV2,
    "regnet": RegNet,
    "googlenet": GoogLeNet,
    "vgg_bn": VGGBN,
    "decoder": Decoder,
    "mlp": MLP,
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {name: (2, 3, 32, 32) for name in ZOO}
INPUT_SHAPES["mlp"] = (4, 16)


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    """A seeded random float32 input of the shape the zoo model `name` takes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(INPUT_SHAPES[name], generator=g)


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN random statistics far from the defaults (in place), put the model in eval()."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._NormBase):
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(c, generator=g) + 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2.5 + 0.5)
            if m.weight is not None:
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_(sign * (torch.rand(c, generator=g) * 1.5 + 0.5))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def set_random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN (in module order) the statistics `tests.conftest.random_bn` draws from
    np.random.default_rng(seed), the same draws the ONNX and Keras builders use; put the model in eval().
    A BN without affine parameters or running statistics keeps its None (its draws are still taken)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                st = random_bn(rng, m.num_features)
                for name, key in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "mean"),
                                  ("running_var", "var")):
                    if getattr(m, name) is not None:
                        getattr(m, name).copy_(torch.tensor(st[key]))
    return model.eval()


def build(name: str, seed: int = 0) -> nn.Module:
    """ZOO[name] with seeded weights and randomized BN, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(ZOO[name](), seed)


def export_onnx(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """Export with every BN kept as BatchNormalization(training_mode=0): the TorchScript-based exporter
    with constant folding off (on, it fuses Conv+BN itself; the default dynamo exporter's optimizer
    does too unless optimize=False). It is also ~4x faster than dynamo=True for these tiny models."""
    import contextlib
    import io
    import warnings
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["x"], output_names=["y"])
