"""The cyclic garbage collector paused around passes that make many small objects and free few."""
from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a pass that allocates several small objects per node and frees
    few (loading, folding, counting and saving a model): each collection walks every live wrapper and index
    entry, so a pass over a long graph paid for them again and again (a third of the fold time of a 32k-BN
    chain; another tenth of the whole run in loading and saving). Reference counting still frees what the
    pass drops; the few cycles it makes (exceptions with their frames) wait for the next collection.
    Nested uses are free; the outermost one turns the collector back on."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
