"""The node: receive calls, execute them, stream their output, heartbeat the parent.

Threads:
- the main thread receives calls and, with ``concurrency == 1``, executes them
  itself: no hand-off between threads on the per-call path, and a cancel can
  interrupt it with SIGINT, which also breaks out of blocking calls such as
  ``time.sleep``;
- with ``concurrency > 1``, worker threads execute the calls the main thread
  receives (a cancel reaches them as an asynchronous KeyboardInterrupt);
- a watch thread, on a short timer, flushes call output, heartbeats the parent,
  runs the terminator, and receives (cancels, mostly) while the main thread is
  busy executing.

Both threads use the one ZeroMQ socket, each operation under ``sock_lock``; they
wait on the socket's file descriptor outside the lock. That descriptor is
edge-triggered: any socket operation can consume the edge that announces an
incoming message, so whoever operates on the socket re-checks ``ZMQ_EVENTS``
afterwards and wakes the main thread when a message is waiting.

Configuration comes from the environment (never argv, so the key never shows in
``ps``): FLAME_ADDRESS, FLAME_RUNNER_ID, FLAME_KEY (hex) or FLAME_KEY_FILE,
FLAME_CONCURRENCY, FLAME_PARENT_TIMEOUT, FLAME_FAILSAFE, FLAME_HEARTBEAT,
FLAME_PARENT_PID, FLAME_CURVE_SERVER (the parent's CurveZMQ public key, off loopback).
"""
from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from .. import serialize
from ..wire import Wire, curve_client, pending, recv_ready, send_parts
from .capture import Capture, CallOutput
from .terminator import Terminator

log = logging.getLogger("flame.node")

PARENT = "parent"
#: How long output may sit in a call's buffer before it is sent. Livebook uses 50 ms;
#: shorter keeps progress bars lively, longer batches tight print loops better.
FLUSH_INTERVAL = 0.02
#: Functions kept by content hash; the parent mirrors this LRU exactly (see Runner).
FN_CACHE_SIZE = 256
EXIT_PARENT_LOST = 3


