"""Where a runner's boot spends its time, and what a template process (``preload``) saves.

1. Cold start, part by part: an interpreter that does nothing; the runner's imports; its output
   capture set up; then a whole pool from nothing to its first result, against the floor (a raw
   pyzmq + cloudpickle echo, bench_pool.py's) and ProcessPoolExecutor; the same from a fresh
   process (the parent's imports included); and a runner forked from a template that is
   already running. All take turns.

flame's modules are byte-compiled first, as an installed package's are (this machine sets
PYTHONDONTWRITEBYTECODE, which would make every runner compile them again).
2. Eight runners whose calls import numpy and matplotlib.pyplot, from a fresh pool to eight
   results, with and without ``LocalBackend(preload=["numpy", "matplotlib.pyplot"])``, taking turns.

    python benchmarks/bench_boot.py [rounds]
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]

import flame  # noqa: E402
from bench_pool import ECHO_SERVER, Floor  # noqa: E402
from table import print_table, stats  # noqa: E402

PARTS = {
    "interpreter": "",
    "+ the runner's imports": "import flame.node.node",
    "+ its output capture": "import flame.node.node\nfrom flame.node.capture import Capture\n"
                            "Capture(runner=True).install()",
}


def until_ready(code: str, after: str = "") -> float:
    """Seconds from starting ``python -c code`` until it has run ``code``, not until it exits (a
    runner never does before its first result); then it runs ``after`` and exits."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", f"{code}\nimport os\nos.write(1, b'r')\nos.read(0, 1)\n{after}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.read(1) == b"r"
    took = time.perf_counter() - t
    proc.stdin.close()
    proc.wait()
    return took


#: The call of every cold start: a builtin, so that no system imports a module to unpickle it.
noop = int


def cold(make, first, stop):
    def once():
        t = time.perf_counter()
        thing = make()
        first(thing)
        took = time.perf_counter() - t
        stop(thing)
        return took
    return once


def uses_plots(i: int) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig = plt.figure()
    plt.close(fig)
    return int(np.arange(i + 1).sum())


def eight(preload):
    def once():
        t = time.perf_counter()
        with flame.Pool(flame.LocalBackend(preload=preload), min=0, max=8) as pool:
            assert list(pool.map(uses_plots, range(8))) == [sum(range(i + 1)) for i in range(8)]
            return time.perf_counter() - t
    return once


FRESH_FLAME = "import flame\np = flame.Pool(max=1)\np.call(int)\n"
FRESH_FLOOR = """
import subprocess, sys, zmq, cloudpickle
ECHO = {echo!r}
ctx = zmq.Context(); sock = ctx.socket(zmq.ROUTER); sock.bind("tcp://127.0.0.1:0")
proc = subprocess.Popen([sys.executable, "-c", ECHO, sock.getsockopt_string(zmq.LAST_ENDPOINT)])
ident = sock.recv_multipart()[0]
sock.send_multipart([ident, cloudpickle.dumps((int, ()), protocol=5)])
cloudpickle.loads(sock.recv_multipart()[1])
"""


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    os.environ.setdefault("MPLBACKEND", "Agg")
    import compileall
    compileall.compile_dir(os.path.dirname(flame.__file__), quiet=1)
    systems = {name: (lambda c=code: until_ready(c)) for name, code in PARTS.items()}
    systems["flame: fresh pool to first result"] = cold(lambda: flame.Pool(max=1), lambda p: p.call(noop),
                                                        lambda p: p.shutdown())
    systems["floor: raw pyzmq + cloudpickle echo"] = cold(lambda: Floor(1), lambda f: f.call(noop),
                                                          lambda f: f.close())
    systems["ProcessPoolExecutor"] = cold(lambda: ProcessPoolExecutor(1), lambda e: e.submit(noop).result(),
                                          lambda e: e.shutdown())
    systems["fresh process: flame"] = lambda: until_ready(FRESH_FLAME, "p.shutdown()")
    systems["fresh process: floor"] = lambda: until_ready(FRESH_FLOOR.format(echo=ECHO_SERVER),
                                                          "proc.kill(); proc.wait()")
    shared = flame.LocalBackend(preload=[])
    holder = flame.Pool(shared, max=1)  # keeps the template running between pools
    holder.call(noop)
    systems["flame, forked from a running template"] = cold(lambda: flame.Pool(shared, max=1),
                                                            lambda p: p.call(noop), lambda p: p.shutdown())
    samples: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(rounds):
        for name, once in systems.items():
            samples[name].append(once())
    holder.shutdown()
    floor = stats(samples["floor: raw pyzmq + cloudpickle echo"])[0]
    fresh_floor = stats(samples["fresh process: floor"])[0]
    print(f"\ncold start, part by part ({rounds} rounds, taking turns)\n")
    print_table(["what", "median ms", "p90 ms", "/ floor"],
                [[k, f"{stats(v)[0] * 1e3:.1f}", f"{stats(v)[1] * 1e3:.1f}",
                  f"{stats(v)[0] / (fresh_floor if k.startswith('fresh') else floor):.2f}x"]
                 for k, v in samples.items()])

    runs = {"spawned (no preload)": eight(None), "forked (preload numpy, matplotlib.pyplot)":
            eight(["numpy", "matplotlib.pyplot"])}
    got: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(max(3, rounds // 3)):
        for name, once in runs.items():
            got[name].append(once())
    base = stats(got["spawned (no preload)"])[0]
    print(f"\n8 runners importing numpy and matplotlib.pyplot, fresh pool to 8 results "
          f"({len(got['spawned (no preload)'])} rounds, taking turns)\n")
    print_table(["runners", "median ms", "p90 ms", "/ spawned"],
                [[k, f"{stats(v)[0] * 1e3:.0f}", f"{stats(v)[1] * 1e3:.0f}", f"{stats(v)[0] / base:.2f}x"]
                 for k, v in got.items()])


if __name__ == "__main__":
    main()
