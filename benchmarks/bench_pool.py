"""flame.Pool against its floor (raw pyzmq + cloudpickle echo), ProcessPoolExecutor, and Ray
and Dask when installed (the `bench` extra).

Prints one table per measure: median and p90, and each system's ratio to the floor measured
in the same run, the systems taking turns so that the machine's drift hits all of them
alike; writes benchmarks/results/bench_pool.png. The tiny-task floor sends every task
before reading a reply; the 100 MB round trip runs through shared memory (flame) and over
the socket (flame (socket): LocalBackend(shared_memory=False)), next to one numpy copy of
the array. Run: `python benchmarks/bench_pool.py [--quick]`.
"""
from __future__ import annotations

import collections
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

    def pipelined(self, fn, items):
        """Every task sent, round robin, before any reply is read: the best a raw user would write."""
        items = list(items)
        order: dict = {ident: collections.deque() for ident in self.ids}
        for i, x in enumerate(items):
            ident = self.ids[i % len(self.ids)]
            order[ident].append(i)
            self.send(ident, fn, x)
        results = {}
        for _ in items:  # each worker answers in the order it was sent its tasks
            ident, value = self.recv()
            results[order[ident].popleft()] = value
        return [results[i] for i in range(len(items))]

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


def echo(a):
    return a


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


# ---- peers, when installed (the `bench` extra) -----------------------------------------------
class RayPeer:
    def __init__(self, workers: int) -> None:
        import os
        import tempfile
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen on loopback
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray
        import ray
        self.ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="flame-bench-ray-"))
        self.fns: dict = {}

    def remote(self, fn):
        if fn not in self.fns:  # a class would make an actor: wrap it in a function
            self.fns[fn] = self.ray.remote(fn if not isinstance(fn, type) else (lambda *a, f=fn: f(*a)))
        return self.fns[fn]

    def call(self, fn, *args):
        return self.ray.get(self.remote(fn).remote(*args))

    def map(self, fn, xs):
        f = self.remote(fn)
        return self.ray.get([f.remote(x) for x in xs])

    def close(self) -> None:
        self.ray.shutdown()


class DaskPeer:
    def __init__(self, workers: int) -> None:
        from dask.distributed import Client, LocalCluster
        self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address="127.0.0.1:0")
        self.client = Client(self.cluster)

    def call(self, fn, *args):
        return self.client.submit(fn, *args, pure=False).result()

    def map(self, fn, xs):
        return self.client.gather(self.client.map(fn, list(xs), pure=False))

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


def peers() -> dict:
    found = {}
    for name, module, make in (("Ray", "ray", RayPeer), ("Dask", "distributed", DaskPeer)):
        try:
            __import__(module)
            found[name] = make
        except ImportError:
            pass
    return found


def joblib_maps(systems: dict) -> dict:
    """The same tiny tasks through ``joblib.Parallel`` (its auto-batching) on flame's backend,
    on loky (joblib's own), and on Ray's and Dask's backends where those are installed."""
    try:
        import joblib
    except ImportError:
        return {}
    flame.register_joblib()

    def through(backend, **config):
        def run(fn, xs):
            with joblib.parallel_config(backend=backend, n_jobs=2, **config):
                return joblib.Parallel()(joblib.delayed(fn)(x) for x in xs)
        return run
    maps = {"joblib on flame": through("flame", pool=systems["flame"]), "joblib on loky": through("loky")}
    if "Ray" in systems:
        from ray.util.joblib import register_ray
        register_ray()
        maps["joblib on Ray"] = through("ray")
    if "Dask" in systems:  # its backend uses the Client made last: the Dask peer's
        maps["joblib on Dask"] = through("dask")
    return maps