class Node:
    def __init__(self, env: dict[str, str], capture: Capture | None = None) -> None:
        self.id = env["FLAME_RUNNER_ID"]
        self.address = env["FLAME_ADDRESS"]
        self.concurrency = int(env.get("FLAME_CONCURRENCY", "1"))
        self.heartbeat = float(env.get("FLAME_HEARTBEAT", "1.0"))
        ppid = env.get("FLAME_PARENT_PID")
        self.terminator = Terminator(float(env.get("FLAME_PARENT_TIMEOUT", "5")),
                                     float(env.get("FLAME_FAILSAFE", "60")),
                                     int(ppid) if ppid else None)
        self.wire = Wire(_read_key(env), self.id)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 2000)
        curve_client(self.sock, env.get("FLAME_CURVE_SERVER"))  # set when the parent is off loopback
        self.sock.connect(self.address)
        self.sock_lock = threading.Lock()
        self.recv_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        os.set_blocking(self._wake_r, False)
        #: calls received by the watch thread (or by main for the workers), FIFO
        self.calls: collections.deque = collections.deque()
        self.capture = capture or Capture(runner=True)
        self.fns: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.running: dict[str, tuple[int, CallOutput]] = {}
        self.queued: set[str] = set()  # received, not started (calls the parent sent ahead)
        self.cancelled: set[str] = set()  # queued calls cancelled before they started
        self.dirty: set[CallOutput] = set()
        self.stopping = False
        self.busy = False  # the main thread is executing a call and not watching the socket
        self._main_ident = threading.main_thread().ident
        self._main_call: str | None = None
        self._interrupt_main: str | None = None

    # ---- sending, from any thread --------------------------------------------------
    def post(self, kind: str, fields: dict | None = None, frames: list | tuple = ()) -> None:
        """Sign and send a message to the parent, at once."""
        # The main thread checks the socket before it next polls; any other thread's send may
        # consume the edge the main thread polls for, so it wakes main if a message waits.
        other = threading.get_ident() != self._main_ident
        with self.sock_lock:
            send_parts(self.sock, self.wire.encode(kind, PARENT, fields, frames))
            waiting = other and pending(self.sock)
        if waiting:
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the main thread is due to wake anyway

    def _receive(self) -> list:
        with self.sock_lock:
            return recv_ready(self.sock)

    def _output_pending(self, out: CallOutput) -> None:
        self.dirty.add(out)

    def _post_output(self, call_id: str, kind: str, data: Any) -> None:
        if kind == "display":
            self.post("display", {"id": call_id}, (json.dumps(data).encode(),))
        else:
            self.post("stream", {"id": call_id, "n": kind}, (data.encode("utf-8", "replace"),))

    def publish_display(self, payload: dict) -> None:
        out = self.capture.current()
        if out is None:
            print(payload.get("data", {}).get("text/plain", ""))
        else:
            out.display(payload)

    # ---- main thread --------------------------------------------------------------------
    def main_loop(self) -> None:
        import platform
        import select
        poller = select.poll()
        poller.register(self.sock.getsockopt(zmq.FD), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wake_r, calls = self._wake_r, self.calls
        self.post("hello", {"pid": os.getpid(), "host": socket.gethostname(),
                            "python": platform.python_version(), "cwd": os.getcwd(),
                            "gpus": _visible_gpus(), "gpu_info": _gpu_info()})
        while True:
            # take_in drains the socket, re-arming its edge-triggered descriptor; after calls
            # ran, loop to take in what arrived meanwhile before sleeping on it.
            self.take_in()
            if calls:
                while calls:
                    self._dispatch(calls.popleft())
                continue
            if self.stopping and not self.running:
                return
            # The timeout only bounds the cost of a lost edge; wake-ups are explicit.
            for fd, _ in poller.poll(100):
                if fd == wake_r:
                    try:
                        os.read(wake_r, 65536)
                    except BlockingIOError:
                        pass

    def take_in(self) -> bool:
        """Receive, check and route what is waiting (main thread, or watch thread while main is busy).

        One thread at a time from receive through routing: sequence numbers are checked in
        arrival order, and calls enter the one FIFO queue in that order too.
        """
        with self.recv_lock:
            batch = self._receive()
            for parts in batch:
                self.handle(parts)
        return bool(batch)

    def handle(self, parts: list) -> None:
        msg = self.wire.decode(parts)
        if msg is None:
            return
        head, frames = msg
        self.terminator.heard()
        kind = head["k"]
        if kind == "call":
            nf = head.get("nf")
            self.queued.add(head["id"])
            self.calls.append((head["id"], head.get("name", "?"),
                               self._function(head["fn"], frames[0] if nf else None), frames[1 if nf else 0:]))
            if threading.get_ident() != self._main_ident:
                self._wake()
        elif kind == "cancel":
            self.cancel(head["id"])
        elif kind == "shutdown":
            self.stopping = True
            self._wake()
        # "welcome" and "heartbeat" only prove the parent is alive.

    def _dispatch(self, item: tuple) -> None:
        if self.concurrency == 1:
            self.busy = True
            try:
                self.execute(*item)
            except KeyboardInterrupt:
                pass  # a cancel that landed just after the call ended
            finally:
                self.busy = False
        else:
            self.work_queue.put(item)

    def _function(self, digest: str, payload: Any) -> list:
        """The LRU of functions by content hash, in the same order the parent keeps it."""
        fns = self.fns
        if payload is not None:
            entry = fns[digest] = [bytes(payload), None]
            if len(fns) > FN_CACHE_SIZE:
                fns.popitem(last=False)
        else:
            entry = fns[digest]
            fns.move_to_end(digest)
        return entry

    # ---- watch thread ----------------------------------------------------------------
    def watch_loop(self) -> None:
        next_beat = time.monotonic() + self.heartbeat
        while True:
            time.sleep(FLUSH_INTERVAL)
            if self.busy or self.concurrency > 1:
                self.take_in()  # the main thread is not looking at the socket: take in cancels
            if self.dirty:
                dirty, self.dirty = self.dirty, set()
                for out in dirty:
                    out.drain(lambda kind, data, cid=out.call_id: self._post_output(cid, kind, data))
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.heartbeat
                self.post("heartbeat")
            why = self.terminator.verdict()
            if why is not None:
                exit_now(why, self.id)

    def cancel(self, call_id: str) -> None:
        ident = self.running.get(call_id, (None,))[0]
        if ident is None:
            if call_id in self.queued:  # sent ahead and not started: answer now, skip it later
                self.cancelled.add(call_id)
                self.post("error", {"id": call_id, "type": "builtins.KeyboardInterrupt", "msg": "cancelled",
                                    "tb": "", "cancelled": True})
            return
        if ident == self._main_ident:
            self._interrupt_main = call_id
            signal.pthread_kill(ident, signal.SIGINT)
        else:
            import ctypes
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                       ctypes.py_object(KeyboardInterrupt))

    # ---- executing calls ----------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        target, self._interrupt_main = self._interrupt_main, None
        if target is not None and target == self._main_call:
            raise KeyboardInterrupt

    def worker(self) -> None:
        while True:
            try:
                self.execute(*self.work_queue.get())
            except KeyboardInterrupt:
                continue  # a cancel that landed between calls

    def execute(self, call_id: str, name: str, entry: list, arg_frames: list) -> None:
        self.queued.discard(call_id)
        if call_id in self.cancelled:
            self.cancelled.discard(call_id)
            return
        ident = threading.get_ident()
        out = CallOutput(call_id, self._output_pending)
        self.running[call_id] = (ident, out)
        self.capture.begin(ident, out)
        main = ident == self._main_ident
        kind, fields, frames = "result", {"id": call_id}, ()
        try:
            try:
                if entry[1] is None:
                    entry[1] = serialize.loads([entry[0]])
                fn = entry[1]
                args, kwargs = serialize.loads(arg_frames)
                if main:
                    self._main_call = call_id
                result = fn(*args, **kwargs)
            finally:
                if main:
                    self._main_call = None
            try:
                frames = serialize.dumps(result)
            except Exception as exc:
                serialize.raise_unpicklable(f"the result of {name}()", result, exc)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
            kind, fields, frames = "error", _error_fields(call_id, exc), _pickled_error(exc)
        finally:
            self.capture.end(ident, out)
            self.dirty.discard(out)
            if out.events:
                out.drain(lambda k, data: self._post_output(call_id, k, data))
            self.running.pop(call_id, None)
        self.post(kind, fields, frames)


