"""Attach: an app serves a node (``serve``); a notebook or script connects to it (``connect``)."""
from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import serialize
from .call import make_sink, to_sink
from .errors import FlameError, RunnerDied
from .keys import new_key, read_private, write_private
from .replies import Replies, Request
from .listen import curve_client
from .wire import HEARTBEAT, Kind, Wire, introduction

log = logging.getLogger("flame.attach")

#: Seconds without a word from the app after which a client gives it up.
APP_TIMEOUT = 5.0


class AttachError(FlameError):
    """Could not attach to an app: no such connection file, wrong key, or no answer."""


class AppGone(RunnerDied):
    """The attached app exited (or stopped answering) while a request was in flight."""


def attach_dir() -> str:
    """Where ``serve`` writes connection files by default: $FLAMEBOOK_ATTACH_DIR, else ~/.local/share/flamebook/attach."""
    return os.environ.get("FLAMEBOOK_ATTACH_DIR") or os.path.join(
        os.path.expanduser("~"), ".local", "share", "flamebook", "attach")


class Serving:
    """What ``serve`` returns: the node running inside this app."""

    def __init__(self, node: Any, connection_file: str) -> None:
        self._node = node
        self.connection_file = connection_file
        self.address = node.address

    def stop(self) -> None:
        """Stop serving and remove the connection file."""
        self._node.stop()
        try:
            os.unlink(self.connection_file)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return f"<flame.Serving {self.address} file={self.connection_file}>"


def serve(address: str = "tcp://127.0.0.1:0", namespace: dict | None = None,
          connection_file: str | None = None, name: str | None = None, loop: Any = None) -> Serving:
    """Serve a node inside this process so notebooks can ``%attach`` to it; returns at once.

    Args:
        address: ZeroMQ address to bind. Defaults to a free port on 127.0.0.1.
        namespace: the names attached cells see and change. Defaults to ``__main__.__dict__``.
        connection_file: where to write address and key (mode 0600). Defaults to
            ``attach_dir()/NAME-PID.json``.
        name: label for the default connection file. Defaults to the script's name.
        loop: the app's asyncio event loop, where attached cells' ``await`` runs. Defaults to
            the loop running where ``serve()`` is called, else the loop found running when a
            cell awaits (an app that calls ``asyncio.run`` later), else the node's own.
    """
    from .node import aio
    from .node.served import AppNode

    if loop is None and "asyncio" in sys.modules:
        import asyncio
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    if loop is not None:
        aio.app_loop_hint = loop

    if namespace is None:
        namespace = sys.modules["__main__"].__dict__
    if not isinstance(namespace, dict):
        raise TypeError(f"namespace must be a dict, got {type(namespace).__name__}")
    key = new_key()
    node = AppNode(key, address, namespace)
    if connection_file is None:
        label = name or os.path.splitext(os.path.basename(sys.argv[0] or "python"))[0] or "python"
        connection_file = os.path.join(attach_dir(), f"{label}-{os.getpid()}.json")
    # Created 0700 (parents too): on a shared machine, the names of our apps are our own.
    os.makedirs(os.path.dirname(os.path.abspath(connection_file)), mode=0o700, exist_ok=True)
    address = node.address
    if "://0.0.0.0:" in address:  # bound to every interface: tell clients a name they can reach
        address = address.replace("0.0.0.0", socket.gethostname())
    info = {"address": address, "key": key.hex(), "pid": os.getpid(), "host": socket.gethostname(),
            "python": platform.python_version(), "argv": sys.argv}
    if node.curve_public is not None:
        info["curve_server_key"] = node.curve_public.decode()
    write_private(connection_file, json.dumps(info))
    node.start()
    served = Serving(node, connection_file)
    atexit.register(served.stop)
    log.info("flame: serving %s (connection file %s)", node.address, connection_file)
    return served


def find_connection_file(target: str) -> str:
    """A path, or a name looked up in ``attach_dir()`` (NAME.json, NAME-*.json, newest first),
    among this user's own files: in a shared attach directory, another user's file is never
    picked (it would send them the cells, and unpickle their replies)."""
    if os.path.isfile(target):
        return target
    base = attach_dir()
    foreign = []
    for pattern in (f"{target}", f"{target}.json", f"{target}-*.json", f"*{target}*.json"):
        found = []
        for path in glob.glob(os.path.join(base, pattern)):
            try:
                st = os.stat(path)
            except OSError:
                continue
            (found if st.st_uid == os.geteuid() else foreign).append((st.st_mtime, path))
        if found:
            return max(found)[1]
    if foreign:
        raise AttachError(f"no connection file of yours matches {target!r} in {base}; "
                          f"other users' do ({', '.join(sorted(p for _, p in foreign))}), and are never used")
    raise AttachError(f"no connection file {target!r}, and none matching it in {base}")


