"""Placement, the pool's one decision, as a pure function: no processes, no sockets."""
from __future__ import annotations

from flame.placement import Limits, decide
from flame.runner import Runner


class C:
    def __init__(self, name, affinity=None):
        self.name, self.affinity = name, affinity

    def __repr__(self):
        return self.name


def runner(rid, state="ready", calls=0, idle_since=0.0, started=True):
    r = Runner(rid, boot_deadline=100.0, send=lambda *message: None)
    r.state = state
    r.calls = {f"{rid}-c{i}": None for i in range(calls)}
    r.last_active = idle_since
    r.handle = object() if started else None
    return r


def starts(decision):
    return [(c.name, r.id) for c, r in decision.starts]


def test_least_loaded_ready_runner_first_and_fifo():
    rs = [runner("a", calls=1), runner("b"), runner("c", state="booting")]
    d = decide([C("x"), C("y"), C("z")], rs, Limits(min=0, max=3, concurrency=2), now=0)
    assert starts(d) == [("x", "b"), ("y", "a"), ("z", "b")]
    assert d.boots == 0 and d.stops == []


def test_boots_only_what_the_waiting_calls_need():
    d = decide([C(str(i)) for i in range(5)], [], Limits(min=0, max=10, concurrency=2), now=0)
    assert d.boots == 3
    booting = [runner("a", state="booting")]
    d = decide([C(str(i)) for i in range(5)], booting, Limits(min=0, max=10, concurrency=2), now=0)
    assert d.boots == 2, "the runner already booting covers two calls"


def test_boots_are_capped_by_max_and_the_backends_capacity():
    d = decide([C(str(i)) for i in range(9)], [runner("a", state="booting", started=False)],
               Limits(min=0, max=4, concurrency=1), now=0)
    assert d.boots == 3
    d = decide([C(str(i)) for i in range(9)], [runner("a", state="booting", started=False)],
               Limits(min=0, max=4, concurrency=1, capacity=2), now=0)
    assert d.boots == 1, "a boot the backend has not started yet holds a share of its capacity"


def test_at_max_the_next_calls_are_sent_ahead_to_busy_runners():
    rs = [runner("a", calls=1), runner("b", calls=1)]
    d = decide([C("x"), C("y"), C("z")], rs, Limits(min=0, max=2, concurrency=1, prefetch=1), now=0)
    assert starts(d) == [("x", "a"), ("y", "b")] and d.boots == 0
    d = decide([C("x")], rs, Limits(min=0, max=2, concurrency=1, prefetch=0), now=0)
    assert starts(d) == []


def test_nothing_is_sent_ahead_while_a_runner_boots():
    rs = [runner("a", calls=1), runner("b", state="booting")]
    d = decide([C("x")], rs, Limits(min=0, max=2, concurrency=1), now=0)
    assert starts(d) == [] and d.boots == 0


def test_pinned_calls_wait_for_their_runner_and_others_pass_them():
    rs = [runner("a", calls=1), runner("b")]
    d = decide([C("x", affinity="a"), C("y")], rs, Limits(min=0, max=2, concurrency=1, prefetch=0), now=0)
    assert starts(d) == [("y", "b")]
    d = decide([C("x", affinity="gone"), C("y", affinity="b")], rs, Limits(min=0, max=2, concurrency=1), now=0)
    assert starts(d) == [("x", "b")], "a call whose runner is gone goes anywhere; y waits for b"
    d = decide([C("x", affinity="a")], rs, Limits(min=0, max=3, concurrency=1), now=0)
    assert d.boots == 0, "a pinned call boots nothing"


def test_min_is_kept_unless_paused():
    assert decide([], [runner("a")], Limits(min=3, max=4, concurrency=1), now=0).boots == 2
    assert decide([], [runner("a")], Limits(min=3, max=4, concurrency=1, refill=False), now=0).boots == 0
    assert decide([], [], Limits(min=3, max=4, concurrency=1, can_boot=False), now=0).boots == 0


def test_idle_runners_stop_but_never_below_min():
    rs = [runner("a", idle_since=0), runner("b", idle_since=0), runner("c", calls=1, idle_since=0),
          runner("d", idle_since=9)]
    d = decide([], rs, Limits(min=2, max=4, concurrency=1, idle_after=5), now=10)
    assert [r.id for r in d.stops] == ["a", "b"]
    d = decide([], rs, Limits(min=3, max=4, concurrency=1, idle_after=5), now=10)
    assert [r.id for r in d.stops] == ["a"]
    d = decide([C("x")], rs[:1], Limits(min=0, max=4, concurrency=1, idle_after=5), now=10)
    assert starts(d) == [("x", "a")] and d.stops == [], "a runner that just got a call is not idle"


def test_decide_changes_nothing():
    rs = [runner("a", calls=1), runner("b")]
    waiting = [C("x"), C("y")]
    decide(waiting, rs, Limits(min=0, max=2, concurrency=1), now=0)
    assert [len(r.calls) for r in rs] == [1, 0] and [c.name for c in waiting] == ["x", "y"]
