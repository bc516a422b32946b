"""Is a loaded ONNX model sound? Tensor data against the dims it declares, and onnx's checker on the
file's bytes run beside it (load_onnx calls both)."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from typing import Callable, Iterator

import onnx

from ..core.errors import BnfoldError
from .protos import all_tensors, itemsize


def passes_checker(data: bytes) -> bool:
    """Does onnx's checker (no shape inference) accept the serialised model `data`?"""
    try:
        onnx.checker.check_model(data, full_check=False)
    except Exception:  # noqa: BLE001 - the caller's structure check gives the verdict and the message
        return False
    return True


# a forked child that only runs onnx's C++ checker and leaves with os._exit: Linux (fork is unsafe beside
# other platforms' system frameworks) with a second CPU to run it on
FORK_CHECK = sys.platform.startswith("linux") and hasattr(os, "fork")


@contextlib.contextmanager
def checking(data: bytes | None) -> Iterator[Callable[[], bool]]:
    """onnx's checker on the serialised model `data` (None: no check), beside what the block does; the block
    calls the function it gets for the verdict (True: the model passes).

    The checker holds the GIL for its whole run (as long as the rest of a 32k-node model's load), so a
    thread would not run beside it: a forked child does, on another CPU, and says its verdict by its
    exit status. Where no child can be forked, or its check ended other than by a verdict (killed, or
    crashed on a hostile model), the verdict is False: the caller's own structure check decides."""
    if data is None or not FORK_CHECK or (os.cpu_count() or 1) < 2:
        yield lambda: data is not None and passes_checker(data)
        return
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:  # the child: the check, its verdict as the exit status, no exit handler of the parent's run
        code = 3
        try:
            code = 0 if passes_checker(data) else 1
        finally:
            os._exit(code)
    status: list[int] = []

    def passes() -> bool:
        if pid < 0:
            return passes_checker(data)
        if not status:
            status.append(os.waitpid(pid, 0)[1])
        return os.waitstatus_to_exitcode(status[0]) == 0

    try:
        yield passes
    finally:
        if pid > 0 and not status:  # the block ended early (an error): the child's verdict is not needed
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            os.waitpid(pid, 0)


_EXACT_RAW = 8 << 20  # reading raw_data's length copies the bytes: bigger tensors are checked when read


def check_sizes(model: onnx.ModelProto, path: str, size: int | None) -> None:
    """Each tensor holds as much data as its dims declare (a mismatch would crash, or allocate what the
    dims claim, later); on-disk tensors were checked against their files when left there. A tensor over
    _EXACT_RAW bytes is only checked against `size`, the file's, here (ondisk.tensor_value checks it
    exactly)."""
    T = onnx.TensorProto
    for t in all_tensors(model):  # a model may hold hundreds of thousands: ~1.5 us each
        dims = t.dims[:]  # (a list: iterating the repeated field itself ends in a raised IndexError)
        if dims and min(dims) < 0:
            raise BnfoldError(f"tensor {t.name!r} has a negative dimension {dims}", path)
        item = itemsize(t.data_type)
        if not item or t.data_location == T.EXTERNAL:
            continue  # strings, unknown types (the checker speaks of those) and external data (checked when read)
        n = math.prod(dims)
        if t.HasField("raw_data"):
            want, unit = (n + 1) // 2 if item < 0 else n * item, "bytes"
            if size is not None and want > size:
                raise BnfoldError(f"tensor {t.name!r} declares dims {dims} ({want} bytes), more than the "
                                  f"whole file holds ({size}); the file is corrupt", path)
            if want > _EXACT_RAW:
                continue
            have = len(t.raw_data)
        else:
            have = len(t.float_data) + len(t.int32_data) + len(t.int64_data) + len(t.double_data) + len(t.uint64_data)
            want = 2 * n if t.data_type in _TWO_FLOATS else (n + 1) // 2 if item < 0 else n
            unit = "values"
        if have != want:
            raise BnfoldError(f"tensor {t.name!r} declares dims {dims} ({want} {unit}) but holds {have} "
                              f"{unit}; the file is corrupt", path)


_TWO_FLOATS = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)  # two values an element