def main(quick: bool = False) -> None:
    n_warm, rounds, n_cold, n_big, n_tasks, t_rounds = ((300, 3, 3, 3, 1000, 1) if quick
                                                        else (3000, 10, 7, 7, 5000, 5))
    big = np.ones(100 * 1024 * 1024 // 8)
    spare = np.empty_like(big)
    others = peers()
    table: dict = {}  # measure -> {system: samples}

    # warm calls and the 100 MB round trip: one worker each
    systems = {"floor": Floor(1), "flame": flame.Pool(max=1),
               "flame (socket)": flame.Pool(flame.LocalBackend(shared_memory=False), max=1),
               "ProcessPoolExecutor": ProcessPoolExecutor(1)}
    for name, make in others.items():
        systems[name] = make(1)
    calls = {name: (lambda fn, *a, s=s: s.submit(fn, *a).result()) if isinstance(s, ProcessPoolExecutor)
             else s.call for name, s in systems.items()}
    for call in calls.values():
        call(noop)
    warm_calls = {k: v for k, v in calls.items() if k != "flame (socket)"}
    table["warm no-op call (µs)"] = interleaved(
        warm_calls, lambda call: [t * 1e6 for t in timed(lambda: call(noop), n_warm // rounds)], rounds)
    big_calls = dict(calls, **{"numpy copy (reference)": lambda fn, a: np.copyto(spare, a)})
    big_calls["ProcessPoolExecutor"] = lambda fn, a: systems["ProcessPoolExecutor"].submit(np.copy, a).result()
    table["100 MB numpy round trip (ms)"] = interleaved(
        big_calls, lambda call: [t * 1e3 for t in timed(lambda: call(echo, big), 1)], n_big)
    for s in systems.values():
        (s.shutdown if hasattr(s, "shutdown") else s.close)()

    # throughput: tiny tasks on two workers. The floor sends every task before reading a reply.
    systems = {"floor": Floor(2), "flame": flame.Pool(max=2), "ProcessPoolExecutor": ProcessPoolExecutor(2)}
    for name, make in others.items():
        systems[name] = make(2)
    maps = {"floor": systems["floor"].pipelined, "flame": lambda fn, xs: list(systems["flame"].map(fn, xs)),
            "flame (submit)": lambda fn, xs: [f.result() for f in [systems["flame"].submit(fn, x) for x in xs]],
            "flame (chunksize=50)": lambda fn, xs: list(systems["flame"].map(fn, xs, chunksize=50)),
            "ProcessPoolExecutor": lambda fn, xs: list(systems["ProcessPoolExecutor"].map(fn, xs, chunksize=1)),
            "ProcessPoolExecutor (chunksize=50)":
                lambda fn, xs: list(systems["ProcessPoolExecutor"].map(fn, xs, chunksize=50))}
    for name in others:
        maps[name] = systems[name].map
    maps.update(joblib_maps(systems))
    for run in maps.values():
        assert run(tiny, range(4)) == [1, 2, 3, 4]

    def rate(run):
        t = time.perf_counter()
        run(tiny, range(n_tasks))
        return [n_tasks / (time.perf_counter() - t)]
    table[f"{n_tasks} tiny tasks on 2 runners (tasks/s)"] = interleaved(maps, rate, t_rounds)
    for s in systems.values():
        (s.shutdown if hasattr(s, "shutdown") else s.close)()

    # cold start: from nothing to the first result (a builtin, so nothing is imported to unpickle it)
    def cold(make, stop):
        def once(_):
            t = time.perf_counter()
            handle = make()
            (handle.submit(int).result() if isinstance(handle, ProcessPoolExecutor) else handle.call(int))
            took = time.perf_counter() - t
            stop(handle)
            return [took * 1e3]
        return once
    starts = {"floor": cold(lambda: Floor(1), lambda f: f.close()),
              "flame": cold(lambda: flame.Pool(max=1), lambda p: p.shutdown()),
              "ProcessPoolExecutor": cold(lambda: ProcessPoolExecutor(1), lambda e: e.shutdown())}
    table["cold start to first result (ms)"] = interleaved(starts, lambda once: once(None), n_cold)
    for name, make in others.items():  # seconds each: a few samples, after the others
        table["cold start to first result (ms)"][name] = [
            cold(lambda m=make: m(1), lambda p: p.close())(None)[0] for _ in range(2)]

    report(table)


def report(table: dict) -> None:
    """One markdown table per measure (median, p90, ratio to the floor), and a PNG of the ratios."""
    import os
    ratios: dict = {}
    for measure, samples in table.items():
        higher_better = "tasks/s" in measure
        floor = stats(samples["floor"])[0]
        rows = []
        for system, values in samples.items():
            med, p90 = stats(values)
            ratio = med / floor
            rows.append((system, f"{med:,.1f}", f"{p90:,.1f}" if not higher_better else "",
                         f"{ratio:.2f}x"))
            if system not in ("floor", "numpy copy (reference)"):
                ratios.setdefault(system, {})[measure] = (1 / ratio) if higher_better else ratio
        print(f"\n{measure}\n")
        print_table(("system", "median", "p90", "/ floor"), rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    measures = list(table)
    systems = list(ratios)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        xs = [j + i * width for j in range(len(measures))]
        ax.bar(xs, [ratios[system].get(m, 0) for m in measures], width, label=system)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(measures))])
    ax.set_xticklabels([m.split(" (")[0] for m in measures], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time relative to the floor (log; lower is better)")
    ax.legend(fontsize=8)
    ax.set_title("flame and its peers against the floor (raw pyzmq + cloudpickle), same run")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_pool.png")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
