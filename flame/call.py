"""One call in flight: its future, output sink, deadline and cancel state."""
from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError, wait
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED
from concurrent.futures._base import FINISHED as _FINISHED
from typing import Any, Callable, Iterable, Protocol

from . import serialize
from .errors import RunnerDied, SerializationError
from .wire import read_output


class OutputSink(Protocol):
    """Where a call's remote output goes. Methods are called from the pool's I/O thread."""

    def stream(self, name: str, text: str) -> None:
        """``name`` is "stdout" or "stderr"."""

    def display(self, data: dict) -> None:
        """A rich display message: {"data": {mime: value}, "metadata": {...}, "transient": {...}}."""

    #: Optional: True if the sink shows what the call reports (``flame.report``) in
    #: ``report(points, key, index)``: the points, the call's key, its index in its map.
    #: A sink without it gets no reports, and its calls send none.
    reports: bool


class StdSink:
    """The default sink: the ``sys.stdout``/``sys.stderr`` the caller had when it made the call.
    Reports (``flame.report``) become lines on stderr with FLAME_PROGRESS=1 in the environment
    when flame is imported (read once: a plain script's per-call path stays as it was)."""

    reports = os.environ.get("FLAME_PROGRESS") == "1"

    def __init__(self) -> None:
        self.out = sys.stdout
        self.err = sys.stderr

    def stream(self, name: str, text: str) -> None:
        target = self.err if name == "stderr" else self.out
        try:
            target.write(text)
            target.flush()
        except (ValueError, OSError):  # the caller's stream was closed meanwhile
            pass

    def display(self, data: dict) -> None:
        text = data.get("data", {}).get("text/plain")
        if text is not None:
            self.stream("stdout", text + "\n")

    def report(self, points: list, key: str, index: int | None) -> None:
        for point in points:
            label = point.get("series") or (key if index is None else index + point.get("item", 0))
            values = " ".join(f"{k}={v:.4g}" if v is not None else f"{k}=nan"
                              for k, v in point.get("metrics", {}).items())
            step = f" (step {point['step']:g})" if "step" in point else ""
            self.stream("stderr", f"flame.report [{label}]: {values}{step}\n")


def to_sink(sink: Any, kind: str, head: dict, frames: list, key: str, index: int | None = None) -> None:
    """A call's output message (stream, display, report) to its sink, the cell that asked.
    ``key`` tells the calls of one cell apart; ``index``: the call's place in its map."""
    how, args = read_output(kind, head, frames)
    if how == "report":
        args = (*args, key, index)
    getattr(sink, how)(*args)


_sink_factory: Callable[[], OutputSink] = StdSink


def set_sink_factory(factory: Callable[[], OutputSink] | None) -> None:
    """Choose how each new call makes its output sink; called in the caller's thread at submit.

    The flamebook kernel uses this to route output to the cell that made the call.
    ``None`` restores the default (:class:`StdSink`).
    """
    global _sink_factory
    _sink_factory = factory or StdSink


def make_sink() -> OutputSink:
    return _sink_factory()


_ids = itertools.count(1)
_DONE = frozenset((_FINISHED, CANCELLED, CANCELLED_AND_NOTIFIED))


