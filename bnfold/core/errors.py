"""Two kinds of failure: the user's input is bad (exit 2, one line), or bnfold has a bug (traceback)."""
from __future__ import annotations


class BnfoldError(Exception):
    """The user's input or request cannot be honoured. The CLI prints one line and exits 2."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class MissingExtraError(BnfoldError):
    """A framework package is needed but not installed; names the pip extra that brings it."""

    def __init__(self, package: str, extra: str, path: str | None = None) -> None:
        super().__init__(
            f"this needs {package}, which is not installed: pip install 'bnfold[{extra}]'", path
        )


class VerificationFailed(AssertionError):
    """Raised by library helpers (bnfold.testing) when two models are not the same function."""


class WriteFailed(BnfoldError, OSError):
    """An output could not be written (read-only folder, disk full...): one line and exit 2 like any
    BnfoldError, and still the OSError that callers of bnfold.save caught before it existed."""

    def __init__(self, message: str, path: str | None = None, errno: int | None = None,
                 strerror: str | None = None) -> None:
        BnfoldError.__init__(self, message, path)
        self.errno, self.strerror, self.filename = errno, strerror, path

    __str__ = BnfoldError.__str__
