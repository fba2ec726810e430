"""A pool's lock, and the effects its holders queue to run once it is released.

Nothing slow or foreign runs under the lock: no backend call, no future callback (user
code), no unpickling. A transition that needs one queues it with ``later``; whoever
releases the lock runs what was queued meanwhile, in order, on its own thread.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger("flame.pool")


class State:
    """``with state:`` holds the lock; leaving releases it, then runs the queued effects."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.lock = threading.Lock()
        self._effects: list[Callable[[], Any]] = []
        #: queue an effect (under the lock); a bound method: this is the per-call path
        self.later = self._effects.append
        self.acquire = self.lock.acquire

    def __enter__(self) -> "State":
        self.lock.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Release the lock, then run the effects queued while it was held."""
        if not self._effects:
            self.lock.release()
            return
        todo = self._effects.copy()
        self._effects.clear()
        self.lock.release()
        for effect in todo:
            try:
                effect()
            except Exception:
                log.exception("flame: %s: %r failed", self._name, effect)