class Call:
    """A call from submit until its future is done and its runner slot is free."""

    __slots__ = ("id", "fn", "name", "fn_hash", "fn_payload", "arg_frames", "arg_digest", "future",
                 "sink", "deadline", "runner", "state", "cancel_deadline", "pool", "affinity", "ahead", "strict",
                 "shm", "origin", "order", "retries", "tries", "index", "uses", "__weakref__")

    def __init__(self, pool: Any, fn: Any, name: str, fn_hash: str, fn_payload: bytes,
                 arg_frames: list, arg_digest: bytes | None, deadline: float | None,
                 affinity: str | None = None, outcome: bool = False) -> None:
        self.id = f"c{next(_ids)}"
        self.pool = pool
        self.fn = fn  # kept until done, to map remote traceback lines back to local source
        #: id of the runner this call must run on while that runner lives (``%%remote``)
        self.affinity = affinity
        #: where its large arguments wait in the pool's shared memory (shm.Arena.put), if they do
        self.shm: list | None = None
        #: sent ahead to a busy runner (its arguments are kept until it is done)
        self.ahead = False
        #: runs on its affinity runner or nowhere (it uses values held there): RunnerDied if gone
        self.strict = False
        #: what made the values a strict call uses (for the error if their runner is gone)
        self.origin: Any = ""
        self.name = name
        self.fn_hash = fn_hash
        self.fn_payload = fn_payload
        self.arg_frames = arg_frames
        self.arg_digest = arg_digest
        #: what the caller waits on: a CallFuture, or an Outcome for Pool.call
        self.future: CallFuture | Outcome = Outcome(self) if outcome else CallFuture(self)
        self.sink = make_sink()
        self.deadline = deadline
        self.runner: Any = None
        #: queued -> running -> (cancelling ->) done
        self.state = "queued"
        self.cancel_deadline: float | None = None
        #: its place among the calls sent to its runner (Runner.sent when it was sent)
        self.order = 0
        #: runs left should its runner die before it returns (the pool's ``retries``); while
        #: any are left it keeps its arguments
        self.retries = 0
        #: why each earlier run failed (a RunnerDied's message each), for ``attempts``
        self.tries: list[str] = []
        #: its place in its map (of its chunk's first item), for the series of its reports
        self.index: int | None = None
        #: the values on other runners it receives copies of, kept alive until it ends
        self.uses: list | None = None

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.name}() {self.state}>"

    def run_again(self, error: BaseException) -> bool:
        """Its runner died with ``error`` before it returned: whether it runs again (it has
        retries left). Not a call being cancelled or past its deadline, nor one that uses
        values that were on that runner: they are not silently recomputed."""
        if (not isinstance(error, RunnerDied) or self.retries <= 0 or self.state != "running"
                or self.strict or self.arg_frames is None
                or (self.deadline is not None and time.monotonic() > self.deadline)):
            return False
        self.retries -= 1
        self.tries.append(str(error))
        return True

    def failure(self, error: BaseException) -> BaseException:
        """What it fails with: ``error``, or, after retries, a RunnerDied naming every try."""
        if not self.tries or not isinstance(error, RunnerDied):
            return error
        tries = [*self.tries, str(error)]
        return RunnerDied(f"{self.name}() failed on each of its {len(tries)} tries: "
                          + "; ".join(f"({i}) {why}" for i, why in enumerate(tries, 1)),
                          error.runner_id, error.exit_code, error.stderr)


