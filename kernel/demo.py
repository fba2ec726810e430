"""Headless demo: a pool boots runners on demand, streams their output, and lets them idle out."""
from __future__ import annotations

import logging
import time

import flame


def work(n: int) -> int:
    import os
    import time
    for i in range(3):
        print(f"  [runner pid {os.getpid()}] task {n}: step {i + 1}/3", flush=True)
        time.sleep(0.3)
    return n * n


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    with flame.Pool(max=2, idle_shutdown_after=2.0) as pool:
        print("empty pool:", pool)
        print("squares:", list(pool.map(work, range(4))))
        print("runners:", [(r.id, r.pid, r.state) for r in pool.runners])
        try:
            pool.call(lambda: 1 / 0)
        except ZeroDivisionError as exc:
            print("remote exception came back as", type(exc).__name__)
        print("waiting for idle shutdown ...")
        while pool.runners:
            time.sleep(0.2)
        print("idle pool:", pool)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
