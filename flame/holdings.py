"""Values the pool's runners hold for Remotes: making Remotes, sending operations on them to
their runner, finding the runner a call's Remotes live on, and releasing values in batches.

Releasing a Remote's value (``_Held.__del__``) may run in any thread, at any point where the
garbage collector runs, the pool's own locked sections included: so it only appends to
``releases``, and the tick sends what the list holds, one ``release`` message per runner.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from .errors import RunnerDied
from .node import objects
from .remote import Remote, RemoteGone, _Held

log = logging.getLogger("flame.pool")

if TYPE_CHECKING:  # pragma: no cover
    from .call import Outcome
    from .pool import Pool
    from .runner import Runner


class Holdings:
    """The Remotes' side of one pool; it owns the queue of values to release."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        #: (runner_id, object id) of values no Remote refers to any more
        self.releases: list = []

    def remote(self, runner_id: str, ref: tuple, origin: Any) -> Remote:
        """Wrap runner ``runner_id``'s reference ``(id, bytes)`` as a Remote, and count it there."""
        oid, nbytes = ref
        r = self._pool._fleet.runners.get(runner_id)
        if r is not None:
            r.hold(oid, nbytes)
        return Remote(_Held(self._pool, runner_id, oid, origin, nbytes))

    def spawned(self, fn: Callable, futures: list) -> list[Remote]:
        """The Remotes of values being made by ``futures`` (calls of ``objects.spawn``), once all
        are made. If one fails or the wait is interrupted, the others are cancelled, and a value
        made all the same is released as soon as it is."""
        name = f"spawn({getattr(fn, '__qualname__', None) or type(fn).__name__})"
        try:
            refs = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
                f.add_done_callback(lambda f: self._let_go(f, name))
            raise
        return [self.remote(f.runner_id, ref, name) for f, ref in zip(futures, refs)]

    def _let_go(self, future: Any, name: str) -> None:
        """A spawn nobody waits for any more: release what it made (dropping its Remote does)."""
        if not future.cancelled() and future.exception() is None:
            self.remote(future.runner_id, future.result(), name)

    def copy(self, held: _Held, path: tuple, target: str, pool: Any, uses: list) -> tuple:
        """How ``held``'s value (at ``path``) travels in the arguments of a call of ``pool`` that
        runs on ``target`` (""; anywhere): pickling's ``__reduce__``. From its runner to the
        call's directly where the call's runner can reach the holder's listener: both on one
        host, or the holder's listener on TCP (its backend's ``peer_host``); the call fetches it
        there (``node/peers.py``). Else through this process, said in the log."""
        if held.released:
            raise RemoteGone(f"the Remote {held.origin} on runner {held.runner_id} was released")
        runners = self._pool._fleet.runners
        holder, to = runners.get(held.runner_id), runners.get(target)
        origin = held.origin + "".join("." + p for p in path)
        to = to if to is not None else (pool._fleet.runners.get(target) if pool is not self._pool else None)
        # Runners on this machine reach each other wherever the call lands (its runner may not be
        # chosen yet: a call whose only Remotes are another pool's is placed like any other).
        local = not pool.backend.remote and not self._pool.backend.remote
        same_host = local or (to is not None and to.host == holder.host) if holder is not None else False
        if holder is not None and holder.peer_address and (same_host or reachable(holder.peer_address)):
            uses.append(held)
            from .node import peers
            return peers.fetch, (holder.peer_address, held.runner_id, held.oid, path, origin, self.peer_key,
                                 holder.pid if same_host else None)
        why = (f"runner {held.runner_id} is gone" if holder is None else
               "the call's runner is not chosen yet" if to is None else
               f"runners {held.runner_id} and {target} are on different hosts"
               if to.host != holder.host else f"runner {held.runner_id} serves no copies")
        log.info("flame: the value from %s travels from runner %s through this process (%s)",
                 origin, held.runner_id, why)
        return objects.value, (Remote(held, path).get(),)

    @property
    def peer_key(self) -> bytes:
        """The key of this pool's runners' peer channel (``node/peers.py``)."""
        from .node.peers import peer_key
        return peer_key(self._pool._key)

    def handle(self, held: _Held, path: tuple, target: str, uses: list, pool: Any) -> tuple:
        """How ``flame.ref`` of ``held``'s value travels to a call on runner ``target`` (of any
        pool of this process): its holder's address and peer key, for the call's runner to
        ask it directly. The call keeps the value alive until the handle is pinned there."""
        if held.released:
            raise RemoteGone(f"the Remote {held.origin} on runner {held.runner_id} was released")
        holder = self._pool._fleet.runners.get(held.runner_id)
        if holder is None:
            raise lost(held.runner_id, held)
        if not holder.peer_address:
            raise RemoteGone(f"runner {held.runner_id} serves no handles")
        to = pool._fleet.runners.get(target) if target else None
        same_host = not (pool.backend.remote or self._pool.backend.remote) or (
            to is not None and to.host == holder.host)
        from .node import peers
        address = holder.peer_address
        if not same_host and not reachable(address):
            # A Unix socket: a runner on another machine could not connect. Its requests go
            # through this process instead (node/relay.py).
            address = peers.RELAY
            log.info("flame: flame.ref of %s: runner %s listens on a Unix socket, which the call's "
                     "runner may not reach: its requests are relayed through this process (give its "
                     "backend peer_host=... to connect them directly)", held.origin, held.runner_id)
        uses.append(held)
        return peers.handle, (address, held.runner_id, held.oid, path,
                              held.origin + "".join("." + p for p in path), held.nbytes, self.peer_key,
                              holder.pid if same_host else None)

    def on_holder(self, held: _Held, fn: Callable, args: tuple, arg_frames: list | None = None) -> Outcome:
        """Queue ``fn(*args)`` on the runner that holds ``held``, and nowhere else; the caller
        waits for the Outcome. ``arg_frames``: the arguments already pickled."""
        pool = self._pool
        if pool.closed:
            raise RemoteGone(f"{pool.name} was shut down: the value from {held.origin} is gone")
        call = pool._packer.call(fn, args, {}, held.runner_id, True, held, arg_frames=arg_frames, outcome=True)
        pool._enqueue((call,))
        return call.future

    def release(self, runner_id: str, oid: int) -> None:
        """A Remote's value is no longer referred to here. Any thread, any time: no lock."""
        self.releases.append((runner_id, oid))

    def send(self, runners: dict[str, Runner]) -> None:
        """Send the releases queued since the last tick, one message per runner (under the lock)."""
        if not self.releases:
            return
        releases, self.releases = self.releases, []
        by_runner: dict[str, list[int]] = {}
        for runner_id, oid in releases:
            by_runner.setdefault(runner_id, []).append(oid)
        for runner_id, ids in by_runner.items():
            r = runners.get(runner_id)
            if r is not None and r.state != "dead":
                r.release(ids)


