"""One path for running a call on a node: execute it, stream its output, package its outcome,
cancel it. The runner (``node.py``) and the node inside an attached app (``served.py``) share it.

Two promises hold whatever the user's code and objects do:

- **A reply always goes back.** A result that fails to pickle (even half-way), an exception
  whose ``__str__``, ``__repr__`` or ``__reduce__`` raises: each becomes an error reply that
  names what happened, and the node lives on.
- **A cancel hits the call it was meant for, or nothing.** A cancel is aimed at a call, not at
  a thread: it is delivered (SIGINT to the main thread, an asynchronous KeyboardInterrupt to
  any other) only while that call is registered as running, under the same lock that
  retires it; retiring withdraws an interrupt not yet delivered. At most one interrupt is
  aimed at each call, and wherever it lands before the call is retired, it is caught here.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable

from .. import serialize
from ..errors import SerializationError
from . import aio
from .capture import Capture, CallOutput

log = logging.getLogger("flame.node")
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: send(kind, fields, frames): how a call's output and reply leave the node.
Send = Callable[[str, dict, tuple], None]


class _InFlight:
    __slots__ = ("ident", "out", "interrupted")

    def __init__(self, ident: int, out: CallOutput) -> None:
        self.ident = ident
        self.out = out
        self.interrupted = False


class Calls:
    """The calls a node is running: execute, cancel, and flush their output.

    ``signal_main``: interrupt calls on the main thread with SIGINT (which also breaks out of
    blocking calls such as ``time.sleep``) rather than an asynchronous exception; the node
    then installs :meth:`on_sigint` as the SIGINT handler.
    """

    def __init__(self, capture: Capture, signal_main: bool = False,
                 pack: Callable[[list], tuple] | None = None) -> None:
        self.capture = capture
        #: pack(frames) -> (frames, header fields): a result's large buffers into shared memory
        self.pack = pack
        self._lock = threading.Lock()
        self._running: dict[str, _InFlight] = {}
        self._queued: set[str] = set()  # received and not started (calls sent ahead)
        self._skip: set[str] = set()  # queued calls cancelled before they started
        self._dirty: set[CallOutput] = set()
        self._main = threading.main_thread().ident if signal_main else None
        self._sigint_target: str | None = None

    @property
    def running(self) -> int:
        """How many calls are running now."""
        return len(self._running)

    def queued(self, call_id: str) -> None:
        """``call_id`` was received and waits for a thread: a cancel now skips it."""
        self._queued.add(call_id)

    # ---- executing ------------------------------------------------------------------------
    def execute(self, call_id: str, name: str, work: Callable[[], Any], send: Send,
                reports: bool = False) -> None:
        """Run ``work()`` as call ``call_id`` in this thread; stream its output and send its reply.

        ``name`` says what runs, for error messages: "f()", "the cell". ``reports``: its caller
        shows what it reports (``flame.report``).
        """
        with self._lock:
            self._queued.discard(call_id)
            if call_id in self._skip:  # cancelled while queued: already answered
                self._skip.discard(call_id)
                return
            ident = threading.get_ident()
            out = CallOutput(call_id, self._output_pending, send, reports)
            flight = self._running[call_id] = _InFlight(ident, out)
        self.capture.begin(ident, out)
        reply = None  # stays None only if the cancel landed before the outcome was packaged
        started = False
        while True:
            try:
                if not started:
                    started = True
                    reply = self._outcome(call_id, name, work)
                self._retire(call_id, flight)
                break
            except KeyboardInterrupt:
                continue  # the one interrupt aimed at this call landed outside its work
        send(*(reply or cancelled_reply(call_id)))

    def _outcome(self, call_id: str, name: str, work: Callable[[], Any]) -> tuple[str, dict, tuple]:
        try:
            result = work()
            if hasattr(type(result), "__await__"):  # is_awaitable, inline: this is the per-call path
                result = aio.wait(result)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
            return error_reply(call_id, exc)
        try:
            frames = serialize.dumps(result)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a __reduce__ may raise anything
            return error_reply(call_id, SerializationError(
                f"cannot send the result of {name}: {serialize.describe(result)}: "
                f"{type(exc).__name__}: {safe_str(exc)}"))
        fields = {"id": call_id}
        if self.pack is not None and len(frames) > 1:  # only out-of-band buffers can go to shared memory
            try:
                frames, extra = self.pack(frames)
                fields.update(extra)
            except OSError as exc:  # /dev/shm full, say: the socket still carries it
                log.warning("flame: result of %s goes over the socket: shared memory failed: %s", name, exc)
        return "result", fields, tuple(frames)

    def _retire(self, call_id: str, flight: _InFlight) -> None:
        """The call has ended: from here on no interrupt can reach it. Idempotent."""
        with self._lock:
            if self._running.get(call_id) is flight:
                del self._running[call_id]
                if flight.interrupted and flight.ident != self._main:
                    _async_raise(flight.ident, None)  # withdraw it if not yet delivered
            self._dirty.discard(flight.out)
        self.capture.end(flight.ident, flight.out)
        if flight.out.events:
            flight.out.drain()  # the rest of its output, before its reply

    # ---- output ---------------------------------------------------------------------------
    def _output_pending(self, out: CallOutput) -> None:
        with self._lock:  # flush() swaps the set: always add to the current one
            self._dirty.add(out)

    def flush(self) -> None:
        """Send the output every call has written since the last flush."""
        if not self._dirty:
            return
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for out in dirty:
            out.drain()

    # ---- cancelling -----------------------------------------------------------------------
    def cancel(self, call_id: str) -> str | None:
        """Interrupt call ``call_id``: "interrupted" when running, "skipped" when still queued
        (the caller answers for it), None when it is not here (it ended meanwhile)."""
        with self._lock:
            flight = self._running.get(call_id)
            if flight is None:
                if call_id in self._queued:
                    self._skip.add(call_id)
                    return "skipped"
                return None
            if not flight.interrupted:
                flight.interrupted = True
                if flight.ident == self._main:
                    self._sigint_target = call_id
                    signal.pthread_kill(flight.ident, signal.SIGINT)
                else:
                    _async_raise(flight.ident, KeyboardInterrupt)
            return "interrupted"

    def on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler of a node whose main thread runs calls: raise only in the targeted call.

        Runs on the main thread between two bytecodes, possibly inside this class's own
        locked sections, so it takes no lock.
        """
        target, self._sigint_target = self._sigint_target, None
        flight = self._running.get(target) if target is not None else None
        if flight is not None and flight.ident == self._main:
            raise KeyboardInterrupt


