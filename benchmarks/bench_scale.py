"""The pool at scale: placement with many runners and calls, and a real pool of 64 runners.

1. ``placement.decide`` alone (pure, no processes): time per decision with 100,000 waiting
   calls, from 10 to 1,000 runners, in two cases: every runner free (the decision starts a call
   on each), and every runner busy at ``max`` (it sends calls ahead, up to PREFETCH each).
2. A real pool of local runners (``max=64``): seconds from a fresh pool to 64 ready runners;
   tiny tasks through ``map`` on 64 runners against the same on 2 (tasks/s, and the ratio: the
   parent's cost per call should not grow with the number of runners); the parent's CPU time
   per call; and the parent's CPU while 64 ready runners only exchange heartbeats.

Prints medians and p90 where there are samples. Run: ``python benchmarks/bench_scale.py [--quick]``.
"""
from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import flame
from flame import placement
from table import print_table, stats

QUICK = "--quick" in sys.argv


def fake_runners(n: int, busy: int) -> list:
    calls = {f"c{i}": None for i in range(busy)}
    return [SimpleNamespace(id=f"r{i}", state="ready", calls=dict(calls), handle=object(),
                            last_active=0.0, objects=None) for i in range(n)]


def bench_placement() -> None:
    waiting = [placement.ANY] * 100_000
    rows = []
    for n in (10, 100, 1000):
        for case, busy, limits in (
                ("all free", 0, placement.Limits(0, n, 1, placement.PREFETCH, None, None)),
                ("all busy, at max", 1, placement.Limits(0, n, 1, placement.PREFETCH, None, None))):
            runners = fake_runners(n, busy)
            samples = []
            rounds = 3 if QUICK or n == 1000 else 10
            for _ in range(rounds):
                t = time.perf_counter()
                d = placement.decide(waiting, runners, limits, 1.0)
                samples.append(time.perf_counter() - t)
            med, p90 = stats(samples)
            rows.append((n, case, len(d.starts), f"{med * 1e3:.2f}", f"{p90 * 1e3:.2f}",
                         f"{med / max(1, len(d.starts)) * 1e6:.2f}"))
    print("placement.decide with 100,000 waiting calls\n")
    print_table(("runners", "case", "calls started", "ms per decision (median)", "p90 ms",
                 "us per call started"), rows)
    print()


def noop(_):
    return None


def run_map(pool: flame.Pool, n: int) -> tuple[float, float]:
    """Seconds and parent CPU seconds for ``pool.map`` of ``n`` tiny tasks."""
    c, t = time.process_time(), time.perf_counter()
    list(pool.map(noop, range(n)))
    return time.perf_counter() - t, time.process_time() - c


def wait_ready(pool: flame.Pool, n: int, limit: float = 300.0) -> float:
    t = time.perf_counter()
    while sum(r.state == "ready" for r in pool.runners) < n:
        if time.perf_counter() - t > limit:
            raise RuntimeError(f"only {sum(r.state == 'ready' for r in pool.runners)} of {n} runners ready")
        time.sleep(0.05)
    return time.perf_counter() - t


def bench_pool(big: int = 64) -> None:
    tasks = 5_000 if QUICK else 20_000
    rounds = 1 if QUICK else 3
    opts = dict(idle_shutdown_after=None, boot_timeout=300, parent_timeout=60)
    with flame.Pool(min=big, max=big, **opts) as wide, flame.Pool(min=2, max=2, **opts) as narrow:
        boot = wait_ready(wide, big)
        wait_ready(narrow, 2)
        run_map(wide, 2 * big)  # every runner has the function now
        run_map(narrow, 4)
        results: dict = {big: [], 2: []}
        for _ in range(rounds):  # the two pools take turns
            for n, pool in ((big, wide), (2, narrow)):
                results[n].append(run_map(pool, tasks))
        c, t = time.process_time(), time.perf_counter()
        time.sleep(5.0)
        idle_cpu = (time.process_time() - c) / (time.perf_counter() - t)
    rows = []
    rate = {}
    for n in (2, big):
        walls = [w for w, _ in results[n]]
        med, p90 = stats(walls)
        rate[n] = tasks / med
        cpu = stats([c for _, c in results[n]])[0]
        rows.append((n, f"{tasks / med:,.0f}", f"{tasks / p90:,.0f}", f"{cpu / tasks * 1e6:.0f}"))
    print(f"A real pool of local runners ({os.cpu_count()} cores), {tasks:,} tiny tasks through map, "
          f"{rounds} round(s), the pools taking turns\n")
    print_table(("runners", "tasks/s (median)", "tasks/s (p90 round)", "parent CPU us per task"), rows)
    print(f"\n{big} runners vs 2: {rate[big] / rate[2]:.2f}x the tasks/s")
    print(f"fresh pool to {big} ready runners: {boot:.1f} s")
    print(f"parent CPU while {big} ready runners only heartbeat: {idle_cpu * 100:.1f}% of one core "
          f"({big} heartbeats/s out, {big} in)")


if __name__ == "__main__":
    bench_placement()
    if "--placement" not in sys.argv:
        bench_pool()
