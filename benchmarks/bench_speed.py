"""bnfold's speed in one run: folding against the cost of reading and writing the file, verification
against the cost of running the model, peers, imports and peak memory. Prints numbers, asserts nothing.

Every contender runs as a whole process (interpreter start and imports included: that is what a user
waits for), interleaved with the others so drift in the machine's load hits all alike; the baselines are
measured in the same run and the numbers that matter are ratios to them. Wall time and CPU time
(user + sys of the child) are both printed: on a shared machine CPU time moves less. Peak memory is each
child's own VmHWM, read from /proc as it exits.

  1. imports   what `bnfold MODEL --no-verify` imports, and how long that takes (python -X importtime)
  2. real      a torchvision ResNet-50 export (random weights, BN statistics calibrated on random
               batches, BatchNormalization kept, ~100 MB): bnfold --no-verify vs the load+save floor
               `onnx.save(onnx.load(p), q)` vs onnxslim vs onnxsim
  3. chains    N Conv(1x1, 4 ch)->BN pairs, N from --sizes: the same contenders (peers only up to
               --peer-max pairs: they are super-linear); the cost per pair and the marginal cost per pair
               between sizes (flat = linear)
  4. verify    `bnfold MODEL` (full verification, CPU) against creating and running plain onnxruntime
               sessions for the original and the folded model once each, at the default input size and
               at 224x224
  5. memory    peak memory of a fold of an in-memory model (bnfold.fold(model, verify=False)) over the
               file size, and of each whole process

    python benchmarks/bench_speed.py                   # everything (~6 min on 2 busy cores)
    python benchmarks/bench_speed.py --quick           # a smoke run
    python benchmarks/bench_speed.py --only chains --sizes 1000,32000,128000 --chain-repeat 3 --big-repeat 3

The ResNet-50 export needs torch and torchvision (once: it is cached in benchmarks/_work/, git-ignored).
A peer that is not installed is reported as missing; one that exceeds --timeout is dropped for larger sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _timing import PY, ROOT, Run, child_env, med, run

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"

FLOOR = "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


@dataclass
class Contender:
    name: str
    args: list[str]  # with {src} and {dst} placeholders
    runs: list[Run] = field(default_factory=list)
    failed: str = ""

    def cmd(self, src: Path, dst: Path) -> list[str]:
        return [a.replace("{src}", str(src)).replace("{dst}", str(dst)) for a in self.args]


def peers(with_peers: bool) -> tuple[list[Contender], list[str]]:
    """Floor, bnfold and the installed peers; lines saying which peers are missing."""
    import importlib.util
    cs = [Contender("onnx load+save (floor)", ["-c", FLOOR, "{src}", "{dst}"]),
          Contender("bnfold --no-verify", ["-m", "bnfold", "{src}", "--no-verify", "-q", "-o", "{dst}"])]
    notes = []
    if with_peers:
        for mod, label in (("onnxslim", "onnxslim"), ("onnxsim", "onnxsim")):
            if importlib.util.find_spec(mod) is None:
                notes.append(f"{label}: missing (pip install {mod}), not measured")
                continue
            cs.append(Contender(label, ["-m", mod, "{src}", "{dst}"]))
    return cs, notes


def race(contenders: list[Contender], src: Path, repeat: int, timeout: float, warm_up: bool = True) -> None:
    """Interleaved runs of every contender on `src`; a contender that fails or times out stops running.
    `warm_up`: one untimed run of each first (bytecode caches written, first-touch costs paid)."""
    dst = WORK / f"out_{os.getpid()}.onnx"
    src.read_bytes()  # in the page cache before anyone is timed
    for c in contenders if warm_up else ():
        if not c.failed:
            r = run(c.cmd(src, dst), timeout)
            if not r.ok:
                c.failed = r.out.splitlines()[-1] if r.out else "failed"
    for _ in range(repeat):
        for c in contenders:
            if c.failed:
                continue
            r = run(c.cmd(src, dst), timeout)
            if not r.ok:
                c.failed = r.out.splitlines()[-1] if r.out else "failed"
                continue
            c.runs.append(r)
    for p in (dst, Path(str(dst) + ".data")):
        p.unlink(missing_ok=True)


def table(contenders: list[Contender], size_mb: float, floor: Contender) -> None:
    fw, fc = med([r.wall for r in floor.runs]), med([r.cpu for r in floor.runs])
    print(f"   {'':26s} {'wall s':>8s} {'x floor':>8s} {'cpu s':>8s} {'x floor':>8s} {'peak MiB':>9s} {'x file':>7s}")
    for c in contenders:
        if c.failed and not c.runs:
            print(f"   {c.name:26s} {c.failed[:90]}")
            continue
        w, cp, pk = med([r.wall for r in c.runs]), med([r.cpu for r in c.runs]), med([r.peak_mib for r in c.runs])
        print(f"   {c.name:26s} {w:8.2f} {w / fw:7.2f}x {cp:8.2f} {cp / fc:7.2f}x {pk:9.0f} {pk / size_mb:6.2f}x"
              + (f"   (stopped: {c.failed[:60]})" if c.failed else ""))
    print("   runs (wall s): " + "; ".join(f"{c.name.split()[0]} " + " ".join(f"{r.wall:.2f}" for r in c.runs)
                                        for c in contenders if c.runs))


# -- models --------------------------------------------------------------------------------------

_RESNET = """
import sys, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None)
for mod in m.modules():
    if isinstance(mod, torch.nn.BatchNorm2d):
        mod.momentum = None  # statistics: the average over the calibration batches
        with torch.no_grad():  # and affine parameters far from the defaults, random signs
            mod.weight.uniform_(0.5, 1.5).mul_(torch.sign(torch.randn_like(mod.weight)))
            mod.bias.normal_(0, 0.2)
