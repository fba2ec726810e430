"""Requests waiting for their reply, by request id: a pool's completions and inspections, an
attached client's cells and calls. Any thread may ask; the thread that receives answers, and
a peer that is gone fails what it still owed."""
from __future__ import annotations

import itertools
from concurrent.futures import Future, InvalidStateError
from typing import Any, Iterator


class Request:
    """One request: who must answer it (``peer``; None: whoever we talk to), the future its
    asker waits on, and where output sent meanwhile goes (``sink``)."""

    __slots__ = ("peer", "future", "sink")

    def __init__(self, peer: str | None, sink: Any) -> None:
        self.peer = peer
        self.future: Future = Future()
        self.sink = sink


class Replies:
    """The requests of one asker that wait for a reply."""

    def __init__(self) -> None:
        self._waiting: dict[str, Request] = {}
        self._ids = itertools.count(1)

    def new(self, peer: str | None = None, sink: Any = None, request_id: str | None = None) -> tuple[str, Request]:
        """A request to send, with a fresh id unless ``request_id`` names it."""
        request_id = request_id or f"q{next(self._ids)}"
        request = self._waiting[request_id] = Request(peer, sink)
        return request_id, request

    def get(self, request_id: str, peer: str | None = None) -> Request | None:
        """The request ``request_id``, if ``peer`` is the one who must answer it."""
        request = self._waiting.get(request_id)
        return request if request is not None and request.peer == peer else None

    def answer(self, request_id: str, peer: str | None, value: Any = None,
               exc: BaseException | None = None) -> None:
        """``peer``'s reply to ``request_id``; a reply to no request of ours, or from the wrong
        peer, is dropped."""
        request = self.get(request_id, peer)
        if request is not None:
            del self._waiting[request_id]
            _settle(request.future, value, exc)

    def drop(self, request_id: str) -> None:
        """Its asker stopped waiting (answered, timed out, interrupted)."""
        self._waiting.pop(request_id, None)

    def fail(self, exc: BaseException, peer: str | None = None) -> None:
        """Fail what ``peer`` still owes (every request, if None)."""
        for request_id, request in list(self._waiting.items()):
            if peer is None or request.peer == peer:
                self._waiting.pop(request_id, None)
                _settle(request.future, None, exc)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._waiting.values()))


def _settle(future: Future, value: Any, exc: BaseException | None) -> None:
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
    except InvalidStateError:  # settled already (failed as its peer went, then answered)
        pass
