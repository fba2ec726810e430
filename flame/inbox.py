"""What a pool's I/O thread brings it: each message a runner sends, one handler per kind,
and the tick (heartbeats, deadlines, releases, frees, placement).

The inbox owns only its handler table and whether the batch of messages it is handling freed
a slot; what a message changes belongs to its owner, which the handler asks: the call to
``InFlight``, the runner to its ``Runner`` (through the ``Fleet``), the queue to the ``Pool``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from . import wire
from .holdings import forward
from .inflight import deliver, output
from .wire import Kind

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool
    from .runner import Runner


class Inbox:
    """The messages and ticks of one pool's endpoint."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        # Read on every message: the objects, not a path through the pool to them.
        self._state, self._calls, self._runners = pool._state, pool._inflight.calls, pool._fleet.runners
        self._requests, self._shm = pool._fleet.requests, pool._shm
        #: a runner freed slots while calls wait: place them once the batch of messages is handled
        self._freed = False
        self._next_beat = 0.0
        # One handler per kind a runner sends (stream, display, report, reply and relays are
        # taken outside the lock: _unlocked). Each runs under the lock; an answer's returns what
        # deliver() settles once the lock is released.
        self._handlers: dict[str, Callable[[Runner, dict], Any]] = {
            Kind.RESULT: self._on_answer, Kind.ERROR: self._on_answer, Kind.HELLO: self._on_hello,
            Kind.HEARTBEAT: _on_heartbeat, Kind.FREE: self._on_free, Kind.CODE_MISSING: self._on_code_missing,
            Kind.PEER: _on_peer,
        }
        # The kinds taken without the lock, each on the thread that received it: one lookup
        # for all of them ahead of the locked handlers.
        self._unlocked: dict[str, Callable[[str, dict, list], None]] = {
            Kind.STREAM: self._on_output, Kind.DISPLAY: self._on_output, Kind.REPORT: self._on_output,
            Kind.REPLY: self._on_reply, Kind.RELAY: forward, Kind.RELAYED: forward,
        }

    def message(self, peer: str, head: dict, frames: list) -> None:
        """One message from runner ``peer`` (on the thread that received it)."""
        kind = head["k"]
        unlocked = self._unlocked.get(kind)
        if unlocked is not None:
            unlocked(peer, head, frames)
            return
        handler = self._handlers.get(kind)
        if handler is None:
            return
        self._state.acquire()  # not `with`: this is the per-call path
        try:
            r = self._runners.get(peer)
            if r is None:
                return  # a runner already dropped; its late messages mean nothing now
            r.heard()
            answer = handler(r, head)
        finally:
            self._state.release()
        if answer is not None and not answer[0].future.settled:
            deliver(*answer, peer, head, frames, self._shm)

    def _on_output(self, peer: str, head: dict, frames: list) -> None:
        """STREAM, DISPLAY or REPORT: to the cell that asked."""
        output(self._calls.get(head.get("id", "")), peer, head["k"], head, frames)

    def _on_reply(self, peer: str, head: dict, frames: list) -> None:
        """REPLY: to an introspection request (Pool.complete, Pool.inspect)."""
        self._requests.answer(head.get("id", ""), peer, head.get("content"))

    # RELAY and RELAYED, between two runners that cannot connect: holdings.forward

    def _on_answer(self, r: Runner, head: dict) -> tuple | None:
        """RESULT or ERROR: the call's slot is free; deliver() settles it after the lock."""
        call = r.calls.get(head.get("id", ""))
        if call is None:
            return None
        cancelled = call.state == "cancelling" and bool(head.get("cancelled"))
        r.tally(head["k"] == Kind.RESULT)
        self._pool._inflight.retire(call)
        if r.state == "ready" and self._pool._waiting:
            self._freed = True  # placed once per batch of messages: after_messages
        return call, cancelled

    def _on_hello(self, r: Runner, head: dict) -> None:
        """HELLO: a booting runner is ready."""
        if self._pool._fleet.hello(r, head):
            self._pool._schedule()

    def _on_free(self, r: Runner, head: dict) -> None:
        """FREE: a region of our arena the runner no longer uses."""
        self._shm.release(head.get("at", -1), r.id)

    def _on_code_missing(self, r: Runner, head: dict) -> None:
        """CODE_MISSING: its host's cache lost an archive; the next call sends it whole."""
        r.code_missing(self._pool._code, head.get("h"))

    def after_messages(self) -> None:
        """A batch of messages was handled: place the calls waiting for the slots it freed.
        Once per batch, not per result: with many calls queued, a decision per result cost
        more than the result itself."""
        if self._freed:
            pool = self._pool
            with self._state:
                self._freed = False
                if pool._waiting and not pool._closed:
                    pool._schedule()

    def tick(self, now: float) -> None:
        """Heartbeats, call deadlines, cancels overdue, releases, frees, placement. No backend
        call: a slow backend must never starve heartbeats (runners would exit)."""
        pool = self._pool
        with self._state:
            if now >= self._next_beat:
                self._next_beat = now + wire.HEARTBEAT  # read here: one value, wherever it is set
                pool._fleet.heartbeat()
            for r in pool._inflight.overdue(list(self._runners.values()), now):
                pool._drop_runner(r, None)
            pool._holdings.send(self._runners)
            self._shm.send_frees(pool._fleet.send_free)
            pool._expire_waiting(now)
            if not pool._closed:
                pool._schedule()


def _on_peer(r: Runner, head: dict) -> None:
    """PEER: it now serves copies of its values to its peers, there."""
    r.serves(head.get("address"))


def _on_heartbeat(r: Runner, head: dict) -> None:
    """HEARTBEAT: it is alive (``message`` notes that for every kind), and its load."""
    r.sampled(head)
