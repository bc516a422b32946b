"""Protobuf wrappers kept alive for the length of one job.

protobuf's Python objects for the messages of a repeated field (upb's wrappers) live only while something
refers to them. A pass over a model's 100k initializers that finds none alive makes each one and frees it
again (~0.4 us a tensor, more than most passes spend reading it): the load check, the op and parameter
counts, the index and the save each paid for that. Within `holding()`, the lists the first passes make
(protos.tensor_groups, GraphIndex.build) are kept until the job ends, so the later passes find every
wrapper made. Outside it nothing is kept (a library caller's model is never held longer than its call).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, TypeVar

T = TypeVar("T")
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("bnfold_held", default=None)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Keep what hold() is given until the block ends (nested blocks keep theirs to themselves)."""
    token = _HELD.set([])
    try:
        yield
    finally:
        _HELD.reset(token)


def hold(items: T) -> T:
    """`items` itself, kept alive until the innermost holding() block ends (if any)."""
    held = _HELD.get()
    if held is not None:
        held.append(items)
    return items
