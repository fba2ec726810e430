"""Runner processes on this machine."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
from typing import IO, Mapping, Sequence

from ..gpu import discover, visible_ids
from .base import Backend, RunnerHandle, RunnerSpec, node_command, tail

log = logging.getLogger("flame.backends.local")


class LocalHandle(RunnerHandle):
    def __init__(self, proc: subprocess.Popen, log_file: IO[bytes], gpus: tuple[str, ...] = ()) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log_file
        self.gpus = gpus

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def stderr_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


class LocalBackend(Backend):
    """Runners as child processes of this one, using this interpreter and ``sys.path`` by default.

    Runners start in their own session, so a Ctrl-C meant for the parent (or a
    kernel interrupt sent to its process group) never reaches them directly: the
    pool cancels their calls over the wire instead.
    """

    def __init__(self, python: str | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | None = None, gpus_per_runner: int = 0,
                 gpu_ids: Sequence[int | str] | None = None) -> None:
        """
        Args:
            python: interpreter that runs ``python -m flame.node``. Defaults to ``sys.executable``.
            env: extra environment variables for every runner. Defaults to none.
            cwd: working directory of runners. Defaults to the parent's.
            gpus_per_runner: GPUs each runner gets for itself, through CUDA_VISIBLE_DEVICES. Defaults to 0.
            gpu_ids: the GPUs to hand out (indices or UUIDs). Defaults to the parent's
                CUDA_VISIBLE_DEVICES if set, else every GPU that NVML or nvidia-smi finds.
        """
        if python is not None and not isinstance(python, str):
            raise TypeError(f"python must be a path string, got {python!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(env).items()):
            raise TypeError("env must map str to str")
        if isinstance(gpus_per_runner, bool) or not isinstance(gpus_per_runner, int) or gpus_per_runner < 0:
            raise ValueError(f"gpus_per_runner must be an int >= 0, got {gpus_per_runner!r}")
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.cwd = cwd
        self.gpus_per_runner = gpus_per_runner
        self._lock = threading.Lock()
        self._free: list[tuple[str, ...]] = []  # GPU sets not held by a runner
        if gpus_per_runner:
            ids = self._gpu_candidates(gpu_ids)
            n = gpus_per_runner
            self._free = [tuple(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]
            leftover = len(ids) % n
            if leftover:
                log.warning("flame: %d GPU(s) left unused: %s do not make a set of %d",
                            leftover, ids[-leftover:], n)
        elif gpu_ids is not None:
            raise ValueError("gpu_ids is only used with gpus_per_runner > 0")
        self.gpu_sets = tuple(self._free)

    def _gpu_candidates(self, gpu_ids: Sequence[int | str] | None) -> list[str]:
        if gpu_ids is not None:
            if isinstance(gpu_ids, (str, bytes)) or not all(isinstance(g, (int, str)) for g in gpu_ids):
                raise TypeError(f"gpu_ids must be a list of GPU indices or UUIDs, got {gpu_ids!r}")
            ids = [str(g) for g in gpu_ids]
            if len(set(ids)) != len(ids):
                raise ValueError(f"gpu_ids lists a GPU twice: {ids}")
            source = "gpu_ids"
        else:
            ids = visible_ids(os.environ)
            source = "the parent's CUDA_VISIBLE_DEVICES"
            if ids is None:
                found, how = discover()
                ids = [g.id for g in found]
                source = f"GPU discovery ({how})"
        if len(ids) < self.gpus_per_runner:
            raise ValueError(f"gpus_per_runner={self.gpus_per_runner} but {source} offers "
                             f"{len(ids)} GPU(s){': ' + ', '.join(ids) if ids else ''}; "
                             "pass gpu_ids=[...] to name devices explicitly")
        return ids

    def __repr__(self) -> str:
        gpus = f", gpus_per_runner={self.gpus_per_runner}" if self.gpus_per_runner else ""
        return f"LocalBackend(python={self.python!r}{gpus})"

    def capacity(self) -> int | None:
        if not self.gpus_per_runner:
            return None
        with self._lock:
            return len(self._free)

    def runner_env(self, spec: RunnerSpec) -> dict[str, str]:
        env = dict(os.environ)
        # The parent's import path, so functions pickled by reference resolve the same way.
        paths = [p or os.getcwd() for p in sys.path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(self.env)
        env.update(spec.env)
        env["FLAME_PARENT_PID"] = str(os.getpid())
        return env

    def boot(self, spec: RunnerSpec) -> RunnerHandle:
        env = self.runner_env(spec)
        gpus: tuple[str, ...] = ()
        if self.gpus_per_runner:
            with self._lock:
                if not self._free:
                    raise RuntimeError(f"all {len(self.gpu_sets)} GPU set(s) are held by runners")
                gpus = self._free.pop(0)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        out = tempfile.TemporaryFile(prefix=f"flame-{spec.runner_id}-")
        try:
            proc = subprocess.Popen(node_command(self.python, spec), env=env,
                                    cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            out.close()
            self._release(gpus)
            raise RuntimeError(f"cannot start {self.python!r}: {exc}") from exc
        return LocalHandle(proc, out, gpus)

    def _release(self, gpus: tuple[str, ...]) -> None:
        if gpus:
            with self._lock:
                if gpus not in self._free:
                    self._free.append(gpus)
                    self._free.sort(key=self.gpu_sets.index)

    def terminate(self, handle: RunnerHandle) -> None:
        assert isinstance(handle, LocalHandle)
        if handle.proc.poll() is None:
            handle.proc.kill()
        try:
            handle.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
            log.warning("flame: runner pid %s did not exit after SIGKILL", handle.pid)
        self._release(handle.gpus)  # only once the process is gone: the GPU is free again

