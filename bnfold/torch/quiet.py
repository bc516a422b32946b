"""Keep torch's own chatter (exporter progress, warnings, FX graph dumps) off bnfold's stdout and stderr."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Any


@contextlib.contextmanager
def quiet() -> Any:
    """torch.onnx.export prints progress and warnings; the CLI's stdout must stay clean for --json."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
