"""The pool: places calls on runners, boots and stops runners, watches deadlines and liveness.

Threads: callers (submit, wait), one I/O thread per pool (owns the ZeroMQ ROUTER,
runs every timer), and a short-lived thread per runner boot (a backend may block).
State is guarded by one lock; no sink, backend or future callback runs under it.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import datetime
import itertools
import logging
import math
import os
import select
import threading
import time
import weakref
from concurrent.futures import CancelledError
from typing import Any, Callable, Iterable

import zmq

from . import serialize
from .backends.base import Backend, RunnerSpec
from .call import Call, CallFuture
from .errors import BootError, CallTimeout, PoolClosed, RunnerDied, SerializationError
from .runner import Runner, RunnerInfo
from .functions import FunctionCache
from .wire import INLINE_MAX, KEY_BYTES, Wire, listener, out_of_band_digest, pending, recv_ready, send_parts

log = logging.getLogger("flame.pool")

#: How often the I/O thread checks exits, deadlines and idleness.
TICK = 0.05
#: Heartbeat interval to runners; they exit after ``parent_timeout`` without one.
HEARTBEAT = 1.0
#: How long a cancelled call may take to stop before its runner is killed and replaced.
CANCEL_GRACE = 1.0
#: Calls sent ahead to a busy runner when every runner is busy and the pool is at max.
PREFETCH = 1
#: How long a runner asked to stop may take before it is killed.
STOP_GRACE = 2.0

_pool_ids = itertools.count(1)
_live_pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()


def _shutdown_all() -> None:
    for pool in list(_live_pools):
        pool.shutdown(wait=False)


atexit.register(_shutdown_all)


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

        self._key = os.urandom(KEY_BYTES)
        self._wire = Wire(self._key, "parent")
        self._functions = FunctionCache(dumps=serialize.dumps_function)
        self._lock = threading.RLock()
        self._sock_lock = threading.Lock()
        self._runners: dict[str, Runner] = {}
        self._waiting: collections.deque[Call] = collections.deque()
        self._calls: dict[str, Call] = {}
        self._runner_ids = itertools.count(1)
        self._closed = False
        self._min_paused = False  # set by a boot failure: no refilling `min` until a boot works

        self._ctx = zmq.Context()
        self._sock, self._curve_public = listener(self._ctx, backend.bind_host)
        self._sock.bind(f"tcp://{backend.bind_host}:0")
        self.address = backend.connect_address(self._sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._sock_fd = self._sock.getsockopt(zmq.FD)
        # The caller receiving in _wait polls the socket and its own wake-up pipe: another
        # thread's socket operation may consume the edge it waits for (see _send).
        self._lead_r, self._lead_w = os.pipe()
        os.set_blocking(self._lead_r, False)
        os.set_blocking(self._lead_w, False)
        self._sock_poll = select.poll()  # used only by the thread holding _recv_lock
        self._sock_poll.register(self._sock_fd, select.POLLIN)
        self._sock_poll.register(self._lead_r, select.POLLIN)
        self._recv_lock = threading.Lock()
        self._waiters: list = []  # one entry per caller blocked in _wait (list ops are atomic)
        self._io_watching = True  # the I/O thread is waiting on the socket, not only on its pipe
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopped = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name=f"flame-{self.name}-io", daemon=True)
        self._io.start()
        _live_pools.add(self)
        with self._lock:
            self._refill_min()
        log.info("flame: %s listening on %s with %r", self.name, self.address, backend)

    # ---- public API ----------------------------------------------------------------
    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> CallFuture:
        """Run ``fn(*args, **kwargs)`` on a runner; return a future for its result."""
        future = self._submit(fn, args, kwargs)
        if not self._io_watching and not self._waiters:
            self._wake()  # nobody is receiving: let the I/O thread watch for this call's result
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
        with self._lock:
            if self._closed:
                raise PoolClosed(f"{self.name} is shut down")
            self._calls[call.id] = call
            if not self._waiting and affinity is None:
                runner = self._least_loaded(self.max_concurrency)
                if runner is not None:  # the common case: straight to a runner with room
                    self._start(call, runner)
                    return call.future
            self._waiting.append(call)
            self._schedule()
        return call.future

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on a runner and return its value (or raise its exception).

        A KeyboardInterrupt while waiting (Ctrl-C, the notebook's stop button) stops the
        remote work too, then re-raises.
        """
        future = self._submit(fn, args, kwargs)  # this thread receives its own result
        try:
            return _result(future)
        except KeyboardInterrupt:
            future.cancel()
            raise _interrupted(future) from None

    def map(self, fn: Callable, *iterables: Iterable) -> list:
        """``[fn(*xs) for xs in zip(*iterables)]``, run across runners; results in input order.

        If one call fails, the others are cancelled and its exception is raised.
        """
        futures = [self._submit(fn, xs, {}) for xs in zip(*iterables)]
        try:
            return [_result(f) for f in futures]
        except KeyboardInterrupt:
            for f in futures:
                f.cancel()
            raise _interrupted(futures[0]) from None
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

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls and stop every runner.

        With ``wait``, calls already submitted finish first; ``cancel_futures`` cancels them instead.
        """
        with self._lock:
            first = not self._closed
            self._closed = True
            pending = list(self._calls.values())
        if cancel_futures:
            for call in pending:
                call.future.cancel()
        elif wait:
            for call in pending:
                try:
                    call.future.exception()
                except (CancelledError, Exception):
                    pass
        if not first and self._stopped.is_set():
            return
        with self._lock:
            for call in list(self._waiting):
                self._finish(call, exc=PoolClosed(f"{self.name} was shut down before {call.name}() ran"))
            self._waiting.clear()
            for r in list(self._runners.values()):
                if r.state == "ready":
                    self._stop_runner(r)
                elif r.state == "booting":
                    self._drop_runner(r, None)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            with self._lock:
                if not self._runners:
                    break
            time.sleep(0.02)
        with self._lock:
            for r in list(self._runners.values()):
                self._drop_runner(r, RunnerDied(f"runner {r.id} was stopped: {self.name} shut down", r.id))
        self._stopped.set()
        self._wake()
        if threading.current_thread() is not self._io:
            self._io.join(timeout=5)
        _live_pools.discard(self)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=exc[0] is None, cancel_futures=exc[0] is not None)

    def __repr__(self) -> str:
        with self._lock:
            states = collections.Counter(r.state for r in self._runners.values())
            busy = sum(len(r.active) for r in self._runners.values())
        desc = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no runners"
        return (f"<flame.Pool {self.name}: {desc}; {busy} running, {len(self._waiting)} waiting; "
                f"max={self.max} max_concurrency={self.max_concurrency}"
                f"{' (shut down)' if self._closed else ''}>")

    def _repr_html_(self) -> str:
        import html
        rows = []
        now = datetime.datetime.now()
        for r in self.runners:
            up = str(now - r.started).split(".")[0]
            names = {g.get("id"): g.get("name") for g in r.extra.get("gpu_info", [])}
            gpus = ", ".join(f"{g} ({names[g]})" if names.get(g) else str(g) for g in r.gpus) or "–"
            rows.append(f"<tr><td>{html.escape(r.id)}</td><td>{r.state}</td><td>{html.escape(r.host)}</td>"
                        f"<td>{r.pid or ''}</td><td>{r.active}</td><td>{up}</td><td>{html.escape(gpus)}</td></tr>")
        body = "".join(rows) or '<tr><td colspan="7"><i>no runners</i></td></tr>'
        with self._lock:
            waiting = len(self._waiting)
        return (f"<div><b>flame.Pool {html.escape(self.name)}</b> — {html.escape(repr(self.backend))}, "
                f"max={self.max}, max_concurrency={self.max_concurrency}, waiting calls: {waiting}"
                f"{' (shut down)' if self._closed else ''}"
                "<table><thead><tr><th>runner</th><th>state</th><th>host</th><th>pid</th>"
                "<th>active calls</th><th>uptime</th><th>GPUs</th></tr></thead>"
                f"<tbody>{body}</tbody></table></div>")

    # ---- scheduling (caller holds the lock) ----------------------------------------
    def _schedule(self) -> None:
        waiting = self._waiting
        pinned = self._place(self.max_concurrency)
        if len(waiting) > pinned:
            booting = sum(1 for r in self._runners.values() if r.state == "booting")
            need = len(waiting) - pinned - booting * self.max_concurrency
            while need > 0 and self._can_boot():
                self._boot()
                need -= self.max_concurrency
            if len(waiting) > pinned and not booting and not self._can_boot():
                # Every runner is busy and no more can come: send the next calls ahead, so each
                # is on its runner the moment the one before it ends (the runner still runs
                # at most max_concurrency at once).
                self._place(self.max_concurrency + PREFETCH)
        self._refill_min()

    def _place(self, limit: int) -> int:
        """Start waiting calls on ready runners holding fewer than ``limit`` calls, least loaded
        first, in FIFO order except that a call pinned to a busy runner lets later calls pass.
        Returns how many waiting calls are pinned to busy runners."""
        waiting = self._waiting
        pinned = 0
        while len(waiting) > pinned:
            best = self._least_loaded(limit)
            if best is None:
                break
            pinned = 0
            for call in waiting:
                mine = self._runners.get(call.affinity) if call.affinity else None
                if mine is None or mine.state not in ("ready", "booting"):
                    waiting.remove(call)
                    self._start(call, best)
                    break
                if mine.state == "ready" and len(mine.active) < limit:
                    waiting.remove(call)
                    self._start(call, mine)
                    break
                pinned += 1
            else:
                break
        return pinned

    def _least_loaded(self, limit: int) -> Runner | None:
        """The ready runner with the fewest calls, if it holds fewer than ``limit``."""
        best = None
        for r in self._runners.values():
            if r.state == "ready" and len(r.active) < limit:
                if best is None or len(r.active) < len(best.active):
                    best = r
        return best

    def _live_count(self) -> int:
        return sum(1 for r in self._runners.values() if r.state in ("booting", "ready"))

    def _can_boot(self) -> bool:
        if len(self._runners) >= self.max or self._stopped.is_set():
            return False
        room = self.backend.capacity()
        if room is None:
            return True
        # Boots under way have not taken their share of the backend yet (GPU sets, say).
        starting = sum(1 for r in self._runners.values() if r.state == "booting" and r.handle is None)
        return room - starting > 0

    def _refill_min(self) -> None:
        if self._closed or self._min_paused:
            return
        while self._live_count() < self.min and self._can_boot():
            self._boot()

    def _start(self, call: Call, r: Runner) -> None:
        call.state, call.runner = "running", r
        r.active[call.id] = call
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
        self._send(r, "call", fields, frames, digest)
        call.arg_frames = call.arg_digest = None  # sent; let large buffers go

    def _boot(self) -> None:
        rid = f"{self.name}-r{next(self._runner_ids)}"
        r = Runner(rid, time.monotonic() + self.boot_timeout)
        self._runners[rid] = r
        spec = RunnerSpec(rid, self.address, {
            "FLAME_RUNNER_ID": rid, "FLAME_ADDRESS": self.address, "FLAME_KEY": self._key.hex(),
            "FLAME_CONCURRENCY": str(self.max_concurrency), "FLAME_HEARTBEAT": str(HEARTBEAT),
            "FLAME_PARENT_TIMEOUT": str(self.parent_timeout), "FLAME_FAILSAFE": str(self.boot_timeout),
        }, self.max_concurrency)
        if self._curve_public is not None:
            spec.env["FLAME_CURVE_SERVER"] = self._curve_public.decode()  # a public key
        threading.Thread(target=self._boot_thread, args=(r, spec), name=f"flame-boot-{rid}",
                         daemon=True).start()
        log.info("flame: booting runner %s", rid)

    def _boot_thread(self, r: Runner, spec: RunnerSpec) -> None:
        try:
            handle = self.backend.boot(spec)
        except Exception as exc:
            with self._lock:
                self._boot_failed(r, BootError(f"runner {r.id} could not be started by "
                                               f"{self.backend!r}: {exc}"))
            return
        with self._lock:
            r.handle, r.pid = handle, handle.pid
            r.host = handle.host
            if r.state == "dead":  # the pool gave up on it meanwhile
                self._terminate(r)
            elif self.backend.capacity() is not None:
                self._schedule()  # capacity counted this boot twice meanwhile: look again

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
        self._send(r, "shutdown")
        log.info("flame: stopping runner %s", r.id)

    def _drop_runner(self, r: Runner, error: Exception | None, reschedule: bool = True) -> None:
        """Forget a runner, fail its calls with ``error``, and make sure its process is gone."""
        if r.state == "dead":
            return
        r.state = "dead"
        self._runners.pop(r.id, None)
        self._wire.forget(r.id)
        for call in list(r.active.values()):
            self._finish(call, exc=error or RunnerDied(f"runner {r.id} stopped", r.id))
        r.active.clear()
        if r.handle is not None:
            self._terminate(r)
        if reschedule and not self._stopped.is_set():
            self._schedule()

    def _terminate(self, r: Runner) -> None:
        try:
            self.backend.terminate(r.handle)
        except Exception:
            log.exception("flame: backend failed to terminate runner %s", r.id)

    def _finish(self, call: Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Settle a call's future (if still open) and release its slot."""
        call.state = "done"
        call.fn = None
        self._calls.pop(call.id, None)
        r = call.runner
        if r is not None and r.active.pop(call.id, None) is not None:
            r.last_active = time.monotonic()
        fut = call.future
        if not fut.done():
            try:
                fut.set_exception(exc) if exc is not None else fut.set_result(result)
            except Exception:  # cancelled meanwhile: InvalidStateError
                pass

    def _cancel(self, call: Call) -> None:
        """Stop a call: drop it from the queue, or interrupt it on its runner."""
        with self._lock:
            if call.state == "queued":
                try:
                    self._waiting.remove(call)
                except ValueError:
                    pass
                call.state = "done"
                self._calls.pop(call.id, None)
            elif call.state == "running":
                self._interrupt(call)

    def _interrupt(self, call: Call) -> None:
        call.state = "cancelling"
        call.cancel_deadline = time.monotonic() + CANCEL_GRACE
        self._send(call.runner, "cancel", {"id": call.id})

    # ---- I/O thread ----------------------------------------------------------------------
    def _send(self, r: Runner, kind: str, fields: dict | None = None, frames: list | tuple = (),
              digest: bytes | None = None) -> None:
        """Sign and send at once, from any thread (callers send their own calls: no hand-off)."""
        with self._sock_lock:
            if self._sock.closed:
                return
            msg = self._wire.encode(kind, r.id, fields, frames, digest)
            send_parts(self._sock, [r.id.encode(), *msg])
            # A socket operation may consume the edge on the socket's FD that would have woken
            # whoever polls it (the I/O thread, or a caller in _wait) for an incoming message;
            # if one is waiting, wake them explicitly. With nobody polling, the next receiver
            # checks the socket before it polls.
            waiters = bool(self._waiters)
            waiting = (waiters or self._io_watching) and pending(self._sock)
        if waiting:
            self._wake()
            if waiters:
                self._wake(self._lead_w)

    def _wake(self, fd: int | None = None) -> None:
        try:
            os.write(self._wake_w if fd is None else fd, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _receive(self) -> list:
        with self._sock_lock:
            if self._sock.closed:
                return []
            return recv_ready(self._sock)

    def _wait(self, future: CallFuture) -> None:
        """Wait for ``future``, receiving and handling messages in this thread meanwhile.

        A caller blocked in call()/map() takes the receiving role itself (one at a time,
        leader/followers), so its result needs no hand-off from the I/O thread: that
        hand-off, a GIL ping-pong between two threads, cost more than the network hop.
        """
        if future.settled:
            return
        self._waiters.append(None)
        poll, lead_r = self._sock_poll.poll, self._lead_r
        try:
            while not future.settled:
                if not self._recv_lock.acquire(timeout=0.05):
                    continue
                batch: list = []
                try:
                    if future.settled or self._stopped.is_set():
                        break
                    batch = self._receive()
                    if not batch:
                        # The timeout only bounds the cost of a lost edge; wake-ups are explicit.
                        for fd, _ in poll(20):
                            if fd == lead_r:
                                try:
                                    os.read(lead_r, 65536)
                                except OSError:  # empty, or closed by a shutdown meanwhile
                                    pass
                        batch = self._receive()
                finally:
                    try:
                        for parts in batch:  # handled even if Ctrl-C struck: nothing is lost
                            self._handle(parts)
                    finally:
                        self._recv_lock.release()
        finally:
            self._waiters.pop()
            if not self._waiters and self._calls:
                self._wake()  # others' calls are out: the I/O thread must watch the socket again

    def _receive_and_handle(self) -> bool:
        """Receive, check and handle what is waiting, unless another thread is doing so now.

        One thread at a time, from receive through handling: sequence numbers are checked
        in arrival order, and a call's output is delivered before its result.
        """
        if not self._recv_lock.acquire(blocking=False):
            return False
        try:
            batch = self._receive()
            for parts in batch:
                self._handle(parts)
        finally:
            self._recv_lock.release()
        return bool(batch)

    def _io_loop(self) -> None:
        next_tick = next_beat = time.monotonic()
        woken = True
        # Two poll sets: while callers wait in _wait they receive themselves, and the I/O
        # thread must not wake (and contend for the GIL) on every message.
        watch_all, watch_wake = select.poll(), select.poll()
        for p in (watch_all, watch_wake):
            p.register(self._wake_r, select.POLLIN)
        watch_all.register(self._sock_fd, select.POLLIN)
        try:
            while not self._stopped.is_set():
                # Handle outside the socket lock: handlers take the pool lock and may send,
                # and the lock order everywhere is pool lock -> socket lock.
                got = self._receive_and_handle() if woken or not self._waiters else False
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    if now >= next_beat:
                        next_beat = now + HEARTBEAT
                        with self._lock:
                            for r in self._runners.values():
                                if r.state == "ready":
                                    self._send(r, "heartbeat")
                    self._check(now)
                if got:
                    continue
                self._io_watching = not self._waiters
                # Round up: a timeout truncated to 0 ms would spin until the tick.
                wait_ms = math.ceil(max(0.0, next_tick - time.monotonic()) * 1000)
                ready = (watch_all if self._io_watching else watch_wake).poll(wait_ms)
                woken = False
                for fd, _ in ready:
                    if fd == self._wake_r:
                        woken = True
                        try:
                            os.read(self._wake_r, 65536)
                        except BlockingIOError:
                            pass
        except Exception:
            log.exception("flame: %s I/O thread failed", self.name)
            raise
        finally:
            with self._sock_lock:
                self._sock.close(linger=0)
            self._ctx.term()
            for fd in (self._wake_r, self._wake_w, self._lead_r, self._lead_w):
                os.close(fd)

    def _handle(self, parts: list) -> None:
        ident = parts[0].bytes
        try:
            peer = ident.decode()
        except UnicodeDecodeError:
            peer = repr(ident)
        msg = self._wire.decode(parts[1:], peer=peer)
        if msg is None:
            return
        head, frames = msg
        kind = head["k"]
        with self._lock:
            r = self._runners.get(peer)
            if r is None:
                return  # a runner already dropped; its late messages mean nothing now
            r.last_heard = time.monotonic()
            if kind == "hello":
                if r.state == "booting":
                    r.state = "ready"
                    r.pid = head.get("pid", r.pid)
                    r.host = head.get("host", r.host)
                    r.python = head.get("python", "")
                    r.gpus = tuple(head.get("gpus", ()))
                    r.gpu_info = head.get("gpu_info", [])
                    r.last_active = time.monotonic()
                    self._min_paused = False
                    self._send(r, "welcome")
                    log.info("flame: runner %s ready (pid %s on %s)", r.id, r.pid, r.host)
                    self._schedule()
                return
            call = r.active.get(head.get("id", ""))
            if call is None:
                return
            if kind in ("result", "error"):
                if kind == "result":
                    outcome = self._unpickle_result(call, frames)
                else:
                    outcome = self._remote_error(call, head, frames)
                if isinstance(outcome, BaseException):
                    self._finish(call, exc=outcome)
                else:
                    self._finish(call, result=outcome)
                if r.state == "ready" and self._waiting:
                    self._schedule()
                return
        if kind == "stream":
            self._deliver(call, "stream", head.get("n", "stdout"), bytes(frames[0]).decode("utf-8", "replace"))
        elif kind == "display":
            import json
            self._deliver(call, "display", json.loads(bytes(frames[0])))

    def _deliver(self, call: Call, how: str, *args: Any) -> None:
        try:
            getattr(call.sink, how)(*args)
        except Exception:
            log.exception("flame: output sink of %s failed", call)

    def _unpickle_result(self, call: Call, frames: list) -> Any:
        try:
            return serialize.loads(frames)
        except Exception as exc:
            return SerializationError(f"the result of {call.name}() arrived but cannot be unpickled here: "
                                      f"{type(exc).__name__}: {exc}")

    def _remote_error(self, call: Call, head: dict, frames: list) -> BaseException:
        if head.get("cancelled") and call.state == "cancelling":
            return CancelledError(f"{call.name}() was cancelled")
        return serialize.rebuild_error(head, frames, _local_source(head.get("tb", ""), call.fn))

    def _check(self, now: float) -> None:
        with self._lock:
            for r in list(self._runners.values()):
                code = r.handle.exit_status() if r.handle is not None else None
                if code is not None:
                    self._runner_exited(r, code)
                elif r.state == "booting" and now > r.boot_deadline:
                    refused = self._wire.refused.get(r.id)
                    self._boot_failed(r, BootError(
                        f"runner {r.id} did not connect within boot_timeout={self.boot_timeout:g} s"
                        + (f"; its messages were refused: {refused}" if refused else "")
                        + _stderr_note(r), r.handle.stderr_tail() if r.handle else ""))
                elif r.state == "stopping" and r.stop_deadline is not None and now > r.stop_deadline:
                    self._drop_runner(r, None)
                elif r.state == "ready" and now - r.last_heard > max(10.0, 3 * self.parent_timeout):
                    self._drop_runner(r, RunnerDied(
                        f"runner {r.id} stopped answering (no heartbeat for "
                        f"{now - r.last_heard:.0f} s)" + _stderr_note(r), r.id))
                elif (r.state == "ready" and not r.active and self.idle_shutdown_after is not None
                      and now - r.last_active > self.idle_shutdown_after
                      and self._live_count() > self.min):
                    self._stop_runner(r)
                else:
                    for call in list(r.active.values()):
                        if call.state == "running" and call.deadline is not None and now > call.deadline:
                            self._interrupt(call)
                            self._timeout(call)
                        elif call.state == "cancelling" and now > call.cancel_deadline:
                            log.warning("flame: %s did not stop within %g s of its cancel; "
                                        "killing runner %s", call, CANCEL_GRACE, r.id)
                            self._drop_runner(r, None)
                            break
            for call in list(self._waiting):
                if call.deadline is not None and now > call.deadline:
                    self._waiting.remove(call)
                    self._timeout(call)

    def _timeout(self, call: Call) -> None:
        fut = call.future
        if call.state == "queued":
            self._finish(call, exc=CallTimeout(f"{call.name}() waited past its timeout of "
                                               f"{self.timeout:g} s without a runner"))
        elif not fut.done():
            try:
                fut.set_exception(CallTimeout(f"{call.name}() passed its timeout of {self.timeout:g} s; "
                                              f"its remote work was stopped"))
            except Exception:
                pass

    def _runner_exited(self, r: Runner, code: int) -> None:
        how = _describe_exit(code)
        tail = r.handle.stderr_tail() if r.handle else ""
        if r.state == "booting":
            self._boot_failed(r, BootError(f"runner {r.id} exited during boot ({how})" + _stderr_note(r), tail))
        elif r.state == "stopping" and not r.active:
            self._drop_runner(r, None)
        else:
            names = ", ".join(f"{c.name}()" for c in r.active.values())
            self._drop_runner(r, RunnerDied(
                f"runner {r.id} died ({how})" + (f" while running {names}" if names else "")
                + _stderr_note(r), r.id, code, tail))


def _local_source(tb: str, fn: Any) -> str:
    """Point remote traceback lines of functions sent by value back at their local source.

    cloudpickle renames the file of code it sends to "<dynamic-code>", so the runner
    cannot show source lines; the parent still has the code objects and linecache.
    """
    if "<dynamic-code>" not in tb or fn is None:
        return tb
    import linecache
    import re
    import types
    codes: dict[str, list] = {}
    seen: set = set()
    todo = [getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)]
    env = getattr(fn, "__globals__", {})
    while todo:
        code = todo.pop()
        if not isinstance(code, types.CodeType) or code in seen or len(seen) > 500:
            continue
        seen.add(code)
        codes.setdefault(code.co_name, []).append(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        for name in code.co_names:  # helpers defined next to fn (same notebook or script)
            value = env.get(name)
            if isinstance(value, types.FunctionType) and value.__module__ == getattr(fn, "__module__", None):
                todo.append(value.__code__)

    def fix(m: "re.Match[str]") -> str:
        line, name = int(m.group(1)), m.group(2)
        for code in codes.get(name, ()):
            lines = [n for _, _, n in code.co_lines() if n is not None]
            if lines and min(lines) <= line <= max(lines):
                src = linecache.getline(code.co_filename, line).strip()
                return f'File "{code.co_filename}", line {line}, in {name}' + (f"\n    {src}" if src else "")
        return m.group(0)
    return re.sub(r'File "<dynamic-code>", line (\d+), in (\S+)', fix, tb)


def _interrupted(future: CallFuture) -> KeyboardInterrupt:
    """A KeyboardInterrupt that says what happened, without flame's waiting frames in its traceback."""
    return KeyboardInterrupt(f"interrupted while waiting for {future.call.name}(); its remote work was stopped")


def _result(future: CallFuture) -> Any:
    """``future.result()``, receiving in this thread meanwhile (see Pool._wait).

    It waits in short slices, so Ctrl-C is seen at once even when SIGINT lands on
    another thread or comes from ``_thread.interrupt_main``.
    """
    future.call.pool._wait(future)
    return future.result()


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _stderr_note(r: Runner) -> str:
    tail = r.handle.stderr_tail() if r.handle is not None else ""
    return f"; last output:\n{tail}" if tail.strip() else ""
