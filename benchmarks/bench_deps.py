"""Dependencies travel (issue #25): a runner on a host with nothing but Python, against one on
a host that has everything installed, and the bytes each sends.

Runs a real sshd on loopback and logs in as the unprivileged REMOTE_USER of the tests (needs
root, openssh-server and /usr/bin/python3.X of this minor version, as the tests do). numpy
and pandas are imported here, and each sample is a fresh pool, from its creation to the
first result of a call that uses both, over one SSH connection kept open:

- "bare host, empty cache": a venv made --without-pip, nothing installed; its code cache is
  emptied first, so pyzmq, cloudpickle, psutil, numpy, pandas (and theirs) all travel;
- "bare host, warm cache": the same host, its cache kept: nothing travels but the asking;
- "everything installed": a venv with this process's versions of all of them (and flame's
  archive cached, as in the warm case): the floor.

The cases take turns.

    python benchmarks/bench_deps.py [samples]
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]

import flame  # noqa: E402
from table import print_table, stats  # noqa: E402

#: What "everything installed" has: flame's needs, numpy, pandas and pandas' own.
EVERYTHING = ("zmq", "cloudpickle", "psutil", "blake3", "numpy", "pandas", "dateutil", "python_dateutil",
              "pytz", "tzdata", "six")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    import numpy as np
    import pandas as pd
    from services import REMOTE_USER, RemoteHost, Sshd
    work = tempfile.mkdtemp(prefix="flame-bench-deps-")
    sshd = Sshd(work)
    host = RemoteHost()
    try:
        bare, full = host.venv("nothing", ()), host.venv("everything", EVERYTHING)
        cache = {"bare": os.path.join(host.home, "cache-bare"), "full": os.path.join(host.home, "cache-full")}
        backends = {name: flame.SSHBackend([f"{REMOTE_USER}@127.0.0.1:{sshd.port}"], python=python,
                                           key=sshd.client_key, known_hosts=None,
                                           env={"FLAME_CODE_CACHE": cache[name]})
                    for name, python in (("bare", bare), ("full", full))}
        cases = {"bare host, empty cache": "bare", "bare host, warm cache": "bare", "everything installed": "full"}
        samples: dict[str, list[float]] = {c: [] for c in cases}
        sent: dict[str, list[int]] = {c: [] for c in cases}

        def work_fn() -> int:
            return int(pd.DataFrame({"x": np.arange(10)}).x.sum())

        def run(case: str) -> None:
            if case.endswith("empty cache"):
                shutil.rmtree(cache["bare"], ignore_errors=True)
            t = time.perf_counter()
            with flame.Pool(backends[cases[case]], max=1, code_sync=False) as pool:
                assert pool.call(work_fn) == 45
                samples[case].append(time.perf_counter() - t)
                sent[case].append(pool.code_bytes_sent)
        for case in cases:  # opens the SSH connections, fills the caches
            run(case)
            samples[case].clear(), sent[case].clear()
        for _ in range(n):
            for case in cases:
                run(case)
        floor = stats(samples["everything installed"])[0]
        rows = []
        for case in cases:
            med, p90 = stats(samples[case])
            rows.append([case, f"{med * 1000:.0f}", f"{p90 * 1000:.0f}", f"{med / floor:.2f}x",
                         f"{max(sent[case]):,}"])
        print(f"\nfirst result of a fresh SSH pool, numpy {np.__version__} + pandas {pd.__version__} "
              f"imported here ({n} samples each, interleaved)\n")
        print_table(["case", "median ms", "p90 ms", "vs everything installed", "bytes sent"], rows)
        for b in backends.values():
            b.close()
    finally:
        host.stop()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
