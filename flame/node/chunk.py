"""Calls that run many: a chunk of ``map``'s items (``Pool.map(..., chunksize=n)``), n calls'
worth of work in one message each way; and a joblib batch (``flame.register_joblib``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence


def run_chunk(fn: Callable, items: Sequence[tuple]) -> list:
    """``[fn(*xs) for xs in items]``: the first exception ends the chunk, as it would the calls.
    Where its caller shows reports (``flame.report``), each item's are a series of their own."""
    from . import capture
    out = capture.installed.current() if capture.installed is not None else None
    if out is None or not out.reports:  # the per-item path: nothing more than the calls
        return [fn(*xs) for xs in items]
    from .report import current_item
    results = []
    try:
        for i, xs in enumerate(items):
            current_item.index = i
            results.append(fn(*xs))
    finally:
        current_item.index = 0
    return results


def run_batch(batch: Callable[[], Any]) -> Any:
    """One joblib batch (a ``BatchedCalls``), called: sent as an argument, so the arrays in it
    travel out of band (shared memory locally)."""
    return batch()
