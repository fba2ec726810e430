"""Markdown tables for the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence


def timed(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds each of ``n`` runs of ``fn()`` took."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def stats(samples: Sequence[float]) -> tuple[float, float]:
    """Median and 90th percentile."""
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.9))]


def print_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(r: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
