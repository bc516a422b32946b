"""CPU inference speed-up of a Keras ResNet50 after bnfold folds its BatchNorms. Prints, asserts nothing.

keras.applications.ResNet50(weights=None) gets random BN statistics far from the defaults, is folded
by `bnfold.fold` (verification on: the printed speed-up is of a model proven to
compute the same function), and both models are timed in this run, on this machine, each called
through one tf.function (how Keras' predict() and a served model run; eager op-by-op calls would
mostly time Python overhead). Calls alternate between the two models; the medians and their ratio
original / folded are printed for each batch size. The fold itself (plan, rebuild, verify) is timed
too.

    python benchmarks/bench_keras_resnet50.py                    # 224x224, batch 1 and 8, 30 calls each
    python benchmarks/bench_keras_resnet50.py --quick            # 96x96, batch 1, 10 calls
    python benchmarks/bench_keras_resnet50.py --size 160 --batches 1,4 --calls 50
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def randomise_bn(model, rng: np.random.Generator) -> None:
    import keras

    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            c = int(layer.moving_mean.shape[0])
            layer.gamma.assign((rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)).astype("float32"))
            layer.beta.assign(rng.normal(0.0, 1.0, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0.5, 1.0, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 3.0, c).astype("float32"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224, help="input height and width")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--calls", type=int, default=30, help="timed calls per model and batch size")
    ap.add_argument("--quick", action="store_true", help="96x96, batch 1, 10 calls")
    args = ap.parse_args()
    if args.quick:
        args.size, args.batches, args.calls = 96, "1", 10

    import keras
    import tensorflow as tf

    import bnfold

    rng = np.random.default_rng(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(args.size, args.size, 3))
    randomise_bn(model, rng)
    t0 = time.perf_counter()
    result = bnfold.fold(model, example_inputs=[rng.standard_normal((1, args.size, args.size, 3))
                                                .astype("float32")])
    fold_s = time.perf_counter() - t0
    rep = result.report
    print(f"keras {keras.__version__}, tensorflow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"input {args.size}x{args.size}")
    print(f"fold: {len(rep.folded)} of {len(rep.decisions)} BatchNorms folded, verification "
          f"{'passed' if rep.verification.passed else 'FAILED'}, {fold_s:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in rep.timing_s.items())})")

    fns = {name: tf.function(lambda x, m=m: m(x, training=False))
           for name, m in (("original", model), ("folded", result.model))}
    print(f"{'batch':>5} {'original ms':>12} {'folded ms':>10} {'speed-up':>9}")
    for batch in [int(b) for b in args.batches.split(",")]:
        x = tf.constant(rng.standard_normal((batch, args.size, args.size, 3)).astype("float32"))
        times: dict[str, list[float]] = {"original": [], "folded": []}
        for fn in fns.values():
            for _ in range(3):  # trace and warm up
                fn(x).numpy()
        for _ in range(args.calls):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(x).numpy()
                times[name].append(time.perf_counter() - t)
        orig, fold = statistics.median(times["original"]), statistics.median(times["folded"])
        print(f"{batch:>5} {orig * 1e3:>12.2f} {fold * 1e3:>10.2f} {orig / fold:>8.3f}x")


if __name__ == "__main__":
    main()
