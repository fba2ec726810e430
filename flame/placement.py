"""Placement: the pool's one decision, as a pure function.

Given the calls waiting (FIFO), the runners and the pool's limits, :func:`decide` says which
calls start on which runners, how many runners to boot, and which idle runners to stop. It
reads runners and calls and changes nothing, so it is tested without processes
(``tests/test_placement.py``). The rules, in order:

1. A call pinned to a runner (``call.affinity``) runs there while that runner lives; it waits
   for a free slot there even if other runners are free, and later calls may pass it.
   A call whose runner is gone goes anywhere.
2. Any other call starts on the least-loaded ready runner with a free slot, FIFO.
3. Calls left over boot runners, up to ``max`` and the backend's capacity, but no more than
   the runners booting now leave uncovered.
4. When nothing can boot and every runner is busy, the next calls are sent ahead, so each is
   on its runner the moment the one before it ends: as many per runner as the calls left
   waiting share out, up to ``prefetch`` (a long queue keeps runners from waiting on the
   parent; a short one leaves later calls free to go to whichever runner frees first). The
   runner still runs at most ``concurrency`` at once.
5. ``min`` runners are kept, booting or ready.
6. A ready runner idle for ``idle_after`` seconds stops, unless that would leave fewer than
   ``min`` or it holds values for Remotes (as FLAME's ``track_resources``).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class Limits:
    """The pool's options and the backend's room, as placement sees them."""

    min: int
    max: int
    #: calls one runner runs at once
    concurrency: int
    #: most calls sent ahead to each busy runner when nothing can boot
    prefetch: int = 1
    #: more runners the backend could start now; None: no limit of its own
    capacity: int | None = None
    #: seconds a ready runner may sit idle; None: forever
    idle_after: float | None = None
    #: keep ``min`` runners (off after a failed boot, until a boot works again)
    refill: bool = True
    #: runners may boot (off once the pool is shutting down)
    can_boot: bool = True


#: Most calls sent ahead to a busy runner when every runner is busy and the pool is at max
#: (placement.py, rule 4). Measured on 5000 tiny tasks over 2 runners: 16 keeps them from
#: ever waiting on the parent.
PREFETCH = 16


class _Any:
    """A call that may run anywhere (no affinity): what :data:`ANY` stands for."""

    affinity = None


#: Stands for a call about to be queued, to ask what it would boot (``Pool._boot_ahead``).
ANY = _Any()


@dataclass
class Decision:
    #: (call, runner) pairs, in the order the calls waited
    starts: list = field(default_factory=list)
    #: runners to boot
    boots: int = 0
    #: idle runners to stop
    stops: list = field(default_factory=list)


def least_loaded(runners: Iterable[Any], limit: int, load: dict | None = None) -> Any:
    """The ready runner with the fewest calls, if it holds fewer than ``limit``."""
    best, fewest = None, limit
    for r in runners:
        if r.state == "ready":
            n = len(r.calls) if load is None else load[r.id]
            if n < fewest:
                best, fewest = r, n
    return best


def direct(call: Any, runners: dict, limit: int) -> Any:
    """Where one call goes straight away when nothing waits before it (the per-call path,
    ahead of ``decide``): the runner it names, if ready with a free slot, else for a call
    that names none the least loaded ready runner with one; None: it waits."""
    if call.affinity is None:
        return least_loaded(runners.values(), limit)
    r = runners.get(call.affinity)
    return r if r is not None and r.state == "ready" and len(r.calls) < limit else None


def decide(waiting: Sequence[Any], runners: Sequence[Any], limits: Limits, now: float) -> Decision:
    """What to do now. ``runners`` have ``id``, ``state`` ("booting", "ready", "stopping"),
    ``calls`` (the calls on them), ``handle`` (None while the backend is still starting them)
    and ``last_active``; calls have ``affinity`` (a runner id or None)."""
    decision = Decision()
    by_id, load = {}, {}
    booting = ready = starting = 0
    for r in runners:  # one pass: what placement needs to know of each runner
        by_id[r.id] = r
        load[r.id] = len(r.calls)
        if r.state == "booting":
            booting += 1
            starting += r.handle is None
        elif r.state == "ready":
            ready += 1

    # The ready runners by (load, order) in a heap: least_loaded's choice (the first of the
    # least loaded) in O(log n) a call, where a scan per call made a decision quadratic
    # (bench_scale.py: 2.8 s at 1,000 runners). Loads only grow here, so an entry whose load
    # is stale is pushed again with the real one when it comes up.
    heap = [(load[r.id], i, r) for i, r in enumerate(runners) if r.state == "ready"]
    heapq.heapify(heap)

    def least(limit: int) -> Any:
        while heap:
            n, i, r = heap[0]
            if n != load[r.id]:
                heapq.heapreplace(heap, (load[r.id], i, r))
                continue
            return r if n < limit else None
        return None

    def place(queue: Iterable[Any], limit: int) -> tuple[list, int | None]:
        """Start what can start at ``limit`` calls per runner, in order. Returns the calls left
        waiting for their own runner, and where the first call that found no room is in
        ``queue`` (None if none): it and every call after it are left too."""
        pinned: list = []
        for i, call in enumerate(queue):
            mine = by_id.get(call.affinity) if call.affinity is not None else None
            if mine is not None and mine.state in ("ready", "booting"):
                if mine.state == "ready" and load[mine.id] < limit:
                    decision.starts.append((call, mine))
                    load[mine.id] += 1
                else:
                    pinned.append(call)
                continue
            best = least(limit)
            if best is None:  # no ready runner has room: no later call can start either
                return pinned, i
            decision.starts.append((call, best))
            load[best.id] += 1
        return pinned, None

    pinned, stuck = place(waiting, limits.concurrency)
    others = 0 if stuck is None else len(waiting) - stuck  # left, not pinned (counted, not copied)
    live = booting + ready
    room = limits.max - len(runners) if limits.can_boot else 0
    if limits.capacity is not None:
        room = min(room, limits.capacity - starting)  # boots under way have not taken theirs yet
    need = others - booting * limits.concurrency
    if need > 0 and room > 0:
        decision.boots = min(room, math.ceil(need / limits.concurrency))
    elif others and not booting and room <= 0 and limits.prefetch > 0:
        depth = min(limits.prefetch, max(1, math.ceil((others + len(pinned)) / max(1, ready))))
        place(itertools.chain(pinned, itertools.islice(waiting, stuck, None)), limits.concurrency + depth)
    if limits.refill and live + decision.boots < limits.min:
        decision.boots = max(decision.boots, min(room, limits.min - live))
    if limits.idle_after is not None:
        keep = live + decision.boots
        for r in runners:
            if keep <= limits.min:
                break
            if (r.state == "ready" and load[r.id] == 0 and not getattr(r, "objects", None)
                    and not getattr(r, "held", 0)  # values other runners' handles keep
                    and now - r.last_active > limits.idle_after):  # values held for Remotes keep it
                decision.stops.append(r)
                keep -= 1
    return decision
