"""The pool: options, API and state transitions.

Where things live: the socket and its threads in ``endpoint.py``; the one decision (which
call starts where, what boots, what stops) in ``placement.py``; the call lifecycle in
``inflight.py`` and the runner lifecycle in ``lifecycle.py`` (mixins working on this
class's state, under its lock); the parent's view of a runner in ``runner.py`` and of a call
in ``call.py``; how a pool shows itself in ``present.py``.

Threads: callers (submit, wait), the endpoint's I/O thread (receives when no caller does,
heartbeats and deadlines every tick), a watch thread that asks backends how their runners
are (``exit_status`` may run ``squeue``), a short-lived thread per boot and per terminate.
State is guarded by one lock, and nothing slow or foreign runs under it: no backend call,
no future callback, no unpickling. Transitions queue those as effects, run once the lock is
released (:meth:`Pool._state`).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import itertools
import logging
import re
import threading
import time
import weakref
from concurrent.futures import CancelledError
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import placement, present, serialize, shm
from .placement import PREFETCH
from .backends.base import Backend
from .call import Call, CallFuture, gather
from .codesync import CODE_LIMIT, CodeSync, LocalCode
from .endpoint import Endpoint
from .errors import PoolClosed, RunnerDied
from .functions import FunctionCache
from .keys import new_key
from .inflight import CallLifecycle
from .holdings import Holdings
from .lifecycle import STOP_GRACE, RunnerLifecycle
from .runner import Runner, RunnerInfo
from .wire import fast_digests

log = logging.getLogger("flame.pool")

#: How long shutdown waits for backends to force-stop runners (SSH, scancel).
TERMINATE_WAIT = 20.0

_pool_ids = itertools.count(1)
_live_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()


def pools() -> list["Pool"]:
    """Every pool of this process that is not shut down, by name."""
    return sorted(_live_pools, key=lambda p: p.name)


def shutdown_all() -> None:
    """Shut every pool of this process down now, without waiting for calls to finish."""
    for pool in list(_live_pools):
        pool.shutdown(wait=False)


atexit.register(shutdown_all)


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False,
                  optional: bool = False, positive: bool = False) -> None:
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {want}{' or None' if optional else ''}, got {value!r}")
    if value < minimum or (positive and value <= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else f'>= {minimum}'}, got {value!r}")


class Pool(Holdings, CallLifecycle, RunnerLifecycle):
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
                 code_limit: int = CODE_LIMIT) -> None:
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
            code_sync: local code sent to runners on other machines: True finds it (modules loaded
                from outside the standard library and site-packages, and the sources in local
                directories on ``sys.path``), a list names what to send (modules, packages, or
                directories to import from), False sends none. Defaults to True for backends on other machines (SSH, Slurm),
                False for LocalBackend, whose runners import from this file system.
            code_exclude: glob patterns of files and directories code sync leaves out, besides
                .git, virtualenvs and caches. Defaults to none.
            code_limit: most bytes of local code code sync sends; past it, CodeSyncError names
                the largest files. Defaults to 100 MB.
        """
        if backend is None:
            from .backends.local import LocalBackend
            backend = LocalBackend()
        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be a flame Backend, got {backend!r}")
        _check_number("min", min, minimum=0, integer=True)
        _check_number("max", max, minimum=1, integer=True)
        if min > max:
            raise ValueError(f"min ({min}) must not exceed max ({max})")
        _check_number("max_concurrency", max_concurrency, minimum=1, integer=True)
        _check_number("idle_shutdown_after", idle_shutdown_after, minimum=0, optional=True, positive=True)
        _check_number("boot_timeout", boot_timeout, minimum=0, positive=True)
        _check_number("timeout", timeout, minimum=0, optional=True, positive=True)
        _check_number("parent_timeout", parent_timeout, minimum=0, positive=True)
        _check_number("code_limit", code_limit, minimum=1, integer=True)
        if code_sync is None:
            code_sync = backend.remote
        if not isinstance(code_sync, bool) and (isinstance(code_sync, str) or not all(
                isinstance(p, str) for p in code_sync)):
            raise TypeError(f"code_sync must be True, False or a list of paths, got {code_sync!r}")
        if code_sync is not False and not backend.remote:
            raise ValueError(f"code_sync is for runners on other machines; {backend!r} runners "
                             "import from this file system")
        if isinstance(code_exclude, str) or not all(isinstance(p, str) for p in code_exclude):
            raise TypeError(f"code_exclude must be a list of glob patterns, got {code_exclude!r}")
        self.backend = backend
        self.min, self.max, self.max_concurrency = min, max, max_concurrency
        self.idle_shutdown_after = idle_shutdown_after
        self.boot_timeout = boot_timeout
        self.timeout = timeout
        self.parent_timeout = parent_timeout
        self.name = name or f"pool-{next(_pool_ids)}"

        self._key = new_key()
        # Code sync's state is its own (codesync.CodeSync): what runners elsewhere boot from,
        # which hosts have which archive, the bytes sent. Local code found errs at the door.
        self._code = CodeSync(None if code_sync is False else LocalCode(
            None if code_sync is True else list(code_sync), code_exclude, code_limit)) if backend.remote else None
        # Shared memory with runners on this machine (shm.py): our arena, theirs mapped, and
        # the frees of their regions our finalizers queue for the I/O thread to send.
        self._shm_on = bool(getattr(backend, "shared_memory", False)) and shm.available()
        self._arena: shm.Arena | None = None
        self._mappings = shm.Mappings()
        self._frees: collections.deque = collections.deque()
        self._fast = fast_digests()  # large frames digested with BLAKE3, for runners that can too
        self._functions = FunctionCache(dumps=serialize.dumps_function)
        self._lock = threading.Lock()
        self._later: list = []  # effects queued under the lock, run once it is released
        self._runners: dict[str, Runner] = {}
        self._waiting: collections.deque[Call] = collections.deque()
        #: a runner freed slots while calls wait: place them once the batch of messages is handled
        self._freed = False
        self._calls: dict[str, Call] = {}
        self._requests: dict[str, tuple] = {}  # introspection requests: id -> (runner id, Future)
        self._releases: list = []  # (runner id, object id) of values no Remote refers to any more
        self._request_ids = itertools.count(1)
        # Unique across processes and hosts: runner ids name ZeroMQ identities, jobs and key files.
        self._id_prefix = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-{new_key().hex()[:6]}-r"
        self._runner_ids = itertools.count(1)
        self._closed = False
        self._min_paused = False  # set by a boot failure: no refilling `min` until a boot works
        self._capacity = backend.capacity()  # read outside the lock, after each boot and terminate
        self._limits: placement.Limits | None = None
        self._limits_key: tuple = ()
        self._next_beat = 0.0
        #: boot and terminate threads running now: shutdown waits for them (lifecycle._helper)
        self._helpers: set[threading.Thread] = set()
        self._endpoint = Endpoint(self.name, self._key, backend.bind_host, self._on_message,
                                  self._tick, functools.partial(self._fail, "I/O"),
                                  lambda: bool(self._calls or self._requests),
                                  self._serve_code if backend.remote else None, self._after_messages)
        self.address = backend.connect_address(self._endpoint.address)
        self._watcher = threading.Thread(target=self._watch_loop, name=f"flame-{self.name}-watch", daemon=True)
        backend.acquire()
        self._backend_held = True
        self._endpoint.start()
        self._watcher.start()
        _live_pools.add(self)
        with self._state():
            self._schedule()
        log.info("flame: %s listening on %s with %r", self.name, self.address, backend)

    # ---- public API ----------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> CallFuture:
        """Run ``fn(*args, **kwargs)`` on a runner; return a future for its result."""
        future = self._submit(fn, args, kwargs)
        self._endpoint.nudge()  # nobody may be receiving: let the I/O thread watch for the result
        return future

    def submit_to(self, runner: str | None, fn: Callable, /, *args: Any, **kwargs: Any) -> CallFuture:
        """Like :meth:`submit`, on the runner with id ``runner`` while it lives (it waits for a
        free slot there); if that runner is gone (or ``runner`` is None), wherever placement
        puts it. ``future.runner`` says where it went."""
        future = self._submit(fn, args, kwargs, runner)
        self._endpoint.nudge()
        return future

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, affinity: str | None = None,
                strict: bool = False, origin: Any = "") -> CallFuture:
        return self._queue(fn, [(args, kwargs)], affinity, strict, origin)[0].future

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a runner and return its value (or raise its exception).

        A KeyboardInterrupt while waiting (Ctrl-C, the notebook's stop button) stops the
        remote work too, then re-raises.
        """
        # No future: this thread waits for the call itself, and receives its own result.
        return self._queue(fn, [(args, kwargs)], outcome=True)[0].future.result()

    def map(self, fn: Callable, *iterables: Iterable) -> list:
        """``[fn(*xs) for xs in zip(*iterables)]``, run across runners; results in input order.

        If one call fails, the others are cancelled and its exception is raised. In a notebook,
        a map that takes more than a second shows a progress line in the cell.
        """
        futures = self._submit_many(fn, zip(*iterables))
        return gather(futures, title=f"map({getattr(fn, '__qualname__', None) or type(fn).__name__})")

    def cast(self, fn: Callable, /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on a runner without waiting; a failure is logged, not raised."""
        future = self.submit(fn, *args, **kwargs)

        def report(f: CallFuture) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("flame: cast of %s() failed: %r", f.call.name, f.exception())
        future.add_done_callback(report)

    async def acall(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call` for asyncio: awaiting it runs the call; cancelling the task stops it."""
        import asyncio  # here, not at the top: it is most of what importing flame would cost
        future = self.submit(fn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def complete(self, code: str, cursor: int | None = None, *, runner: str | None = None,
                 timeout: float = 10.0) -> dict:
        """Jupyter ``complete_reply`` content for ``code``, computed on a runner against its
        interactive namespace (the one ``%%remote`` cells run in): runner ``runner`` (an id),
        else any ready one. Answered at once, also while the runner runs calls."""
        return self._ask("complete", {"code": code, "cursor": len(code) if cursor is None else cursor},
                         runner, timeout)

    def inspect(self, code: str, cursor: int | None = None, detail_level: int = 0, *,
                runner: str | None = None, timeout: float = 10.0) -> dict:
        """Jupyter ``inspect_reply`` content for the name at ``cursor``, from a runner (see :meth:`complete`)."""
        return self._ask("inspect", {"code": code, "cursor": len(code) if cursor is None else cursor,
                                     "detail": detail_level}, runner, timeout)

    def _ask(self, kind: str, fields: dict, runner: str | None, timeout: float) -> dict:
        from concurrent.futures import Future
        with self._lock:
            r = self._runners.get(runner) if runner is not None else None
            if r is None or r.state != "ready":
                r = next((x for x in self._runners.values() if x.state == "ready"), None)
            if r is None:
                raise LookupError(f"{self.name} has no ready runner to ask")
            rid = f"q{next(self._request_ids)}"
            answer: Future = Future()
            self._requests[rid] = (r.id, answer)
            self._endpoint.send(r.id, kind, {"id": rid, **fields})
        self._endpoint.nudge()  # someone must receive the reply
        try:
            return answer.result(timeout)
        finally:
            self._requests.pop(rid, None)

    @property
    def code_bytes_sent(self) -> int:
        """Bytes of code archives this pool has sent to runners, flame's own included."""
        return self._code.bytes_sent if self._code is not None else 0

    @property
    def runners(self) -> list[RunnerInfo]:
        """A snapshot of the pool's runners."""
        with self._lock:
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
        with self._state():
            first = not self._closed
            self._closed = True
            pending = list(self._calls.values())
        if cancel_futures:
            for call in pending:
                call.future.cancel()
        elif wait:
            for call in pending:
                with contextlib.suppress(CancelledError, Exception):
                    call.future.exception()
        if not first and self._endpoint.stopped.is_set():
            return
        with self._state():
            while self._waiting:
                call = self._waiting.popleft()
                self._finish(call, exc=PoolClosed(f"{self.name} was shut down before {call.name}() ran"))
            for r in list(self._runners.values()):
                if r.state == "ready":
                    self._stop_runner(r)
                elif r.state == "booting":
                    self._drop_runner(r, None)
        deadline = time.monotonic() + STOP_GRACE
        while self._runners and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._state():
            for r in list(self._runners.values()):
                self._drop_runner(r, RunnerDied(f"runner {r.id} was stopped: {self.name} shut down", r.id))
        self._endpoint.stop()
        deadline = time.monotonic() + TERMINATE_WAIT
        while time.monotonic() < deadline:  # also those listed meanwhile
            alive = [t for t in list(self._helpers) if t.is_alive()]
            if not alive:
                break
            for t in alive:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._arena is not None:
            self._arena.close()
        self._release_backend()
        _live_pools.discard(self)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)

    def __repr__(self) -> str:
        with self._lock:
            states = collections.Counter(r.state for r in self._runners.values())
            busy = sum(len(r.calls) for r in self._runners.values())
        desc = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no runners"
        return (f"<flame.Pool {self.name}: {desc}; {busy} running, {len(self._waiting)} waiting; "
                f"max={self.max} max_concurrency={self.max_concurrency}"
                f"{' (shut down)' if self._closed else ''}>")

    def _repr_html_(self) -> str:
        return present.pool_html(self)

    # ---- state: one lock; effects run after it is released ---------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[None]:
        """Hold the lock; on leaving, release it, then run the effects queued meanwhile."""
        self._lock.acquire()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Release the lock, then run the effects queued while it was held (in order)."""
        todo = self._later
        if not todo:
            self._lock.release()
            return
        self._later = []
        self._lock.release()
        for effect in todo:
            try:
                effect()
            except Exception:
                log.exception("flame: %s: %r failed", self.name, effect)

    def _expect_calls(self, n: int) -> list[Runner]:
        """``n`` calls are about to be queued and the pool has no runner: start the boots placement
        would start for them now, before they are pickled, and return those runners. In a fresh
        process the first call imports what pickling needs (cloudpickle): that then overlaps
        the runner's boot (fresh process to first result: 1.36x the floor before, 1.16x after)."""
        with self._state():
            if self._runners or self._closed:
                return []
            expected = [placement.ANY] * n
            for _ in range(placement.decide(expected, [], self._limits_now(), time.monotonic()).boots):
                self._boot()
            return list(self._runners.values())

    def _unexpect(self, runners: list[Runner]) -> None:
        """The calls ``_expect_calls`` booted ``runners`` for failed to pickle: stop the ones
        that have taken no call meanwhile, as if they had never been asked for."""
        if runners:
            with self._state():
                for r in runners:
                    if not r.calls and r.state in ("booting", "ready") and not self._waiting:
                        self._drop_runner(r, None, reschedule=False)

    def _limits_now(self) -> placement.Limits:
        key = (self._capacity, self._closed or self._min_paused, self._endpoint.stopped.is_set())
        limits = self._limits
        if limits is None or key != self._limits_key:  # made anew only when one of these changed
            limits = self._limits = placement.Limits(
                self.min, self.max, self.max_concurrency, PREFETCH, key[0], self.idle_shutdown_after,
                refill=not key[1], can_boot=not key[2])
            self._limits_key = key
        return limits

    def _schedule(self) -> None:
        """Apply placement's decision (caller holds the lock)."""
        decision = placement.decide(self._waiting, list(self._runners.values()), self._limits_now(),
                                    time.monotonic())
        if decision.starts:
            for call, _ in decision.starts:
                self._waiting.remove(call)
            self._start_many(decision.starts)
        for _ in range(decision.boots):
            self._boot()
        for r in decision.stops:
            self._stop_runner(r)

    def _fail(self, where: str, exc: BaseException) -> None:
        """One of the pool's own threads died: fail every call with the cause, stop the runners."""
        error = PoolClosed(f"{self.name} stopped working: its {where} thread failed with "
                           f"{type(exc).__name__}: {exc} (traceback in the log)")
        error.__cause__ = exc
        self._endpoint.stopped.set()
        with self._state():
            self._closed = True
            while self._waiting:
                self._finish(self._waiting.popleft(), exc=error)
            for r in list(self._runners.values()):
                self._drop_runner(r, error, reschedule=False)
        self._endpoint.wake()
        if self._arena is not None:
            self._arena.close()
        self._release_backend()
        _live_pools.discard(self)

    def _shared_memory(self) -> shm.Arena:
        with self._lock:
            if self._arena is None:
                self._arena = shm.Arena(shm.pool_owner(self._id_prefix))
            return self._arena

    def _release_backend(self) -> None:
        with self._lock:
            if self._backend_held is False:
                return
            self._backend_held = False
        self.backend.release()
