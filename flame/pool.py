"""The pool: options, API and state transitions.

Where things live: the socket and its threads in ``endpoint.py``, the one decision (which
call starts where, what boots, what stops) in ``placement.py``, the parent's view of a runner
in ``runner.py``, of a call in ``call.py``, and how a pool shows itself in ``present.py``.

Threads: callers (submit, wait), the endpoint's I/O thread (receives when no caller does,
heartbeats and deadlines every tick), a watch thread that asks backends how their runners
are (``exit_status`` may run ``squeue``), a short-lived thread per boot and per terminate.
State is guarded by one lock, and nothing slow or foreign runs under it: no backend call,
no future callback, no unpickling. Transitions queue those as effects, run once the lock is
released (:meth:`Pool._state`).
"""
from __future__ import annotations

import asyncio
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
from concurrent.futures import CancelledError, InvalidStateError
from typing import Any, Callable, Iterable, Iterator

from . import placement, present, serialize
from .backends.base import Backend, RunnerSpec
from .call import Call, CallFuture, Pickled
from .endpoint import TICK, Endpoint
from .errors import BootError, CallTimeout, PoolClosed, RunnerDied
from .functions import FunctionCache
from .keys import new_key
from .runner import Runner, RunnerInfo
from .wire import INLINE_MAX, introduction, out_of_band_digest, read_output

log = logging.getLogger("flame.pool")

#: Heartbeat interval to runners; they exit after ``parent_timeout`` without one.
HEARTBEAT = 1.0
#: How long a cancelled call may take to stop before its runner is killed and replaced.
CANCEL_GRACE = 1.0
#: Calls sent ahead to a busy runner when every runner is busy and the pool is at max.
PREFETCH = 1
#: How long a runner asked to stop may take before it is killed.
STOP_GRACE = 2.0
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


