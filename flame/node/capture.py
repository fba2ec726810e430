"""Per-call capture of stdout, stderr and rich display on a node.

``sys.stdout`` and ``sys.stderr`` are replaced once, at node start, by routers that
look up the call running on the writing thread.  Output of a call is buffered as
ordered events and sent by the node's I/O thread on a short timer (and at the end
of the call), so concurrent calls never mix their output and a tight print loop
does not become one message per print.

On a runner (``Capture(runner=True)``) as in a Jupyter kernel, nothing a call causes
to be printed is lost: threads a call starts write to that call, and so do other
threads and file descriptors 1 and 2 (C extensions, subprocesses) while exactly one
call runs.  What belongs to no call goes to the runner's log.  In an app served for
attach, what the app prints on its own is left alone.
"""
from __future__ import annotations

import contextvars
import io
import os
import sys
import threading
from typing import Any, Callable

from ..wire import output_message

#: The call an asyncio task writes to (tasks run on a loop's thread, not the call's): set by
#: the task that awaits a call's coroutine (``aio.wait``), inherited by the tasks it starts.
task_output: contextvars.ContextVar["CallOutput | None"] = contextvars.ContextVar("flame_task_output",
                                                                                  default=None)


class CallOutput:
    """Output of one call not yet sent: a list of ``(kind, payload)`` events."""

    __slots__ = ("call_id", "events", "lock", "on_first", "send", "closed", "reports")

    def __init__(self, call_id: str, on_first: Callable[["CallOutput"], None],
                 send: Callable[..., None], reports: bool = False) -> None:
        self.call_id = call_id
        self.events: list[list[Any]] = []
        self.lock = threading.Lock()
        #: called when the first event is buffered (after each drain): schedules a flush
        self.on_first = on_first
        #: send(kind, fields, frames): the node's, for the messages drained events become
        self.send = send
        #: the call has ended: late writes from threads it started go elsewhere
        self.closed = False
        #: its caller shows what it reports (flame.report): else reports are not even kept
        self.reports = reports

    def write(self, name: str, text: str) -> None:
        with self.lock:
            events = self.events
            if events and events[-1][0] == name:
                events[-1][1].append(text)
                return
            events.append([name, [text]])
            first = len(events) == 1
        if first:
            self.on_first(self)

    def display(self, payload: dict) -> None:
        with self.lock:
            self.events.append(["display", payload])
            first = len(self.events) == 1
        if first:
            self.on_first(self)

    def report(self, point: dict) -> None:
        """One ``flame.report``: sent with the others of the same flush, as one message."""
        self.write("report", point)  # batched like text: consecutive reports are one event

    def drain(self) -> None:
        """Send every pending event as a message, in order.

        The lock is held while sending so that two drains of the same call (timer
        and end of call) cannot reorder events.
        """
        if not self.events:
            return
        with self.lock:
            events, self.events = self.events, []
            for kind, payload in events:
                if kind == "stdout" or kind == "stderr":
                    payload = "".join(payload)
                self.send(*output_message(self.call_id, kind, payload))


#: The capture routing this process's output, once one is installed.
installed: "Capture | None" = None


class Capture:
    """Maps threads to the call whose output they produce."""

    def __init__(self, runner: bool = False) -> None:
        self.by_thread: dict[int, CallOutput] = {}
        self.runner = runner
        self._open: dict[CallOutput, None] = {}  # calls running now
        self._fds: _FdCapture | None = None

    def begin(self, ident: int, out: CallOutput) -> None:
        """``out`` collects what thread ``ident`` prints until :meth:`end`."""
        self.by_thread[ident] = out
        self._open[out] = None

    def end(self, ident: int, out: CallOutput) -> None:
        if self._fds is not None and len(self._open) == 1:
            # What a subprocess wrote just before the call returned belongs to the call.
            self._fds.drain_ready()
        self.by_thread.pop(ident, None)
        self._open.pop(out, None)
        out.closed = True

    def current(self) -> CallOutput | None:
        """The call the calling thread writes to, if any."""
        out = task_output.get() or self.by_thread.get(threading.get_ident())
        if out is not None and not out.closed:
            return out
        return self.lone() if self.runner else None

    def lone(self) -> CallOutput | None:
        """The one call running, if exactly one is."""
        if len(self._open) == 1:
            try:
                return next(iter(self._open))
            except (StopIteration, RuntimeError):  # it ended meanwhile
                pass
        return None

    def install(self) -> None:
        """Route sys.stdout and sys.stderr; on a runner, file descriptors 1 and 2 and new threads too."""
        global installed
        installed = self
        out, err = sys.stdout, sys.stderr
        if self.runner:
            self._fds = _FdCapture(self)
            out, err = self._fds.install()
            _inherit_in_threads(self)
        sys.stdout = _Router("stdout", out, self)
        sys.stderr = _Router("stderr", err, self)

    @property
    def log_stream(self) -> Any:
        """Where the runner's own messages go: never into a call's output."""
        return self._fds.log_err if self._fds is not None else sys.__stderr__


