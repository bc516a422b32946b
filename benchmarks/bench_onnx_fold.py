"""How much does folding an ONNX model cost? Prints numbers, asserts nothing.

a) Whole process: `python -m bnfold BIG.onnx --no-verify -o OUT` against a bare
   `python -c "import onnx; onnx.save(onnx.load(p), q)"` on the same ~100 MB file, median of --repeat.
   The ratio is what a user feels; the goal is <= ~1.5x.
b) Scaling: `bnfold.fold(model, verify=False)` on chains of N Conv(1x1, 4 ch)->BN pairs, in process.
   Microseconds per BN must stay flat as N grows (a graph indexed once is linear in nodes).

Both baselines are measured in the same run, on the same machine, so the ratios are comparable even
where absolute seconds are not. Generated models go to benchmarks/_work/ (git-ignored).

    python benchmarks/bench_onnx_fold.py            # full: 100 MB, 1k..16k pairs, 3 repeats
    python benchmarks/bench_onnx_fold.py --quick    # a smoke run in well under a minute
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "_work"
# Measure this checkout, as the `python -m bnfold` subprocesses (run from ROOT) do.
sys.path.insert(0, str(ROOT))
OPSET = 17
SEED = 1234
BIG_CHANNELS = 256  # a 3x3 256->256 conv is 2.36 MB of fp32 weight, so ~42 layers make 100 MB


def _bn_initializers(rng: np.random.Generator, name: str, n: int) -> list[onnx.TensorProto]:
    # Far from the defaults so the fold does real arithmetic, as in the tests.
    gamma = rng.uniform(0.5, 2.0, n) * rng.choice([-1.0, 1.0], n)
    stats = {"scale": gamma, "B": rng.normal(0.0, 1.0, n), "mean": rng.normal(0.5, 1.0, n),
             "var": rng.uniform(0.5, 3.0, n)}
    return [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in stats.items()]


def _conv_bn_chain(pairs: int, channels: int, k: int, spatial: int, rng: np.random.Generator,
                   relu: bool) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "input"
    scale = np.sqrt(2.0 / (channels * k * k))
    for i in range(pairs):
        w = (rng.standard_normal((channels, channels, k, k), dtype=np.float32) * scale).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        inits.append(numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32) * 0.1, f"conv{i}.bias"))
        nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"],
                                      name=f"conv{i}", kernel_shape=[k, k], pads=[k // 2] * 4))
        inits.extend(_bn_initializers(rng, f"bn{i}", channels))
        y = "output" if i == pairs - 1 and not relu else f"bn{i}_out"
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}_out"] + [f"bn{i}.{s}" for s in
                                      ("scale", "B", "mean", "var")], [y], name=f"bn{i}", epsilon=1e-5))
        if relu:
            x = "output" if i == pairs - 1 else f"relu{i}_out"
            nodes.append(helper.make_node("Relu", [y], [x], name=f"relu{i}"))
        else:
            x = y
    shape = [1, channels, spatial, spatial]
    graph = helper.make_graph(nodes, f"chain{pairs}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnfold-bench")
    model.ir_version = 8
    return model


def big_model(mb: float) -> Path:
    """A ~`mb` MB conv net of 3x3 Conv->BN->Relu layers, built once and cached in benchmarks/_work/."""
    per_layer = BIG_CHANNELS * BIG_CHANNELS * 9 * 4
    layers = max(1, round(mb * 1e6 / per_layer))
    path = WORK / f"big_{layers}x{BIG_CHANNELS}ch.onnx"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        model = _conv_bn_chain(layers, BIG_CHANNELS, 3, 8, np.random.default_rng(SEED), relu=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(model, tmp)
        os.replace(tmp, path)
    return path


def chain_model(pairs: int) -> onnx.ModelProto:
    """N tiny Conv(1x1, 4 channels)->BN pairs: the graph size, not the weights, is what grows."""
    return _conv_bn_chain(pairs, 4, 1, 2, np.random.default_rng(SEED + pairs), relu=False)


def _timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - t0, proc


def bench_whole_process(mb: float, repeat: int) -> None:
    """Part a: bnfold CLI vs bare onnx.load + onnx.save, each as a fresh Python process."""
    path = big_model(mb)
    out_fold, out_copy = WORK / "big.folded.onnx", WORK / "big.copy.onnx"
    size_mb = path.stat().st_size / 1e6
    print(f"\n== a) whole process on {path.name} ({size_mb:.1f} MB), median of {repeat}")
    copy_cmd = [sys.executable, "-c", "import onnx, sys; m = onnx.load(sys.argv[1]); onnx.save(m, sys.argv[2])",
                str(path), str(out_copy)]
    fold_cmd = [sys.executable, "-m", "bnfold", str(path), "--no-verify", "-o", str(out_fold)]
    path.read_bytes()  # page cache warm for both contenders, so neither pays the first disk read
    copy_t: list[float] = []
    fold_t: list[float] = []
    failure = ""
    for _ in range(repeat):
        # Interleaved, so drift in machine load hits both sides alike.
        t, proc = _timed(copy_cmd)
        if proc.returncode != 0:
            print(f"   baseline failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
            return
        copy_t.append(t)
        if not failure:
            t, proc = _timed(fold_cmd)
            if proc.returncode != 0:
                failure = f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"
            else:
                fold_t.append(t)
    base = statistics.median(copy_t)
    print(f"   onnx.load + onnx.save      {base:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in copy_t)})")
    if failure:
        print(f"   bnfold --no-verify failed ({failure})")
        return
    fold = statistics.median(fold_t)
    print(f"   bnfold --no-verify         {fold:7.2f} s   (runs: {', '.join(f'{t:.2f}' for t in fold_t)})")
    print(f"   ratio bnfold / baseline    {fold / base:7.2f} x   (goal: <= ~1.5x)")
    _print_breakdown(path)
    for p in (out_fold, out_copy):
        p.unlink(missing_ok=True)


def _print_breakdown(path: Path) -> None:
    # One extra, untimed run with --json: the report's own phase timings show where the time goes.
    import json

    out = WORK / "big.breakdown.onnx"
    proc = subprocess.run([sys.executable, "-m", "bnfold", str(path), "--no-verify", "--json", "-o", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    out.unlink(missing_ok=True)
    try:
        rep = json.loads(proc.stdout)
    except ValueError:
        return
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in rep.get("timing_s", {}).items())
    print(f"   bnfold phases (one --json run): {phases}; folded {len(rep.get('folded', []))}, "
          f"skipped {len(rep.get('skipped', []))}")


def bench_chain(sizes: list[int], repeat: int) -> None:
    """Part b: in-process fold time per BN on Conv->BN chains of growing length."""
    try:
        import bnfold
        fold = bnfold.fold
    except (ImportError, AttributeError) as exc:
        print(f"\n== b) skipped: bnfold.fold is not available ({exc})")
        return
    print(f"\n== b) bnfold.fold(model, verify=False) on Conv(1x1, 4 ch)->BN chains, median of {repeat}")
    print(f"   {'pairs':>6s} {'nodes':>6s} {'fold s':>8s} {'us/BN':>8s} {'best':>8s} {'vs first':>8s} {'folded':>7s} {'build s':>8s}")
    first: float | None = None
    for n in sizes:
        t0 = time.perf_counter()
        model = chain_model(n)
        build = time.perf_counter() - t0
        times: list[float] = []
        folded = -1
        for _ in range(repeat):
            gc.collect()
            t0 = time.perf_counter()
            result = fold(model, verify=False)
            times.append(time.perf_counter() - t0)
            folded = len(result.report.folded)
            del result
        t = statistics.median(times)
        per_bn = t / n * 1e6
        first = per_bn if first is None else first
        best = min(times) / n * 1e6
        print(f"   {n:6d} {len(model.graph.node):6d} {t:8.3f} {per_bn:8.1f} {best:8.1f} {per_bn / first:7.2f}x "
              f"{folded:7d} {build:8.2f}")
    print("   us/BN: median run; best: fastest run (least disturbed by other load on the machine).")
    print("   'vs first' is median us/BN relative to the smallest chain: flat (~1x) means linear cost.")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks selected on the command line and print their numbers."""
    ap = argparse.ArgumentParser(description="ONNX fold benchmarks (prints numbers, asserts nothing).")
    ap.add_argument("--sizes", default="1000,2000,4000,8000,16000",
                    help="comma-separated chain lengths (Conv->BN pairs) for part b")
    ap.add_argument("--mb", type=float, default=100.0, help="approximate size of the part a model in MB")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the median is printed")
    ap.add_argument("--quick", action="store_true", help="small smoke run: --mb 10 --sizes 250,500,1000 --repeat 1")
    ap.add_argument("--only", choices=("process", "chain"), help="run one part only")
    args = ap.parse_args(argv)
    if args.quick:
        args.mb, args.sizes, args.repeat = 10.0, "250,500,1000", 1
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    import onnxruntime  # noqa: F401  (imported for the version line only)
    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs")
    if args.only in (None, "process"):
        bench_whole_process(args.mb, args.repeat)
    if args.only in (None, "chain"):
        bench_chain(sizes, args.repeat)


if __name__ == "__main__":
    main()
