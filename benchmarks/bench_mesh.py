"""Runners addressing each other: a method call through a handle (flame.ref) from one runner to
another against the same call from the parent, and a 100 MB value copied runner to runner
against copying it to the parent and against a raw transfer of the same bytes.

Prints medians and p90; the systems take turns, round by round. The parent's peak RSS during
the runner-to-runner copies says whether the bytes passed through it. Ray's actor call from a
task and its object transfer between workers join the table when Ray is installed.
Run: `python benchmarks/bench_mesh.py [--quick]`.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

import numpy as np

import flame
from table import print_table, stats, timed

MB = 1 << 20


class Counter:
    def __init__(self):
        self.n = 0

    def noop(self):
        return None


def calls_from_here(handle, n):
    """On a runner: seconds each of ``n`` method calls through ``handle`` took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        handle.noop()
        out.append(time.perf_counter() - t)
    return out


def nbytes(value):
    return value.nbytes


RAW = r"""
import sys, zmq
ctx = zmq.Context(); sock = ctx.socket(zmq.REP); sock.bind(sys.argv[1])
payload = bytes(int(sys.argv[2]))
print("up", flush=True)
while sock.recv() != b"stop":
    sock.send(payload, copy=False)
"""


def raw_transfer(size: int, rounds: int) -> list[float]:
    """The floor: one process sends ``size`` bytes to another over a Unix socket with pyzmq."""
    import tempfile

    import zmq
    where = tempfile.mkdtemp(prefix="bench-mesh-")
    address = f"ipc://{where}/raw"
    server = subprocess.Popen([sys.executable, "-c", RAW, address, str(size)], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(address)
    out = []
    try:
        for _ in range(rounds):
            t = time.perf_counter()
            sock.send(b"go")
            frame = sock.recv(copy=False)
            assert len(frame.buffer) == size
            out.append(time.perf_counter() - t)
            del frame
        sock.send(b"stop")
    finally:
        sock.close(0)
        ctx.term()
        server.kill()
        server.wait()
        import shutil
        shutil.rmtree(where, ignore_errors=True)
    return out


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(quick: bool = False) -> None:
    n, rounds = (200, 3) if quick else (2000, 10)
    copies = 3 if quick else 10
    rows = []
    with flame.Pool(max=1, name="holder") as holders, flame.Pool(max=1, name="caller") as callers:
        counter = holders.spawn(Counter)
        big = holders.spawn(np.ones, 100 * MB // 8)
        callers.call(int)  # booted
        ref = flame.ref(counter)
        parent, runner = [], []
        counter.noop()
        callers.call(calls_from_here, ref, 10)
        for _ in range(rounds):
            parent.extend(timed(counter.noop, n // rounds))
            runner.extend(callers.call(calls_from_here, ref, n // rounds))
        (pm, p9), (rm, r9) = stats(parent), stats(runner)
        rows.append(("method call through a Remote, from the parent", "µs", f"{pm * 1e6:.1f} / {p9 * 1e6:.1f}", "1.00x"))
        rows.append(("method call through flame.ref, runner to runner", "µs", f"{rm * 1e6:.1f} / {r9 * 1e6:.1f}",
                     f"{rm / pm:.2f}x"))

        callee = callers.runners[0].runner_id
        before = peak_rss()
        to_runner, to_parent, raw = [], [], []
        for _ in range(copies):  # the copies first: the parent's peak must not count the .get()s
            t = time.perf_counter()
            assert callers.submit_to(callee, nbytes, big).result() == 100 * MB
            to_runner.append(time.perf_counter() - t)
        grew = peak_rss() - before
        for _ in range(copies):
            raw.extend(raw_transfer(100 * MB, 1))
            t = time.perf_counter()
            value = big.get()
            to_parent.append(time.perf_counter() - t)
            del value
        (tm, t9), (gm, g9), (wm, w9) = stats(to_runner), stats(to_parent), stats(raw)
        rows.append(("100 MB raw transfer, pyzmq over a Unix socket (floor)", "ms", f"{wm * 1e3:.1f} / {w9 * 1e3:.1f}", "1.00x"))
        rows.append(("100 MB copied runner to runner for a call", "ms", f"{tm * 1e3:.1f} / {t9 * 1e3:.1f}", f"{tm / wm:.2f}x"))
        rows.append(("100 MB copied to the parent (.get())", "ms", f"{gm * 1e3:.1f} / {g9 * 1e3:.1f}", f"{gm / wm:.2f}x"))
        rows.append(("parent's peak RSS growth during the runner-to-runner copies", "MB", f"{grew / MB:.1f}", ""))
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(Counter).remote()

        @ray.remote
        def from_task(a, k):
            out = []
            for _ in range(k):
                t = time.perf_counter()
                ray.get(a.noop.remote())
                out.append(time.perf_counter() - t)
            return out
        am, a9 = stats(ray.get(from_task.remote(actor, n)))
        rows.append(("Ray actor call from a task", "µs", f"{am * 1e6:.1f} / {a9 * 1e6:.1f}", f"{am / pm:.2f}x"))
        obj = ray.put(np.ones(100 * MB // 8))

        @ray.remote
        def size(x):
            return x.nbytes
        ray.get(size.remote(obj))
        xm, x9 = stats(timed(lambda: ray.get(size.remote(obj)), copies))
        rows.append(("Ray: 100 MB object to a task", "ms", f"{xm * 1e3:.1f} / {x9 * 1e3:.1f}", f"{xm / wm:.2f}x"))
        ray.shutdown()
    print_table(("measure", "unit", "median / p90", "ratio"), rows)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