def _inherit_in_threads(capture: Capture) -> None:
    """A thread started during a call writes to that call (threads do not inherit contextvars)."""
    start = threading.Thread.start

    def start_in_call(thread: threading.Thread) -> None:
        out = capture.by_thread.get(threading.get_ident())
        if out is not None:
            run = thread.run

            def run_in_call() -> None:
                me = threading.get_ident()
                capture.by_thread[me] = out
                try:
                    run()
                finally:
                    capture.by_thread.pop(me, None)
            thread.run = run_in_call  # type: ignore[method-assign]
        start(thread)
    threading.Thread.start = start_in_call  # type: ignore[method-assign]


class _FdCapture:
    """File descriptors 1 and 2 become pipes; a thread routes what arrives to the lone call.

    stdout without a call, and stderr always, also go to the original descriptors, which
    stay the runner's log (so a crash's last words are in the error the parent shows).
    """

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.lock = threading.Lock()
        self.pipes: dict[int, tuple[str, int, Any]] = {}  # read end -> (name, original fd, decoder)
        self._ready: Any = None  # a poll object for drain_ready (a poll object is not shared)

    def install(self) -> tuple[Any, Any]:
        import codecs
        streams = []
        for fd, name, stream in ((1, "stdout", sys.__stdout__), (2, "stderr", sys.__stderr__)):
            try:
                stream.flush()
            except (AttributeError, ValueError, OSError):
                pass
            original = os.dup(fd)
            r, w = os.pipe()
            try:  # room for bursts from C code that holds the GIL while it writes (Linux)
                import fcntl
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
            except (ImportError, AttributeError, OSError):
                pass
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self.pipes[r] = (name, original, codecs.getincrementaldecoder("utf-8")(errors="replace"))
            streams.append(io.TextIOWrapper(io.FileIO(original, "w", closefd=False), encoding="utf-8",
                                            errors="replace", line_buffering=True))
        self.log_out, self.log_err = streams
        import select
        self._ready = select.poll()
        for r in self.pipes:
            self._ready.register(r, select.POLLIN)
        threading.Thread(target=self._pump, name="flame-node-fds", daemon=True).start()
        return self.log_out, self.log_err

    def _pump(self) -> None:
        import select
        poller = select.poll()
        for r in self.pipes:
            poller.register(r, select.POLLIN)
        while True:
            poller.poll()
            self.drain()

    def drain_ready(self) -> None:
        """Route what waits in the pipes, at the cost of one system call when nothing does."""
        with self.lock:
            if self._ready.poll(0):
                self._drain()

    def drain(self) -> None:
        """Route everything waiting in the pipes now."""
        with self.lock:
            self._drain()

    def _drain(self) -> None:
        for r, (name, original, decoder) in self.pipes.items():
            while True:
                try:
                    data = os.read(r, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._route(name, original, decoder, data)

    def _route(self, name: str, original: int, decoder: Any, data: bytes) -> None:
        out = self.capture.lone()
        if out is not None:
            text = decoder.decode(data)
            if text:
                out.write(name, text)
        if out is None or name == "stderr":
            try:
                os.write(original, data)
            except OSError:
                pass


class _Router(io.TextIOBase):
    """A text stream that sends each write to the writing thread's call, or to ``fallback``."""

    def __init__(self, name: str, fallback: Any, capture: Capture) -> None:
        super().__init__()
        self.name = name
        self._fallback = fallback
        self._capture = capture

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fallback.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        out = self._capture.current()
        if out is None:
            return self._fallback.write(text)
        if text:
            out.write(self.name, text)
        return len(text)

    def flush(self) -> None:
        if self._capture.current() is None:
            self._fallback.flush()
