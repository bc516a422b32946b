"""timm models in their training form with random weights, for the re-parameterisation tests and
benchmarks/bench_reparam.py.

BN parameters far from the defaults (gamma of random sign, beta != 0) and running statistics calibrated
on one random batch in train mode (momentum 1: the batch's own statistics), so the activations stay in
range through the depth.
"""
from __future__ import annotations

import numpy as np


def build_calibrated(name: str, num_classes: int, size: int):
    """timm.create_model(name) (no pretrained weights) in eval(), calibrated on a 2x3xSIZExSIZE batch."""
    import timm
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = timm.create_model(name, pretrained=False, num_classes=num_classes)
    for mod in m.modules():
        if isinstance(mod, _BatchNorm) and mod.affine:
            c = mod.num_features
            mod.weight.data = torch.tensor(rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), dtype=torch.float32)
            mod.bias.data = torch.tensor(rng.normal(0, 1, c), dtype=torch.float32)
            mod.momentum = 1.0
    m.train()
    with torch.no_grad():
        m(torch.randn(2, 3, size, size) * 2 + 0.5)
    return m.eval()
