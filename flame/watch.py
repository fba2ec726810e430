"""The pool's own threads besides the endpoint's: the watch thread and the helpers.

No backend call ever runs under the pool's lock: ``boot()`` runs on a helper thread per
boot, ``terminate()`` on one per runner (SSH waits up to 15 s, ``scancel`` up to 60 s), and
``exit_status()``/``stderr_tail()`` on the watch thread, which asks every runner's handle
outside the lock and then hands what it heard to the fleet, which acts on it under the lock.
Shutdown waits for the helpers (``join``): a boot that ends after shutdown dropped its
runner then reaps it before shutdown returns.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from . import shm
from .backends.base import Backend, RunnerSpec
from .endpoint import TICK
from .errors import BootError

if TYPE_CHECKING:  # pragma: no cover
    from .fleet import Fleet
    from .runner import Runner

log = logging.getLogger("flame.pool")


class Watch:
    """The watch thread of one pool and the helper threads running now."""

    def __init__(self, fleet: Fleet, backend: Backend, name: str, parent_timeout: float) -> None:
        self._fleet = fleet
        self._backend = backend
        self._name = name
        # A runner heartbeats as often as its parent; silent for this long, it is gone.
        self._silent_after = max(10.0, 3 * parent_timeout)
        self._helpers: set[threading.Thread] = set()
        self._stopped = threading.Event()
        self._fail: Callable[[BaseException], None] = lambda exc: None

    def start(self, stopped: threading.Event, fail: Callable[[BaseException], None]) -> None:
        """Watch until ``stopped`` is set; should the thread itself fail, ``fail`` says why."""
        self._stopped, self._fail = stopped, fail
        threading.Thread(target=self._loop, name=f"flame-{self._name}-watch", daemon=True).start()

    def boot(self, r: Runner, spec: RunnerSpec) -> None:
        """Boot ``r`` on a helper: backend.boot() may block."""
        self._helper(functools.partial(self._boot, r, spec), f"flame-boot-{r.id}")

    def reap(self, r: Runner) -> None:
        """Force-stop ``r``'s process on a helper: terminate() may block (SSH, scancel)."""
        self._helper(functools.partial(self._reap, r), f"flame-terminate-{r.id}")

    def join(self, deadline: float) -> None:
        """Wait until ``deadline`` for the helpers, also those started meanwhile."""
        while time.monotonic() < deadline:
            alive = [t for t in list(self._helpers) if t.is_alive()]
            if not alive:
                return
            for t in alive:
                t.join(timeout=max(0.0, deadline - time.monotonic()))

    def _helper(self, work: Callable[[], None], name: str) -> None:
        def run() -> None:
            try:
                work()
            finally:
                self._helpers.discard(threading.current_thread())
        t = threading.Thread(target=run, name=name, daemon=True)
        # Started before it is listed: joining a thread not yet started raises.
        t.start()
        self._helpers.add(t)
        if not t.is_alive():  # it ended before it was listed, and its discard came first
            self._helpers.discard(t)

    def _boot(self, r: Runner, spec: RunnerSpec) -> None:
        try:
            handle = self._backend.boot(spec)
        except Exception as exc:
            self._fleet.boot_failed(r, BootError(f"runner {r.id} could not be started by {self._backend!r}: {exc}"))
            return
        self._fleet.booted(r, handle)

    def _reap(self, r: Runner) -> None:
        try:
            self._backend.terminate(r.handle)
            if getattr(self._backend, "shared_memory", False) or not self._backend.remote:
                shm.sweep(r.id)  # its arena and start count, now that it cannot make them
        except Exception:
            log.exception("flame: backend failed to terminate runner %s", r.id)
        self._fleet.reaped(r)

    def _loop(self) -> None:
        """Ask backends how their runners are, outside the lock; the fleet acts on what they say."""
        silent_after = self._silent_after
        try:
            while not self._stopped.wait(TICK):
                now = time.monotonic()
                found = []
                for r in self._fleet.list():
                    handle = r.handle
                    code = handle.exit_status() if handle is not None else None  # may run squeue
                    why = r.verdict(now, code, silent_after)
                    if why is not None:
                        tail = handle.stderr_tail() if handle is not None and why != "stop overdue" else ""
                        found.append((r, why, code, tail))
                if found:
                    self._fleet.verdicts(found, now, silent_after)
        except BaseException as exc:  # noqa: BLE001
            log.exception("flame: %s watch thread failed", self._name)
            self._fail(exc)