def runner_for(found: list, pool: Any) -> str | None:
    """The runner a call whose arguments hold the Remotes ``found`` runs on: the one of
    ``pool``'s runners holding the most bytes of them (ties: the first argument's); None when
    none is ``pool``'s (they all travel as copies)."""
    held: dict[str, int] = {}
    for r in found:
        h = r._held
        if not isinstance(r, Remote):  # a handle (flame.ref): it does not pull the call
            continue
        if h.released:
            raise RemoteGone(f"the Remote {r._describe()} was released")
        if h.pool is pool:
            held[h.runner_id] = held.get(h.runner_id, 0) + h.nbytes
    if not held:
        return None
    return max(held, key=held.__getitem__)  # max keeps the first of equals: the first argument's


def lost(runner_id: str, origin: Any) -> RunnerDied:
    """The error for a call whose values lived on a runner that is gone."""
    origin = getattr(origin, "origin", origin)
    return RunnerDied(f"runner {runner_id} is gone, and with it the value from {origin}", runner_id)


def reachable(address: str | None) -> bool:
    """Whether a runner's peer listener at ``address`` can be reached from other hosts: a TCP
    listener (its backend's ``peer_host``), not a Unix socket."""
    return bool(address) and address.startswith("tcp://")


def forward(sender: str, head: dict, frames: list) -> None:
    """RELAY or RELAYED from runner ``sender`` (``node/relay.py``): on to the runner it names
    (``to``), of any pool of this process, saying who sent it. A request for a runner that is
    gone is answered at once, with RunnerDied."""
    from .registry import pools
    from .wire import Kind
    to, kind = head.get("to"), head.get("k")
    fields = {"id": head.get("id"), "from": sender, "req": head.get("req"), "mac": head.get("mac")}
    data = [bytes(f) for f in frames]
    for pool in pools():
        with pool._state.lock:
            r = pool._fleet.runners.get(to)
            ready = r is not None and r.state == "ready"
        if ready:
            pool._endpoint.send(to, kind, fields, data)
            return
    if kind == Kind.RELAY:
        gone = {"id": (head.get("req") or {}).get("id"), "error": f"runner {to} is gone", "type": "RunnerDied"}
        for pool in pools():
            if sender in pool._fleet.runners:
                pool._endpoint.send(sender, Kind.RELAYED, {"id": head.get("id"), "req": gone})
                return
