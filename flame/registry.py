"""The pools of this process that are not shut down: listed (``flame.pools()``), shut down
together at exit, and told when a runner of any of them is gone (its handles with it)."""
from __future__ import annotations

import atexit
import weakref
from typing import Any

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


def add(pool: Any) -> None:
    _live.add(pool)


def discard(pool: Any) -> None:
    _live.discard(pool)


def pools() -> list:
    """Every pool of this process that is not shut down, by name."""
    return sorted(_live, key=lambda p: p.name)


def shutdown_all() -> None:
    """Shut every pool of this process down now, without waiting for calls to finish."""
    for pool in list(_live):
        pool.shutdown(wait=False)


atexit.register(shutdown_all)
