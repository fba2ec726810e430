"""One call in flight: its future, output sink, deadline and cancel state."""
from __future__ import annotations

import itertools
import sys
from concurrent.futures import Future
from typing import Any, Callable, Protocol


class OutputSink(Protocol):
    """Where a call's remote output goes. Methods are called from the pool's I/O thread."""

    def stream(self, name: str, text: str) -> None:
        """``name`` is "stdout" or "stderr"."""

    def display(self, data: dict) -> None:
        """A rich display message: {"data": {mime: value}, "metadata": {...}, "transient": {...}}."""


class StdSink:
    """The default sink: the ``sys.stdout``/``sys.stderr`` the caller had when it made the call."""

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


class Call:
    """A call from submit until its future is done and its runner slot is free."""

    __slots__ = ("id", "fn", "name", "fn_hash", "fn_payload", "arg_frames", "arg_digest", "future",
                 "sink", "deadline", "runner", "state", "cancel_deadline", "pool", "affinity",
                 "__weakref__")

    def __init__(self, pool: Any, fn: Any, name: str, fn_hash: str, fn_payload: bytes,
                 arg_frames: list, arg_digest: bytes | None, deadline: float | None,
                 affinity: str | None = None) -> None:
        self.id = f"c{next(_ids)}"
        self.pool = pool
        self.fn = fn  # kept until done, to map remote traceback lines back to local source
        #: id of the runner this call must run on while that runner lives (``%%remote``)
        self.affinity = affinity
        self.name = name
        self.fn_hash = fn_hash
        self.fn_payload = fn_payload
        self.arg_frames = arg_frames
        self.arg_digest = arg_digest
        self.future: CallFuture = CallFuture(self)
        self.sink = make_sink()
        self.deadline = deadline
        self.runner: Any = None
        #: queued -> running -> (cancelling ->) done
        self.state = "queued"
        self.cancel_deadline: float | None = None

    def __repr__(self) -> str:
        return f"<Call {self.id} {self.name}() {self.state}>"


class CallFuture(Future):
    """A :class:`concurrent.futures.Future` whose ``cancel()`` also stops the remote work."""

    def __init__(self, call: Call) -> None:
        super().__init__()
        self.call = call
        #: done(), readable without taking the future's lock (the pool polls it while receiving)
        self.settled = False

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


