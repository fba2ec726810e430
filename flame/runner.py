"""Parent-side state of one runner."""
from __future__ import annotations

import collections
import datetime
import time
from dataclasses import dataclass, field
from typing import Any

from .backends.base import RunnerHandle

#: Must equal flame.node.node.FN_CACHE_SIZE: both sides keep the same LRU of functions,
#: updated in the same order, so the parent knows which functions the runner holds.
FN_CACHE_SIZE = 256


@dataclass(frozen=True)
class RunnerInfo:
    """A snapshot of one runner, as listed by ``Pool.runners``."""

    id: str
    state: str
    pid: int | None
    host: str
    active: int
    started: datetime.datetime
    gpus: tuple = ()
    python: str = ""
    idle_for: float | None = None
    extra: dict = field(default_factory=dict)


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
        self.started = datetime.datetime.now()
        self.boot_deadline = boot_deadline
        self.stop_deadline: float | None = None
        self.active: dict[str, Any] = {}
        self.last_active = time.monotonic()
        self.last_heard = time.monotonic()
        self.fns: collections.OrderedDict[str, None] = collections.OrderedDict()

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

    def info(self) -> RunnerInfo:
        idle = time.monotonic() - self.last_active if self.state == "ready" and not self.active else None
        return RunnerInfo(self.id, self.state, self.pid, self.host or "localhost", len(self.active),
                          self.started, tuple(self.gpus), self.python, idle,
                          {"gpu_info": list(self.gpu_info)} if self.gpu_info else {})
