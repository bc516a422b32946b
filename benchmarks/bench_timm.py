"""How much BatchNorm bnfold's PyTorch pass removes from real timm models, next to torch.fx's `fuse`.
Prints numbers and asserts nothing.

Every timm architecture that has BatchNorm and fits the machine (or a seeded sample of them with
--n) is built without pretrained weights, its BN statistics calibrated on random batches and pushed far
from the defaults (tests/torch/real_models.py), and run on a batch of 2 at --size (or the size the model
is built for). Per model:

  bn        BatchNorm calls one forward pass makes, counted at run time (tests/torch/bn_calls.py: a
            TorchFunctionMode sees F.batch_norm / torch.batch_norm, hooks see frozen BN modules)
  fold      foldable calls, recorded as the model runs: the input comes straight from a conv/linear
            output that nothing else reads (+N: through a single-use flatten/reshape/transpose chain)
  bnfold    bnfold.fold(model, example_inputs=(x,)): BN calls left, foldable calls gone, seconds, the
            capture used and the verification verdict
  fx        torch.fx.experimental.optimization.fuse(model): calls left, seconds (or why it failed)
  err       max |output - float64 run of the original| for the original, bnfold's and fx's results

Then totals: foldable calls gone (goal >= 95%), all calls gone, models less accurate than the original
beyond float noise (4x its own error + 16 ulp of the output scale), crashes.

    python benchmarks/bench_timm.py --n 40 --seed 1          # a seeded sample of 40 BN architectures
    python benchmarks/bench_timm.py                          # all of them (hours on two cores)
    python benchmarks/bench_timm.py --models resnet18,levit_128s,tv:r3d_18 --json out.json
    python benchmarks/bench_timm.py --models tvf:fasterrcnn_mobilenet_v3_large_fpn,qat:mobilenet_v2 --size 96

Names: timm's; tv:NAME a torchvision model (classification, segmentation, video, detection); tvf:NAME the
same with every BatchNorm2d turned into FrozenBatchNorm2d; qat:NAME torchvision's quantizable NAME,
fused and prepared with torch.ao.quantization.prepare_qat.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from tests.torch.bn_calls import census, is_frozen_bn  # noqa: E402
from tests.torch.real_models import qat_model, timm_model, torchvision_model  # noqa: E402


class Timeout(Exception):
    pass


@contextlib.contextmanager
def budget(seconds: int) -> Any:
    def fire(*_: Any) -> None:
        raise Timeout(f"over {seconds}s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) or is_frozen_bn(m) for m in model.modules())


def build(name: str, size: int | None) -> tuple[nn.Module, tuple]:
    """The model `name` and its input; `size` None: the size it was made for."""
    if name.startswith(("tv:", "tvf:")):  # tvf: every BatchNorm2d frozen, as for pretrained backbones
        tv, _, arch = name.partition(":")
        kw: dict[str, Any] = {}
        if any(k in arch for k in ("rcnn", "retinanet", "fcos")):
            kw = {"min_size": size or 224, "max_size": size or 224}  # their transform resizes to 800 px else
        return torchvision_model(arch, size=size or 224, frozen=tv == "tvf", **kw)
    if name.startswith("qat:"):
        return qat_model(name[4:], size=size or 224)
    return timm_model(name, size=size)


def leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def max_err(model: nn.Module, x: tuple, ref: list[torch.Tensor]) -> float:
    with torch.no_grad():
        got = leaves(model(*x))
    if [g.shape for g in got] != [r.shape for r in ref]:
        return float("inf")
    return max(((g.double() - r).abs().max().item() for g, r in zip(got, ref) if r.numel()), default=0.0)


def one(name: str, size: int, limit: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    try:
        with budget(limit):
            try:
                model, x = build(name, size)
                before = census(model, *x)
            except Exception:  # noqa: BLE001 - too small an input for this model: its own size then
                model, x = build(name, None)
                before = census(model, *x)
            row["input"] = list(x[0].shape)
            row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
            row.update(bn=len(before.calls), foldable=len(before.foldable), via_layout=len(before.through_layout))
            with torch.no_grad():
                try:
                    ref = leaves(copy.deepcopy(model).double()(*(t.double() for t in x)))
                except RuntimeError:  # no float64 kernels (fake quantization): the fp32 original is the reference
                    ref = [t.double() for t in leaves(model(*x))]
            row["err_orig"] = max_err(model, x, ref)
            row["scale"] = max((r.abs().max().item() for r in ref if r.numel()), default=0.0)

            import bnfold
            stderr = io.StringIO()
            t0 = time.perf_counter()
            row["phase"] = "bnfold"  # from here on, an exception is bnfold's
            with contextlib.redirect_stderr(stderr):
                res = bnfold.fold(model, example_inputs=x)
            row["bnfold_s"] = round(time.perf_counter() - t0, 2)
            row["bnfold_stderr_bytes"] = len(stderr.getvalue())
            after = census(res.model, *x)
            row["bnfold_left"] = len(after.calls)
            row["bnfold_gone_foldable"] = sum(1 for n in before.foldable if n not in after.counts)
            row["bnfold_gone_layout"] = sum(1 for n in before.through_layout if n not in after.counts)
            row["bnfold_err"] = max_err(res.model, x, ref)
            rep = res.report
            row["capture"] = rep.info.get("capture")
            row["verified"] = rep.verification.passed
            row["skipped"] = sorted({d.reason.value for d in rep.skipped})
            row["missed"] = [(n, (d.reason.value, (d.detail or "")[:120])) for d in rep.skipped
                             for n in [d.bn] if n in before.foldable][:3]
    except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the run
        row["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        return row
    try:
        with budget(limit):
            from torch.fx.experimental.optimization import fuse
            t0 = time.perf_counter()
            fused = fuse(copy.deepcopy(model))
            row["fx_s"] = round(time.perf_counter() - t0, 2)
            row["fx_left"] = len(census(fused, *x).calls)
            row["fx_err"] = max_err(fused, x, ref)
    except Exception as e:  # noqa: BLE001
        row["fx_error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        row["fx_left"] = row["bn"]
    return row


def candidates(seed: int) -> list[str]:
    import timm
    names = sorted(timm.list_models())
    random.Random(seed).shuffle(names)
    return names


def fits(name: str, max_params: float) -> bool:
    """Does timm architecture `name` have BatchNorm and at most `max_params` million parameters?"""
    import timm
    for device in ("meta", "cpu"):  # meta is instant; some constructors compute on real tensors
        try:
            with torch.device(device):
                probe = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001
            continue
        return has_bn(probe) and sum(p.numel() for p in probe.parameters()) <= max_params * 1e6
    return False


def worse(row: dict[str, Any], err_key: str) -> bool:
    """Less accurate than the original beyond float noise."""
    err = row.get(err_key)
    if err is None:
        return False
    return err > 4 * row["err_orig"] + 16 * torch.finfo(torch.float32).eps * row["scale"]


def print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        what = "CRASH in bnfold" if r.get("phase") == "bnfold" else "could not build or run"
        print(f"{r['model']:32s} {what}: {r['error']}", flush=True)
        return
    fx = f"{r['fx_left']:4d} {r.get('fx_s', 0):6.2f}s" if "fx_error" not in r else f"{r['fx_left']:4d}  fail "
    print(f"{r['model']:32s} {r['bn']:4d} {r['foldable']:4d}+{r['via_layout']:<3d} | {r['bnfold_left']:4d} "
          f"{r['bnfold_gone_foldable']:4d}+{r['bnfold_gone_layout']:<3d} {r['bnfold_s']:6.2f}s {r['capture'] or '':12s} "
          f"{str(r['verified']):5s} | {fx} | {r['err_orig']:.1e} {r['bnfold_err']:.1e} "
          f"{r.get('fx_err', float('nan')):.1e}{'  LESS ACCURATE' if worse(r, 'bnfold_err') else ''}", flush=True)
    for name, why in r.get("missed", []):
        print(f"{'':34s}kept a foldable BN {name}: {why[0]} {why[1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=0, help="a seeded sample of N BN architectures (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="", help="comma-separated names (timm, tv:NAME, tvf:NAME, qat:NAME)")
    ap.add_argument("--size", type=int, default=64, help="input height/width where the model accepts it")
    ap.add_argument("--max-params", type=float, default=40.0, help="skip models over this many million params")
    ap.add_argument("--limit", type=int, default=600, help="seconds per model before it counts as failed")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--json", default="", help="write every row to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings
    warnings.simplefilter("ignore")

    explicit = [m for m in args.models.split(",") if m]
    names = explicit or candidates(args.seed)
    print(f"{'model':32s} {'bn':>4s} {'fold':>8s} | {'left':>4s} {'gone':>8s} {'secs':>7s} {'capture':12s} "
          f"{'ok':5s} | {'fx left/secs':12s} | err: orig bnfold fx", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        if args.n and len(rows) >= args.n:
            break
        if not explicit:
            if not fits(name, args.max_params):
                continue
        row = one(name, args.size, args.limit)
        rows.append(row)
        print_row(row)
    ok = [r for r in rows if "error" not in r]
    crashed = [r for r in rows if r.get("phase") == "bnfold" and "error" in r]
    foldable = sum(r["foldable"] for r in ok)
    gone = sum(r["bnfold_gone_foldable"] for r in ok)
    layout = sum(r["via_layout"] for r in ok)
    gone_layout = sum(r["bnfold_gone_layout"] for r in ok)
    bn = sum(r["bn"] for r in ok)
    left, fx_left = sum(r["bnfold_left"] for r in ok), sum(r["fx_left"] for r in ok)
    print()
    print(f"models {len(ok)} ({len(rows) - len(ok) - len(crashed)} could not be built or run), bnfold crashed on "
          f"{len(crashed)}, verification not passed "
          f"{sum(r['verified'] is not True for r in ok)}, less accurate than the original "
          f"{sum(worse(r, 'bnfold_err') for r in ok)} (fx fuse: {sum(worse(r, 'fx_err') for r in ok)}, "
          f"fx fuse failed on {sum('fx_error' in r for r in ok)})")
    print(f"BN calls {bn}; foldable {foldable} (+{layout} through layout ops)")
    print(f"bnfold: foldable calls gone {gone}/{foldable} ({100 * gone / max(foldable, 1):.1f}%), through layout "
          f"{gone_layout}/{layout}; all calls gone {bn - left}/{bn} ({100 * (bn - left) / max(bn, 1):.1f}%); "
          f"fold+verify {sum(r['bnfold_s'] for r in ok):.0f}s")
    print(f"torch.fx fuse: calls gone {bn - fx_left}/{bn} ({100 * (bn - fx_left) / max(bn, 1):.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
