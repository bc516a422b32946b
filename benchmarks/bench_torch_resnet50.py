"""Eager CPU speed-up of a folded ResNet-50 at batch 1. Prints numbers, asserts nothing.

The model is torchvision's ResNet-50 layout (7x7 stem, max-pool, bottleneck stages of 3/4/6/3 blocks,
widths 64..512 x4), tests.helpers.zoo_deep's copy of it (torchvision is not a dependency), with random BN
statistics far from the defaults. bnfold folds it (and verifies the fold); then the original and the
folded model each run `--runs` timed forward passes at batch 1, interleaved so that both see the same
machine state, after `--warmup` untimed ones. Printed: the median ms of each, every BN decision
count, and `speed-up original / folded` from the medians and from the minimums (expect > 1.05x: 53 BN
kernels and their memory traffic go; on a busy machine the minimums are the steadier figure).

    python benchmarks/bench_torch_resnet50.py                  # 224x224, 30 runs each
    python benchmarks/bench_torch_resnet50.py --runs 10 --size 160 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout: bnfold and tests.helpers (never tests/ itself, whose
# onnx/ and torch/ folders would shadow the real packages)

import bnfold  # noqa: E402
from tests.helpers.zoo_deep import ResNet  # noqa: E402
from tests.helpers.zoo_torch import randomize_bn  # noqa: E402


def _time(model: nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x)
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = randomize_bn(ResNet("bottleneck", (3, 4, 6, 3)), seed=0)
    x = torch.randn(1, 3, a.size, a.size)

    t0 = time.perf_counter()
    res = bnfold.fold(model, example_inputs=(x,))
    fold_s = time.perf_counter() - t0
    rep = res.report
    folded = res.model
    print(f"folded {len(rep.folded)} BN, skipped {len(rep.skipped)}; capture {rep.info.get('capture')}; "
          f"verification passed={rep.verification.passed}; fold+verify {fold_s:.2f}s")

    base, fast = [], []
    with torch.inference_mode():
        for _ in range(a.warmup):
            model(x)
            folded(x)
        for _ in range(a.runs):
            base.append(_time(model, x))
            fast.append(_time(folded, x))
    mb, mf = statistics.median(base), statistics.median(fast)
    print(f"threads {torch.get_num_threads()}, input 1x3x{a.size}x{a.size}, {a.runs} runs each (interleaved)")
    print(f"original  median {mb:8.2f} ms  (min {min(base):.2f})")
    print(f"folded    median {mf:8.2f} ms  (min {min(fast):.2f})")
    print(f"speed-up original / folded: {mb / mf:.3f}x (medians), {min(base) / min(fast):.3f}x (minimums: "
          "less sensitive to other load on the machine)")


if __name__ == "__main__":
    main()
