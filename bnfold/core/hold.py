"""Protobuf wrappers kept alive for the length of one job.

protobuf's Python objects for the messages of a repeated field (upb's wrappers) live only while something
refers to them. A pass over a model's 100k initializers that finds none alive makes each one and frees it
again (~0.4 us a tensor, more than most passes spend reading it): the load check, the op and parameter
counts, the index and the save each paid for that. Within `holding()`, the lists the first passes make
(protos.tensor_groups, GraphIndex.build) are kept until the job ends, so the later passes find every
wrapper made. Outside it nothing is kept (a library caller's model is never held longer than its call).

A block also keeps what a pass noted about an object for the ones after it (`note`, `noted`): the load check
sums the elements of a model's initializers as it reads their dims, and the count of the model as loaded uses
that sum instead of reading every tensor's dims again; it also notes when a long graph's file records no module
paths (onnx/names.py). A note describes its object as it was noted: code inside a block that changes a noted
object in place forgets its notes first (a fold in place does). Blocks are bnfold's own: nothing a library caller
gets back (bnfold.load's model included) carries a note.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, TypeVar

T = TypeVar("T")
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("bnfold_held", default=None)
_NOTES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bnfold_notes", default=None)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Keep what hold() is given until the block ends (nested blocks keep theirs to themselves)."""
    token, notes = _HELD.set([]), _NOTES.set({})
    try:
        yield
    finally:
        _NOTES.reset(notes)
        _HELD.reset(token)


def note(owner: object, key: str, value: object) -> None:
    """Remember `value` about `owner` until the innermost holding() block ends (outside one: nothing). A later
    note of the same key replaces it. Only for what stays true of `owner` until the reader asks."""
    notes = _NOTES.get()
    if notes is not None:
        notes[id(owner), key] = (owner, value)  # (owner kept: its id() stays its own)


def forget(owner: object) -> None:
    """Drop every note about `owner` in this block (it is about to change: a fold in place)."""
    notes = _NOTES.get()
    if notes:
        for k in [k for k, (o, _) in notes.items() if o is owner]:
            del notes[k]


def noted(owner: object, key: str) -> object | None:
    """What note() remembered about `owner` under `key` in this block, or None."""
    notes = _NOTES.get()
    entry = notes.get((id(owner), key)) if notes else None
    return entry[1] if entry is not None and entry[0] is owner else None


def hold(items: T) -> T:
    """`items` itself, kept alive until the innermost holding() block ends (if any)."""
    held = _HELD.get()
    if held is not None:
        held.append(items)
    return items