def _receive_until(waiter: "CallFuture | Outcome", timeout: float | None) -> None:
    """Receive the pool's messages in this thread until ``waiter`` is settled, the timeout
    passes or the pool stops receiving; a KeyboardInterrupt meanwhile stops the remote work.

    This thread receives itself (no hand-off from the I/O thread), in short slices, so Ctrl-C
    is seen at once even when SIGINT lands on another thread or comes from
    ``_thread.interrupt_main``.
    """
    call = waiter.call
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        call.pool._endpoint.wait(waiter, timeout)
        if not waiter.settled:  # past the deadline, or the pool stopped receiving (it settles every call)
            waiter._block(None if deadline is None else max(0.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        if waiter.done():
            raise  # the call's own outcome, or Ctrl-C just after it arrived
        waiter.cancel()
        raise KeyboardInterrupt(f"interrupted while waiting for {call.name}(); "
                                "its remote work was stopped") from None


class CallFuture(Future):
    """A :class:`concurrent.futures.Future` of a call. ``cancel()`` also stops the remote work,
    and so does a KeyboardInterrupt (Ctrl-C, the notebook's stop button) while in ``result()``."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call
        #: done(), readable without taking the future's lock (the pool polls it while receiving)
        self.settled = False

    @property
    def runner_id(self) -> str | None:
        """The id of the runner the call was placed on; None while it waits for one."""
        r = self.call.runner
        return r.id if r is not None else None

    @property
    def runner(self) -> str | None:
        """The same as :attr:`runner_id`."""
        return self.runner_id

    @property
    def attempts(self) -> int:
        """How many runs the call has taken so far: 1, plus one per run whose runner died
        before it returned and that the pool's ``retries`` ran again."""
        return len(self.call.tries) + 1

    def result(self, timeout: float | None = None) -> Any:
        """The call's value, or its exception raised here. While waiting, this thread receives
        the pool's messages itself, and a KeyboardInterrupt stops the remote work too."""
        # Not settled yet, but done: a done callback asking (joblib's does), which runs before
        # set_result returns, maybe on the thread that receives for everyone.
        if not self.settled and self._state not in _DONE:
            _receive_until(self, timeout)
        # Settled: read without the condition's lock (a finished future never changes).
        value = self._result if self._state == _FINISHED and self._exception is None else super().result(0)
        return value.load() if type(value) is Pickled else value

    def _block(self, timeout: float | None) -> None:
        wait((self,), timeout)

    def set_result(self, result: Any) -> None:
        super().set_result(result)
        self.settled = True

    def set_exception(self, exception: BaseException | None) -> None:
        super().set_exception(exception)
        self.settled = True

    def cancel(self) -> bool:
        # The future stays PENDING while the call runs remotely, so Future.cancel() can
        # still succeed; the pool then interrupts the runner (and kills it after a grace).
        if self.done():
            return False
        self.call.pool._cancel(self.call)
        cancelled = super().cancel()
        if cancelled:
            self.settled = True
        return cancelled


_settling = threading.Lock()


class Outcome:
    """What :meth:`Pool.call` waits for: a call's outcome, settled like a CallFuture, without
    a Future's condition and callbacks (only the calling thread waits for it). That is a
    Future's creation, locking and notifying less per warm call (about 2.5 us here)."""

    __slots__ = ("call", "settled", "_value", "_error", "_event")

    def __init__(self, call: Call) -> None:
        self.call = call
        self.settled = False
        self._value: Any = None
        self._error: BaseException | None = None
        self._event: threading.Event | None = None  # made only for a wait past the pool's end

    def done(self) -> bool:
        return self.settled

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._settle(None, exception)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        with _settling:
            if self.settled:
                raise InvalidStateError(f"{self.call!r} is already settled")
            self._value, self._error, self.settled = value, error, True
            event = self._event
        if event is not None:
            event.set()

    def cancel(self) -> bool:
        """Stop the call, here and on its runner; False if it had ended."""
        if self.settled:
            return False
        self.call.pool._cancel(self.call)
        try:
            self._settle(None, CancelledError(f"{self.call.name}() was cancelled"))
        except InvalidStateError:
            return False
        return True

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._error

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._error is not None:
            raise self._error
        value = self._value
        return value.load() if type(value) is Pickled else value

    def _wait(self, timeout: float | None) -> None:
        if not self.settled:
            _receive_until(self, timeout)
            if not self.settled:
                raise FutureTimeout(f"{self.call.name}() did not finish within {timeout} s")

    def _block(self, timeout: float | None) -> None:
        with _settling:
            if self.settled:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        event.wait(timeout)


class Pickled:
    """A result as it arrived: unpickled by the first ``result()`` that asks, in that thread.

    Unpickling runs the user's code (``__setstate__``, constructors) and may be slow; the
    thread that receives messages for the whole pool must not wait on it.
    """

    __slots__ = ("frames", "name", "value", "error", "lock")

    def __init__(self, frames: list, name: str) -> None:
        self.frames: list | None = frames
        self.name = name
        self.value: Any = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def load(self) -> Any:
        with self.lock:
            if self.frames is not None:
                try:
                    self.value = serialize.loads(self.frames)
                except Exception as exc:
                    self.error = SerializationError(f"the result of {self.name}() arrived but cannot be "
                                                    f"unpickled here: {type(exc).__name__}: {exc}")
                self.frames = None
        if self.error is not None:
            raise self.error
        return self.value


def gather(futures: Iterable[Any], *, return_exceptions: bool = False, title: str = "gather") -> list:
    """Wait for ``futures`` (from ``pool.submit``) and return their results in order, showing a
    progress line in a notebook while it takes more than a second.

    The first exception is raised (the other futures are cancelled), unless
    ``return_exceptions``: then exceptions take the place of results. ``title`` starts the
    progress line. Defaults to "gather".
    """
    futures = list(futures)
    from .progress import Tracker  # here: the progress line is only for batches
    tracker = Tracker(title, futures)
    try:
        if not return_exceptions:
            return [f.result() for f in futures]
        out = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as exc:  # CancelledError included
                out.append(exc)
        return out
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    finally:
        tracker.close()
