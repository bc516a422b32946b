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


# the packages every install has (pyproject's dependencies), by the modules an import of them fails on
CORE_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "numpy": "numpy", "ml_dtypes": "ml_dtypes",
                 "google.protobuf": "protobuf", "google._upb": "protobuf"}  # ("google" alone is a shared namespace)


def core_dependency_error(e: BaseException) -> BnfoldError | None:
    """A failed import of one of bnfold's own dependencies (not installed: ModuleNotFoundError; installed but
    broken: an ImportError naming it, here or in what caused it, as numpy's own re-raise of a compiled part
    that does not load) as the one-line error it is, about the machine; None for anything else."""
    seen: list[BaseException] = []
    cause: BaseException | None = e
    while isinstance(cause, ImportError) and not any(cause is c for c in seen):
        package = _core_package(cause.name or "")
        if package is not None:
            why = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), type(cause).__name__)
            return BnfoldError(f"this needs {package}, which bnfold depends on, but it cannot be imported "
                               f"({why}): pip install {package}")
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def _core_package(module: str) -> str | None:
    for prefix, package in CORE_PACKAGES.items():
        if module == prefix or module.startswith(prefix + "."):
            return package
    return None


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
