"""A value computed in a thread of its own while the caller goes on (onnxruntime and numpy's big operations
release the GIL, so verification overlaps such work with its model runs)."""
from __future__ import annotations

from typing import Any, Callable


class Later:
    """A value computed in a thread of its own from now on; get() waits for it (and raises what it raised)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, thread: str = "bnfold", _source: Any = None) -> None:
        if _source is not None:
            self._future, self._then = _source, fn
            return
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        self._future, self._then = pool.submit(fn, *args), None
        pool.shutdown(wait=False)

    def then(self, fn: Callable[[Any], Any]) -> "Later":
        """The value fn(this value), once this one is there."""
        return Later(fn, _source=self._future)

    def get(self) -> Any:
        value = self._future.result()
        return value if self._then is None else self._then(value)
