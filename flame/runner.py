"""Parent-side state of one runner."""
from __future__ import annotations

import collections
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .backends.base import RunnerHandle

if TYPE_CHECKING:  # pragma: no cover
    import datetime
from .wire import FN_CACHE_SIZE


@dataclass(frozen=True)
class RunnerInfo:
    """A snapshot of one runner, as listed by ``Pool.runners``."""

    id: str
    state: str
    pid: int | None
    host: str
    #: calls on the runner now (running, or sent ahead to it)
    active: int
    started: datetime.datetime
    gpus: tuple = ()
    python: str = ""
    idle_for: float | None = None
    extra: dict = field(default_factory=dict)
    #: values the runner holds for this pool's Remotes
    objects: int = 0
    #: their size in bytes, best effort (``nbytes`` where known, else ``sys.getsizeof``)
    object_bytes: int = 0


class Runner:
    """One runner: booting -> ready -> stopping -> dead."""

    def __init__(self, runner_id: str, boot_deadline: float) -> None:
        self.id = runner_id
        self.state = "booting"
        self.handle: RunnerHandle | None = None
        self.pid: int | None = None
        self.host = ""
        self.python = ""
        self.gpus: tuple = ()
        self.gpu_info: list = []
        self.started = time.time()  # a datetime in RunnerInfo: datetime is not imported to boot
        self.boot_deadline = boot_deadline
        self.stop_deadline: float | None = None
        #: the calls on this runner, by call id: running, or sent ahead
        self.calls: dict[str, Any] = {}
        #: values it holds for Remotes: object id -> bytes
        self.objects: dict[int, int] = {}
        self.last_active = time.monotonic()
        self.last_heard = time.monotonic()
        self.fns: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: the local code's archive the runner has (code sync), and where it keeps archives:
        #: (host, cache directory), from its hello
        self.code: str | None = None
        self.cache: tuple | None = None
        self.executable = ""
        #: calls sent to it so far (each call's ``order`` on it), and the file in which a local
        #: runner counts the calls it has started (``flame/node/starts.py``), if it has one
        self.sent = 0
        self.starts: str | None = None

    def started_calls(self) -> int | None:
        """How many of the calls sent to it the runner had started, by its start count, or
        None without one. Read once the process is gone; the file is unlinked then."""
        if self.starts is None:
            return None
        path, self.starts = self.starts, None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            data = os.pread(fd, 8, 0)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return int.from_bytes(data, "little") if len(data) == 8 else None

    def knows(self, fn_hash: str) -> bool:
        """Record that ``fn_hash`` is sent now; True if the runner already holds it (mirrors its LRU)."""
        fns = self.fns
        if fn_hash in fns:
            fns.move_to_end(fn_hash)
            return True
        fns[fn_hash] = None
        if len(fns) > FN_CACHE_SIZE:
            fns.popitem(last=False)
        return False

    def verdict(self, now: float, exit_code: int | None, silent_after: float) -> str | None:
        """What the runner's state and ``exit_code`` (from its handle) call for, or None:
        "exited", "boot timeout", "stop overdue" or "silent". Pure, like the terminator's."""
        if self.state == "dead":
            return None
        if exit_code is not None:
            return "exited"
        if self.state == "booting" and now > self.boot_deadline:
            return "boot timeout"
        if self.state == "stopping" and self.stop_deadline is not None and now > self.stop_deadline:
            return "stop overdue"
        if self.state == "ready" and now - self.last_heard > silent_after:
            return "silent"
        return None

    def info(self) -> RunnerInfo:
        import datetime
        idle = (time.monotonic() - self.last_active
                if self.state == "ready" and not self.calls and not self.objects else None)
        return RunnerInfo(self.id, self.state, self.pid, self.host or "localhost", len(self.calls),
                          datetime.datetime.fromtimestamp(self.started), tuple(self.gpus), self.python, idle,
                          {"gpu_info": list(self.gpu_info)} if self.gpu_info else {},
                          len(self.objects), sum(self.objects.values()))
