"""Where a run is, on stderr only: a live bar on a terminal, plain lines in a log, nothing with -q.

On a terminal the display is rich's (an optional dependency, `pip install 'bnfold[progress]'`; Keras
brings it too): one bar over the models of a batch, one over the current model's verification runs
(a Step per provider and batch, counted by the verifier), the current step as text and the elapsed
time. Without rich a terminal gets the plain lines. Not on a terminal (a CI log), a batch prints one
line per model as it starts and ends; a single model prints nothing but its report, so an error stays
the one line on stderr. stdout never sees any of it: it carries the report (or the JSON document).
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO


class Progress:
    """Progress of one command: `model()` / `done()` around each model, `say()` as Options.progress."""

    def __init__(self, mode: str, models: int, stream: TextIO | None = None) -> None:
        self.mode, self.models, self.stream = mode, models, stream or sys.stderr
        self.k = 0
        self.name = ""
        self._live: Any = None
        self._batch_task = self._step_task = None
        if mode == "bar":
            self._start_rich()

    @classmethod
    def choose(cls, quiet: bool, models: int, stream: TextIO | None = None) -> "Progress":
        """A bar on a terminal, lines for a batch in a log, nothing when quiet (or one model in a log)."""
        s = stream or sys.stderr
        tty = hasattr(s, "isatty") and s.isatty()
        if quiet:
            return cls("off", models, s)
        if tty:
            return cls("bar", models, s)
        return cls("lines" if models > 1 else "off", models, s)

    # -- rich --------------------------------------------------------------------------------------
    def _start_rich(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)
        except ImportError:
            self.mode = "plain"  # a terminal without rich: the plain lines, as before
            return
        self._live = RichProgress(SpinnerColumn(), TextColumn("bnfold: {task.description}"), BarColumn(bar_width=24),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(file=self.stream, stderr=True), transient=True)
        self._live.start()
        if self.models > 1:
            self._batch_task = self._live.add_task("models", total=self.models)
        self._step_task = self._live.add_task("starting", total=None)

    # -- events ------------------------------------------------------------------------------------
    def model(self, path: str) -> None:
        """A model starts."""
        self.k += 1
        self.name = path
        tag = f"[{self.k}/{self.models}] " if self.models > 1 else ""
        if self._live is not None:  # a bar line is one terminal line: the file's name, not its whole path
            self.name = os.path.basename(os.path.normpath(path))
            self._live.reset(self._step_task, total=None, description=f"{tag}{self.name}: loading")
        elif self.mode in ("lines", "plain"):
            self._line(f"{tag}{path}")

    def say(self, msg: str) -> None:
        """A step of the current model (Options.progress); a Step also moves the bar."""
        tag = f"[{self.k}/{self.models}] " if self.models > 1 else ""
        if self._live is not None:
            total = getattr(msg, "total", None)
            done = getattr(msg, "done", None)
            kw = {"total": total, "completed": done} if total else {}
            self._live.update(self._step_task, description=f"{tag}{self.name}: {msg}", **kw)
        elif getattr(msg, "total", None) is not None:
            return  # plain lines carry the notable steps, not every batch run
        elif self.mode == "plain":
            self._line(f"{tag}{msg}...")
        elif self.mode == "lines":
            self._line(f"{tag}{self.name}: {msg}")

    def done(self, path: str, status: str) -> None:
        """A model ended with `status` (a short phrase)."""
        tag = f"[{self.k}/{self.models}] " if self.models > 1 else ""
        if self._live is not None:
            if self._batch_task is not None:
                self._live.advance(self._batch_task)
                self._live.console.print(f"bnfold: {tag}{path}: {status}", highlight=False, markup=False,
                                         soft_wrap=True)
        elif self.mode == "lines" or (self.mode == "plain" and self.models > 1):
            self._line(f"{tag}{path}: {status}")

    def note(self, msg: str) -> None:
        """A line worth keeping whatever the mode but off (e.g. files a folder run leaves out)."""
        if self.mode == "off":
            return
        if self._live is not None:
            self._live.console.print(f"bnfold: {msg}", highlight=False, markup=False, soft_wrap=True)
        else:
            self._line(msg)

    def close(self) -> None:
        """Remove the live display (idempotent)."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _line(self, text: str) -> None:
        print(f"bnfold: {text}", file=self.stream, flush=True)
