"""A local runner's start count: kept where its pool can read it after a SIGKILL.

The pool requeues the calls a dead runner never started and fails the others. Replies
cannot tell it which is which: a reply handed to ZeroMQ may still be in its I/O thread's
hands when the process is killed, and the call after it has started by then. So a local
runner keeps, in a file in /dev/shm that only it writes, one more than the highest index
(place among the calls it received) of a call it has started, written through a shared
mapping before the call runs anything, its arguments' unpickling included: no system call
per call, and the page outlives the process. The pool reads it once the runner is gone
(``Runner.started_calls``) and unlinks it.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("flame.node")


class StartCount:
    """The count in the file at ``path``, created 0600 with ``O_EXCL``; inert if it cannot be."""

    def __init__(self, path: str) -> None:
        import mmap
        self.path = path
        self.count = 0
        self.lock = threading.Lock()  # worker threads start calls concurrently
        self.mm = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.warning("flame runner: no start count (%s): if this runner is killed, its pool "
                        "can only guess which calls had started", exc)
            return
        try:
            os.ftruncate(fd, 8)
            self.mm = mmap.mmap(fd, 8)
        finally:
            os.close(fd)

    def started(self, index: int) -> None:
        """Call ``index`` (its place among the calls received) starts now."""
        if self.mm is not None:
            with self.lock:  # worker threads may start calls out of their order: keep the highest
                if index >= self.count:
                    self.count = index + 1
                    self.mm[:8] = self.count.to_bytes(8, "little")

    def close(self) -> None:
        """Unlink the file (the runner exits; a mapping would outlive it anyway)."""
        if self.mm is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
