"""Remote objects: a method call on a Remote against a warm pool.call, and release latency.

Prints medians and p90; the two calls take turns, round by round, on the same runner. A Ray
actor method call (``ray.get(actor.m.remote())``) joins the table when Ray is installed.
Run: `python benchmarks/bench_remote.py [--quick]`.
"""
from __future__ import annotations

import gc
import sys
import time

import flame
from table import print_table, stats, timed


class Model:
    def noop(self):
        return None


def noop():
    return None


def held():
    from flame.node import objects
    return objects.held()[0]


def main(quick: bool = False) -> None:
    n, rounds, n_release = (300, 3, 5) if quick else (4000, 20, 20)
    rows = []
    with flame.Pool(max=1) as pool:
        model = pool.spawn(Model)
        systems = {"call": lambda: pool.call(noop), "remote": lambda: model.noop()}
        for run in systems.values():
            run()
        samples: dict = {k: [] for k in systems}
        for _ in range(rounds):
            for name, run in systems.items():
                samples[name].extend(timed(run, n // rounds))
        (cm, c9), (rm, r9) = stats(samples["call"]), stats(samples["remote"])
        rows.append(("warm pool.call of a no-op", "µs", f"{cm * 1e6:.1f} / {c9 * 1e6:.1f}", "1.00x"))
        rows.append(("no-op method call on a Remote", "µs", f"{rm * 1e6:.1f} / {r9 * 1e6:.1f}", f"{rm / cm:.2f}x"))

        latencies = []
        gc.collect()
        time.sleep(0.2)
        base = pool.call(held)
        for _ in range(n_release):
            value = pool.spawn(bytearray, 10_000_000)
            assert pool.call(held) == base + 1
            t = time.perf_counter()
            del value
            gc.collect()
            while pool.call(held) > base:
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t)
        lm, l9 = stats(latencies)
        rows.append(("release: del until the runner frees it", "ms", f"{lm * 1e3:.1f} / {l9 * 1e3:.1f}", ""))
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        actor = ray.remote(Model).remote()
        ray.get(actor.noop.remote())
        am, a9 = stats(timed(lambda: ray.get(actor.noop.remote()), n))
        rows.append(("Ray actor method call (ray.get)", "µs", f"{am * 1e6:.1f} / {a9 * 1e6:.1f}", f"{am / cm:.2f}x"))
        ray.shutdown()
    print_table(("measure", "unit", "median / p90", "vs warm pool.call"), rows)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
