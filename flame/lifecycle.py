"""The runner lifecycle: booting -> ready -> stopping -> dead.

A mixin of :class:`flame.pool.Pool`: it works on the pool's state, under the pool's lock,
and queues backend calls as effects (``_later``) or makes them on threads of its own, so
that no backend call ever runs under the lock: ``boot()`` on a thread per boot,
``terminate()`` on a thread per runner (SSH waits up to 15 s, ``scancel`` up to 60 s), and
``exit_status()``/``stderr_tail()`` on the watch thread, which asks every runner's handle
outside the lock and then acts on what it heard, under it.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from . import present, shm, wire
from .backends.base import RunnerSpec
from .endpoint import TICK
from .errors import BootError, RunnerDied
from .runner import Runner

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger("flame.pool")

#: How long a runner asked to stop may take before it is killed.
STOP_GRACE = 2.0


class RunnerLifecycle:
    """Booting, stopping, dropping and watching the pool's runners (caller holds the lock
    unless a method says otherwise)."""

    def _boot(self: "Pool") -> None:
        rid = f"{self._id_prefix}{next(self._runner_ids)}"
        r = self._runners[rid] = Runner(rid, time.monotonic() + self.boot_timeout)
        spec = RunnerSpec(rid, self.address, {
            "FLAME_RUNNER_ID": rid, "FLAME_ADDRESS": self.address, "FLAME_KEY": self._key.hex(),
            "FLAME_CONCURRENCY": str(self.max_concurrency), "FLAME_HEARTBEAT": str(wire.HEARTBEAT),
            "FLAME_PARENT_TIMEOUT": str(self.parent_timeout), "FLAME_FAILSAFE": str(self.boot_timeout),
        }, self.max_concurrency)
        if self._endpoint.curve_public is not None:
            spec.env["FLAME_CURVE_SERVER"] = self._endpoint.curve_public.decode()  # a public key
        if not self.backend.remote and shm.available():  # it counts the calls it starts there
            r.starts = spec.env["FLAME_STARTS"] = f"{shm.DIR}/flame-{rid}-starts"
        if self._code is not None:  # it boots from archives it fetches from us (node/boot.py)
            spec.env["FLAME_BOOT"] = json.dumps(self._code.boot_settings())
            r.code = self._code.code_digest()
        self._helper(functools.partial(self._boot_thread, r, spec), f"flame-boot-{rid}")
        log.info("flame: booting runner %s", rid)

    def _helper(self: "Pool", work: Callable[[], None], name: str) -> None:
        """Run ``work`` on a thread of its own, which shutdown waits for: a boot that ends after
        shutdown dropped its runner then reaps it before shutdown returns."""
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

    def _boot_thread(self: "Pool", r: Runner, spec: RunnerSpec) -> None:
        """On a thread of its own: backend.boot() may block."""
        try:
            handle = self.backend.boot(spec)
        except Exception as exc:
            with self._state():
                self._boot_failed(r, BootError(f"runner {r.id} could not be started by "
                                               f"{self.backend!r}: {exc}"))
            return
        capacity = self.backend.capacity()
        with self._state():
            r.handle, r.pid, r.host = handle, handle.pid, handle.host
            self._capacity = capacity
            if r.state == "dead":  # the pool gave up on it meanwhile
                self._later.append(functools.partial(self._reap, r))
            else:
                self._schedule()

    # ---- code sync: runners on other machines get flame and the local code from the pool --------
    def _serve_code(self: "Pool", peer: str, digest: str) -> bytes | None:
        """On the receiving thread: the archive a booting runner of this pool asks for."""
        with self._lock:
            r = self._runners.get(peer.removesuffix("/boot"))
            if r is None or r.state != "booting":
                return None
        return self._code.serve(digest, r.id)

    def _push_code(self: "Pool", r: Runner) -> None:
        """The local code changed since ``r`` got it: send the new archive ahead of its next call,
        or only its name where the runner's host is known to have it."""
        archive = self._code.now
        self._endpoint.send(r.id, "code", {"h": archive.digest}, self._code.frames_for(archive, r.cache, r.id))
        r.code = archive.digest
        r.fns.clear()  # the runner forgets its functions too: some refer to the old modules

    def _boot_failed(self: "Pool", r: Runner, error: BootError) -> None:
        log.warning("flame: %s", error)
        self._drop_runner(r, None, reschedule=False)
        self._min_paused = True
        # Fail the waiting calls that the runners still booting cannot take, unless a ready
        # runner will serve them: a broken boot must surface, not retry forever.
        if not any(x.state == "ready" for x in self._runners.values()):
            keep = sum(1 for x in self._runners.values() if x.state == "booting") * self.max_concurrency
            while len(self._waiting) > keep:
                self._finish(self._waiting.popleft(), exc=error)

    def _stop_runner(self: "Pool", r: Runner) -> None:
        r.state = "stopping"
        r.stop_deadline = time.monotonic() + STOP_GRACE
        self._endpoint.send(r.id, "shutdown")
        log.info("flame: stopping runner %s", r.id)

    def _drop_runner(self: "Pool", r: Runner, error: Exception | None, reschedule: bool = True) -> None:
        """Forget a runner, fail its calls with ``error``, and make sure its process is gone."""
        if r.state == "dead":
            return
        r.state = "dead"
        self._runners.pop(r.id, None)
        self._endpoint.wire.forget(r.id)
        self._endpoint.wire.fast_peers.discard(r.id)
        if self._arena is not None:
            self._arena.release_all(r.id)  # whatever it held of ours is ours again
        self._mappings.forget(f"flame-{r.id}-")
        error = error or RunnerDied(f"runner {r.id} stopped", r.id)
        # A runner starts its calls in the order they were sent. A local one counts them in its
        # start count (node/starts.py) before it starts each: the calls past it provably never
        # started, and run elsewhere instead of failing. Without the file, only the first
        # max_concurrency unanswered calls are taken to have started, since a runner hands each
        # reply to ZeroMQ before it starts another call (not proof: ZeroMQ may not have sent
        # it when the process is killed).
        unanswered = [c for c in r.calls.values() if c.state == "running"]
        started = r.started_calls()
        never_started = (unanswered[self.max_concurrency:] if started is None
                         else [c for c in unanswered if c.order >= started])
        # Only a call sent ahead kept its arguments (the others let them go once sent).
        never_started = [c for c in never_started if c.arg_frames is not None]
        if never_started and isinstance(error, RunnerDied) and not self._closed:
            for call in never_started:
                r.calls.pop(call.id)
            self._requeue(never_started)
            log.info("flame: %d call(s) sent ahead to runner %s never started; queued again",
                     len(never_started), r.id)
        for call in list(r.calls.values()):
            self._finish(call, exc=error)
        for call in [c for c in self._waiting if c.strict and c.affinity == r.id]:
            self._waiting.remove(call)  # it needs values that were on that runner
            self._finish(call, exc=RunnerDied(f"runner {r.id} is gone, and with it the values "
                                              f"{call.name}() needed", r.id))
        if r.handle is not None:
            self._later.append(functools.partial(self._reap, r))
        if reschedule and not self._endpoint.stopped.is_set():
            self._schedule()

    def _reap(self: "Pool", r: Runner) -> None:
        """Force-stop a runner's process, on a thread of its own: terminate() may block (SSH, scancel)."""
        def reap() -> None:
            try:
                self.backend.terminate(r.handle)
                if self._shm_on or not self.backend.remote:
                    shm.sweep(r.id)  # its arena and start count, now that it cannot make them
            except Exception:
                log.exception("flame: backend failed to terminate runner %s", r.id)
            if self._capacity is not None and not self._endpoint.stopped.is_set():
                capacity = self.backend.capacity()
                with self._state():
                    self._capacity = capacity
                    self._schedule()  # a GPU set may be free again
        self._helper(reap, f"flame-terminate-{r.id}")

    def _watch_loop(self: "Pool") -> None:
        """Ask backends how their runners are, outside the lock, and act on what they say."""
        silent_after = max(10.0, 3 * self.parent_timeout)
        try:
            while not self._endpoint.stopped.wait(TICK):
                now = time.monotonic()
                with self._lock:
                    runners = list(self._runners.values())
                found = []
                for r in runners:
                    handle = r.handle
                    code = handle.exit_status() if handle is not None else None  # may run squeue
                    why = r.verdict(now, code, silent_after)
                    if why is not None:
                        tail = handle.stderr_tail() if handle is not None and why != "stop overdue" else ""
                        found.append((r, why, code, tail))
                if found:
                    with self._state():
                        for r, why, code, tail in found:
                            if r.verdict(now, code, silent_after) == why:  # still so, under the lock
                                self._act(r, why, code, tail)
        except BaseException as exc:  # noqa: BLE001
            log.exception("flame: %s watch thread failed", self.name)
            self._fail("watch", exc)

    def _act(self: "Pool", r: Runner, why: str, code: int | None, tail: str) -> None:
        note = present.output_note(tail)
        if why == "exited":
            how = present.describe_exit(code)
            if r.state == "booting":
                self._boot_failed(r, BootError(f"runner {r.id} exited during boot ({how})" + note, tail))
            elif r.state == "stopping" and not r.calls:
                self._drop_runner(r, None)
            else:
                names = ", ".join(f"{c.name}()" for c in r.calls.values())
                self._drop_runner(r, RunnerDied(f"runner {r.id} died ({how})" + (
                    f" while running {names}" if names else "") + note, r.id, code, tail))
        elif why == "boot timeout":
            refused = self._endpoint.wire.refused.get(r.id)
            self._boot_failed(r, BootError(
                f"runner {r.id} did not connect within boot_timeout={self.boot_timeout:g} s"
                + (f"; its messages were refused: {refused}" if refused else "") + note, tail))
        elif why == "stop overdue":
            self._drop_runner(r, None)
        elif why == "silent":
            self._drop_runner(r, RunnerDied(f"runner {r.id} stopped answering (no heartbeat for "
                                            f"{time.monotonic() - r.last_heard:.0f} s)" + note, r.id))

