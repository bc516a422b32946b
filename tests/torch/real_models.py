"""Real timm / torchvision models with random weights and calibrated, far-from-default BN statistics.

No pretrained weights can be downloaded here, and freshly built BNs (mean 0, var 1, gamma 1, beta 0)
are near-identities that hide layout bugs. So each model's BN statistics are *calibrated*: a few random
batches in train() mode with momentum=None (a cumulative average), then eval(); then gamma gets a
random sign and scale and beta a random shift, so the folded maps are far from the identity while the
activations stay in range. Frozen BNs (torchvision's FrozenBatchNorm2d) get random buffers.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from tests.torch.bn_calls import is_frozen_bn


def calibrate(model: nn.Module, inputs: tuple, seed: int, batches: int = 2) -> nn.Module:
    """Calibrate BN statistics on random batches like `inputs`, then randomise gamma/beta; returns
    `model` in eval() mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    # only the BNs in train(): dropout stays off, and models whose train() forward wants more (detection
    # targets) run their inference path
    model.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for _ in range(batches):
            batch = tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) * 1.5 + 0.3 if t.is_floating_point()
                          else t for t in inputs)
            model(*batch)
    model.eval()
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if not (isinstance(m, _BatchNorm) or is_frozen_bn(m)) or not isinstance(w, torch.Tensor):
                continue
            c = w.numel()
            sign = torch.where(torch.rand(c, generator=g) < 0.3, -1.0, 1.0)
            w.copy_((w.float() * sign * (0.6 + 0.8 * torch.rand(c, generator=g))).to(w.dtype))
            m.bias.add_((0.3 * torch.randn(c, generator=g)).to(m.bias.dtype))
            if is_frozen_bn(m):
                m.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 2 * torch.rand(c, generator=g))
    return model


def timm_model(name: str, seed: int = 0, size: int | None = 64, batch: int = 2) -> tuple[nn.Module, tuple]:
    """A timm model built without pretrained weights, calibrated, and an input for it: `size` square,
    or the config's own size (size None, or a model built for one input size without `img_size`)."""
    import timm
    torch.manual_seed(seed)
    cfg = timm.models.get_pretrained_cfg(name)
    fixed = bool(getattr(cfg, "fixed_input_size", False))
    if size is None:
        size = int(cfg.input_size[-1]) if cfg is not None else 224
    try:
        model = timm.create_model(name, pretrained=False, num_classes=10, **({"img_size": size} if fixed else {}))
    except TypeError:
        model = timm.create_model(name, pretrained=False, num_classes=10)
        size = int(cfg.input_size[-1])
    c = int(cfg.input_size[0]) if cfg is not None else 3
    x = torch.randn(batch, c, size, size, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(model, (torch.randn(4, c, size, size),), seed)
    return model, (x,)


def torchvision_model(name: str, seed: int = 0, size: int = 64, batch: int = 2, frozen: bool = False,
                      **kw: Any) -> tuple[nn.Module, tuple]:
    """A torchvision model (classification, segmentation, video, detection) built without any weights
    and calibrated; video models take (N, 3, 4, size, size). `frozen` turns every BatchNorm2d into
    torchvision's FrozenBatchNorm2d after calibration, as torchvision does for pretrained backbones."""
    import inspect

    import torchvision
    torch.manual_seed(seed)
    params = inspect.signature(torchvision.models.get_model_builder(name)).parameters
    if "weights_backbone" in params:
        kw.setdefault("weights_backbone", None)
    model = torchvision.models.get_model(name, weights=None, **kw)
    video = name in torchvision.models.list_models(module=torchvision.models.video)
    shape = (batch, 3, 4, size, size) if video else (batch, 3, size, size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(model, (torch.randn((4,) + shape[1:]),), seed)
    if frozen:
        freeze(model)
    return model, (x,)


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a torchvision FrozenBatchNorm2d holding the same statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d
    for path, m in list(model.named_modules()):
        if type(m) is nn.BatchNorm2d:
            f = FrozenBatchNorm2d(m.num_features, eps=m.eps)
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(f, k).copy_(getattr(m, k).detach())
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, f)
    return model


def qat_model(name: str = "mobilenet_v2", seed: int = 0, size: int = 64, batch: int = 2,
              fuse: bool = True) -> tuple[nn.Module, tuple]:
    """torchvision's quantizable `name`, fused for QAT (unless `fuse` is False) and prepared with
    torch.ao.quantization.prepare_qat: fake-quantize modules with 0-dim and 1-element buffers
    around the convs, as a user has it mid-way through quantization-aware training."""
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.get_model(f"quantized_{name}", weights=None, quantize=False)
    if fuse:
        model.eval()
        model.fuse_model(is_qat=True)
    model.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
    model.train()
    torch.ao.quantization.prepare_qat(model, inplace=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    calibrate(model, (torch.randn(4, 3, size, size),), seed)
    # observers update in eval() too: frozen, as for evaluation, every run computes the same function
    model.apply(torch.ao.quantization.disable_observer)
    return model, (x,)
