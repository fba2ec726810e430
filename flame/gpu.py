"""GPU discovery: NVML (nvidia-ml-py) first, ``nvidia-smi`` as the fallback."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("flame.gpus")


@dataclass(frozen=True)
class GPU:
    """One visible GPU. ``id`` is what goes into CUDA_VISIBLE_DEVICES for it."""

    index: int
    id: str
    name: str
    memory_total: int  # bytes
    memory_used: int  # bytes
    uuid: str = ""


def _nvml() -> list[GPU]:
    import pynvml  # nvidia-ml-py
    pynvml.nvmlInit()
    try:
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            found.append(GPU(i, str(i), name.decode() if isinstance(name, bytes) else name,
                             int(mem.total), int(mem.used), uuid.decode() if isinstance(uuid, bytes) else uuid))
        return found
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> list[GPU]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    out = subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.used,uuid",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    found = []
    for line in out.strip().splitlines():
        index, name, total, used, uuid = [p.strip() for p in line.split(",")]
        found.append(GPU(int(index), index, name, int(float(total)) << 20, int(float(used)) << 20, uuid))
    return found


def discover() -> tuple[list[GPU], str]:
    """All GPUs of this machine, and how they were found (or why none were)."""
    reasons = []
    for how, probe in (("NVML", _nvml), ("nvidia-smi", _nvidia_smi)):
        try:
            return probe(), how
        except Exception as exc:  # no driver, no library, no binary
            reasons.append(f"{how}: {type(exc).__name__}: {exc}")
    return [], "; ".join(reasons)


def visible_ids(env: dict | None = None) -> list[str] | None:
    """The CUDA_VISIBLE_DEVICES entries of ``env`` (this process by default), or None when unset."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def describe(ids: list[str]) -> list[dict]:
    """Name and memory of each GPU in ``ids`` (indices or UUIDs, as in CUDA_VISIBLE_DEVICES).

    A runner reports these in its hello; NVML numbers devices ignoring CUDA_VISIBLE_DEVICES,
    as do the ids the parent handed out.
    """
    if not ids:
        return []
    found, _ = discover()
    if not found:
        return []  # no driver here: nothing to say beyond the ids
    by_id = {g.id: g for g in found}
    by_id.update({g.uuid: g for g in found if g.uuid})
    return [{"id": gid, "name": by_id[gid].name, "memory_total": by_id[gid].memory_total}
            if gid in by_id else {"id": gid, "name": "?", "memory_total": 0} for gid in ids]


def gpus() -> list[GPU]:
    """The GPUs this process may use: every GPU, or those CUDA_VISIBLE_DEVICES names."""
    found, _ = discover()
    allowed = visible_ids()
    if allowed is None:
        return found
    return [g for g in found if g.id in allowed or g.uuid in allowed]


class Usage:
    """Utilisation and memory in use of some GPUs (ids as in CUDA_VISIBLE_DEVICES), through
    NVML, kept initialised between samples: a runner samples its GPUs with each heartbeat.
    Without NVML (or if it fails once) it says nothing: ``nvidia-smi`` each second would cost
    a process per sample."""

    def __init__(self, ids: list[str]) -> None:
        self._handles: list = []
        self._nvml: object | None = None
        if not ids:
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            for gid in ids:
                if gid.isdigit():
                    h = pynvml.nvmlDeviceGetHandleByIndex(int(gid))
                else:
                    h = pynvml.nvmlDeviceGetHandleByUUID(gid)
                self._handles.append((gid, h))
            self._nvml = pynvml
        except Exception as exc:
            log.debug("flame: no GPU usage through NVML: %s", exc)
            self._handles = []

    def sample(self) -> list[dict]:
        """``[{"id", "util" (%), "memory_used", "memory_total" (bytes)}]``, or [] without NVML."""
        nvml = self._nvml
        if nvml is None:
            return []
        try:
            found = []
            for gid, h in self._handles:
                util = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                found.append({"id": gid, "util": int(util.gpu), "memory_used": int(mem.used),
                              "memory_total": int(mem.total)})
            return found
        except Exception as exc:
            log.debug("flame: GPU usage sampling failed, stopping: %s", exc)
            self._nvml = None
            return []
