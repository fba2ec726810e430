"""Calls that run many: a chunk of ``map``'s items (``Pool.map(..., chunksize=n)``), n calls'
worth of work in one message each way; and a joblib batch (``flame.register_joblib``)."""
from __future__ import annotations

from typing import Any, Callable, Sequence


def run_chunk(fn: Callable, items: Sequence[tuple]) -> list:
    """``[fn(*xs) for xs in items]``: the first exception ends the chunk, as it would the calls."""
    return [fn(*xs) for xs in items]


def run_batch(batch: Callable[[], Any]) -> Any:
    """One joblib batch (a ``BatchedCalls``), called: sent as an argument, so the arrays in it
    travel out of band (shared memory locally)."""
    return batch()
