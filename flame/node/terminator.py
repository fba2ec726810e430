"""A node never outlives its parent: the parent-liveness and failsafe timers, and the ways a
runner leaves (``exit_now``, SIGTERM, its stdin closing), each unlinking its shared memory.

The timers are checked from the node's watch thread on every tick (it runs at least every
heartbeat interval), so no extra thread is needed for them.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from .. import shm

log = logging.getLogger("flame.node")


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


#: Exit code when the parent is gone (or silent past its timeout).
EXIT_PARENT_LOST = 3
#: Exit code when the node's own machinery failed (its traceback is in the log).
EXIT_BROKEN = 4

#: Run before the node exits, whatever the way: unlink our shared memory.
cleanup: list = []


def exit_now(why: str, runner_id: str = "", code: int = EXIT_PARENT_LOST, parent_gone: bool = False) -> None:
    """Exit at once (the parent is gone, or the runner cannot go on). Saying why is best effort:
    stderr may be a closed pipe (an SSH channel that went away), and that must not keep the
    runner alive. With the parent's process gone, its shared memory goes too: no one else would
    unlink it (a parent that is merely silent keeps it)."""
    try:
        for fn in cleanup:
            fn()
        if parent_gone and "-r" in runner_id:
            shm.sweep(shm.pool_owner(runner_id))
    except BaseException:
        pass
    try:
        log.warning("flame runner %s exiting: %s", runner_id, why)
        sys.__stderr__.flush()
    except BaseException:
        pass
    finally:
        os._exit(code)


def terminated(runner_id: str, terminator: Terminator) -> None:
    """SIGTERM (``pkill``, ``scancel``, a host shutting down): unlink our shared memory, then
    die of the signal as before, so that the parent still reads "killed by SIGTERM".

    ``pkill -f`` signals the parent in the same instant, and a parent that dies of SIGTERM
    unlinks nothing: if it is gone a moment later, its files go with ours, as when it is
    killed (exit_now)."""
    try:
        for fn in cleanup:
            fn()
        log.warning("flame runner %s exiting: it was sent SIGTERM", runner_id)
        if terminator.parent_pid is not None and "-r" in runner_id:
            until = time.monotonic() + 0.5
            while time.monotonic() < until and terminator.verdict() is None:
                time.sleep(0.02)
            if (terminator.verdict() or "").startswith("parent process"):
                shm.sweep(shm.pool_owner(runner_id))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def watch_stdin() -> None:
    """EOF on stdin means the connection to the parent is gone: exit at once."""
    fd = sys.stdin.fileno()

    def watch() -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        # A local runner's stdin is a pipe from its parent: EOF is usually the parent's death,
        # and then its shared memory goes with us (over SSH, the connection alone may be gone).
        # The pipe closes while the parent exits, before it is a zombie: give it a moment to be
        # gone for certain, or a parent that is merely closing keeps its memory.
        parent = os.environ.get("FLAME_PARENT_PID")
        gone = False
        if parent:
            until = time.monotonic() + 1.0
            while not gone and time.monotonic() < until:
                gone = not alive(int(parent))
                if not gone:
                    time.sleep(0.01)
        exit_now("its connection (stdin) closed", os.environ.get("FLAME_RUNNER_ID", ""), parent_gone=gone)
    threading.Thread(target=watch, name="flame-node-stdin", daemon=True).start()
