"""Does merging multi-branch blocks pay at run time? Prints numbers, asserts nothing.

timm models in their training form (RepVGG, MobileOne by default; random weights, BN statistics
calibrated on one random batch in train mode) are exported to ONNX with BatchNormalization kept
(torch.onnx, dynamo=False, constant folding off), then folded by bnfold (verification on). Both files
run on onnxruntime's CPU provider with every graph optimisation on (ORT_ENABLE_ALL: onnxruntime fuses
Conv+BN itself, but not the branches), same session options, same input, interleaved. Printed per model:
the op counts before/after, the median latency of --repeat timed runs (after --warmup runs) of each,
and `ratio bnfold / original` (below 1 is faster). timm's own reparameterize_model, exported the same
way, runs as a third column: the hand-written merge we should match.

    python benchmarks/bench_reparam.py                      # repvgg_a0, mobileone_s0 at 1x3x224x224
    python benchmarks/bench_reparam.py --quick              # 64x64 inputs, fewer runs
    python benchmarks/bench_reparam.py --models repvgg_a0,fastvit_t8 --size 160 --batch 4 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout


def build(name: str, size: int):
    from tests.helpers.timm_train_form import build_calibrated
    return build_calibrated(name, num_classes=1000, size=size)


def export(model, size: int, batch: int):
    import onnx
    import torch
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(batch, 3, size, size),), f, dynamo=False, do_constant_folding=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(f.getvalue())


def session(model, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def counts(model) -> str:
    c = Counter(n.op_type for n in model.graph.node)
    return " ".join(f"{k} {c[k]}" for k in ("Conv", "BatchNormalization", "Add", "Sub", "Mul"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="repvgg_a0,mobileone_s0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="64x64, 3 warm-up and 10 timed runs")
    a = ap.parse_args()
    if a.quick:
        a.size, a.warmup, a.repeat = 64, 3, 10

    import bnfold.keras.files as kf
    kf.before_tensorflow()  # quiet start-up; keeps imports in the order the project needs
    import bnfold
    from timm.utils.model import reparameterize_model

    print(f"onnxruntime CPU, ORT_ENABLE_ALL, input {a.batch}x3x{a.size}x{a.size}, median of {a.repeat} runs "
          f"after {a.warmup} warm-up runs, threads {a.threads or 'default'}")
    for name in a.models.split(","):
        model = build(name, a.size)
        original = export(model, a.size, a.batch)
        timm_merged = export(reparameterize_model(copy.deepcopy(model)), a.size, a.batch)
        t0 = time.perf_counter()
        res = bnfold.fold(original)
        fold_s = time.perf_counter() - t0
        ver = res.report.verification
        print(f"\n{name}: bnfold {fold_s:.1f} s (verification {ver.verdict}, {ver.proofs})")
        variants = {"original": original, "bnfold": res.model, "timm reparameterize": timm_merged}
        sessions = {k: session(m, a.threads) for k, m in variants.items()}
        x = {"x": np.random.default_rng(1).normal(size=(a.batch, 3, a.size, a.size)).astype(np.float32)}
        ref = sessions["original"].run(None, x)[0]
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(a.warmup):
            for s in sessions.values():
                s.run(None, x)
        for _ in range(a.repeat):  # interleaved: drift in machine load hits every variant alike
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, x)
                times[k].append(time.perf_counter() - t)
        base = statistics.median(times["original"])
        for k, m in variants.items():
            med = statistics.median(times[k])
            diff = float(np.abs(sessions[k].run(None, x)[0] - ref).max() / max(np.abs(ref).max(), 1e-30))
            print(f"  {k:<20} {counts(m):<50} median {med * 1e3:8.2f} ms   ratio {med / base:5.2f}   "
                  f"max rel diff {diff:.1e}")


if __name__ == "__main__":
    main()
