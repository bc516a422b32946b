"""Property: on random PyTorch models built the way real code writes them (strategies_torch.py), the
fold is exact, complete and honest. Checked with plain torch runs, independently of bnfold's verifier:

* the folded model is within float noise of the unfolded one against a float64 run of the original
  (noise: the original with every parameter and buffer nudged one ulp, twice);
* every BN that is foldable by construction is folded and its batch_norm call is gone at run time
  (calls counted by a TorchFunctionMode); no BN that must stay is folded, and it still runs;
* folding the result again folds nothing and changes no tensor; the input model is unchanged.

BNFOLD_FUZZ_EXAMPLES sets the number of examples (default 300, about a minute or two on two cores);
examples are derandomized, so CI runs the same ones every time.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402

from tests.fuzz.strategies_torch import models  # noqa: E402
from tests.helpers.frameworks import torch_pass  # noqa: E402
from tests.helpers.torch_threads import one_thread  # noqa: E402, F401 (autouse: runs this module single-threaded)
from tests.torch.bn_calls import census  # noqa: E402

EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES", "").strip() or 300)
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model)(x)  # a copy: a BN in train() would update its statistics


def _nudged(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every floating parameter and buffer moved by a random relative amount of one ulp."""
    m = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point() and t.numel():
                eps = torch.finfo(t.dtype).eps
                t.mul_(torch.from_numpy(1 + rng.uniform(-eps, eps, tuple(t.shape))).to(t.dtype))
    return m


@SETTINGS
@given(models())
def test_fold_is_exact_complete_and_honest(case) -> None:
    model, x, labels, facts = case
    event(f"capture={facts['capture']}")
    event(f"nd={facts['nd']} dtype={facts['dtype']}")
    for k in facts["kinds"]:
        event(f"block={k}")
    state, modes = _state(model), [m.training for m in model.modules()]
    y0 = _run(model, x)
    before = census(copy.deepcopy(model), x)
    assert set(before.counts) == set(labels), (before.counts, labels)  # the strategy's own bookkeeping

    res = torch_pass.fold(model, example_inputs=(x,), providers=["cpu"])
    rep = res.report

    # the input model is untouched and still computes the same
    assert _same(state, _state(model)) and modes == [m.training for m in model.modules()]
    assert torch.equal(_run(model, x), y0)

    # every BN decided once; what folded is gone at run time, what must stay still runs
    d = {v.bn: v for v in rep.decisions}
    assert len(d) == len(rep.decisions) and set(d) == set(labels), (sorted(d), sorted(labels))
    after = census(copy.deepcopy(res.model), x)
    for name, want in labels.items():
        if want == "fold":
            assert d[name].is_folded, (name, d[name].reason, d[name].detail, facts)
            assert name not in after.counts, (name, "still runs", facts)
        else:
            assert not d[name].is_folded, (name, "must stay", facts)
            assert after.counts[name] == before.counts[name], (name, facts)
    assert type(res.model) is type(model)
    assert rep.verification.passed is True, rep.to_dict()["verification"]

    # within float noise of the original, judged against a float64 run of it
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    err_orig = (y0.double() - ref).abs().max().item()
    err_fold = (_run(res.model, x).double() - ref).abs().max().item()
    noise = max((_run(_nudged(model, s), x).double() - y0.double()).abs().max().item() for s in (1, 2))
    floor = 16 * torch.finfo(x.dtype).eps * ref.abs().max().item()
    assert err_fold <= 8 * max(err_orig, noise) + floor, (err_fold, err_orig, noise, floor, facts)

    # a second fold is a no-op
    folded_state = _state(res.model)
    again = torch_pass.fold(res.model, example_inputs=(x,), verify=False)
    assert not again.report.folded, [f.bn for f in again.report.folded]
    assert _same(folded_state, _state(again.model)) and _same(folded_state, _state(res.model))