class AppConnection:
    """A connection to the node inside an app (``flame.connect``). Thread-safe."""

    def __init__(self, connection_file: str, timeout: float = 10.0) -> None:
        path = find_connection_file(connection_file)
        try:
            info = json.loads(read_private(path))
            key = bytes.fromhex(info["key"])
            self.address: str = info["address"]
        except (OSError, ValueError, KeyError) as exc:
            raise AttachError(f"cannot use connection file {path}: {exc}") from exc
        self.connection_file = path
        self.me = f"client-{os.urandom(6).hex()}"
        self._wire = Wire(key, self.me, cut=True)  # a served app listens with CurveZMQ
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.ROUTING_ID, self.me.encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        curve_client(self._sock, info.get("curve_server_key"), key)
        # A wrong key is refused in the CurveZMQ handshake, before any frame: the monitor is
        # how this side learns it, so the error can say "wrong key" rather than "no answer".
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._sock.connect(self.address)
        self._lock = threading.Lock()
        self._requests = Replies()
        self._handlers: dict[str, Callable[[str, Request, dict, list], None]] = {
            Kind.STREAM: self._on_output, Kind.DISPLAY: self._on_output, Kind.REPORT: self._on_output, Kind.REPLY: self._on_reply,
            Kind.RESULT: self._on_result, Kind.ERROR: self._on_error,
        }
        self._last_heard = time.monotonic()
        self._closed = False
        self._refused = False
        self.info: dict = {}
        _, self._welcome = self._requests.new(request_id="hello")
        self._io = threading.Thread(target=self._io_loop, name="flame-connect-io", daemon=True)
        self._io.start()
        self._send(Kind.HELLO, {"id": "hello", **introduction()})
        try:
            self.info = self._welcome.future.result(timeout=timeout)
        except Exception as exc:
            self.close()
            if self._refused:
                raise AttachError(f"the app at {self.address} refused the key in {path}: "
                                  "wrong key (nothing was unpickled)") from None
            raise AttachError(f"no answer from {self.address} within {timeout:g} s "
                              f"(is the app in {path} still running?)") from exc
        self.pid: int = self.info.get("pid", info.get("pid"))
        self.host: str = self.info.get("host", info.get("host", "?"))

    def __repr__(self) -> str:
        return (f"<flame.AppConnection pid {getattr(self, 'pid', '?')} on {getattr(self, 'host', '?')} "
                f"at {self.address}>")

    # ---- requests ----------------------------------------------------------------------------
    def _send(self, kind: str, fields: dict, frames: Any = ()) -> None:
        with self._lock:
            if self._closed:
                raise AppGone(f"the connection to {self.address} is closed")
            self._sock.send_multipart(self._wire.encode(kind, "app", fields, frames), copy=False)

    def _request(self, kind: str, fields: dict, frames: Any = (), sink: Any = None) -> Any:
        rid, req = self._requests.new(sink=sink)
        fields["id"] = rid
        if getattr(sink, "reports", False):  # the cell shows what it reports (flame.report)
            fields["rp"] = 1
        self._send(kind, fields, frames)
        try:
            while True:
                try:
                    return req.future.result(timeout=0.1)
                except FutureTimeout:
                    continue
        except KeyboardInterrupt:
            if kind in (Kind.RUN, Kind.CALL):
                self._send(Kind.CANCEL, {"id": rid})
                try:  # give the app a moment to stop the cell, so the next one finds it idle
                    req.future.exception(timeout=2.0)
                except Exception:
                    pass
            raise KeyboardInterrupt("interrupted; the app's cell was stopped") from None
        finally:
            self._requests.drop(rid)

    def run(self, code: str, *, user_expressions: dict | None = None,
            execution_count: int | None = None) -> dict:
        """Run ``code`` in the app like a notebook cell; output streams to the current sink.

        Returns ``{"data", "metadata", "user_expressions"}``: the mime bundle of the cell's
        value (``data`` is None when it has none), computed in the app, and each of
        ``user_expressions`` evaluated there afterwards. With ``execution_count``, the app
        keeps the value as ``Out[n]`` and ``_n`` too (it always keeps ``_``).
        """
        fields: dict = {"code": code}
        if user_expressions:
            fields["expressions"] = dict(user_expressions)
        if execution_count is not None:
            fields["count"] = execution_count
        return self._request(Kind.RUN, fields, sink=make_sink())

    def call(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in the app's worker thread and return its result."""
        return self._request(Kind.CALL, {}, serialize.dumps((fn, args, kwargs)), sink=make_sink())

    def complete(self, code: str, cursor: int | None = None) -> dict:
        """Jupyter complete_reply content, computed by the app against its namespace."""
        return self._request(Kind.COMPLETE, {"code": code, "cursor": len(code) if cursor is None else cursor})

    def inspect(self, code: str, cursor: int | None = None, detail_level: int = 0) -> dict:
        """Jupyter inspect_reply content, computed by the app."""
        return self._request(Kind.INSPECT, {"code": code, "cursor": len(code) if cursor is None else cursor,
                                         "detail": detail_level})

    def close(self) -> None:
        """Detach. The app keeps running."""
        self._closed = True
        self._io.join(timeout=2)

    # ---- I/O thread ----------------------------------------------------------------------
    def _io_loop(self) -> None:
        local = self._is_local()
        next_beat = time.monotonic()
        try:
            while not self._closed:
                with self._lock:
                    ready = self._sock.poll(0)
                    batch = []
                    while ready and self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        batch.append(self._sock.recv_multipart(copy=False))
                for parts in batch:
                    self._handle(parts)
                if self._monitor is not None:
                    self._watch_handshake()
                if not batch:
                    zmq.select([self._sock.getsockopt(zmq.FD)], [], [], 0.05)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT
                    if self.info:
                        try:
                            self._send(Kind.HEARTBEAT, {})
                        except AppGone:
                            break  # closed by the user meanwhile
                    gone = None
                    if local and self.info and not _pid_alive(self.info.get("pid")):
                        gone = f"the app (pid {self.info.get('pid')}) exited"
                    elif self.info and now - self._last_heard > APP_TIMEOUT:
                        gone = f"the app at {self.address} stopped answering for {APP_TIMEOUT:g} s"
                    if gone:
                        self._fail_all(AppGone(gone))
                        self._closed = True
        except BaseException as exc:  # noqa: BLE001 - requests fail with the cause, never hang
            log.exception("flame: the connection to %s failed", self.address)
            self._fail_all(AppGone(f"the connection to {self.address} failed: {type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._closed = True
                self._stop_watching()
                self._sock.close()
            self._ctx.term()
            self._fail_all(AppGone("detached from the app"))

    def _watch_handshake(self) -> None:
        """Until the first handshake succeeds, note an authentication refusal (io thread only)."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = True
                self._fail_all(AttachError("refused"))
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                with self._lock:
                    self._stop_watching()
                return

    def _stop_watching(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _is_local(self) -> bool:
        return self.address.startswith(("tcp://127.", "tcp://localhost", "ipc://"))

    def _fail_all(self, exc: Exception) -> None:
        self._requests.fail(exc)

    def _handle(self, parts: list) -> None:
        msg = self._wire.decode(parts, peer=None)
        if msg is None:
            if len(parts) >= 2 and bytes(parts[1]) == Kind.REFUSED:
                self._refused = True
                self._fail_all(AttachError("refused"))
            return
        head, frames = msg
        if head.get("f") != "app":
            return
        self._last_heard = time.monotonic()  # HEARTBEAT only proves the app is alive
        if head["k"] == Kind.WELCOME:
            self._requests.answer("hello", None, {k: v for k, v in head.items() if k not in ("k", "f", "t", "q")})
            return
        handler = self._handlers.get(head["k"])
        rid = head.get("id", "")
        req = self._requests.get(rid)
        if handler is not None and req is not None:
            handler(rid, req, head, frames)

    # ---- one handler per kind the app sends about a request ----------------------------
    def _on_output(self, rid: str, req: Request, head: dict, frames: list) -> None:
        """STREAM, DISPLAY or REPORT: to the sink of the cell that asked."""
        if req.sink is not None:
            to_sink(req.sink, head["k"], head, frames, rid)

    def _on_reply(self, rid: str, req: Request, head: dict, frames: list) -> None:
        self._requests.answer(rid, None, head["content"])

    def _on_result(self, rid: str, req: Request, head: dict, frames: list) -> None:
        try:
            self._requests.answer(rid, None, serialize.loads(frames))
        except Exception as exc:
            self._requests.answer(rid, None, exc=exc)

    def _on_error(self, rid: str, req: Request, head: dict, frames: list) -> None:
        self._requests.answer(rid, None, exc=_rebuild(head, frames))


def _rebuild(head: dict, frames: list) -> BaseException:
    if head.get("cancelled"):
        return KeyboardInterrupt("the app's cell was interrupted")
    return serialize.rebuild_error(head, frames, head.get("tb", ""))


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    import psutil
    try:  # a zombie is gone for our purposes
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def connect(connection_file: str, timeout: float = 10.0) -> AppConnection:
    """Connect to an app started with ``flame.serve`` (a connection file path or name)."""
    return AppConnection(connection_file, timeout)


def serve_script(argv: list[str] | None = None) -> int:
    """``flamebook serve -- python SCRIPT [ARGS]``: run an unmodified script with a node inside it."""
    import types
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and os.path.basename(argv[0]).startswith("python"):
        argv = argv[1:]  # `flamebook serve -- python app.py`: we are that python
    if not argv:
        print("usage: flamebook serve -- python SCRIPT [ARGS]", file=sys.stderr)
        return 2
    path = argv[0]
    with open(path, "rb") as f:
        source = f.read()
    main_mod = types.ModuleType("__main__")
    main_mod.__file__ = path
    main_mod.__builtins__ = __builtins__
    sys.modules["__main__"] = main_mod
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    served = serve(namespace=main_mod.__dict__,
                   name=os.path.splitext(os.path.basename(path))[0])
    print(f"flamebook: serving {path} for %attach; connection file {served.connection_file}",
          file=sys.stderr, flush=True)
    exec(compile(source, path, "exec"), main_mod.__dict__)
    return 0


if __name__ == "__main__":
    sys.exit(serve_script())
