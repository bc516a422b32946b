"""A value computed in a thread of its own while the caller goes on (onnxruntime, numpy's big operations and
hashlib release the GIL, so verification overlaps such work with its model runs, and a fold with the
digest of its input)."""
from __future__ import annotations

from typing import Any, Callable


class Later:
    """A value computed in a thread of its own from now on; get() waits for it (and raises what it raised)."""

    def __init__(self, fn: Callable[..., Any], *args: Any, thread: str = "bnfold", daemon: bool = False,
                 _source: Any = None) -> None:
        """daemon: the interpreter may exit while fn still runs (work nobody may need, as a digest of a
        file whose fold then fails, never delays an exit); else it waits for fn at exit."""
        if _source is not None:
            self._future, self._then = _source, fn
            return
        import concurrent.futures

        self._then = None
        if daemon:
            import threading

            future: concurrent.futures.Future = concurrent.futures.Future()

            def work() -> None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as e:  # noqa: BLE001 - get() raises it in the caller
                        future.set_exception(e)

            self._future = future
            threading.Thread(target=work, name=thread, daemon=True).start()
            return
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread)
        self._future = pool.submit(fn, *args)
        pool.shutdown(wait=False)

    def then(self, fn: Callable[[Any], Any]) -> "Later":
        """The value fn(this value), once this one is there."""
        return Later(fn, _source=self._future)

    def get(self) -> Any:
        value = self._future.result()
        return value if self._then is None else self._then(value)
