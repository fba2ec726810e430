"""flame.Pool against its floor (raw pyzmq + cloudpickle echo) and ProcessPoolExecutor.

Prints one table: median and p90 of each measure, and flame's ratio to the floor
measured in the same run, the systems taking turns so that the machine's drift hits
all of them alike. Run: `python benchmarks/bench_pool.py [--quick]`.
"""
from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import cloudpickle
import numpy as np
import zmq

import flame
from table import print_table, stats, timed

# ---- the floor: ~40 lines of raw pyzmq + cloudpickle, pickle-5 buffers out of band ----------
ECHO_SERVER = r"""
import pickle, sys, zmq, cloudpickle
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1])
s.send(b"ready")
while True:
    parts = s.recv_multipart(copy=False)
    fn, args = pickle.loads(parts[0], buffers=parts[1:])
    bufs = []
    head = cloudpickle.dumps(fn(*args), protocol=5, buffer_callback=bufs.append)
    s.send_multipart([head, *[b.raw() for b in bufs]], copy=False)
"""


class Floor:
    def __init__(self, workers: int = 1) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind("tcp://127.0.0.1:0")
        addr = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.procs = [subprocess.Popen([sys.executable, "-c", ECHO_SERVER, addr]) for _ in range(workers)]
        self.ids = [self.sock.recv_multipart()[0] for _ in range(workers)]

    def send(self, ident, fn, *args):
        bufs = []
        head = cloudpickle.dumps((fn, args), protocol=5, buffer_callback=bufs.append)
        self.sock.send_multipart([ident, head, *[b.raw() for b in bufs]], copy=False)

    def recv(self):
        parts = self.sock.recv_multipart(copy=False)
        return parts[0].bytes, cloudpickle.loads(parts[1], buffers=parts[2:])

    def call(self, fn, *args):
        self.send(self.ids[0], fn, *args)
        return self.recv()[1]

    def map(self, fn, items):
        items, results, free = list(items), {}, list(self.ids)
        inflight = {}
        nxt = 0
        while len(results) < len(items):
            while free and nxt < len(items):
                ident = free.pop()
                inflight[ident] = nxt
                self.send(ident, fn, items[nxt])
                nxt += 1
            ident, value = self.recv()
            results[inflight.pop(ident)] = value
            free.append(ident)
        return [results[i] for i in range(len(items))]

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.sock.close(0)
        self.ctx.term()


def noop():
    return None


def tiny(x):
    return x + 1


def interleaved(systems: dict, measure, rounds: int) -> dict:
    """Run ``measure(system)`` for each system in turn, ``rounds`` times, pooling the samples.

    Alternating keeps the comparison fair on a shared machine, whose speed drifts over
    seconds: every system sees the same drift.
    """
    out: dict = {name: [] for name in systems}
    for _ in range(rounds):
        for name, system in systems.items():
            out[name].extend(measure(system))
    return out


def main(quick: bool = False) -> None:
    n_warm, rounds, n_cold, n_big, n_tasks, t_rounds = ((300, 3, 3, 2, 1000, 1) if quick
                                                        else (6000, 20, 7, 5, 5000, 5))
    big = np.ones(100 * 1024 * 1024 // 8)
    echo = lambda a: a  # noqa: E731 - a lambda, sent by value like a notebook's

    # warm calls and the 100 MB round trip: one worker each
    floor, pool, ex = Floor(1), flame.Pool(max=1), ProcessPoolExecutor(1)
    calls = {"floor": lambda fn, *a: floor.call(fn, *a), "flame": pool.call,
             "ppe": lambda fn, *a: ex.submit(fn, *a).result()}
    for call in calls.values():
        call(noop)
    warm = interleaved(calls, lambda call: timed(lambda: call(noop), n_warm // rounds), rounds)
    calls["ppe"] = lambda fn, *a: ex.submit(np.copy, *a).result()  # ProcessPoolExecutor can't send lambdas
    big_rt = interleaved(calls, lambda call: timed(lambda: call(echo, big), 1), n_big)
    floor.close(), pool.shutdown(), ex.shutdown()

    # throughput: tiny tasks on two workers
    floor, pool, ex = Floor(2), flame.Pool(max=2), ProcessPoolExecutor(2)
    maps = {"floor": floor.map, "flame": pool.map, "ppe": lambda fn, xs: list(ex.map(fn, xs))}
    for run in maps.values():
        run(tiny, range(4))

    def rate(run):
        t = time.perf_counter()
        run(tiny, range(n_tasks))
        return [n_tasks / (time.perf_counter() - t)]
    tput = interleaved(maps, rate, t_rounds)
    floor.close(), pool.shutdown(), ex.shutdown()

    # cold start: from nothing to the first result
    def cold(start, first, stop):
        def once(_):
            t = time.perf_counter()
            handle = start()
            first(handle)
            took = time.perf_counter() - t
            stop(handle)
            return [took]
        return once
    starts = {"floor": cold(lambda: Floor(1), lambda fl: fl.call(noop), lambda fl: fl.close()),
              "flame": cold(lambda: flame.Pool(max=1), lambda p: p.call(noop), lambda p: p.shutdown()),
              "ppe": cold(lambda: ProcessPoolExecutor(1), lambda ex: ex.submit(noop).result(),
                          lambda ex: ex.shutdown())}
    cold_start = interleaved(starts, lambda once: once(None), n_cold)

    rows = []

    def row(name, unit, scale, samples):
        (fm, f9), (pm, p9), (em, e9) = (stats(samples[k]) for k in ("floor", "flame", "ppe"))
        rows.append((name, unit, f"{fm*scale:.1f} / {f9*scale:.1f}", f"{pm*scale:.1f} / {p9*scale:.1f}",
                     f"{em*scale:.1f} / {e9*scale:.1f}", f"{pm / fm:.2f}x"))

    row("warm no-op call", "µs", 1e6, warm)
    row("cold start to first result", "ms", 1e3, cold_start)
    row("100 MB numpy round trip", "ms", 1e3, big_rt)
    (fm, _), (pm, _), (em, _) = (stats(tput[k]) for k in ("floor", "flame", "ppe"))
    rows.append((f"{n_tasks} tiny tasks on 2 runners", "tasks/s", f"{fm:.0f}", f"{pm:.0f}", f"{em:.0f}",
                 f"{pm / fm:.2f}x"))
    print_table(("measure", "unit", "floor (median / p90)", "flame (median / p90)",
                 "ProcessPoolExecutor", "flame / floor"), rows)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
