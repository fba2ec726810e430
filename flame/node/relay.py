"""Requests to a holder this runner cannot reach (its listener is a Unix socket on another
host, and its backend has no ``peer_host``): relayed through the parent, over the two
runners' own signed connections to it (``Kind.RELAY`` to the holder, ``Kind.RELAYED`` back).
So a handle (``flame.ref``) works wherever its holder is, directly where it can.

The parent forwards only between runners of its pools and says who asks (``from``, the
identity its wire checked); the asker also proves it holds the holder pool's peer key (as a
direct connection would), with an HMAC over the request's id and the holder's name.

Only the waiting and the hand-over live here; what is asked and answered is ``peers.py``'s,
which passes its channel in.
"""
from __future__ import annotations

import hashlib
import hmac
import queue
import threading
import time
from typing import Any, Callable

from ..errors import RunnerDied
from ..wire import Kind

_waiting: dict[int, list] = {}  # request id -> [event, (head, frames) once answered]
_work: queue.SimpleQueue = queue.SimpleQueue()
_worker: list = []
_worker_lock = threading.Lock()


def mac(key: bytes, request: Any, holder: str) -> str:
    """What proves that a relayed request comes from a holder of the peer ``key``."""
    return hmac.new(key, f"flame relay {request} {holder}".encode(), hashlib.sha256).hexdigest()


def ask(post: Callable[..., None], gone: set, timeout: float, holder: str, key: bytes, fields: dict,
        frames: list, origin: str) -> tuple[dict, list]:
    """Send a FETCH for ``holder`` through the parent (``post``: this runner's channel to it);
    its answer (head, frames). ``gone``: the runners its pool said are gone."""
    request = fields["id"]
    slot: list = [threading.Event(), None]
    _waiting[request] = slot
    post(Kind.RELAY, {"id": request, "to": holder, "req": fields, "mac": mac(key, request, holder)}, frames)
    deadline = time.monotonic() + timeout
    try:
        while not slot[0].wait(0.1):  # in slices: a cancel (KeyboardInterrupt) lands between them
            if holder in gone or time.monotonic() > deadline:
                why = "is gone" if holder in gone else f"did not answer within {timeout:g} s"
                raise RunnerDied(f"runner {holder}, which holds the value from {origin}, {why}", holder)
    finally:
        _waiting.pop(request, None)
    return slot[1]


def answered(head: dict, frames: list) -> None:
    """RELAYED: the answer to one of this runner's relayed requests."""
    slot = _waiting.get(head.get("id"))
    if slot is not None:
        slot[1] = (head.get("req") or {}, frames)
        slot[0].set()


def asked(head: dict, frames: list, answer: Callable[[dict, list], None]) -> None:
    """RELAY: a request relayed from another runner, answered by ``answer(head, frames)`` on a
    thread of its own (it may run an operation on a held value), one at a time, as the
    listener answers its own."""
    _work.put((head, frames, answer))
    with _worker_lock:
        if not _worker:
            _worker.append(threading.Thread(target=_answer_loop, name="flame-node-relay", daemon=True))
            _worker[0].start()


def _answer_loop() -> None:
    while True:
        head, frames, answer = _work.get()
        answer(head, frames)
