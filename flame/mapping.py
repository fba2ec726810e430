"""What ``Pool.map`` returns: its results in input order, each when it is reached, as
``concurrent.futures.Executor.map`` gives them."""
from __future__ import annotations

import collections
import time
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from typing import Any, Callable, Iterator


class MapResults(Iterator):
    """The results of one ``map``, lazily and in order. A call's exception is raised when its
    result is reached, and then the calls not yet done are cancelled, as they are when the
    object is dropped part-read or :meth:`close` d (dropped unread, its calls run on, as with
    ``Executor.map``); a result already yielded is no longer referenced
    here. ``timeout`` counts from the ``map`` call. In a notebook, as a cell's value, it shows
    its progress line and then its results as a list."""

    def __init__(self, futures: list, timeout: float | None, chunked: bool, tracker: Any) -> None:
        self._futures = collections.deque(futures)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._chunk: collections.deque = collections.deque()
        self._chunked = chunked
        self._tracker = tracker
        self._read = False  # dropped before any result was read, its calls go on (as the stdlib's)

    def __iter__(self) -> "MapResults":
        return self

    def __next__(self) -> Any:
        self._read = True
        if self._chunk:
            return self._chunk.popleft()
        if not self._futures:
            self.close()
            raise StopIteration
        future = self._futures.popleft()
        try:
            if self._deadline is None:
                value = future.result()
            else:
                value = future.result(max(0.0, self._deadline - time.monotonic()))
        except FutureTimeout:
            future.cancel()
            self.close()
            raise FutureTimeout("a map result was not ready within its timeout") from None
        except BaseException:
            self.close()
            raise
        del future  # the future holds the result: only the caller keeps it now
        if not self._chunked:
            return value
        self._chunk.extend(value)
        return self.__next__()

    def close(self) -> None:
        """Cancel the calls not yet done (their results will not be asked for)."""
        while self._futures:
            self._futures.pop().cancel()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def __del__(self) -> None:
        try:
            if self._read:
                self.close()
            elif self._tracker is not None:
                self._tracker.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<flame map results: {len(self._futures)} call(s) not yet read>"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """As a notebook cell's value: wait for the rest (the progress line shows meanwhile)
        and show the results as a list."""
        printer.pretty(list(self))


def start(queue: Callable[..., list], fn: Callable, iterables: tuple,
          timeout: float | None, chunksize: int) -> MapResults:
    """Queue the calls of one ``map`` through ``queue`` (the pool's: a function and a list of
    ``(args, kwargs)`` to futures), ``chunksize`` items a call, and return their results."""
    title = f"map({getattr(fn, '__qualname__', None) or type(fn).__name__})"
    items = list(zip(*iterables))
    if chunksize > 1:
        from .node.chunk import run_chunk
        futures = queue(run_chunk, [((fn, items[i:i + chunksize]), {}) for i in range(0, len(items), chunksize)],
                        per_call=chunksize)
    else:
        futures = queue(fn, [(xs, {}) for xs in items], per_call=1)
    from .progress import Tracker  # here: the progress line is only for batches
    return MapResults(futures, timeout, chunksize > 1, Tracker(title, futures))