m.train()
with torch.no_grad():
    for _ in range(3):
        m(torch.randn(8, 3, 96, 96))
m.eval()
torch.onnx.export(m, (torch.randn(1, 3, 224, 224),), sys.argv[1], dynamo=False, do_constant_folding=False,
                  input_names=["input"], output_names=["logits"], opset_version=17,
                  dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}})
"""


def resnet50() -> Path | None:
    path = WORK / "resnet50.onnx"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = WORK / "resnet50.tmp.onnx"
        print("   exporting torchvision ResNet-50 (once; cached in benchmarks/_work/)...", flush=True)
        p = subprocess.run([PY, "-c", _RESNET, str(tmp)], capture_output=True, text=True)
        if p.returncode != 0:
            print(f"   cannot export ResNet-50 (needs torch and torchvision): {p.stderr.strip()[-300:]}")
            return None
        os.replace(tmp, path)
    return path


_CHAIN = """
import sys
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
n, path = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(n)
c = 4
nodes, inits, x = [], [], "input"
for i in range(n):
    inits.append(numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32), f"w{i}"))
    inits.append(numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"b{i}"))
    nodes.append(helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", kernel_shape=[1, 1]))
    gamma = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    for k, v in (("g", gamma), ("be", rng.normal(0, 1, c)), ("m", rng.normal(0.5, 1, c)), ("v", rng.uniform(0.5, 3, c))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), f"{k}{i}"))
    y = "output" if i == n - 1 else f"y{i}"
    nodes.append(helper.make_node("BatchNormalization", [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"], [y],
                                  name=f"bn{i}", epsilon=1e-5))
    x = y
shape = [1, c, 2, 2]
g = helper.make_graph(nodes, f"chain{n}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                      [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.save(m, path)
"""


def chain(n: int) -> Path:
    path = WORK / f"chain_{n}.onnx"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        tmp = WORK / f"chain_{n}.tmp.onnx"
        subprocess.run([PY, "-c", _CHAIN, str(n), str(tmp)], check=True)
        os.replace(tmp, path)
    return path


# -- sections ------------------------------------------------------------------------------------

def section_imports(model: Path) -> None:
    print("\n== 1. imports of `bnfold MODEL --no-verify` (python -X importtime, one run after a warm-up)")
    out = WORK / "imports.onnx"
    args = [PY, "-X", "importtime", "-m", "bnfold", str(model), "--no-verify", "-q", "-o", str(out)]
    subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True)
    p = subprocess.run(args, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    out.unlink(missing_ok=True)
    by_root: dict[str, float] = {}
    loaded = set()
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        if not self_us.strip().isdigit():
            continue
        loaded.add(name.strip())
        root = name.strip().split(".")[0]
        by_root[root] = by_root.get(root, 0.0) + int(self_us) / 1e6
    total = sum(by_root.values())
    top = sorted(by_root.items(), key=lambda kv: -kv[1])[:6]
    print(f"   {total:.3f} s in all; by package: " + ", ".join(f"{k} {v:.3f}" for k, v in top))
    heavy = ["onnxruntime", "torch", "tensorflow", "keras", "jax", "onnx.reference", "bnfold.onnx.verify",
             "bnfold.onnx.proofs", "bnfold.onnx.runtime", "bnfold.verify.compare", "bnfold.verify.inputs"]
    print("   imported: " + ", ".join(f"{h} {'YES' if h in loaded else 'no'}" for h in heavy))


def section_real(repeat: int, timeout: float, with_peers: bool) -> Path | None:
    path = resnet50()
    if path is None:
        return None
    size = path.stat().st_size / 2 ** 20
    print(f"\n== 2. real export: {path.name} ({size:.1f} MiB), median of {repeat} interleaved whole-process runs")
    cs, notes = peers(with_peers)
    for n in notes:
        print(f"   {n}")
    race(cs, path, repeat, timeout)
    table(cs, size, cs[0])
    _breakdown(path)
    return path


def _breakdown(path: Path) -> None:
    out = WORK / "breakdown.onnx"
    r = run(["-m", "bnfold", str(path), "--no-verify", "--json", "-o", str(out)])
    out.unlink(missing_ok=True)
    try:
        rep = json.loads(r.out)
    except ValueError:
        return
    phases = ", ".join(f"{k} {v:.2f}" for k, v in rep.get("timing_s", {}).items() if k != "verify")
    print(f"   bnfold's own phases (s): {phases}; folded {len(rep.get('folded', []))}, "
          f"skipped {len(rep.get('skipped', []))}")


def section_chains(sizes: list[int], repeat: int, timeout: float, with_peers: bool, peer_max: int,
                   big: int, big_repeat: int) -> None:
    print(f"\n== 3. chains of N Conv(1x1, 4 ch)->BN pairs, median of {repeat} interleaved whole-process runs "
          f"({big_repeat} above {big} pairs; peers, super-linear, up to {peer_max} pairs and while a run takes "
          f"under {timeout:.0f} s)")
    cs, notes = peers(with_peers)
    for n in notes:
        print(f"   {n}")
    names = [c.name.split()[0] for c in cs]
    print(f"   {'pairs':>7s} {'MiB':>5s} " + " ".join(f"{n + ' s':>10s}" for n in names) +
          f" {'bnfold/floor':>13s} {'cpu ratio':>9s} {'us/pair':>8s} {'marginal us/pair':>24s}")
    prev: tuple[int, float] | None = None
    first: float | None = None
    for k, n in enumerate(sizes):
        path = chain(n)
        for c in cs:
            c.runs = []
            if n > peer_max and c not in cs[:2] and not c.failed:
                c.failed = f"not run above {peer_max} pairs"
        race([c for c in cs if not c.failed], path, repeat if n <= big else big_repeat, timeout, warm_up=k == 0)
        walls = [med([r.wall for r in c.runs]) for c in cs]
        cells = [f"{w:10.2f}" if c.runs else f"{'(' + _why_not(c.failed) + ')':>10s}" for c, w in zip(cs, walls)]
        floor, fold = walls[0], walls[1]
        cpu = med([r.cpu for r in cs[1].runs]) / med([r.cpu for r in cs[0].runs]) if cs[1].runs else float("nan")
        marginal = ""
        if prev is not None and cs[1].runs:
            m = (fold - prev[1]) / (n - prev[0]) * 1e6
            first = first or m
            marginal = f"{m:8.1f} ({m / first:4.2f}x the first)"
        if cs[1].runs:
            prev = (n, fold)
        print(f"   {n:7d} {path.stat().st_size / 2 ** 20:5.1f} " + " ".join(cells) +
              f" {fold / floor:12.2f}x {cpu:8.2f}x {fold / n * 1e6:8.1f} {marginal:>24s}")
        for c in cs[1:]:
            if c.failed and _why_not(c.failed) == "failed" and not c.runs:
                print(f"      {c.name}: {c.failed[:100]}")


def _why_not(failed: str) -> str:
    return "timeout" if "timed out" in failed else "not run" if failed.startswith("not run") else "failed"


_BASELINE = """
import sys, time, json
import numpy as np
import onnxruntime as ort
t0 = time.perf_counter()
shape = [int(d) for d in sys.argv[3].split('x')]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
for p in sys.argv[1:3]:
    s = ort.InferenceSession(p, providers=['CPUExecutionProvider'])
    s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps({'run_s': time.perf_counter() - t0}))
"""


def section_verify(model: Path | None, repeat: int) -> None:
    if model is None:
        print("\n== 4. verification: skipped (no ResNet-50 export)")
        return
    print(f"\n== 4. verification cost on {model.name}, CPU, median of {repeat} interleaved runs")
    folded = WORK / "resnet50.folded.onnx"
    if not run(["-m", "bnfold", str(model), "--no-verify", "-q", "-o", str(folded)]).ok:
        print("   cannot fold the model")
        return
    print("   baseline: plain onnxruntime sessions (default options) for the original and the folded model,")
    print("   created and run once each on the same input; bnfold: the report's verify time (in process) and the")
    print("   whole `bnfold MODEL` process against the whole `bnfold MODEL --no-verify` process")
    for label, shape in (("default input (dynamic dims defaulted)", None), ("224x224", "2x3x224x224")):
        out = WORK / "verified.onnx"
        spec = ["--input", f"input:{shape}"] if shape else []
        base_shape = shape or "2x3x64x64"
        verify_s, base_s, whole, nov, base_whole = [], [], [], [], []
        for _ in range(repeat):
            r = run(["-m", "bnfold", str(model), "--json", "--providers", "cpu", "-o", str(out), *spec])
            if not r.ok:
                print(f"   {label}: bnfold failed: {r.out[-300:]}")
                return
            rep = json.loads(r.out)
            verify_s.append(rep["timing_s"]["verify"])
            whole.append(r.wall)
            b = run(["-c", _BASELINE, str(model), str(folded), base_shape])
            base_s.append(json.loads(b.out)["run_s"])
            base_whole.append(b.wall)
            nv = run(["-m", "bnfold", str(model), "--no-verify", "-q", "-o", str(out), *spec])
            nov.append(nv.wall)
        v, bs = med(verify_s), med(base_s)
        print(f"   {label} ({base_shape}): verify {v:.2f} s vs run both {bs:.2f} s = {v / bs:.2f}x;  "
              f"whole process {med(whole):.2f} s vs --no-verify {med(nov):.2f} s: verification adds "
              f"{med(whole) - med(nov):.2f} s = {(med(whole) - med(nov)) / (med(base_whole)):.2f}x a whole baseline "
              f"process ({med(base_whole):.2f} s); local proofs: {rep['verification'].get('local_proofs')}")
        out.unlink(missing_ok=True)
    folded.unlink(missing_ok=True)


_IN_MEMORY = """
import sys, json
import onnx
import bnfold
import bnfold.onnx.fold, bnfold.onnx.frontend  # code is not data: imported before the measurement
if sys.argv[2] == 'verify':
    import onnxruntime, onnx.reference, bnfold.onnx.verify
def rss():
    with open('/proc/self/status') as f:
        return {l.split(':')[0]: int(l.split()[1]) for l in f if l.startswith(('VmRSS', 'VmHWM'))}
m = onnx.load(sys.argv[1])
import gc; gc.collect()
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the high-water mark to what is resident now
before = rss()['VmRSS']
res = bnfold.fold(m, verify=sys.argv[2] == 'verify', providers=['cpu'])
print(json.dumps({'before_kib': before, 'peak_kib': rss()['VmHWM'], 'folded': len(res.report.folded)}))
"""


def section_memory(model: Path | None) -> None:
    if model is None:
        return
    size = model.stat().st_size / 2 ** 20
    print(f"\n== 5. peak memory of a fold of an in-memory model ({model.name}, {size:.1f} MiB file)")
    for mode in ("no-verify", "verify"):
        r = run(["-c", _IN_MEMORY, str(model), mode])
        if not r.ok:
            print(f"   bnfold.fold(model, verify={mode == 'verify'}): failed: {r.out[-300:]}")
            continue
        d = json.loads(r.out)
        extra = (d["peak_kib"] - d["before_kib"]) / 1024
        print(f"   bnfold.fold(model, verify={mode == 'verify'}): peak {extra:.0f} MiB above the loaded model = "
              f"{extra / size:.2f}x the file")
    base = run(["-c", "import onnx, numpy"])
    print(f"   (whole-process peaks are in section 2; an interpreter with onnx and numpy imported peaks at "
          f"{base.peak_mib:.0f} MiB)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per contender on the real model (median)")
    ap.add_argument("--chain-repeat", type=int, default=3, help="timed runs per contender per chain size")
    ap.add_argument("--sizes", default="2000,8000,32000,128000", help="chain lengths (pairs)")
    ap.add_argument("--peer-max", type=int, default=8000, help="largest chain the peers are run on (pairs)")
    ap.add_argument("--big", type=int, default=32000, help="chains above this many pairs get --big-repeat runs")
    ap.add_argument("--big-repeat", type=int, default=1, help="timed runs per contender on the big chains")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as too slow")
    ap.add_argument("--no-peers", action="store_true", help="floor and bnfold only")
    ap.add_argument("--only", choices=("imports", "real", "chains", "verify", "memory"), action="append")
    ap.add_argument("--quick", action="store_true", help="smoke run: repeat 1, chains 1000,4000, no peers")
    a = ap.parse_args(argv)
    if a.quick:
        a.repeat, a.chain_repeat, a.sizes, a.no_peers = 1, 1, "1000,4000", True
    only = set(a.only or ("imports", "real", "chains", "verify", "memory"))
    import numpy
    import onnx
    import onnxruntime
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"python {sys.version.split()[0]}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"numpy {numpy.__version__}; {os.cpu_count()} CPUs, load average {load:.1f} at the start")
    model = resnet50() if only & {"imports", "real", "verify", "memory"} else None
    if "imports" in only:
        section_imports(model or chain(1000))
    if "real" in only:
        section_real(a.repeat, a.timeout, not a.no_peers)
    if "chains" in only:
        section_chains([int(s) for s in a.sizes.split(",") if s.strip()], a.chain_repeat, a.timeout, not a.no_peers,
                       a.peer_max, a.big, a.big_repeat)
    if "verify" in only:
        section_verify(model, max(1, min(a.repeat, 3)))
    if "memory" in only:
        section_memory(model)


if __name__ == "__main__":
    main()
