"""Cost of verification against the cost of running both models once (goal: at most 2x).

Builds a ResNet-50-like ONNX model with random BN statistics (needs torch for the export), folds it,
then times, in the same run:
  baseline  = one onnxruntime session each for original and folded (optimisations off), created
              and run once on the same feeds;
  verify    = bnfold.check(original, folded) (original, candidate and noise model, with every
              same-named intermediate compared).
Prints both and the ratio. No assertions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # the repository root: tests.helpers (never tests/ itself, whose
# onnx/ and torch/ packages would shadow the real ones)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50", "inception_v3"])
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)

    import onnxruntime as ort

    import bnfold
    from bnfold.onnx.feeds import make_feeds
    from tests.helpers.zoo_deep import build_deep, export_onnx

    model, x = build_deep(a.model)
    original = export_onnx(model, x)
    folded = bnfold.fold(original, verify=False).model
    feeds = make_feeds(original)[0]

    def baseline() -> float:
        t = time.perf_counter()
        for m in (original, folded):
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            s.run(None, feeds)
        return time.perf_counter() - t

    def verify() -> float:
        t = time.perf_counter()
        ok = bnfold.check(original, folded, providers=["cpu"])
        assert ok.passed is not None
        return time.perf_counter() - t

    base = statistics.median(baseline() for _ in range(a.repeat))
    ver = statistics.median(verify() for _ in range(a.repeat))
    print(f"model {a.model}: {len(original.graph.node)} nodes, CPU only, median of {a.repeat}")
    print(f"  run both models once   {base:7.3f} s")
    print(f"  bnfold verification    {ver:7.3f} s")
    print(f"  ratio                  {ver / base:7.2f} x   (goal: <= 2x)")


if __name__ == "__main__":
    main()
