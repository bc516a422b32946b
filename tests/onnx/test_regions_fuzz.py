"""Random graphs of convs (odd and even kernels, centred and off-centre pads, groups, dilations), BatchNorms,
per-channel Mul/Add/Sub/Div, sums, LeakyRelus and values read twice: whatever bnfold merges, folds or keeps, the
result computes the same function (its own verification, proven fold by fold, and an independent
onnxruntime run), and a second fold changes nothing."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.onnx_build import G
from tests.helpers.onnx_fold_check import fold_verified

SAME = {1: [(0, 0)], 2: [(1, 0), (0, 1)], 3: [(1, 1), (2, 0)], 4: [(2, 1), (1, 2)]}  # pads keeping the size


def random_graph(rng: np.random.Generator):
    g = G(rng)
    c = int(rng.choice([2, 4]))
    values = [g.node("Tanh", ["x"], ["r0"], name="tanh0")]
    for i in range(int(rng.integers(4, 12))):
        src = values[int(rng.integers(0, len(values)))]
        kind = rng.choice(["conv", "conv", "bn", "affine", "sum", "sum", "relu", "sum3"])
        name = f"n{i}"
        if kind == "conv":
            dil = int(rng.choice([1, 1, 2]))
            k = int(rng.choice([1, 2, 3, 4] if dil == 1 else [1, 3]))
            pb, pe = SAME[k][int(rng.integers(0, len(SAME[k])))] if dil == 1 else ((k - 1), (k - 1))
            group = int(rng.choice([1, c]))
            ins = [src, g.weight(f"{name}_w", (c, c // group, k, k))]
            if rng.integers(0, 2):
                ins.append(g.weight(f"{name}_b", (c,)))
            v = g.node("Conv", ins, [f"{name}_out"], name=name, pads=[pb, pb, pe, pe], group=group,
                       dilations=[dil, dil])
            if rng.integers(0, 3):
                v = g.bn(f"{name}_bn", v, c)
        elif kind == "bn":
            v = g.bn(name, src, c)
        elif kind == "affine":
            op = rng.choice(["Mul", "Add", "Sub", "Div"])
            const = g.init(f"{name}_c", rng.uniform(0.5, 1.5, (c, 1, 1)) * rng.choice([-1, 1], (c, 1, 1)))
            ins = [const, src] if op in ("Mul", "Add", "Sub") and rng.integers(0, 2) else [src, const]
            v = g.node(op, ins, [f"{name}_out"], name=name)
        elif kind in ("sum", "sum3"):
            other = values[int(rng.integers(0, len(values)))]
            if other == src:  # a value minus itself is all zeros: nothing to prove
                other = values[0] if src != values[0] else values[-1]
            if kind == "sum3":
                third = values[int(rng.integers(0, len(values)))]
                v = g.node("Sum", [src, other, third], [f"{name}_out"], name=name)
            else:
                v = g.node(rng.choice(["Add", "Sub"]), [src, other], [f"{name}_out"], name=name)
        else:
            v = g.node("LeakyRelu", [src], [f"{name}_out"], name=name, alpha=0.2)
        values.append(v)
    shape = [2, c, 6, 6]
    # outputs plus tanh(x): a random graph may compute a - a, and an all-zero output proves nothing
    outs = [(g.node("Add", [values[-1], "r0"], ["y"], name="out"), shape)]
    if rng.integers(0, 2) and values[-2] != values[-1] and values[-2] != "r0":
        outs.append((g.node("Add", [values[-2], "r0"], ["y2"], name="out2"), shape))
    return g.model([("x", shape)], outs)


@pytest.mark.parametrize("seed", range(150))
def test_random_graphs_stay_the_same_function(seed):
    rng = np.random.default_rng(seed)
    model = random_graph(rng)
    res = fold_verified(model)
    for d in res.report.folded:
        assert d.proof is not None and (d.proof.get("passed") or "not_run" in d.proof), d.to_dict()
