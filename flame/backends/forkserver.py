"""The parent's side of a template process (``LocalBackend(preload=[...])``): start it, ask it
to fork runners, hear how they end. The template's side is ``flame/node/template_process.py``."""
from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import socket
import subprocess
import tempfile
import threading
from typing import Any, Mapping, Sequence

from ..node.template_process import _LEN, recv_exact
from .base import RunnerHandle, tail

log = logging.getLogger("flame.backends.local")

#: Seconds the template has to import its preloads before BootError.
READY_TIMEOUT = 120.0


class Template:
    """One template process, forking runners for one LocalBackend."""

    def __init__(self, python: str, preload: Sequence[str], env: Mapping[str, str], cwd: str | None) -> None:
        self.preload = list(preload)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log = tempfile.TemporaryFile(prefix="flame-template-")
        full = {**env, "FLAME_TEMPLATE_FD": str(child.fileno()), "FLAME_PRELOAD": json.dumps(self.preload)}
        try:
            self.proc = subprocess.Popen([python, "-m", "flame.node.template_process"], env=full, cwd=cwd,
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                         pass_fds=[child.fileno()], start_new_session=True)
        except OSError as exc:
            parent.close()
            raise RuntimeError(f"cannot start {python!r}: {exc}") from exc
        finally:
            child.close()
        self.sock = parent
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._forks: dict[int, concurrent.futures.Future] = {}
        #: pid -> exit code of runners this template forked and reaped
        self.exits: dict[int, int] = {}
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self.alive = True
        threading.Thread(target=self._read, name=f"flame-template-{self.proc.pid}", daemon=True).start()
        try:
            self._ready.result(READY_TIMEOUT)
        except Exception:
            self.stop()
            raise

    def _read(self) -> None:
        """Answers from the template, on a thread of their own."""
        try:
            while True:
                head = recv_exact(self.sock, _LEN.size)
                body = recv_exact(self.sock, _LEN.unpack(head)[0]) if head else b""
                if not body:
                    break
                msg = json.loads(body)
                if "exit" in msg:
                    self.exits[msg["exit"]] = msg["code"]
                elif "forked" in msg:
                    future = self._forks.pop(msg["forked"], None)
                    if future is not None:
                        future.set_result(msg["pid"])
                elif "ready" in msg:
                    self._ready.set_result(msg["ready"])
                elif "error" in msg:
                    self._ready.set_exception(RuntimeError(msg["error"]))
        except OSError:
            pass
        finally:
            self.alive = False
            gone = RuntimeError(self.describe_exit())
            if not self._ready.done():
                self._ready.set_exception(gone)
            for future in list(self._forks.values()):
                if not future.done():
                    future.set_exception(gone)

    def describe_exit(self) -> str:
        code = self.proc.poll()
        how = f"exited with code {code}" if code is not None else "closed its socket"
        text = tail(self.log, 20).strip()
        return f"the template process (pid {self.proc.pid}) {how}" + (f":\n{text}" if text else "")

    def fork(self, env: Mapping[str, str], cwd: str, log_fd: int, timeout: float = 30.0) -> int:
        """Fork a runner with environment ``env`` in ``cwd``, its output going to ``log_fd``; its pid."""
        request_id = next(self._ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._forks[request_id] = future
        data = json.dumps({"id": request_id, "env": dict(env), "cwd": cwd}).encode()
        try:
            with self._send_lock:
                socket.send_fds(self.sock, [_LEN.pack(len(data)) + data], [log_fd])
        except OSError as exc:
            self._forks.pop(request_id, None)
            raise RuntimeError(self.describe_exit()) from exc
        return future.result(timeout)

    def stop(self) -> None:
        """Close the socket: the template exits at EOF (its runners live on, each until its pool
        stops it). Killed if it has not gone within 5 s."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class ForkedHandle(RunnerHandle):
    """A runner forked by a template: not this process's child, so its exit comes from the template."""

    def __init__(self, pid: int, template: Template, log_file: Any, gpus: tuple[str, ...] = ()) -> None:
        self.pid = pid
        self.template = template
        self.log = log_file
        self.gpus = gpus
        self._code: int | None = None

    def exit_status(self) -> int | None:
        if self._code is None:
            code = self.template.exits.pop(self.pid, None)
            if code is None and not self.template.alive and not _running(self.pid):
                code = -9  # its template died first, so nobody reaped it here: it was killed or lost
            self._code = code
        return self._code

    def stderr_tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


def _running(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
