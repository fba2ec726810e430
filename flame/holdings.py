"""Values the pool's runners hold for Remotes: spawning them, placing operations with them,
and releasing them in batches.

A mixin of :class:`flame.pool.Pool`, working on its state under its lock. Releasing a
Remote's value (``_Held.__del__``) may run in any thread, at any point where the garbage collector runs, the pool's
own locked sections included: so it only appends to a list, and the tick sends what the list
holds, one ``release`` message per runner, every TICK.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from .errors import RunnerDied
from .remote import Remote, RemoteGone, _Held

if TYPE_CHECKING:  # pragma: no cover
    from .call import Outcome
    from .pool import Pool


class Holdings:
    """``spawn`` and the Remotes' side of the pool (caller holds the lock unless a method says otherwise)."""

    def spawn(self: "Pool", fn: Callable, /, *args: Any, **kwargs: Any) -> Remote:
        """Run ``fn(*args, **kwargs)`` on a runner and keep the result there; return a Remote.

        Placed like a call: on the runner of a Remote among the arguments, else anywhere,
        booting a runner if needed. What ``fn`` raises is raised here, and no Remote is made.
        """
        from .node import objects
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        future = self._submit(objects.spawn, (fn, args, kwargs), {})
        ref = future.result()
        return self._remote_from(future.runner, ref, f"spawn({name})")

    def _remote_from(self: "Pool", runner: str, ref: tuple, origin: Any) -> Remote:
        """Wrap a runner's reference ``(id, bytes)`` as a Remote, and count it."""
        oid, nbytes = ref
        r = self._runners.get(runner)
        if r is not None:
            r.objects[oid] = nbytes  # one dict store: atomic, no lock needed
        return Remote(_Held(self, runner, oid, origin, nbytes))

    def _on_holder(self: "Pool", held: _Held, fn: Callable, args: tuple,
                   arg_frames: list | None = None) -> "Outcome":
        """Submit ``fn(*args)`` on the runner that holds ``held``, and nowhere else (the caller
        waits). ``arg_frames``: the arguments already pickled."""
        if self._closed:
            raise RemoteGone(f"{self.name} was shut down: the value from {held.origin} is gone")
        call = self._prepare(fn, args, {}, held.runner, True, held, arg_frames=arg_frames, outcome=True)
        self._enqueue((call,))
        return call.future

    def _holder_of(self: "Pool", found: list[Remote]) -> str:
        """The one runner the Remotes among a call's arguments live on."""
        runners = {r._held.runner for r in found}
        if len(runners) > 1:
            raise ValueError(
                f"the arguments hold Remotes on {len(runners)} runners ({', '.join(sorted(runners))}); a call "
                "runs where its Remotes live. Copy all but one here with .get() (it then travels with "
                "the call), or spawn them on the same runner")
        for r in found:
            if r._held.released:
                raise RemoteGone(f"the Remote {r._describe()} was released")
        return runners.pop()

    def _lost(self: "Pool", runner: str, origin: Any) -> RunnerDied:
        origin = getattr(origin, "origin", origin)
        return RunnerDied(f"runner {runner} is gone, and with it the value from {origin}", runner)

    def _release_object(self: "Pool", runner: str, oid: int) -> None:
        """A Remote's value is no longer referred to here. Any thread, any time: no lock."""
        self._releases.append((runner, oid))

    def _send_releases(self: "Pool") -> None:
        """Send the releases queued since the last tick, one message per runner (tick, under the lock)."""
        releases, self._releases = self._releases, []
        by_runner: dict[str, list[int]] = {}
        for runner, oid in releases:
            by_runner.setdefault(runner, []).append(oid)
        now = time.monotonic()
        for runner, ids in by_runner.items():
            r = self._runners.get(runner)
            if r is None or r.state == "dead":
                continue
            for oid in ids:
                r.objects.pop(oid, None)
            if not r.objects:
                r.last_active = now  # its idle time starts when the last value is released
            self._endpoint.send(runner, "release", {"ids": ids})