def exit_now(why: str, runner_id: str = "") -> None:
    """Exit at once because the parent is gone. Saying why is best effort: stderr may be a
    closed pipe (an SSH channel that went away), and that must not keep the runner alive."""
    try:
        log.warning("flame runner %s exiting: %s", runner_id, why)
        sys.__stderr__.flush()
    except BaseException:
        pass
    finally:
        os._exit(EXIT_PARENT_LOST)


def _error_fields(call_id: str, exc: BaseException) -> dict:
    tb = exc.__traceback__
    # Skip the node's own frames: the user's traceback starts in their function.
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    return {"id": call_id, "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
            "msg": str(exc), "tb": text, "cancelled": isinstance(exc, KeyboardInterrupt)}


def _pickled_error(exc: BaseException) -> tuple:
    try:
        exc.__traceback__ = None
        return tuple(serialize.dumps(exc))
    except Exception:
        return ()


def _read_key(env: dict[str, str]) -> bytes:
    key = env.get("FLAME_KEY")
    if key:
        return bytes.fromhex(key)
    path = env.get("FLAME_KEY_FILE")
    if path:
        with open(path, "rb") as f:
            return bytes.fromhex(f.read().decode().strip())
    raise SystemExit("flame.node: no key (set FLAME_KEY or FLAME_KEY_FILE)")


def _visible_gpus() -> list[str]:
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return [g for g in value.split(",") if g.strip()] if value.strip() else []


def _gpu_info() -> list[dict]:
    """Name and memory of each GPU this runner was given (NVML, only when it has GPUs)."""
    ids = _visible_gpus()
    if not ids:
        return []
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return []
    info = []
    try:
        for gid in ids:
            try:
                if gid.isdigit():
                    h = pynvml.nvmlDeviceGetHandleByIndex(int(gid))
                else:
                    h = pynvml.nvmlDeviceGetHandleByUUID(gid)
                name = pynvml.nvmlDeviceGetName(h)
                info.append({"id": gid, "name": name.decode() if isinstance(name, bytes) else name,
                             "memory_total": int(pynvml.nvmlDeviceGetMemoryInfo(h).total)})
            except Exception:
                info.append({"id": gid, "name": "?", "memory_total": 0})
    finally:
        pynvml.nvmlShutdown()
    return info


def _config_from_stdin() -> None:
    """``--stdin``: the FLAME_* settings (the key among them) arrive as one JSON line on stdin.

    Used over SSH, where a command line is visible in ``ps`` and servers refuse to pass
    arbitrary environment variables. stdin then stays open: EOF means the connection
    to the parent is gone, and the runner exits at once.
    """
    # Read byte by byte up to the newline: a buffered reader would swallow what follows.
    fd = sys.stdin.fileno()
    chunks = []
    while True:
        ch = os.read(fd, 1)
        if not ch:
            raise SystemExit("flame.node --stdin: no configuration on stdin")
        if ch == b"\n":
            break
        chunks.append(ch)
    line = b"".join(chunks)
    os.environ.update({k: str(v) for k, v in json.loads(line).items()})

    def watch_stdin() -> None:
        try:
            while os.read(fd, 65536):
                pass
        except OSError:
            pass
        exit_now("its connection (stdin) closed")
    threading.Thread(target=watch_stdin, name="flame-node-stdin", daemon=True).start()


def main() -> None:
    faulthandler.enable()  # a segfault prints its Python traceback into the stderr tail
    if "--stdin" in sys.argv[1:]:
        _config_from_stdin()
    env = dict(os.environ)
    for name in ("FLAME_KEY", "FLAME_KEY_FILE"):
        os.environ.pop(name, None)  # user code and its subprocesses never see the key
    capture = Capture(runner=True)
    capture.install()  # from here on, file descriptors 1 and 2 lead to the running call
    faulthandler.enable(file=capture.log_stream)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=capture.log_stream)
    node = Node(env, capture)
    from . import display
    display.install(node.publish_display)
    signal.signal(signal.SIGINT, node._on_sigint)
    threading.Thread(target=node.watch_loop, name="flame-node-watch", daemon=True).start()
    if node.concurrency > 1:
        node.work_queue = queue.SimpleQueue()
        for i in range(node.concurrency):
            threading.Thread(target=node.worker, name=f"flame-node-worker-{i + 1}", daemon=True).start()
    node.main_loop()
    with node.sock_lock:
        node.sock.close()
    node.ctx.term()
