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


# the packages every install has (pyproject's dependencies), by the module name an import of them fails on
CORE_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "numpy": "numpy", "ml_dtypes": "ml_dtypes",
                 "google": "protobuf"}


def core_dependency_error(e: BaseException) -> BnfoldError | None:
    """A failed import of one of bnfold's own dependencies (not installed: ModuleNotFoundError; installed but
    broken: ImportError naming it) as the one-line error it is, about the machine; None for anything else."""
    if not isinstance(e, ImportError):
        return None
    package = CORE_PACKAGES.get((e.name or "").split(".")[0])
    if package is None:
        return None
    return BnfoldError(f"this needs {package}, which bnfold depends on, but it cannot be imported ({e}): "
                       f"pip install {package}")


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
