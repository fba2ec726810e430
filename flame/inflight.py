"""The call lifecycle: queued -> running (-> cancelling) -> done.

A mixin of :class:`flame.pool.Pool`, working on its state under its lock: starting a call
on a runner (after pickling it outside the lock and queueing it under it), taking in its
answer, cancelling it, and the tick (heartbeats, deadlines,
placement) that the endpoint's I/O thread runs. Futures are settled once the lock is
released (their callbacks are the user's code), and results are unpickled by the
``result()`` that asks for them.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from concurrent.futures import CancelledError, InvalidStateError
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import placement, present, serialize, shm, wire
from .call import Call, CallFuture, Pickled
from .errors import CallTimeout, PoolClosed, SerializationError
from .remote import _sending, remotes_in
from .placement import PREFETCH
from .runner import Runner
from .wire import INLINE_MAX, introduction, out_of_band_digest, read_output

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool

log = logging.getLogger("flame.pool")

#: How long a cancelled call may take to stop before its runner is killed and replaced.
CANCEL_GRACE = 1.0


class CallLifecycle:
    """Starting, answering, cancelling and timing out calls (caller holds the lock unless a
    method says otherwise)."""

    # ---- queued: pickled outside the lock, then registered and placed under it ----------
    def _submit_many(self: "Pool", fn: Callable, arg_tuples: Iterable[tuple]) -> list[CallFuture]:
        """``_submit(fn, xs, {})`` for each ``xs`` (map's path)."""
        return [c.future for c in self._queue(fn, [(xs, {}) for xs in arg_tuples])]

    def _queue(self: "Pool", fn: Callable, arguments: list, affinity: str | None = None,
               strict: bool = False, origin: Any = "", outcome: bool = False) -> list[Call]:
        """Calls of ``fn``, one per ``(args, kwargs)`` in ``arguments``: all pickled first, then
        queued under one lock with one placement decision (one decision per call cost a third
        of the parent's time per tiny task, and the lock it held starved the thread taking
        results). A pool with no runner starts booting for them before it pickles them."""
        expected = self._expect_calls(len(arguments)) if not self._runners and arguments else []
        try:
            entry = self._function(fn)
            calls = [self._prepare(fn, args, kwargs, affinity, strict, origin, entry=entry, outcome=outcome)
                     for args, kwargs in arguments]
        except BaseException:
            self._unexpect(expected)
            raise
        if calls:
            self._enqueue(calls)
        return calls

    def _function(self: "Pool", fn: Callable) -> tuple:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        return self._functions.get(fn)

    def _prepare(self: "Pool", fn: Callable, args: tuple, kwargs: dict, affinity: str | None = None,
                 strict: bool = False, origin: Any = "", entry: tuple | None = None,
                 arg_frames: list | None = None, outcome: bool = False) -> Call:
        """A call, pickled and ready to queue (outside the lock). ``arg_frames``: its arguments
        already pickled (an operation on a Remote with nothing but plain values)."""
        fn_payload, fn_hash = entry or self._function(fn)
        if self._code is not None:
            self._code.refresh()  # cheap unless a module was imported or reloaded
        if arg_frames is None:
            found = remotes_in(args, kwargs) if (args or kwargs) and not strict else None
            if found or strict:  # the call runs where its Remotes live, and they arrive as the real objects
                if found:
                    affinity, strict, origin = self._holder_of(found), True, found[0]._held
                _sending.runner = affinity
                try:
                    arg_frames = serialize.dumps_args(fn, args, kwargs)
                finally:
                    _sending.runner = None
            else:
                arg_frames = serialize.dumps_args(fn, args, kwargs)
        shared = None
        if self._shm_on and len(arg_frames) > 1 and shm.oob_total(arg_frames) >= shm.SHM_MIN:
            shared = self._shared_memory().put(arg_frames[1:], "pool")  # copied outside the lock
            if shared is not None:
                arg_frames = arg_frames[:1]
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        call = Call(self, fn, getattr(fn, "__qualname__", None) or type(fn).__name__, fn_hash,
                    fn_payload, arg_frames, (out_of_band_digest(arg_frames, self._fast)
                     if len(arg_frames) > 1 or len(arg_frames[0]) >= INLINE_MAX else None),
                    deadline, affinity, outcome)
        call.strict, call.shm = strict, shared
        if strict:
            call.origin = origin
        return call

    def _enqueue(self: "Pool", calls: Sequence[Call]) -> None:
        """Register ``calls`` and start what can start; all of them, or none (PoolClosed,
        RunnerDied for a call whose values' runner is gone)."""
        while self._frees:  # regions of runners' memory we let go of: theirs to reuse at once
            peer, offset = self._frees.popleft()
            self._endpoint.send(peer, "free", {"at": offset})
        registered = False
        self._lock.acquire()  # not _state(): this is the per-call path
        try:
            if self._closed:
                raise PoolClosed(f"{self.name} is shut down")
            for call in calls:
                if call.strict and call.affinity not in self._runners:
                    raise self._lost(call.affinity, call.origin)
            for call in calls:
                self._calls[call.id] = call
            registered = True
            if len(calls) == 1 and not self._waiting:  # the common case: straight to a runner with room
                call = calls[0]
                if call.affinity is None:
                    runner = placement.least_loaded(self._runners.values(), self.max_concurrency)
                else:
                    runner = self._runners.get(call.affinity)
                    if runner is not None and (runner.state != "ready" or len(runner.calls) >= self.max_concurrency):
                        runner = None
                if runner is not None:
                    self._start(call, runner)
                    return
            full = self.max_concurrency + PREFETCH
            if (self._waiting and len(self._runners) >= self.max
                    and all(len(r.calls) >= full for r in self._runners.values())):
                # Every runner holds all it may and none can boot: these wait behind the others,
                # and the placement after the next results takes them (a decision per submit
                # cost a fifth of a tiny task's time).
                self._waiting.extend(calls)
                return
            self._waiting.extend(calls)
            self._schedule()
        except BaseException:
            if not registered:  # refused: nothing will ever read their shared memory
                for call in calls:
                    if call.shm is not None:
                        self._arena.release(call.shm[1], "pool")
            raise
        finally:
            self._release()

    def _start(self: "Pool", call: Call, r: Runner) -> None:
        fields, frames, digest = self._call_message(call, r)
        self._endpoint.send(r.id, "call", fields, frames, digest)
        if not call.ahead:
            call.arg_frames = call.arg_digest = None  # sent; let large buffers go

    def _start_many(self: "Pool", starts: list) -> None:
        """Start ``(call, runner)`` pairs, in order. Calls to one runner whose frames all ride
        inline go as one ``calls`` message: one send, one signature and one receive on each
        side for the lot (Dask's batched stream, in a simpler form: no timer, only what one
        placement decision starts together)."""
        if len(starts) == 1:
            self._start(*starts[0])
            return
        batches: dict = {}  # runner id -> (heads, frames) not sent yet
        for call, r in starts:
            fields, frames, digest = self._call_message(call, r)
            if digest is not None or len(frames) > 2:  # out-of-band frames: a message of its own,
                self._send_calls(r.id, batches.pop(r.id, None))  # after the calls before it
                self._endpoint.send(r.id, "call", fields, frames, digest)
            else:
                fields["n"] = len(frames)
                batch = batches.setdefault(r.id, ([], []))
                batch[0].append(fields)
                batch[1].extend(frames)
            if not call.ahead:
                call.arg_frames = call.arg_digest = None
        for rid, batch in batches.items():
            self._send_calls(rid, batch)

    def _send_calls(self: "Pool", rid: str, batch: tuple | None) -> None:
        """Send a batch of inline calls to runner ``rid``: one ``call``, or a ``calls`` message.
        A runner receives its calls in the order they were sent, which its start count
        relies on (``Runner.started_calls``)."""
        if batch is None:
            return
        heads, frames = batch
        if len(heads) == 1:
            del heads[0]["n"]
            self._endpoint.send(rid, "call", heads[0], frames)
        else:
            self._endpoint.send(rid, "calls", {"c": heads}, frames)

    def _call_message(self: "Pool", call: Call, r: Runner) -> tuple[dict, list, Any]:
        """Mark ``call`` as running on ``r``; the fields, frames and digest of its message."""
        if self._code is not None and self._code.now is not None and r.code != self._code.now.digest:
            self._push_code(r)
        call.state, call.runner, call.order = "running", r, r.sent
        r.sent += 1
        fields = {"id": call.id, "fn": call.fn_hash, "name": call.name}
        if call.shm is not None:
            fields["m"] = call.shm
            self._arena.lend(call.shm[1], r.id)
        # Sent ahead to a busy runner: its arguments are kept, should it have to go elsewhere.
        call.ahead = len(r.calls) >= self.max_concurrency
        r.calls[call.id] = call
        frames = list(call.arg_frames)
        # The out-of-band frames are the arguments' (hashed at submit, outside the lock),
        # unless a function too large to ride inline pushes every frame out of band.
        digest = call.arg_digest
        if not r.knows(call.fn_hash):
            fields["nf"] = 1
            frames.insert(0, call.fn_payload)
            if len(call.fn_payload) >= INLINE_MAX:
                digest = None
        return fields, frames, digest

    def _requeue(self: "Pool", calls: list) -> None:
        """Calls that provably never started go back to the front of the queue, in their
        order, to run elsewhere (see ``_drop_runner``)."""
        for call in reversed(calls):
            call.state, call.runner, call.ahead = "queued", None, False
            self._waiting.appendleft(call)

    def _finish(self: "Pool", call: Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Release a call's slot and settle its future once the lock is released."""
        self._retire(call)
        self._later.append(functools.partial(_settle, call.future, result, exc))

    def _retire(self: "Pool", call: Call) -> None:
        call.state = "done"
        if call.shm is not None:  # the pool will not send it again; its runners free it when done
            self._arena.release(call.shm[1], "pool")
            call.shm = None
        self._calls.pop(call.id, None)
        r = call.runner
        if r is not None and r.calls.pop(call.id, None) is not None:
            r.last_active = time.monotonic()

    def _cancel(self: "Pool", call: Call) -> None:
        """Stop a call: drop it from the queue, or interrupt it on its runner."""
        with self._state():
            if call.state == "queued":
                with contextlib.suppress(ValueError):
                    self._waiting.remove(call)
                self._retire(call)
            elif call.state == "running":
                self._interrupt(call)

    def _interrupt(self: "Pool", call: Call) -> None:
        call.state = "cancelling"
        call.cancel_deadline = time.monotonic() + CANCEL_GRACE
        self._endpoint.send(call.runner.id, "cancel", {"id": call.id})

    def _on_message(self: "Pool", peer: str, head: dict, frames: list) -> None:
        kind = head["k"]
        if kind == "reply":  # to an introspection request (Pool.complete, Pool.inspect)
            asked = self._requests.pop(head.get("id", ""), None)
            if asked is not None and asked[0] == peer:
                _settle(asked[1], head.get("content"))
            return
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
            if kind == "result" or kind == "error":  # first: the per-call path
                call = r.calls.get(head.get("id", ""))
                if call is not None:
                    cancelled = call.state == "cancelling" and head.get("cancelled")
                    self._retire(call)
                    if r.state == "ready" and self._waiting:
                        self._freed = True  # placed once per batch of messages: _after_messages
            elif kind == "hello":
                if r.state == "booting":
                    r.state = "ready"
                    r.pid = head.get("pid", r.pid)
                    r.host, r.python = head.get("host", r.host), head.get("python", "")
                    r.gpus, r.gpu_info = tuple(head.get("gpus", ())), head.get("gpu_info", [])
                    r.executable = head.get("executable", "")
                    if head.get("blake3") and self._fast:
                        self._endpoint.wire.fast_peers.add(r.id)
                    if head.get("cache"):
                        r.cache = (r.host, head["cache"])
                        if self._code is not None:
                            self._code.host_has(r.cache, r.code)
                    r.last_active = time.monotonic()
                    self._min_paused = False
                    self._endpoint.send(r.id, "welcome", {**introduction(), "pool": self.name,
                                                          "blake3": self._fast})
                    log.info("flame: runner %s ready (pid %s on %s)", r.id, r.pid, r.host)
                    self._schedule()
            elif kind == "free":  # a region of our arena the runner no longer uses
                if self._arena is not None:
                    self._arena.release(head.get("at", -1), peer)
            elif kind == "code-missing":  # its host's cache lost an archive: send it whole
                if self._code is not None:
                    self._code.host_lost(r.cache, head.get("h"))
                r.code = None
        finally:
            self._release()
        if call is None or call.future.settled:
            return
        if kind == "result":  # unpickled by result(), in the caller's thread: it runs user code
            if "m" in head:  # its large buffers wait in the runner's shared memory
                try:
                    frames = [*frames, *self._mappings.take(
                        head["m"], peer, functools.partial(_free_later, self._frees, peer))]
                except (OSError, ValueError) as exc:
                    _settle(call.future, exc=SerializationError(
                        f"the result of {call.name}() arrived but its shared memory cannot be read: {exc}"))
                    return
            _settle(call.future, Pickled(frames, call.name))
        elif cancelled:
            _settle(call.future, exc=CancelledError(f"{call.name}() was cancelled"))
        else:
            exc = serialize.rebuild_error(head, frames, present.local_source(head.get("tb", ""), call.fn))
            if head.get("type") == "builtins.ModuleNotFoundError" or isinstance(exc, ModuleNotFoundError):
                present.explain_missing_module(exc, call.runner)
            _settle(call.future, exc=exc)
        call.fn = None
        # The future keeps its call, not the other way round: no cycle left for the garbage
        # collector, so a result is freed (its shared memory reused) as soon as it is dropped.
        call.future = None

    def _tick(self: "Pool", now: float) -> None:
        """Heartbeats, call deadlines, cancels overdue, placement. No backend call: a slow
        backend must never starve heartbeats (runners would exit)."""
        with self._state():
            if now >= self._next_beat:
                self._next_beat = now + wire.HEARTBEAT  # read here: one value, wherever it is set
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
            if self._releases:
                self._send_releases()
            while self._frees:
                peer, offset = self._frees.popleft()
                self._endpoint.send(peer, "free", {"at": offset})
            if self.timeout is not None:
                for call in [c for c in self._waiting if now > c.deadline]:
                    self._waiting.remove(call)
                    self._timeout(call)
            if not self._closed:
                self._schedule()

    def _after_messages(self: "Pool") -> None:
        """A batch of messages was handled: place the calls waiting for the slots it freed.
        Once per batch, not per result: with many calls queued, a decision per result cost
        more than the result itself."""
        if self._freed:
            with self._state():
                self._freed = False
                if self._waiting and not self._closed:
                    self._schedule()

    def _timeout(self: "Pool", call: Call) -> None:
        if call.state == "queued":
            self._finish(call, exc=CallTimeout(f"{call.name}() waited past its timeout of "
                                               f"{self.timeout:g} s without a runner"))
        else:  # still on its runner until it answers the interrupt
            self._later.append(functools.partial(_settle, call.future, None, CallTimeout(
                f"{call.name}() passed its timeout of {self.timeout:g} s; its remote work was stopped")))


def _free_later(frees: Any, peer: str, offset: int) -> None:
    """A finalizer: a region of ``peer``'s arena is no longer used here. It may run inside any
    code, locks held, so it only queues; the tick sends it."""
    frees.append((peer, offset))


def _settle(future: CallFuture, result: Any = None, exc: BaseException | None = None) -> None:
    """Settle ``future`` unless it is already done (cancelled, timed out); runs its callbacks."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
