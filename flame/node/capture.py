"""Per-call capture of stdout, stderr and rich display on a node.

``sys.stdout`` and ``sys.stderr`` are replaced once, at node start, by routers that
look up the call running on the writing thread.  Output of a call is buffered as
ordered events and sent by the node's I/O thread on a short timer (and at the end
of the call), so concurrent calls never mix their output and a tight print loop
does not become one message per print.  Writes from threads that belong to no
call go to the process's own streams.
"""
from __future__ import annotations

import io
import sys
import threading
from typing import Any, Callable


class CallOutput:
    """Output of one call not yet sent: a list of ``(kind, payload)`` events."""

    __slots__ = ("call_id", "events", "lock", "on_first")

    def __init__(self, call_id: str, on_first: Callable[["CallOutput"], None]) -> None:
        self.call_id = call_id
        self.events: list[list[Any]] = []
        self.lock = threading.Lock()
        self.on_first = on_first

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

    def drain(self, send: Callable[[str, Any], None]) -> None:
        """Hand every pending event to ``send(kind, payload)``, in order.

        The lock is held while sending so that two drains of the same call (timer
        and end of call) cannot reorder events.
        """
        with self.lock:
            events, self.events = self.events, []
            for kind, payload in events:
                send(kind, "".join(payload) if kind != "display" else payload)


class Capture:
    """Maps threads to the call whose output they produce."""

    def __init__(self) -> None:
        self.by_thread: dict[int, CallOutput] = {}

    def current(self) -> CallOutput | None:
        return self.by_thread.get(threading.get_ident())

    def install(self) -> None:
        sys.stdout = _Router("stdout", sys.stdout, self)
        sys.stderr = _Router("stderr", sys.stderr, self)


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
        out = self._capture.by_thread.get(threading.get_ident())
        if out is None:
            return self._fallback.write(text)
        if text:
            out.write(self.name, text)
        return len(text)

    def flush(self) -> None:
        if threading.get_ident() not in self._capture.by_thread:
            self._fallback.flush()
