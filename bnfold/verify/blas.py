"""numpy's BLAS on one thread, for the many small float64 products of the local proofs.

A proof's replay multiplies a layer's weights by a few columns of data (a window of a convolution's
output): products too small to share out. OpenBLAS splits them across its threads anyway, and on a
machine whose cores are busy its threads wait for each other: a ResNet-50's 53 proofs took 0.9-1.4 s
on two loaded cores with two threads and 0.3-0.4 s with one. A product may come out summed in
another order (float64 rounding, which the proofs' bound allows for: proofs.F64_TERM), nothing more.

Nothing here is required: where the BLAS cannot be found (another BLAS, another platform) the products
run as numpy configured them.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

# OpenBLAS as numpy wheels ship it (scipy-openblas, 64-bit ints and not), and as distributions build it
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
            "openblas_set_num_threads")
_FOUND: list = []  # [(setter, getter)] once looked for


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with numpy's BLAS on one thread, restoring its thread count after."""
    pairs = _blas()
    before = []
    for setter, getter in pairs:
        try:
            before.append((setter, int(getter())))
            setter(1)
        except Exception:  # noqa: BLE001 - a BLAS that refuses keeps its threads
            continue
    try:
        yield
    finally:
        for setter, n in before:
            try:
                setter(n)
            except Exception:  # noqa: BLE001
                pass


def _blas() -> list:
    if _FOUND:
        return _FOUND[0]
    pairs: list = []
    for path in _openblas_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            getter = getattr(lib, name.replace("set_num", "get_num"), None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                pairs.append((setter, getter))
                break
    _FOUND.append(pairs)
    return pairs


def _openblas_libraries() -> list[str]:
    """The OpenBLAS libraries loaded in this process (numpy's among them), from /proc/self/maps (Linux)."""
    import numpy  # noqa: F401 - its BLAS is loaded with it
    try:
        with open(f"/proc/{os.getpid()}/maps") as f:
            paths = {line.split(None, 5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in os.path.basename(p))