def _async_raise(ident: int, exc: type[BaseException] | None) -> None:
    import ctypes
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                               ctypes.py_object(exc) if exc is not None else None)


# ---- packaging an outcome: nothing a user's object does here may escape --------------------------
def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a note saying why it could not be rendered."""
    try:
        text = str(exc)
        if isinstance(text, str):
            return text
        raise TypeError(f"__str__ returned {type(text).__name__}")
    except BaseException as err:  # noqa: BLE001
        return f"<the message of {_type_name(exc)} could not be rendered: {type(err).__name__}: {_plain(err)}>"


def _plain(err: BaseException) -> str:
    try:
        return str(err)
    except BaseException:  # noqa: BLE001
        return "?"


def _type_name(exc: BaseException) -> str:
    try:
        kind = type(exc)
        return f"{kind.__module__}.{kind.__qualname__}"
    except BaseException:  # noqa: BLE001
        return "Exception"


def error_reply(call_id: str, exc: BaseException) -> tuple[str, dict, tuple]:
    """The ``error`` message for ``exc``: type, message, traceback text and, when it pickles, itself."""
    msg = safe_str(exc)
    tb = exc.__traceback__
    # Skip the node's own frames: the user's traceback starts in their function (or cell).
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_HERE):
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # noqa: BLE001
        text = f"{_type_name(exc)}: {msg}\n"
    if msg.startswith("<the message of"):
        text += f"({msg[1:-1]})\n"
    fields = {"id": call_id, "type": _type_name(exc), "msg": msg, "tb": text,
              "cancelled": isinstance(exc, KeyboardInterrupt) or _is_cancelled_error(exc)}
    try:
        exc.__traceback__ = None
        frames = tuple(serialize.dumps(exc))
    except BaseException:  # noqa: BLE001 - it goes back as type name, message and traceback
        frames = ()
    return "error", fields, frames


def _is_cancelled_error(exc: BaseException) -> bool:
    asyncio = sys.modules.get("asyncio")  # only a node that ran a coroutine has it
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def cancelled_reply(call_id: str) -> tuple[str, dict, tuple]:
    return "error", {"id": call_id, "type": "builtins.KeyboardInterrupt", "msg": "cancelled", "tb": "",
                     "cancelled": True}, ()
