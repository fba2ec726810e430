"""Calls in flight: made ready before they are queued, held by id until they end, and their
answers taken in after.

``InFlight`` owns the pool's calls by id, from submit until they are settled, and the
transitions that end them (retired, finished, interrupted, timed out). ``Packer`` pickles a call outside the pool's lock (the function once, by content hash; the
arguments; large buffers into shared memory). ``deliver`` settles a call's future once the
lock is released: futures' callbacks are the user's code, and results are unpickled by the
``result()`` that asks for them, in the caller's thread.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from concurrent.futures import CancelledError, InvalidStateError
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import present, serialize
from .call import Call, CallFuture, Pickled, to_sink
from .errors import CallTimeout, RunnerDied, SerializationError
from .functions import FunctionCache
from .holdings import runner_for
from .remote import Remote, _sending, remotes_in
from .wire import INLINE_MAX, Kind, fast_digests, out_of_band_digest

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool
    from .runner import Runner
    from .shm import Side
    from .state import State

log = logging.getLogger("flame.pool")

#: How long a cancelled call may take to stop before its runner is killed and replaced.
CANCEL_GRACE = 1.0


class InFlight:
    """A pool's calls by call id, queued or on a runner, until each is settled (caller holds
    the pool's lock)."""

    def __init__(self, state: State, shm: Side, timeout: float | None) -> None:
        self._state = state
        self._shm = shm
        self._timeout = timeout
        #: call id -> Call, from submit until it is answered, failed or cancelled
        self.calls: dict[str, Call] = {}
        #: calls ended so far (answered, failed, cancelled): a pool view's calls/s
        self.ended = 0
        #: calls receiving copies of values from other runners (``Call.uses``)
        self.copying: set[Call] = set()

    def __bool__(self) -> bool:
        return bool(self.calls)

    def add(self, calls: Iterable[Call]) -> None:
        for call in calls:
            self.calls[call.id] = call
            if call.uses:
                self.copying.add(call)

    def refused(self, calls: Iterable[Call]) -> None:
        """``calls`` were never queued (PoolClosed, RunnerDied): nothing will read their shared memory."""
        for call in calls:
            if call.shm is not None:
                self._shm.release(call.shm[1], "pool")
                call.shm = None

    def retire(self, call: Call) -> None:
        """``call`` is over here: its slot on its runner is free, its shared memory ours again."""
        call.state = "done"
        self.ended += 1
        if call.uses is not None:
            self.copying.discard(call)
            call.uses = None  # the values it copied may go now
        if call.shm is not None:  # the pool will not send it again; its runners free it when done
            self._shm.release(call.shm[1], "pool")
            call.shm = None
        self.calls.pop(call.id, None)
        if call.runner is not None:
            call.runner.answered(call.id)

    def finish(self, call: Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Retire ``call`` and settle its future once the lock is released."""
        self.retire(call)
        self._state.later(functools.partial(settle, call.future, result, exc))

    def interrupt(self, call: Call) -> None:
        """Ask its runner to stop ``call``; past CANCEL_GRACE the runner is replaced."""
        call.state = "cancelling"
        call.cancel_deadline = time.monotonic() + CANCEL_GRACE
        call.runner.cancel(call.id)

    def time_out(self, call: Call) -> None:
        """``call`` passed the pool's timeout (queued: taken off the queue by its owner)."""
        if call.state == "queued":
            self.finish(call, exc=CallTimeout(f"{call.name}() waited past its timeout of "
                                              f"{self._timeout:g} s without a runner"))
        else:  # still on its runner until it answers the interrupt
            self._state.later(functools.partial(settle, call.future, None, CallTimeout(
                f"{call.name}() passed its timeout of {self._timeout:g} s; its remote work was stopped")))

    def lost(self, runner_id: str) -> list[Call]:
        """Runner ``runner_id`` is gone, and with it the values it held: fail the calls that
        needed them (queued to run there; to receive a copy of one, its remote work stopped if
        running). Returns the queued ones, for the queue's owner to take off its queue."""
        unqueue = [c for c in self.calls.values() if c.strict and c.affinity == runner_id and c.state == "queued"]
        for call in unqueue:
            self.finish(call, exc=RunnerDied(f"runner {runner_id} is gone, and with it the values "
                                             f"{call.name}() needed", runner_id))
        for call in list(self.copying):
            held = next((h for h in call.uses or () if h.runner_id == runner_id), None)
            if held is None or call.state not in ("queued", "running"):
                continue
            error = RunnerDied(f"runner {runner_id} is gone, and with it the value from {held.origin} "
                               f"that {call.name}() was to receive a copy of", runner_id)
            if call.state == "queued":
                unqueue.append(call)
                self.finish(call, exc=error)
            else:
                self.abandon(call, error)
        return unqueue

    def abandon(self, call: Call, exc: BaseException) -> None:
        """Fail a running ``call`` with ``exc`` now, and stop its remote work."""
        self.interrupt(call)
        self._state.later(functools.partial(settle, call.future, None, exc))

    def wait_all(self, cancel: bool) -> None:
        """Wait until the calls in flight now have ended, or cancel them (not holding the lock:
        the pool is closed, so no call joins them)."""
        with self._state.lock:
            pending = list(self.calls.values())
        for call in pending:
            future = call.future  # None once its answer was delivered
            with contextlib.suppress(CancelledError, Exception):
                future.cancel() if cancel else future.exception()

    def overdue(self, runners: Iterable[Runner], now: float) -> list[Runner]:
        """Interrupt the calls past their deadline; return the runners with a cancelled call
        that did not stop within CANCEL_GRACE (to be killed and replaced)."""
        stuck = []
        for r in runners:
            for call in list(r.calls.values()):
                if call.state == "running" and call.deadline is not None and now > call.deadline:
                    self.interrupt(call)
                    self.time_out(call)
                elif call.state == "cancelling" and now > call.cancel_deadline:
                    log.warning("flame: %s did not stop within %g s of its cancel; "
                                "killing runner %s", call, CANCEL_GRACE, r.id)
                    stuck.append(r)
                    break
        return stuck


class Packer:
    """Makes a pool's calls ready to queue, outside its lock; owns its function cache."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.functions = FunctionCache(dumps=serialize.dumps_function)
        self.fast = fast_digests()  # large frames digested with BLAKE3, for runners that can too

    def function(self, fn: Callable) -> tuple:
        """``fn`` pickled, and its content hash."""
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        return self.functions.get(fn)

    def calls(self, fn: Callable, arguments: list, affinity: str | None, strict: bool, origin: Any,
              outcome: bool, per_call: int) -> list[Call]:
        """The calls of ``fn``, one per ``(args, kwargs)`` in ``arguments``, the function pickled
        once. ``per_call``: items per call of a map (numbers its calls)."""
        entry = self.function(fn)
        calls = [self.call(fn, args, kwargs, affinity, strict, origin, entry=entry, outcome=outcome)
                 for args, kwargs in arguments]
        if per_call:
            for i, call in enumerate(calls):
                call.index = i * per_call
        return calls

    def call(self, fn: Callable, args: tuple, kwargs: dict, affinity: str | None = None,
             strict: bool = False, origin: Any = "", entry: tuple | None = None,
             arg_frames: list | None = None, outcome: bool = False) -> Call:
        """A call, pickled and ready to queue. ``arg_frames``: its arguments already pickled
        (an operation on a Remote with nothing but plain values)."""
        pool = self._pool
        fn_payload, fn_hash = entry or self.function(fn)
        if pool._code is not None:
            pool._code.refresh()  # cheap unless a module was imported or reloaded
        uses: list = []
        if arg_frames is None:
            found = remotes_in(args, kwargs) if (args or kwargs) and not strict else None
            if found or strict:  # the call runs where most of its Remotes' bytes live; they arrive
                if found:        # as the real objects there, the others as copies
                    affinity = affinity or runner_for(found, pool)
                    mine = [r._held for r in found if isinstance(r, Remote) and r._held.runner_id == affinity
                            and r._held.pool is pool]
                    strict, origin = bool(mine), (mine[0] if mine else origin)
                before = (getattr(_sending, "runner", None), getattr(_sending, "pool", None),
                          getattr(_sending, "uses", None))  # a copy relayed here pickles a call too
                _sending.runner, _sending.pool, _sending.uses = affinity or "", pool, uses
                try:
                    arg_frames = serialize.dumps_args(fn, args, kwargs)
                finally:
                    _sending.runner, _sending.pool, _sending.uses = before
            else:
                arg_frames = serialize.dumps_args(fn, args, kwargs)
        arg_frames, shared = pool._shm.put(arg_frames, "pool")  # copied outside the lock
        deadline = None if pool.timeout is None else time.monotonic() + pool.timeout
        call = Call(pool, fn, getattr(fn, "__qualname__", None) or type(fn).__name__, fn_hash,
                    fn_payload, arg_frames, (out_of_band_digest(arg_frames, self.fast)
                     if len(arg_frames) > 1 or len(arg_frames[0]) >= INLINE_MAX else None),
                    deadline, affinity, outcome)
        call.strict, call.shm, call.retries = strict, shared, pool.retries
        if strict:
            call.origin = origin
        if uses:
            call.uses = uses
        return call


def output(call: Call | None, peer: str, kind: str, head: dict, frames: list) -> None:
    """A call's stream, display or report message, to its sink (the cell that asked)."""
    if call is not None and call.runner is not None and call.runner.id == peer:
        try:
            to_sink(call.sink, kind, head, frames, call.id, call.index)
        except Exception:
            log.exception("flame: output sink of %s failed", call)


def deliver(call: Call, cancelled: bool, peer: str, head: dict, frames: list, shm: Side) -> None:
    """Settle ``call``'s future with its answer (outside the lock)."""
    if head["k"] == Kind.RESULT:  # unpickled by result(), in the caller's thread: it runs user code
        if "m" in head:  # its large buffers wait in the runner's shared memory
            try:
                frames = [*frames, *shm.take(head["m"], peer, peer)]
            except (OSError, ValueError) as exc:
                settle(call.future, exc=SerializationError(
                    f"the result of {call.name}() arrived but its shared memory cannot be read: {exc}"))
                return
        settle(call.future, Pickled(frames, call.name))
    elif cancelled:
        settle(call.future, exc=CancelledError(f"{call.name}() was cancelled"))
    else:
        exc = serialize.rebuild_error(head, frames, present.local_source(head.get("tb", ""), call.fn))
        if head.get("type") == "builtins.ModuleNotFoundError" or isinstance(exc, ModuleNotFoundError):
            present.explain_missing_module(exc, call.runner)
        settle(call.future, exc=exc)
    call.fn = None
    # The future keeps its call, not the other way round: no cycle left for the garbage
    # collector, so a result is freed (its shared memory reused) as soon as it is dropped.
    call.future = None


def settle(future: CallFuture, result: Any = None, exc: BaseException | None = None) -> None:
    """Settle ``future`` unless it is already done (cancelled, timed out); runs its callbacks."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
