"""Runner processes on this machine."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from typing import IO, Mapping

from .base import Backend, RunnerHandle, RunnerSpec

log = logging.getLogger("flame.backends.local")


class LocalHandle(RunnerHandle):
    def __init__(self, proc: subprocess.Popen, log_file: IO[bytes]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.log = log_file

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def stderr_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)


class LocalBackend(Backend):
    """Runners as child processes of this one, using this interpreter and ``sys.path`` by default.

    Runners start in their own session, so a Ctrl-C meant for the parent (or a
    kernel interrupt sent to its process group) never reaches them directly: the
    pool cancels their calls over the wire instead.
    """

    def __init__(self, python: str | None = None, env: Mapping[str, str] | None = None,
                 cwd: str | None = None) -> None:
        """
        Args:
            python: interpreter that runs ``python -m flame.node``. Defaults to ``sys.executable``.
            env: extra environment variables for every runner. Defaults to none.
            cwd: working directory of runners. Defaults to the parent's.
        """
        if python is not None and not isinstance(python, str):
            raise TypeError(f"python must be a path string, got {python!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in dict(env).items()):
            raise TypeError("env must map str to str")
        self.python = python or sys.executable
        self.env = dict(env or {})
        self.cwd = cwd

    def __repr__(self) -> str:
        return f"LocalBackend(python={self.python!r})"

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
        out = tempfile.TemporaryFile(prefix=f"flame-{spec.runner_id}-")
        try:
            proc = subprocess.Popen([self.python, "-m", "flame.node"], env=self.runner_env(spec),
                                    cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError as exc:
            out.close()
            raise RuntimeError(f"cannot start {self.python!r}: {exc}") from exc
        return LocalHandle(proc, out)

    def terminate(self, handle: RunnerHandle) -> None:
        assert isinstance(handle, LocalHandle)
        if handle.proc.poll() is None:
            handle.proc.kill()
        try:
            handle.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
            log.warning("flame: runner pid %s did not exit after SIGKILL", handle.pid)


def _tail(f: IO[bytes], lines: int) -> str:
    try:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    except (OSError, ValueError):
        return ""
    return "\n".join(text.splitlines()[-lines:])
