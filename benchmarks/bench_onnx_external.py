"""A model over 2 GB round-trips through bnfold with external data. Prints numbers, asserts nothing.

A chain of Gemm(8192 x 8192, fp32: 256 MiB each) -> BatchNormalization layers, about --gb GB in all,
is generated once into benchmarks/_work/ with onnx's own external-data writer. Then, each in a fresh
process (interpreter start-up and imports included, as a user waits for them):
  baseline  onnx.load (external data loaded) + onnx.save_model(save_as_external_data=True)
  bnfold    python -m bnfold BIG.onnx --no-verify -o OUT   (load, fold every BN, save with external data)
Printed: wall time and peak RSS of each (the goal for bnfold: peak near one copy of the weights, i.e.
near the baseline's), the output files, and an onnxruntime check (optimisations off) that the folded
model computes what the original does: both sessions read their files and external data themselves.

    python benchmarks/bench_onnx_external.py            # ~2.3 GB model, needs ~7 GB of disk
    python benchmarks/bench_onnx_external.py --gb 3     # bigger
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import _timing

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "external"
N = 8192  # features: one fp32 weight is N*N*4 bytes = 256 MiB


def build(path: Path, layers: int, seed: int = 7) -> None:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i in range(layers):
        w = rng.standard_normal((N, N), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(N))
        inits.append(numpy_helper.from_array(w, f"fc{i}.weight"))
        del w
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, N).astype(np.float32), f"fc{i}.bias"))
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}"], name=f"fc{i}"))
        gamma = rng.uniform(0.5, 2.0, N) * rng.choice([-1.0, 1.0], N)
        stats = {"scale": gamma, "B": rng.normal(0, 1, N), "mean": rng.normal(0.5, 1, N), "var": rng.uniform(0.5, 3, N)}
        for k, v in stats.items():
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{k}"))
        nodes.append(helper.make_node("BatchNormalization", [f"fc{i}"] + [f"bn{i}.{k}" for k in stats], [f"bn{i}"],
                                      name=f"bn{i}"))
        x = f"bn{i}"
    nodes.append(helper.make_node("Identity", [x], ["output"], name="out"))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, N])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [2, N])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one child process of this interpreter: `cmd` is [-m|-c, ...]."""
    r = _timing.run(cmd)
    if not r.ok:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.out}")
    return r.wall, r.peak_mib / 1024


def size_gib(path: Path) -> float:
    data = Path(str(path) + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 2 ** 30


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        build(Path(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.3, help="approximate model size in GB (default 2.3)")
    ap.add_argument("--keep", action="store_true", help="keep the generated and written files")
    ap.add_argument("--verify", action="store_true",
                    help="also time a full run with verification (from temporary files with external data)")
    a = ap.parse_args()
    layers = max(1, int(np.ceil(a.gb * 1e9 / (N * N * 4))))
    WORK.mkdir(parents=True, exist_ok=True)
    src = WORK / f"big_{layers}x{N}.onnx"
    if not src.exists():
        t = time.perf_counter()
        # in a child process: a parent that once held the model would make every later child look big
        subprocess.run([sys.executable, __file__, "--build", str(src), str(layers)], check=True)
        print(f"generated {src.name}: {layers} Gemm->BN layers, {size_gib(src):.2f} GiB in {time.perf_counter() - t:.1f} s")
    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, {os.cpu_count()} CPUs; "
          f"model {size_gib(src):.2f} GiB ({size_gib(src) * 2 ** 30 / 1e9:.2f} GB)")
    base_out, fold_out = WORK / "baseline.onnx", WORK / "folded.onnx"
    for p in (base_out, fold_out):
        for q in (p, Path(str(p) + ".data")):
            if q.exists():
                q.unlink()
    baseline = ["-c",
                "import onnx,sys; m=onnx.load(sys.argv[1]); onnx.save_model(m, sys.argv[2], save_as_external_data=True,"
                " all_tensors_to_one_file=True, location='baseline.onnx.data', size_threshold=1024)",
                str(src), str(base_out)]
    bnfold = ["-m", "bnfold", str(src), "--no-verify", "-o", str(fold_out), "--json", "-q"]
    tb, rb = run(baseline)
    print(f"  onnx load + save (external)   {tb:7.1f} s   peak RSS {rb:5.2f} GiB")
    tf, rf = run(bnfold)
    print(f"  bnfold --no-verify            {tf:7.1f} s   peak RSS {rf:5.2f} GiB   (ratio {tf / tb:.2f}x time)")
    print(f"  written: {fold_out.name} + {fold_out.name}.data, {size_gib(fold_out):.2f} GiB; "
          f"files in work dir: {sorted(p.name for p in WORK.iterdir())}")
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(0).standard_normal((2, N)).astype(np.float32)
    t = time.perf_counter()
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(fold_out), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    folded = onnx.load(str(fold_out), load_external_data=False)
    n_bn = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    diff = float(np.abs(ref.astype(np.float64) - got).max())
    print(f"  onnxruntime check: max |folded - original| = {diff:.3g} (max |original| {float(np.abs(ref).max()):.3g}); "
          f"BatchNormalization nodes left: {n_bn}; {time.perf_counter() - t:.1f} s")
    if a.verify:
        ver_out = WORK / "verified.onnx"
        tv, rv = run(["-m", "bnfold", str(src), "-o", str(ver_out), "-q"])
        print(f"  bnfold (with verification)    {tv:7.1f} s   peak RSS {rv:5.2f} GiB   (exit code 0 = verified)")
    if not a.keep:
        shutil.rmtree(WORK)


if __name__ == "__main__":
    main()
