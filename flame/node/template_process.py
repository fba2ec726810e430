"""The template process of ``LocalBackend(preload=[...])``: imports the preloads and the
runner's own modules once, then forks each runner from itself (after multiprocessing's
forkserver, with the user's preloads). Started as ``python -m flame.node.template_process``.

When it forks it holds no thread of its own, no ZeroMQ context and no CUDA state: those are
made by each runner after the fork (its sockets, its key, its output capture; its
``CUDA_VISIBLE_DEVICES`` is in its environment before anything initialises CUDA).

It talks to the parent over one Unix socket pair (FLAME_TEMPLATE_FD), private to the two
processes: each request is a length-prefixed JSON object (the runner's environment, the
key among them, and its working directory) with the runner's log file attached as a file
descriptor (SCM_RIGHTS); each answer a length-prefixed JSON object: ``ready`` (or the preload
that failed to import), ``forked`` with the runner's pid, ``exit`` with a runner's exit code.
EOF on that socket means the parent is gone: the template exits at once, and its runners
exit on their own (they watch the parent, FLAME_PARENT_PID, not the template).
"""
from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback

_LEN = struct.Struct("!I")
#: What every runner imports: importing it here is what makes a forked runner start fast.
RUNNER_MODULES = ("flame.node.node", "flame.node.execute", "flame.node.capture", "cloudpickle", "zmq")
#: Exit code of a runner whose start failed after the fork (its traceback is in its log).
EXIT_FORK_FAILED = 4


def send(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_LEN.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int, fds: list | None = None) -> bytes:
    """``n`` bytes from ``sock`` (b"" at EOF); file descriptors that arrive go into ``fds``."""
    chunks, got = [], 0
    while got < n:
        if fds is not None:
            data, new, _, _ = socket.recv_fds(sock, n - got, 4)
            fds.extend(new)
        else:
            data = sock.recv(n - got)
        if not data:
            return b""
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _fork(sock: socket.socket, wake: tuple, request: dict, log_fd: int) -> int:
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return pid
    code = EXIT_FORK_FAILED
    try:
        os.setsid()  # as LocalBackend's spawned runners: a Ctrl-C for the parent never reaches it
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        # The parent's import path as it is now, ahead of the one the template started with.
        paths = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [p for p in paths if p not in sys.path]
        sys.argv[:] = ["flame.node"]
        from flame.node.node import main
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    sock = socket.socket(fileno=int(os.environ.pop("FLAME_TEMPLATE_FD")))
    preload = json.loads(os.environ.pop("FLAME_PRELOAD", "[]"))
    for name in [*preload, *RUNNER_MODULES]:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - said to the parent, who raises BootError
            send(sock, {"error": f"preload {name!r} failed to import: {type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()})
            sys.exit(1)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)  # SIGCHLD wakes select; runners are reaped in the loop
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    send(sock, {"ready": os.getpid()})
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        while True:  # reap every runner that ended, and say how
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if sock in readable:
            fds: list = []
            head = recv_exact(sock, _LEN.size, fds)
            if not head:
                return  # the parent is gone
            body = recv_exact(sock, _LEN.unpack(head)[0], fds)
            if not body or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return
            request = json.loads(body)
            send(sock, {"forked": request["id"], "pid": _fork(sock, (wake_r, wake_w), request, fds[0])})


if __name__ == "__main__":
    main()
