"""The pool: its options, its API, and what it owns: the queue of waiting calls, the lock, and
placement's decisions (``placement.decide``) carried out.

The others own the rest, as in FLAME: each ``Runner`` its runner's life (the messages it is
sent, its code-sync diff, which of its calls run again when it dies); the ``Fleet`` the runners
by id and the backend's threads (``Watch``); ``InFlight`` the calls by id and how each ends
(``Packer`` pickles them before the lock); the ``Inbox`` each message kind runners send;
``Holdings`` the values kept for Remotes; ``shm.Side``, ``CodeSync`` and ``Endpoint`` the shared
memory, the code sent and the socket. Nothing slow or foreign runs under the lock
(``state.State``): transitions queue it as effects, run once the lock is released.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import functools
import logging
import time
from concurrent.futures import Executor
from typing import Any, Callable, Iterable, Sequence

from . import holdings, mapping, options, placement, present, registry, shm
from .backends.base import Backend
from .call import Call, CallFuture
from .codesync import CODE_LIMIT, CodeSync
from .deps import DEPS_LIMIT
from .endpoint import Endpoint
from .errors import BootError, PoolClosed, RunnerDied
from .fleet import Fleet
from .inbox import Inbox
from .inflight import InFlight, Packer
from .keys import new_key
from .node import objects
from .remote import Remote
from .runner import Runner, RunnerInfo
from .state import State
from .wire import Kind

log = logging.getLogger("flame.pool")

#: How long shutdown waits for backends to force-stop runners (SSH, scancel).
TERMINATE_WAIT = 20.0

_pool_ids = itertools.count(1)


class Pool(Executor):
    """An elastic set of runners that execute calls.

    Runners are booted on demand, up to ``max``, and shut down after being idle.
    Functions go by value (cloudpickle), so lambdas and functions defined in a
    notebook cell or ``__main__`` work; their output streams back while they run.

    Use as a context manager, or call :meth:`shutdown`; pools left open are shut
    down at interpreter exit, and their runners exit by themselves if this process dies.
    """

    def __init__(self, backend: Backend | None = None, *, min: int = 0, max: int = 4,
                 max_concurrency: int = 1, idle_shutdown_after: float | None = 30.0,
                 boot_timeout: float = 30.0, timeout: float | None = None,
                 parent_timeout: float = 5.0, name: str | None = None,
                 code_sync: bool | Sequence[str] | None = None, code_exclude: Sequence[str] = (),
                 code_limit: int = CODE_LIMIT, deps: bool | None = None, deps_limit: int = DEPS_LIMIT,
                 retries: int = 0) -> None:
        """
        Args:
            backend: how runners are started. Defaults to ``LocalBackend()``.
            min: runners kept running even when idle. Defaults to 0.
            max: most runners at once. Defaults to 4.
            max_concurrency: calls one runner runs at once (in threads). Defaults to 1.
            idle_shutdown_after: seconds a runner may sit idle before it is shut down (None: never). Defaults to 30.
            boot_timeout: seconds a runner has to start and connect before BootError. Defaults to 30.
            timeout: seconds from submit to result for each call; past it the remote work is stopped and CallTimeout raised (None: no deadline). Defaults to None.
            parent_timeout: seconds without a heartbeat from this process after which runners exit. Defaults to 5.
            name: label for logs and displays. Defaults to "pool-N".
            code_sync: local code sent to runners on other machines (True: found, as README says; a list: these modules, packages or import directories; False: none). Defaults to True for backends on other machines, False for LocalBackend.
            code_exclude: glob patterns of files and directories code sync leaves out, besides .git, virtualenvs and caches. Defaults to none.
            code_limit: most bytes of local code code sync sends; past it, CodeSyncError names the largest files. Defaults to 100 MB.
            deps: send runners on other machines this process's versions of the installed packages they import, pyzmq and the like included, where the host lacks them or has others (False: the host's own). Defaults to True for backends on other machines, False for LocalBackend.
            deps_limit: most bytes (unpacked) of installed packages sent to one host; past it, the error names the largest. Defaults to 2 GB.
            retries: times a call whose runner died before it returned (killed, lost, preempted) runs again elsewhere; it may then run more than once, so must be idempotent. Defaults to 0.
        """
        backend, code_sync = options.check_pool(
            backend, min, max, max_concurrency, idle_shutdown_after, boot_timeout, timeout,
            parent_timeout, code_sync, code_exclude, code_limit, deps, deps_limit, retries)
        self.backend, self.min, self.max, self.max_concurrency = backend, min, max, max_concurrency
        self.idle_shutdown_after, self.boot_timeout, self.timeout = idle_shutdown_after, boot_timeout, timeout
        self.parent_timeout, self.retries = parent_timeout, retries
        self.name = name or f"pool-{next(_pool_ids)}"

        self._key = new_key()
        # What runners elsewhere boot from and get sent (None on this machine); errs at the door.
        self._code = CodeSync.for_pool(backend, code_sync, code_exclude, code_limit, deps, deps_limit)
        self._state = State(self.name)  # the lock, and the effects queued under it
        self._fleet = Fleet(self)
        self._runners = self._fleet.runners  # read here; written by the fleet
        self._shm = shm.Side(bool(getattr(backend, "shared_memory", False)) and shm.available(),
                             shm.pool_owner(self._fleet.prefix))
        self._packer = Packer(self)
        self._inflight = InFlight(self._state, self._shm, timeout)
        self._holdings = holdings.Holdings(self)
        self._waiting: collections.deque[Call] = collections.deque()
        self._closed = False
        self._limits: tuple = ((), None)  # placement's limits, and what they were made for
        self._inbox = Inbox(self)
        self._endpoint = Endpoint(self.name, self._key, backend.bind_host, self._inbox.message,
                                  self._inbox.tick, functools.partial(self._fail, "I/O"),
                                  lambda: bool(self._inflight or self._fleet.requests),
                                  self._fleet.serve_code if backend.remote else None,
                                  self._inbox.after_messages)
        self.address = backend.connect_address(self._endpoint.address)
        self._fleet.acquire()
        self._endpoint.start()
        self._fleet.watch.start(self._endpoint.stopped, functools.partial(self._fail, "watch"))
        registry.add(self)
        with self._state:
            self._schedule()
        log.info("flame: %s listening on %s with %r", self.name, self.address, backend)

    # ---- public API ----------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> CallFuture:
        """Run ``fn(*args, **kwargs)`` on a runner; return a future for its result."""
        future = self._queue(fn, [(args, kwargs)])[0]
        self._endpoint.nudge()  # nobody may be receiving: let the I/O thread watch for the result
        return future

    def submit_to(self, runner_id: str | None, fn: Callable, /, *args: Any, **kwargs: Any) -> CallFuture:
        """Like :meth:`submit`, on the runner ``runner_id`` while it lives (it waits for a free
        slot there); if that runner is gone (or ``runner_id`` is None), wherever placement
        puts it. ``future.runner_id`` says where it went."""
        future = self._queue(fn, [(args, kwargs)], runner_id)[0]
        self._endpoint.nudge()
        return future

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a runner and return its value (or raise its exception).

        A KeyboardInterrupt while waiting (Ctrl-C, the notebook's stop button) stops the
        remote work too, then re-raises.
        """
        # No future: this thread waits for the call itself, and receives its own result.
        return self._queue(fn, [(args, kwargs)], outcome=True)[0].result()

    def spawn(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Remote:
        """Run ``fn(*args, **kwargs)`` on a runner and keep the result there; return a Remote.

        Placed like a call: on the runner of a Remote among the arguments, else anywhere,
        booting a runner if needed. What ``fn`` raises is raised here, and no Remote is made.
        """
        return self._holdings.spawned(fn, self._queue(objects.spawn, [((fn, args, kwargs), {})]))[0]

    def spawn_map(self, fn: Callable, *iterables: Iterable) -> list[Remote]:
        """``spawn(fn, *xs)`` for each ``xs`` in ``zip(*iterables)``, at once across runners as
        ``map`` places calls (e.g. a model per runner); their Remotes, in order. If one raises
        or the wait is interrupted, the others are stopped and their values released."""
        items = [((fn, xs, {}), {}) for xs in zip(*iterables)]
        return self._holdings.spawned(fn, self._queue(objects.spawn, items, per_call=1))

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1) -> mapping.MapResults:
        """``fn(*xs)`` for each ``xs`` in ``zip(*iterables)``, run across runners, as
        :meth:`concurrent.futures.Executor.map`: every call is submitted now, and the results
        come in input order as they are read (``list(pool.map(...))`` waits for them all).

        A call's exception is raised when its result is reached, and the calls not yet done
        are cancelled. ``timeout``: seconds from this call after which reading a result not
        yet there raises TimeoutError (None: no limit). ``chunksize``: items sent as one call
        and one message, for many small ones. In a notebook, a map that takes more than a
        second shows a progress line in the cell, and as a cell's value shows its results.
        """
        options.number("chunksize", chunksize, minimum=1, integer=True)
        return mapping.start(self._queue, fn, iterables, timeout, chunksize)

    def cast(self, fn: Callable, /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on a runner without waiting; a failure is logged, not raised."""
        self.submit(fn, *args, **kwargs).add_done_callback(_log_failure)

    async def acall(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call` for asyncio: awaiting it runs the call; cancelling the task stops it."""
        import asyncio  # here, not at the top: it is most of what importing flame would cost
        future = self.submit(fn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def complete(self, code: str, cursor: int | None = None, *, runner_id: str | None = None,
                 timeout: float = 10.0) -> dict:
        """Jupyter ``complete_reply`` content for ``code``, computed on a runner against its
        interactive namespace (the one ``%%remote`` cells run in): runner ``runner_id`` if it
        is ready, else any ready one. Answered at once, also while the runner runs calls;
        RunnerDied if the runner goes first."""
        return self._fleet.ask(Kind.COMPLETE, _at(code, cursor), runner_id, timeout)

    def inspect(self, code: str, cursor: int | None = None, detail_level: int = 0, *,
                runner_id: str | None = None, timeout: float = 10.0) -> dict:
        """Jupyter ``inspect_reply`` content for the name at ``cursor``, from a runner (see :meth:`complete`)."""
        return self._fleet.ask(Kind.INSPECT, {**_at(code, cursor), "detail": detail_level}, runner_id, timeout)

    @property
    def code_bytes_sent(self) -> int:
        """Bytes of code archives this pool has sent to runners, flame's own and the installed
        packages that travelled (``deps``) included."""
        return self._code.bytes_sent if self._code is not None else 0

    @property
    def runners(self) -> list[RunnerInfo]:
        """A snapshot of the pool's runners."""
        with self._state.lock:
            return [r.info() for r in self._runners.values()]

    @property
    def waiting(self) -> int:
        """Calls waiting for a runner."""
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        """Whether the pool was shut down (or stopped working)."""
        return self._closed

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls and stop every runner.

        With ``wait``, calls already submitted finish first; ``cancel_futures`` cancels them instead.
        """
        with self._state:
            first, self._closed = not self._closed, True
        if wait or cancel_futures:
            self._inflight.wait_all(cancel=cancel_futures)
        if not first and self._endpoint.stopped.is_set():
            return
        with self._state:
            while self._waiting:
                call = self._waiting.popleft()
                self._inflight.finish(call, exc=PoolClosed(f"{self.name} was shut down before {call.name}() ran"))
        self._fleet.stop_all()
        self._endpoint.stop()
        self._fleet.watch.join(time.monotonic() + TERMINATE_WAIT)
        self._end()

    def __exit__(self, *exc: Any) -> None:  # Executor's __enter__ returns the pool
        self.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)

    __repr__, _repr_html_ = present.pool_text, present.pool_html

    def view(self) -> Any:
        """A live view of this pool (``flame.PoolView``): its runners' table, updated until it shuts down."""
        from .view import PoolView
        return PoolView([self])

    # ---- the queue and placement (caller holds the lock unless a method says otherwise) ----
    def _limits_now(self) -> placement.Limits:
        key = (self._fleet.capacity, self._closed or self._fleet.min_paused, self._endpoint.stopped.is_set())
        if key != self._limits[0]:  # made anew only when one of these changed
            self._limits = key, placement.Limits(
                self.min, self.max, self.max_concurrency, placement.PREFETCH, key[0], self.idle_shutdown_after,
                refill=not key[1], can_boot=not key[2])
        return self._limits[1]

    def _schedule(self) -> None:
        """Apply placement's decision."""
        decision = placement.decide(self._waiting, list(self._runners.values()), self._limits_now(),
                                    time.monotonic())
        if decision.starts:
            by_runner: dict[Runner, list[Call]] = {}
            for call, r in decision.starts:
                self._waiting.remove(call)
                by_runner.setdefault(r, []).append(call)
            for r, calls in by_runner.items():
                r.start(calls, self.max_concurrency, self._code, self._shm.lend)
        for _ in range(decision.boots):
            self._fleet.boot()
        for r in decision.stops:
            self._fleet.stop(r)

    def _queue(self, fn: Callable, arguments: list, affinity: str | None = None,
               strict: bool = False, origin: Any = "", outcome: bool = False, per_call: int = 0) -> list[Any]:
        """The futures (or Outcomes) of calls of ``fn``, one per ``(args, kwargs)`` in ``arguments``
        (not holding the lock): all pickled, then queued under one lock with one placement
        decision. A pool with no runner boots before it pickles: a fresh process's first call
        imports what pickling needs, overlapping the boot. The futures are taken first: a call
        lets go of its future once done, maybe before this returns."""
        booted = self._boot_ahead(len(arguments)) if not self._runners and arguments else []
        try:
            calls = self._packer.calls(fn, arguments, affinity, strict, origin, outcome, per_call)
        except BaseException:  # they will not come: stop the runners booted for them, if still idle
            if booted:
                with self._state:
                    for r in [r for r in booted if not (r.calls or self._waiting) and r.state in ("booting", "ready")]:
                        self._drop_runner(r, None, reschedule=False)
            raise
        futures = [c.future for c in calls]
        if calls:
            self._enqueue(calls)
        return futures

    def _boot_ahead(self, n: int) -> list[Runner]:
        """Boot what placement would boot for ``n`` calls in a pool with no runner; return those runners."""
        with self._state:
            if self._runners or self._closed:
                return []
            for _ in range(placement.decide([placement.ANY] * n, [], self._limits_now(), time.monotonic()).boots):
                self._fleet.boot()
            return list(self._runners.values())

    def _enqueue(self, calls: Sequence[Call]) -> None:
        """Register ``calls`` and start what can start; all of them, or none (PoolClosed,
        RunnerDied for a call whose values' runner is gone). Not holding the lock."""
        self._shm.send_frees(self._fleet.send_free)  # regions of runners' memory we let go of
        registered = False
        self._state.acquire()  # not `with`: this is the per-call path
        try:
            if self._closed:
                raise PoolClosed(f"{self.name} is shut down")
            for call in calls:
                if call.strict and call.affinity not in self._runners:
                    raise holdings.lost(call.affinity, call.origin)
            self._inflight.add(calls)
            registered = True
            if len(calls) == 1 and not self._waiting:  # the common case: straight to a runner with room
                runner = placement.direct(calls[0], self._runners, self.max_concurrency)
                if runner is not None:
                    runner.start(calls, self.max_concurrency, self._code, self._shm.lend)
                    return
            self._waiting.extend(calls)
            full = self.max_concurrency + placement.PREFETCH
            if not (len(self._waiting) > len(calls) and len(self._runners) >= self.max
                    and all(len(r.calls) >= full for r in self._runners.values())):
                # Unless every runner holds all it may and none can boot: then these wait behind
                # the others, for the placement after the next results (saves one per submit).
                self._schedule()
        except BaseException:
            if not registered:
                self._inflight.refused(calls)
            raise
        finally:
            self._state.release()

    def _cancel(self, call: Call) -> None:
        """Stop a call (not holding the lock): drop it from the queue, or interrupt it on its runner."""
        with self._state:
            if call.state == "queued":
                with contextlib.suppress(ValueError):
                    self._waiting.remove(call)
                self._inflight.retire(call)
            elif call.state == "running":
                self._inflight.interrupt(call)

    def _expire_waiting(self, now: float) -> None:
        """Fail the waiting calls past the pool's timeout."""
        if self.timeout is not None:
            for call in [c for c in self._waiting if now > c.deadline]:
                self._waiting.remove(call)
                self._inflight.time_out(call)

    # ---- runners gone: where their calls go ------------------------------------------------
    def _boot_failed(self, r: Runner, error: BootError) -> None:
        log.warning("flame: %s", error)
        self._drop_runner(r, None, reschedule=False, boot_failed=True)
        # Fail the waiting calls that the runners still booting cannot take, unless a ready
        # runner will serve them: a broken boot must surface, not retry forever.
        if not any(x.state == "ready" for x in self._runners.values()):
            keep = sum(1 for x in self._runners.values() if x.state == "booting") * self.max_concurrency
            while len(self._waiting) > keep:
                self._inflight.finish(self._waiting.popleft(), exc=error)

    def _drop_runner(self, r: Runner, error: Exception | None, reschedule: bool = True,
                     boot_failed: bool = False) -> None:
        """Forget a runner; its calls fail with ``error``, or run elsewhere (``Runner.die``
        says which), at the front of the queue in their order."""
        if r.state == "dead":
            return
        again, failed = self._fleet.forget(r, error or RunnerDied(f"runner {r.id} stopped", r.id),
                                           not self._closed, boot_failed)
        for call in reversed(again):
            call.state, call.runner, call.ahead = "queued", None, False
            self._waiting.appendleft(call)
        if again:
            log.info("flame: %d call(s) of runner %s queued again", len(again), r.id)
        for call, exc in failed:
            self._inflight.finish(call, exc=exc)
        for call in self._inflight.lost(r.id):  # they needed values that were on that runner
            self._waiting.remove(call)
        if reschedule and not self._endpoint.stopped.is_set():
            self._schedule()

    # ---- the end --------------------------------------------------------------------------
    def _fail(self, where: str, exc: BaseException) -> None:
        """One of the pool's own threads died: fail every call with the cause, stop the runners."""
        error = PoolClosed(f"{self.name} stopped working: its {where} thread failed with "
                           f"{type(exc).__name__}: {exc} (traceback in the log)")
        error.__cause__ = exc
        self._endpoint.stopped.set()
        with self._state:
            self._closed = True
            while self._waiting:
                self._inflight.finish(self._waiting.popleft(), exc=error)
            for r in list(self._runners.values()):
                self._drop_runner(r, error, reschedule=False)
        self._endpoint.wake()
        self._end()

    def _end(self) -> None:
        """What shutdown and a failure both end with: shared memory unlinked, backend let go."""
        self._shm.close()
        self._fleet.release()
        registry.discard(self)


def _log_failure(f: CallFuture) -> None:
    """A cast's future is done: log its failure (nobody waits for it)."""
    if not f.cancelled() and f.exception() is not None:
        log.error("flame: cast of %s() failed: %r", f.call.name, f.exception())


def _at(code: str, cursor: int | None) -> dict:
    """A completion's or inspection's place: ``cursor`` in ``code`` (None: its end)."""
    return {"code": code, "cursor": len(code) if cursor is None else cursor}
