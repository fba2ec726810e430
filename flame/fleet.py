"""A pool's runners, by ``runner_id``: how they come (boot, hello) and go (stop, forget), and
what the backend's threads (``Watch``) find about them.

The fleet writes its own state (the runners, the backend's capacity, whether refilling
``min`` is paused, the requests runners owe a reply) under the pool's lock; each runner's
fields are the Runner's own. Which of a dead runner's calls run again is the Runner's to say
(``Runner.die``); where they go, the pool's (``Pool._drop_runner``, ``Pool._boot_failed``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import time
from typing import TYPE_CHECKING

from . import shm, wire
from .errors import BootError, RunnerDied
from .replies import Replies
from .runner import Runner
from .watch import Watch

if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import RunnerHandle
    from .call import Call
    from .pool import Pool

log = logging.getLogger("flame.pool")

#: How long a runner asked to stop may take before it is killed.
STOP_GRACE = 2.0


class Fleet:
    """The runners of one pool (caller holds the pool's lock unless a method says otherwise)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        #: runner_id -> Runner, booting, ready or stopping (a dead one is forgotten)
        self.runners: dict[str, Runner] = {}
        #: what this pool's runner ids start with: unique across processes and hosts (they name
        #: ZeroMQ identities, jobs and key files) and naming the pool, for people reading them
        self.prefix = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', pool.name)}-{os.urandom(3).hex()}-r"
        self._ids = itertools.count(1)
        #: the backend's capacity (GPU sets free): read outside the lock, after each boot and terminate
        self.capacity = pool.backend.capacity()
        #: set by a boot failure: no refilling ``min`` until a boot works
        self.min_paused = False
        #: completions and inspections asked of runners (``ask``), by request id
        self.requests = Replies()
        self.watch = Watch(self, pool.backend, pool.name, pool.parent_timeout)
        self._backend_held = False

    def acquire(self) -> None:
        """Hold the backend while the pool is open (what its runners share: LocalBackend's template process)."""
        self._pool.backend.acquire()
        self._backend_held = True

    def release(self) -> None:
        """Let go of the backend, once: shutdown and a failure may both end here."""
        with self._pool._state.lock:
            held, self._backend_held = self._backend_held, False
        if held:
            self._pool.backend.release()

    # ---- booting -----------------------------------------------------------------------
    def boot(self) -> None:
        """Boot one more runner, on a helper thread."""
        pool = self._pool
        # 128 random bits of its own: runner ids are seen by other users (/dev/shm names, Slurm
        # job names), and an id someone else's socket took first is a runner that cannot connect.
        rid = f"{self.prefix}{next(self._ids)}-{os.urandom(16).hex()}"  # hex: no "-r" in it (shm.pool_owner)
        r = self.runners[rid] = Runner(rid, time.monotonic() + pool.boot_timeout,
                                       functools.partial(pool._endpoint.send, rid))
        env = {"FLAME_ADDRESS": pool.address, "FLAME_KEY": pool._key.hex(),
               "FLAME_CONCURRENCY": str(pool.max_concurrency), "FLAME_HEARTBEAT": str(wire.HEARTBEAT),
               "FLAME_PARENT_TIMEOUT": str(pool.parent_timeout), "FLAME_FAILSAFE": str(pool.boot_timeout)}
        if pool._endpoint.curve_public is not None:
            env["FLAME_CURVE_SERVER"] = pool._endpoint.curve_public.decode()  # a public key
        # Named with 128 random bits: anyone can list /dev/shm, and a count planted where the
        # runner would make its own would decide which of its calls run again.
        starts = (f"{shm.DIR}/flame-{rid}-starts-{os.urandom(16).hex()}"
                  if not pool.backend.remote and shm.available() else None)
        self.watch.boot(r, r.spec(pool.address, env, pool.max_concurrency, starts, pool._code))
        log.info("flame: booting runner %s", rid)

    def booted(self, r: Runner, handle: RunnerHandle) -> None:
        """On the boot helper: the backend started ``r``'s process."""
        capacity = self._pool.backend.capacity()
        with self._pool._state:
            self.capacity = capacity
            if r.booted(handle):
                self._pool._schedule()
            else:  # the pool gave up on it meanwhile
                self._pool._state.later(functools.partial(self.watch.reap, r))

    def boot_failed(self, r: Runner, error: BootError) -> None:
        """On the boot helper: the backend could not start ``r``."""
        with self._pool._state:
            self._pool._boot_failed(r, error)

    def hello(self, r: Runner, head: dict) -> bool:
        """``r``'s hello: it is ready, unless it was not booting (then False)."""
        if r.state != "booting":
            return False
        pool = self._pool
        if head.get("blake3") and pool._packer.fast:
            pool._endpoint.wire.fast_peers.add(r.id)
        r.hello(head, pool.name, pool._packer.fast, pool._code)
        self.min_paused = False
        log.info("flame: runner %s ready (pid %s on %s)", r.id, r.pid, r.host)
        return True

    def serve_code(self, peer: str, digest: str) -> bytes | None:
        """On the receiving thread: the archive a booting runner of this pool asks for."""
        runner_id, _, channel = peer.rpartition("/")
        with self._pool._state.lock:
            r = self.runners.get(runner_id)
            # the bootstrap's fetch while it boots; the import hook's (deps) while it runs too
            if r is None or r.state not in (("booting", "ready") if channel == "deps" else ("booting",)):
                return None
        return self._pool._code.serve(digest, r.id, str(r.host))

    # ---- ready -------------------------------------------------------------------------
    def heartbeat(self) -> None:
        for r in self.runners.values():
            r.heartbeat()

    def send_free(self, runner_id: str, offset: int) -> None:
        """Tell runner ``runner_id`` we no longer read the region of its arena at ``offset``."""
        self._pool._endpoint.send(runner_id, wire.Kind.FREE, {"at": offset})

    def ready(self, runner_id: str | None) -> Runner | None:
        """Runner ``runner_id`` if it is ready, else any ready one, else None."""
        r = self.runners.get(runner_id) if runner_id is not None else None
        if r is None or r.state != "ready":
            r = next((x for x in self.runners.values() if x.state == "ready"), None)
        return r

    def ask(self, kind: str, fields: dict, runner_id: str | None, timeout: float) -> dict:
        """Ask runner ``runner_id`` (else any ready one) a question of ``kind``; wait for its
        reply's content (any thread, not holding the lock)."""
        endpoint = self._pool._endpoint
        with self._pool._state.lock:
            r = self.ready(runner_id)
            if r is None:
                raise LookupError(f"{self._pool.name} has no ready runner to ask")
            request_id, request = self.requests.new(r.id)
            endpoint.send(r.id, kind, {"id": request_id, **fields})
        endpoint.nudge()  # someone must receive the reply
        try:
            return request.future.result(timeout)
        finally:
            self.requests.drop(request_id)

    # ---- going -------------------------------------------------------------------------
    def stop(self, r: Runner) -> None:
        r.stop(STOP_GRACE)
        log.info("flame: stopping runner %s", r.id)

    def stop_all(self) -> None:
        """The pool shuts down (not holding the lock): ask the ready runners to stop, and past
        STOP_GRACE have the pool drop those still there (booting ones at once)."""
        pool = self._pool
        with pool._state:
            for r in list(self.runners.values()):
                if r.state == "ready":
                    self.stop(r)
                elif r.state == "booting":
                    pool._drop_runner(r, None)
        deadline = time.monotonic() + STOP_GRACE
        while self.runners and time.monotonic() < deadline:
            time.sleep(0.02)
        with pool._state:
            for r in list(self.runners.values()):
                pool._drop_runner(r, RunnerDied(f"runner {r.id} was stopped: {pool.name} shut down", r.id))

    def forget(self, r: Runner, error: BaseException, retry: bool,
               boot_failed: bool = False) -> tuple[list[Call], list[tuple[Call, BaseException]]]:
        """``r`` is gone or given up on, with ``error``: forget it, and have its process made
        sure of. Returns its calls that run again and those that fail (``Runner.die``). A
        failed boot pauses refilling ``min`` until a boot works: a broken boot must surface,
        not loop."""
        pool = self._pool
        del self.runners[r.id]
        if boot_failed:
            self.min_paused = True
        pool._endpoint.wire.forget(r.id)
        pool._endpoint.wire.fast_peers.discard(r.id)
        pool._shm.forget(r.id)  # whatever it held of ours is ours again
        if self.requests:  # completions or inspections it will never answer
            pool._state.later(functools.partial(self.requests.fail, RunnerDied(
                f"runner {r.id} is gone before it answered", r.id), r.id))
        fates = r.die(error, retry)
        # Every runner of every pool of this process may hold handles to its values, or values
        # its handles keep: each is told, once the lock is released.
        pool._state.later(functools.partial(_tell_gone, r.id))
        if r.handle is not None:
            pool._state.later(functools.partial(self.watch.reap, r))
        return fates

    def reaped(self, r: Runner) -> None:
        """On the terminate helper: ``r``'s process is gone; a GPU set may be free again, and
        the directory of its peer listener (on this machine) goes, if it did not remove it."""
        pool = self._pool
        if r.peer_address and not pool.backend.remote:
            _remove_peer_dir(r.peer_address)
        if self.capacity is not None and not pool._endpoint.stopped.is_set():
            capacity = pool.backend.capacity()
            with pool._state:
                self.capacity = capacity
                pool._schedule()

    # ---- the watch thread's findings ---------------------------------------------------
    def list(self) -> list[Runner]:
        with self._pool._state.lock:
            return list(self.runners.values())

    def verdicts(self, found: list[tuple[Runner, str, int | None, str]], now: float,
                 silent_after: float) -> None:
        """The watch thread's findings ``(runner, verdict, exit code, stderr tail)``: those still
        so under the lock become a failed boot or a dropped runner."""
        pool = self._pool
        with pool._state:
            for r, why, code, tail in found:
                if r.verdict(now, code, silent_after) != why:
                    continue
                error = r.error_for(why, code, tail, pool.boot_timeout, pool._endpoint.wire.refused.get(r.id))
                if isinstance(error, BootError):
                    pool._boot_failed(r, error)
                else:
                    pool._drop_runner(r, error)

    def __repr__(self) -> str:
        return f"<Fleet of {self._pool.name}: {len(self.runners)} runners>"


def _tell_gone(runner_id: str) -> None:
    """Runner ``runner_id`` is gone: tell the runners of this process's pools that serve or
    hold handles (``Kind.PEER_GONE``)."""
    from .registry import pools
    for pool in pools():
        for r in list(pool._fleet.runners.values()):
            r.peer_gone(runner_id)


def _remove_peer_dir(address: str) -> None:
    """Remove a killed local runner's peer listener directory: ours, not a symlink, and named
    as node/peers.py names them."""
    import shutil
    import stat
    where = os.path.dirname(address.removeprefix("ipc://"))
    try:
        st = os.lstat(where)
    except OSError:
        return
    if (os.path.basename(where).startswith("flame-peer-") and stat.S_ISDIR(st.st_mode)
            and st.st_uid == os.geteuid()):
        shutil.rmtree(where, ignore_errors=True)
