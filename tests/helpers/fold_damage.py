"""Wrong folds planted the way real bugs damage them, for the self-healing and local-proof tests."""
from __future__ import annotations

import numpy as np

from bnfold.core import kernel

def damage(f: kernel.Folded, how: str, groups: int = 1) -> kernel.Folded:
    """Damage the kernel's result `f` in place and return it. `how`: "scale" one output channel's weight
    off by one part in 1e4; "bias" one bias shifted by 1e-4 of its magnitude; "axis" two channels swapped
    (a wrong channel axis); "group" the first two of `groups` output groups swapped."""
    w, b = f.weight.astype(np.float64).copy(), f.bias.astype(np.float64).copy()
    if how == "scale":
        w[1] *= 1.0001
    elif how == "bias":
        b[1] += 1e-4 * max(abs(b[1]), 1e-3)
    elif how == "axis":
        w[[0, 1]] = w[[1, 0]]
    elif how == "group":
        per = w.shape[0] // groups
        w[:per], w[per:2 * per] = w[per:2 * per].copy(), w[:per].copy()
    f.weight, f.bias = w.astype(f.weight.dtype), b.astype(f.bias.dtype)
    return f
