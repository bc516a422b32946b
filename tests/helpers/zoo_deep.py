"""Full-depth ResNet-18, ResNet-50 and Inception-v3 (torchvision layouts, written here) for the
verification engine's acceptance cases, with random BN statistics."""
from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers.zoo_torch import Bottleneck, BasicBlock, randomize_bn


class ResNet(nn.Module):
    def __init__(self, block: str, layers: tuple[int, ...], num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, n in enumerate(layers):
            width = 64 * 2 ** i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if block == "basic":
                    blocks.append(BasicBlock(cin, width, stride))
                    cin = width
                else:
                    blocks.append(Bottleneck(cin, width, width * 4, stride))
                    cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicConv(nn.Sequential):
    def __init__(self, cin: int, cout: int, k, s=1, p=0) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, s, p, bias=False), nn.BatchNorm2d(cout, eps=0.001), nn.ReLU())


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int) -> None:
        super().__init__()
        self.b1 = BasicConv(cin, 64, 1)
        self.b5 = nn.Sequential(BasicConv(cin, 48, 1), BasicConv(48, 64, 5, p=2))
        self.b3 = nn.Sequential(BasicConv(cin, 64, 1), BasicConv(64, 96, 3, p=1), BasicConv(96, 96, 3, p=1))
        self.bp = BasicConv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b3 = BasicConv(cin, 384, 3, 2)
        self.bd = nn.Sequential(BasicConv(cin, 64, 1), BasicConv(64, 96, 3, p=1), BasicConv(96, 96, 3, 2))

    def forward(self, x):
        return torch.cat([self.b3(x), self.bd(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.b1 = BasicConv(cin, 192, 1)
        self.b7 = nn.Sequential(BasicConv(cin, c7, 1), BasicConv(c7, c7, (1, 7), p=(0, 3)),
                                BasicConv(c7, 192, (7, 1), p=(3, 0)))
        self.bd = nn.Sequential(BasicConv(cin, c7, 1), BasicConv(c7, c7, (7, 1), p=(3, 0)),
                                BasicConv(c7, c7, (1, 7), p=(0, 3)), BasicConv(c7, c7, (7, 1), p=(3, 0)),
                                BasicConv(c7, 192, (1, 7), p=(0, 3)))
        self.bp = BasicConv(cin, 192, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b7(x), self.bd(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b3 = nn.Sequential(BasicConv(cin, 192, 1), BasicConv(192, 320, 3, 2))
        self.b7 = nn.Sequential(BasicConv(cin, 192, 1), BasicConv(192, 192, (1, 7), p=(0, 3)),
                                BasicConv(192, 192, (7, 1), p=(3, 0)), BasicConv(192, 192, 3, 2))

    def forward(self, x):
        return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = BasicConv(cin, 320, 1)
        self.b3 = BasicConv(cin, 384, 1)
        self.b3a = BasicConv(384, 384, (1, 3), p=(0, 1))
        self.b3b = BasicConv(384, 384, (3, 1), p=(1, 0))
        self.bd = nn.Sequential(BasicConv(cin, 448, 1), BasicConv(448, 384, 3, p=1))
        self.bda = BasicConv(384, 384, (1, 3), p=(0, 1))
        self.bdb = BasicConv(384, 384, (3, 1), p=(1, 0))
        self.bp = BasicConv(cin, 192, 1)

    def forward(self, x):
        a = self.b3(x)
        d = self.bd(x)
        return torch.cat([self.b1(x), self.b3a(a), self.b3b(a), self.bda(d), self.bdb(d),
                          self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionV3(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(BasicConv(3, 32, 3, 2), BasicConv(32, 32, 3), BasicConv(32, 64, 3, p=1),
                                  nn.MaxPool2d(3, 2), BasicConv(64, 80, 1), BasicConv(80, 192, 3), nn.MaxPool2d(3, 2))
        self.mixed = nn.Sequential(InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64), InceptionB(288),
                                   InceptionC(768, 128), InceptionC(768, 160), InceptionC(768, 160),
                                   InceptionC(768, 192), InceptionD(768), InceptionE(1280), InceptionE(2048))
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = self.mixed(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


DEEP = {
    "resnet18": (lambda: ResNet("basic", (2, 2, 2, 2)), (1, 3, 224, 224)),
    "resnet50": (lambda: ResNet("bottleneck", (3, 4, 6, 3)), (1, 3, 224, 224)),
    "inception_v3": (InceptionV3, (1, 3, 299, 299)),
}


def build_deep(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model with seeded weights and random BN statistics (eval mode), and an input for it."""
    make, shape = DEEP[name]
    torch.manual_seed(seed)
    model = randomize_bn(make(), seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def export_onnx(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """TorchScript exporter with constant folding off: BatchNormalization nodes are kept."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"])
    return onnx.load_from_string(buf.getvalue())


def ort_fused(model: onnx.ModelProto) -> onnx.ModelProto:
    """A correct fold made by another tool: onnxruntime's own basic optimiser (Conv+BN fusion)."""
    import os
    import tempfile

    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "fused.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = out
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return onnx.load(out)
