"""What a runner tells its parent about itself: its GPUs in its hello, and its load (CPU,
memory, GPU use) with each heartbeat, never on the per-call path."""
from __future__ import annotations

import os
import time
from typing import Any


def gpu_info(ids: list[str]) -> list[dict]:
    """Name and memory of each GPU this runner was given (only when it has GPUs)."""
    if not ids:
        return []
    from ..gpu import describe  # subprocess and NVML: only on GPU runners
    try:
        return describe(ids)
    except Exception:
        return []


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import resource  # peak, not current: the best a system without /proc tells
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if os.uname().sysname == "Darwin" else peak * 1024
        except Exception:
            return None


class Load:
    """The load a runner reports with its heartbeats: CPU % since the last one, RSS, GPUs'
    use (through NVML, on a runner that has GPUs)."""

    def __init__(self, gpus: list[str]) -> None:
        self._at, self._cpu = time.monotonic(), _cpu_seconds()
        self._gpus: Any = None
        if gpus:
            from ..gpu import Usage
            self._gpus = Usage(gpus)

    def sample(self) -> dict:
        now, cpu = time.monotonic(), _cpu_seconds()
        wall = now - self._at
        fields: dict[str, Any] = {"cpu": round(100.0 * (cpu - self._cpu) / wall, 1) if wall > 0 else 0.0,
                                  "rss": _rss()}
        self._at, self._cpu = now, cpu
        if self._gpus is not None:
            fields["gpu"] = self._gpus.sample()
        return fields
