"""flame.Pool against its floor (raw pyzmq + cloudpickle echo) and ProcessPoolExecutor.

Prints one table: median and p90 of each measure, and flame's ratio to the floor
measured in the same run. Run: `python benchmarks/bench_pool.py [--quick]`.
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
from table import print_table, stats

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


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(quick: bool = False) -> None:
    n_warm, n_cold, n_big, n_tasks = (300, 3, 2, 1000) if quick else (3000, 7, 5, 5000)
    rows = []
    big = np.ones(100 * 1024 * 1024 // 8)

    # warm no-op call
    floor = Floor(1)
    floor.call(noop)
    f_warm = timed(lambda: floor.call(noop), n_warm)
    f_big = timed(lambda: floor.call(lambda a: a, big), n_big)
    floor.close()
    floor = Floor(2)
    t = time.perf_counter(); floor.map(tiny, range(n_tasks)); f_tput = n_tasks / (time.perf_counter() - t)
    floor.close()

    def cold(start, first, stop):
        out = []
        for _ in range(n_cold):
            t = time.perf_counter()
            handle = start()
            first(handle)
            out.append(time.perf_counter() - t)
            stop(handle)
        return out
    f_cold = cold(lambda: Floor(1), lambda fl: fl.call(noop), lambda fl: fl.close())

    with flame.Pool(max=1) as pool:
        pool.call(noop)
        p_warm = timed(lambda: pool.call(noop), n_warm)
        p_big = timed(lambda: pool.call(lambda a: a, big), n_big)
    with flame.Pool(max=2) as pool:
        pool.map(tiny, range(4))
        t = time.perf_counter(); pool.map(tiny, range(n_tasks)); p_tput = n_tasks / (time.perf_counter() - t)

    p_cold = cold(lambda: flame.Pool(max=1), lambda p: p.call(noop), lambda p: p.shutdown())

    with ProcessPoolExecutor(1) as ex:
        ex.submit(noop).result()
        e_warm = timed(lambda: ex.submit(noop).result(), n_warm)
        e_big = timed(lambda: ex.submit(np.copy, big).result(), n_big)
    with ProcessPoolExecutor(2) as ex:
        list(ex.map(tiny, range(4)))
        t = time.perf_counter(); list(ex.map(tiny, range(n_tasks))); e_tput = n_tasks / (time.perf_counter() - t)

    e_cold = cold(lambda: ProcessPoolExecutor(1), lambda ex: ex.submit(noop).result(),
                  lambda ex: ex.shutdown())

    def row(name, unit, scale, f, p, e, lower_better=True):
        fm, f9 = stats(f)
        pm, p9 = stats(p)
        em, e9 = stats(e)
        ratio = pm / fm
        rows.append((name, unit, f"{fm*scale:.1f} / {f9*scale:.1f}", f"{pm*scale:.1f} / {p9*scale:.1f}",
                     f"{em*scale:.1f} / {e9*scale:.1f}", f"{ratio:.2f}x"))

    row("warm no-op call", "µs", 1e6, f_warm, p_warm, e_warm)
    row("cold start to first result", "ms", 1e3, f_cold, p_cold, e_cold)
    row("100 MB numpy round trip", "ms", 1e3, f_big, p_big, e_big)
    rows.append((f"{n_tasks} tiny tasks on 2 runners", "tasks/s", f"{f_tput:.0f}", f"{p_tput:.0f}",
                 f"{e_tput:.0f}", f"{p_tput / f_tput:.2f}x"))
    print_table(("measure", "unit", "floor (median / p90)", "flame (median / p90)",
                 "ProcessPoolExecutor", "flame / floor"), rows)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