class Pool:
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
                 parent_timeout: float = 5.0, name: str | None = None) -> None:
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
        self.backend = backend
        self.min, self.max, self.max_concurrency = min, max, max_concurrency
        self.idle_shutdown_after = idle_shutdown_after
        self.boot_timeout = boot_timeout
        self.timeout = timeout
        self.parent_timeout = parent_timeout
        self.name = name or f"pool-{next(_pool_ids)}"

        self._key = new_key()
        self._functions = FunctionCache(dumps=serialize.dumps_function)
        self._lock = threading.Lock()
        self._later: list = []  # effects queued under the lock, run once it is released
        self._runners: dict[str, Runner] = {}
        self._waiting: collections.deque[Call] = collections.deque()
        self._calls: dict[str, Call] = {}
        # Unique across processes and hosts: runner ids name ZeroMQ identities, jobs and key files.
        self._id_prefix = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}-{new_key().hex()[:6]}-r"
        self._runner_ids = itertools.count(1)
        self._closed = False
        self._min_paused = False  # set by a boot failure: no refilling `min` until a boot works
        self._capacity = backend.capacity()  # read outside the lock, after each boot and terminate
        self._next_beat = 0.0
        self._reapers: set[threading.Thread] = set()
        self._endpoint = Endpoint(self.name, self._key, backend.bind_host, self._on_message,
                                  self._tick, functools.partial(self._fail, "I/O"),
                                  lambda: bool(self._calls))
        self.address = backend.connect_address(self._endpoint.address)
        self._watcher = threading.Thread(target=self._watch_loop, name=f"flame-{self.name}-watch", daemon=True)
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

    def _submit(self, fn: Callable, args: tuple, kwargs: dict, affinity: str | None = None) -> CallFuture:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        fn_payload, fn_hash = self._functions.get(fn)
        arg_frames = serialize.dumps_args(fn, args, kwargs)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        call = Call(self, fn, getattr(fn, "__qualname__", None) or type(fn).__name__, fn_hash,
                    fn_payload, arg_frames, (out_of_band_digest(arg_frames)
                     if len(arg_frames) > 1 or len(arg_frames[0]) >= INLINE_MAX else None),
                    deadline, affinity)
        self._lock.acquire()  # not _state(): this is the per-call path
        try:
            if self._closed:
                raise PoolClosed(f"{self.name} is shut down")
            self._calls[call.id] = call
            if not self._waiting and affinity is None:
                runner = placement.least_loaded(self._runners.values(), self.max_concurrency)
                if runner is not None:  # the common case: straight to a runner with room
                    self._start(call, runner)
                    return call.future
            self._waiting.append(call)
            self._schedule()
        finally:
            self._release()
        return call.future

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a runner and return its value (or raise its exception).

        A KeyboardInterrupt while waiting (Ctrl-C, the notebook's stop button) stops the
        remote work too, then re-raises.
        """
        return self._submit(fn, args, kwargs).result()  # this thread receives its own result

    def map(self, fn: Callable, *iterables: Iterable) -> list:
        """``[fn(*xs) for xs in zip(*iterables)]``, run across runners; results in input order.

        If one call fails, the others are cancelled and its exception is raised.
        """
        futures = [self._submit(fn, xs, {}) for xs in zip(*iterables)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def cast(self, fn: Callable, /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` on a runner without waiting; a failure is logged, not raised."""
        future = self.submit(fn, *args, **kwargs)

        def report(f: CallFuture) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("flame: cast of %s() failed: %r", f.call.name, f.exception())
        future.add_done_callback(report)

    async def acall(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call` for asyncio: awaiting it runs the call; cancelling the task stops it."""
        future = self.submit(fn, *args, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

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
        for t in list(self._reapers):
            t.join(timeout=max(0.0, deadline - time.monotonic()))
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

    def _schedule(self) -> None:
        """Apply placement's decision (caller holds the lock)."""
        limits = placement.Limits(
            self.min, self.max, self.max_concurrency, PREFETCH, self._capacity, self.idle_shutdown_after,
            refill=not (self._closed or self._min_paused), can_boot=not self._endpoint.stopped.is_set())
        decision = placement.decide(self._waiting, list(self._runners.values()), limits, time.monotonic())
        for call, r in decision.starts:
            self._waiting.remove(call)
            self._start(call, r)
        for _ in range(decision.boots):
            self._boot()
        for r in decision.stops:
            self._stop_runner(r)

    def _start(self, call: Call, r: Runner) -> None:
        call.state, call.runner = "running", r
        r.calls[call.id] = call
        fields = {"id": call.id, "fn": call.fn_hash, "name": call.name}
        frames = list(call.arg_frames)
        # The out-of-band frames are the arguments' (hashed at submit, outside the lock),
        # unless a function too large to ride inline pushes every frame out of band.
        digest = call.arg_digest
        if not r.knows(call.fn_hash):
            fields["nf"] = 1
            frames.insert(0, call.fn_payload)
            if len(call.fn_payload) >= INLINE_MAX:
                digest = None
        self._endpoint.send(r.id, "call", fields, frames, digest)
        call.arg_frames = call.arg_digest = None  # sent; let large buffers go

    def _finish(self, call: Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Release a call's slot and settle its future once the lock is released."""
        self._retire(call)
        self._later.append(functools.partial(_settle, call.future, result, exc))

    def _retire(self, call: Call) -> None:
        call.state = "done"
        self._calls.pop(call.id, None)
        r = call.runner
        if r is not None and r.calls.pop(call.id, None) is not None:
            r.last_active = time.monotonic()

    def _cancel(self, call: Call) -> None:
        """Stop a call: drop it from the queue, or interrupt it on its runner."""
        with self._state():
            if call.state == "queued":
                with contextlib.suppress(ValueError):
                    self._waiting.remove(call)
                self._retire(call)
            elif call.state == "running":
                self._interrupt(call)

    def _interrupt(self, call: Call) -> None:
        call.state = "cancelling"
        call.cancel_deadline = time.monotonic() + CANCEL_GRACE
        self._endpoint.send(call.runner.id, "cancel", {"id": call.id})

    # ---- runners -------------------------------------------------------------------------
    def _boot(self) -> None:
        rid = f"{self._id_prefix}{next(self._runner_ids)}"
        r = self._runners[rid] = Runner(rid, time.monotonic() + self.boot_timeout)
        spec = RunnerSpec(rid, self.address, {
            "FLAME_RUNNER_ID": rid, "FLAME_ADDRESS": self.address, "FLAME_KEY": self._key.hex(),
            "FLAME_CONCURRENCY": str(self.max_concurrency), "FLAME_HEARTBEAT": str(HEARTBEAT),
            "FLAME_PARENT_TIMEOUT": str(self.parent_timeout), "FLAME_FAILSAFE": str(self.boot_timeout),
        }, self.max_concurrency)
        if self._endpoint.curve_public is not None:
            spec.env["FLAME_CURVE_SERVER"] = self._endpoint.curve_public.decode()  # a public key
        threading.Thread(target=self._boot_thread, args=(r, spec), name=f"flame-boot-{rid}",
                         daemon=True).start()
        log.info("flame: booting runner %s", rid)

    def _boot_thread(self, r: Runner, spec: RunnerSpec) -> None:
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

    def _boot_failed(self, r: Runner, error: BootError) -> None:
        log.warning("flame: %s", error)
        self._drop_runner(r, None, reschedule=False)
        self._min_paused = True
        # Fail the waiting calls that the runners still booting cannot take, unless a ready
        # runner will serve them: a broken boot must surface, not retry forever.
        if not any(x.state == "ready" for x in self._runners.values()):
            keep = sum(1 for x in self._runners.values() if x.state == "booting") * self.max_concurrency
            while len(self._waiting) > keep:
                self._finish(self._waiting.popleft(), exc=error)

    def _stop_runner(self, r: Runner) -> None:
        r.state = "stopping"
        r.stop_deadline = time.monotonic() + STOP_GRACE
        self._endpoint.send(r.id, "shutdown")
        log.info("flame: stopping runner %s", r.id)

    def _drop_runner(self, r: Runner, error: Exception | None, reschedule: bool = True) -> None:
        """Forget a runner, fail its calls with ``error``, and make sure its process is gone."""
        if r.state == "dead":
            return
        r.state = "dead"
        self._runners.pop(r.id, None)
        self._endpoint.wire.forget(r.id)
        for call in list(r.calls.values()):
            self._finish(call, exc=error or RunnerDied(f"runner {r.id} stopped", r.id))
        if r.handle is not None:
            self._later.append(functools.partial(self._reap, r))
        if reschedule and not self._endpoint.stopped.is_set():
            self._schedule()

    def _reap(self, r: Runner) -> None:
        """Force-stop a runner's process, on a thread of its own: terminate() may block (SSH, scancel)."""
        def reap() -> None:
            try:
                self.backend.terminate(r.handle)
            except Exception:
                log.exception("flame: backend failed to terminate runner %s", r.id)
            finally:
                self._reapers.discard(threading.current_thread())
            if self._capacity is not None and not self._endpoint.stopped.is_set():
                capacity = self.backend.capacity()
                with self._state():
                    self._capacity = capacity
                    self._schedule()  # a GPU set may be free again
        t = threading.Thread(target=reap, name=f"flame-terminate-{r.id}", daemon=True)
        self._reapers.add(t)
        t.start()

    # ---- messages (from the endpoint, outside the lock) ------------------------------------
    def _on_message(self, peer: str, head: dict, frames: list) -> None:
        kind = head["k"]
        if kind in ("stream", "display"):
            call = self._calls.get(head.get("id", ""))
            if call is not None and call.runner is not None and call.runner.id == peer:
                how, args = read_output(kind, head, frames)
                try:
                    getattr(call.sink, how)(*args)
                except Exception:
                    log.exception("flame: output sink of %s failed", call)
            return
        call = None
        self._lock.acquire()  # not _state(): this is the per-call path
        try:
            r = self._runners.get(peer)
            if r is None:
                return  # a runner already dropped; its late messages mean nothing now
            r.last_heard = time.monotonic()
            if kind == "hello":
                if r.state == "booting":
                    r.state = "ready"
                    r.pid = head.get("pid", r.pid)
                    r.host, r.python = head.get("host", r.host), head.get("python", "")
                    r.gpus, r.gpu_info = tuple(head.get("gpus", ())), head.get("gpu_info", [])
                    r.last_active = time.monotonic()
                    self._min_paused = False
                    self._endpoint.send(r.id, "welcome", {**introduction(), "pool": self.name})
                    log.info("flame: runner %s ready (pid %s on %s)", r.id, r.pid, r.host)
                    self._schedule()
            elif kind in ("result", "error"):
                call = r.calls.get(head.get("id", ""))
                if call is not None:
                    cancelled = call.state == "cancelling" and head.get("cancelled")
                    self._retire(call)
                    if r.state == "ready" and self._waiting:
                        self._schedule()
        finally:
            self._release()
        if call is None or call.future.settled:
            return
        if kind == "result":  # unpickled by result(), in the caller's thread: it runs user code
            _settle(call.future, Pickled(frames, call.name))
        elif cancelled:
            _settle(call.future, exc=CancelledError(f"{call.name}() was cancelled"))
        else:
            _settle(call.future, exc=serialize.rebuild_error(
                head, frames, present.local_source(head.get("tb", ""), call.fn)))
        call.fn = None

    # ---- time: the endpoint's tick (I/O thread) and the watch thread ---------------------
    def _tick(self, now: float) -> None:
        """Heartbeats, call deadlines, cancels overdue, placement. No backend call: a slow
        backend must never starve heartbeats (runners would exit)."""
        with self._state():
            if now >= self._next_beat:
                self._next_beat = now + HEARTBEAT
                for r in self._runners.values():
                    if r.state == "ready":
                        self._endpoint.send(r.id, "heartbeat")
            for r in list(self._runners.values()):
                for call in list(r.calls.values()):
                    if call.state == "running" and call.deadline is not None and now > call.deadline:
                        self._interrupt(call)
                        self._timeout(call)
                    elif call.state == "cancelling" and now > call.cancel_deadline:
                        log.warning("flame: %s did not stop within %g s of its cancel; "
                                    "killing runner %s", call, CANCEL_GRACE, r.id)
                        self._drop_runner(r, None)
                        break
            if self.timeout is not None:
                for call in [c for c in self._waiting if now > c.deadline]:
                    self._waiting.remove(call)
                    self._timeout(call)
            if not self._closed:
                self._schedule()

    def _timeout(self, call: Call) -> None:
        if call.state == "queued":
            self._finish(call, exc=CallTimeout(f"{call.name}() waited past its timeout of "
                                               f"{self.timeout:g} s without a runner"))
        else:  # still on its runner until it answers the interrupt
            self._later.append(functools.partial(_settle, call.future, None, CallTimeout(
                f"{call.name}() passed its timeout of {self.timeout:g} s; its remote work was stopped")))

    def _watch_loop(self) -> None:
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

    def _act(self, r: Runner, why: str, code: int | None, tail: str) -> None:
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
        _live_pools.discard(self)


def _settle(future: CallFuture, result: Any = None, exc: BaseException | None = None) -> None:
    """Settle ``future`` unless it is already done (cancelled, timed out); runs its callbacks."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
