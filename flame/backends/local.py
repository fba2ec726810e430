"""Runner processes on this machine."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Mapping, Sequence

from .base import Backend, RunnerHandle, RunnerSpec, node_command, tail

if TYPE_CHECKING:  # pragma: no cover
    from .forkserver import Template

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
                 gpu_ids: Sequence[int | str] | None = None,
                 preload: Sequence[str] | None = None, shared_memory: bool = True) -> None:
        """
        Args:
            python: interpreter that runs ``python -m flame.node``. Defaults to ``sys.executable``.
            env: extra environment variables for every runner. Defaults to none.
            cwd: working directory of runners. Defaults to the parent's.
            gpus_per_runner: GPUs each runner gets for itself, through CUDA_VISIBLE_DEVICES. Defaults to 0.
            gpu_ids: the GPUs to hand out (indices or UUIDs). Defaults to the parent's
                CUDA_VISIBLE_DEVICES if set, else every GPU that NVML or nvidia-smi finds.
            preload: modules a template process imports once, at the first boot; runners are then
                forked from it, with those modules and flame's runner side already imported
                (``[]``: flame's alone). Defaults to None: each runner is a fresh interpreter.
            shared_memory: large arguments and results (1 MB or more of buffers) travel through
                shared memory rather than the socket. Defaults to True.
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
        if preload is not None and (isinstance(preload, str) or not all(
                isinstance(m, str) and all(part.isidentifier() for part in m.split(".")) for m in preload)):
            raise TypeError(f"preload must be a list of module names, got {preload!r}")
        self.preload = None if preload is None else list(preload)
        if not isinstance(shared_memory, bool):
            raise TypeError(f"shared_memory must be True or False, got {shared_memory!r}")
        self.shared_memory = shared_memory
        self._template: Template | None = None
        self._template_lock = threading.Lock()
        self._users = 0  # pools using this backend: the template stops with the last

    def _gpu_candidates(self, gpu_ids: Sequence[int | str] | None) -> list[str]:
        from ..gpu import discover, visible_ids
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
        preload = f", preload={self.preload!r}" if self.preload is not None else ""
        return f"LocalBackend(python={self.python!r}{gpus}{preload})"

    def capacity(self) -> int | None:
        if not self.gpus_per_runner:
            return None
        with self._lock:
            return len(self._free)

    def runner_env(self, spec: RunnerSpec | None) -> dict[str, str]:
        env = dict(os.environ)
        # The parent's import path, so functions pickled by reference resolve the same way.
        paths = [p or os.getcwd() for p in sys.path]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(self.env)
        env.update(spec.env if spec is not None else {})
        env["FLAME_PARENT_PID"] = str(os.getpid())
        if self.shared_memory:
            env["FLAME_SHM"] = "1"
        return env

    def template(self) -> Template:
        """The template process runners are forked from: started at the first boot, and again
        if it died."""
        with self._template_lock:
            if self._template is None or not self._template.alive:
                from .forkserver import Template
                env = self.runner_env(None)
                self._template = Template(self.python, self.preload or [], env, self.cwd)
                log.info("flame: template process %d imported %s", self._template.proc.pid,
                         ", ".join(self.preload or []) or "flame's runner side")
            return self._template

    def acquire(self) -> None:
        with self._template_lock:
            self._users += 1

    def release(self) -> None:
        with self._template_lock:
            self._users = max(0, self._users - 1)
            template = self._template if not self._users else None
            self._template = None if template is not None else self._template
        if template is not None:
            template.stop()

    def boot(self, spec: RunnerSpec) -> RunnerHandle:
        env = self.runner_env(spec)
        gpus: tuple[str, ...] = ()
        if self.gpus_per_runner:
            with self._lock:
                if not self._free:
                    raise RuntimeError(f"all {len(self.gpu_sets)} GPU set(s) are held by runners")
                gpus = self._free.pop(0)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        out = _log_file(spec.runner_id)
        if self.preload is not None:
            try:
                pid = self.template().fork(env, self.cwd or os.getcwd(), out.fileno())
            except Exception:
                out.close()
                self._release(gpus)
                raise
            from .forkserver import ForkedHandle
            return ForkedHandle(pid, self._template, out, gpus)
        # The key goes on the runner's stdin (as over SSH), not in its environment, which
        # /proc/PID/environ keeps for the process's life. The pipe stays open: its EOF tells
        # the runner at once that this process is gone.
        key = env.pop("FLAME_KEY", None)
        try:
            proc = subprocess.Popen(node_command(self.python, spec) + (["--stdin"] if key else []), env=env,
                                    cwd=self.cwd, stdin=subprocess.PIPE if key else subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            out.close()
            self._release(gpus)
            raise RuntimeError(f"cannot start {self.python!r}: {exc}") from exc
        if key:
            try:
                proc.stdin.write(json.dumps({"FLAME_KEY": key}).encode() + b"\n")
                proc.stdin.flush()
            except OSError:  # it died at once: its exit status and stderr say why
                pass
        return LocalHandle(proc, out, gpus)

    def _release(self, gpus: tuple[str, ...]) -> None:
        if gpus:
            with self._lock:
                if gpus not in self._free:
                    self._free.append(gpus)
                    self._free.sort(key=self.gpu_sets.index)

    def terminate(self, handle: RunnerHandle) -> None:
        if not isinstance(handle, LocalHandle):  # forked from the template (backends/forkserver.py)
            if handle.exit_status() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while handle.exit_status() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
            self._release(handle.gpus)
            handle.log.close()  # its tail, if needed, was read when it died
            return
        assert isinstance(handle, LocalHandle)
        if handle.proc.poll() is None:
            handle.proc.kill()
        if handle.proc.stdin is not None:
            with contextlib.suppress(OSError):
                handle.proc.stdin.close()
        try:
            handle.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
            log.warning("flame: runner pid %s did not exit after SIGKILL", handle.pid)
        self._release(handle.gpus)  # only once the process is gone: the GPU is free again
        handle.log.close()  # its tail, if needed, was read when it died


def _log_file(runner_id: str) -> "IO[bytes]":
    """An unnamed 0600 file for a runner's output: O_TMPFILE in the temporary directory where
    the system has it (importing tempfile costs 7.6 ms on a boot's critical path), else
    ``tempfile.TemporaryFile``."""
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            fd = os.open(os.environ.get("TMPDIR") or "/tmp", flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return os.fdopen(fd, "w+b")
        except OSError:  # a file system without it
            pass
    import tempfile
    return tempfile.TemporaryFile(prefix=f"flame-{runner_id}-")
