"""Parent-liveness and failsafe timers: a node never outlives its parent.

Checked from the node's I/O loop on every tick (it runs at least every
heartbeat interval), so no extra thread is needed.
"""
from __future__ import annotations

import os
import time


class Terminator:
    """Says why the node must exit, or None.

    - ``failsafe``: the parent never answered the hello within this many seconds.
    - ``parent_timeout``: no message from the parent for this many seconds.
    - ``parent_pid``: for runners started on the parent's machine, the parent's pid: when that
      process is gone (even by SIGKILL) the node exits at once. A runner the parent started
      itself notices by being re-parented, a runner forked by a template process (whose parent
      is the template) by probing the pid: the template may die and its runners live on.
    """

    def __init__(self, parent_timeout: float, failsafe: float, parent_pid: int | None) -> None:
        self.parent_timeout = parent_timeout
        self.failsafe = failsafe
        self.parent_pid = parent_pid
        self.started = time.monotonic()
        self.last_heard: float | None = None

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def verdict(self) -> str | None:
        now = time.monotonic()
        if self.parent_pid is not None and os.getppid() != self.parent_pid and not alive(self.parent_pid):
            return f"parent process {self.parent_pid} is gone"
        if self.last_heard is None:
            if now - self.started > self.failsafe:
                return f"parent did not answer within the {self.failsafe:g} s failsafe"
        elif now - self.last_heard > self.parent_timeout:
            return f"no word from the parent for {self.parent_timeout:g} s"
        return None


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs. A parent killed while its own parent (a Jupyter server, a
    shell) has not reaped it yet is a zombie: it still answers signal 0, but it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): signal 0 is all there is
    return state not in (b"Z", b"X")
