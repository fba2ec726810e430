"""A node inside a running application: the app binds, notebooks attach.

``flame.serve()`` starts this in background threads and returns at once. Cells and
calls from attached notebooks run one at a time in a worker thread of the app, with
their output captured per thread (what the app prints on its own is left alone) and
streamed back; completion and inspection are answered by the I/O thread right away,
so they work while a cell is running; a cancel interrupts the worker thread with an
asynchronous KeyboardInterrupt and never touches the app's own threads.
"""
from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from typing import Any, Callable

import zmq

from .. import serialize
from ..listen import listener
from ..wire import FLUSH_INTERVAL, HEARTBEAT, Kind, WakePipe, Wire, introduction
from . import aio, display, introspect
from .capture import Capture
from .execute import Calls, cancelled_reply
from .interactive import result_bundle, run_source, user_expressions

log = logging.getLogger("flame.attach")

APP = "app"
#: A client not heard from for this long is gone (clients heartbeat every second): it gets
#: no more heartbeats, and a cell it left running is interrupted so the next client finds
#: the app free.
CLIENT_TIMEOUT = 5.0
REFUSED = Kind.REFUSED


class AppNode:
    """The node inside an app: binds a socket, runs attached clients' cells and calls."""

    def __init__(self, key: bytes, address: str, namespace: dict) -> None:
        self.namespace = namespace
        self.wire = Wire(key, APP)
        self.ctx = zmq.Context()
        # Always CurveZMQ, with ZAP admitting only holders of the key: an app's socket is
        # one any local user can reach, loopback included, and its clients are few.
        self.sock, self.curve_public, self._gate = listener(self.ctx, key, curve=True)
        if address.endswith(":0"):
            self.sock.bind(address[:-2] + ":*")
        else:
            self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.outbox: collections.deque = collections.deque()
        self._wakeup = WakePipe()
        self.clients: dict[bytes, float] = {}
        self.refused: set[bytes] = set()
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.running: tuple[str, bytes] | None = None  # (request id, client)
        self.calls = Calls(_shared_capture())
        self.introspection = introspect.Answerer("flame-attach-introspect")
        self.handlers: dict[str, Callable[[bytes, dict, list], None]] = {
            Kind.HELLO: self._on_hello, Kind.RUN: self._on_work, Kind.CALL: self._on_work,
            Kind.CANCEL: self._on_cancel, Kind.COMPLETE: self._on_introspect, Kind.INSPECT: self._on_introspect,
        }
        self.stopped = threading.Event()
        self.io = threading.Thread(target=self._io_loop, name="flame-attach-io", daemon=True)
        self.worker = threading.Thread(target=self._work_loop, name="flame-attach-worker", daemon=True)

    def start(self) -> None:
        self.io.start()
        self.worker.start()

    def stop(self) -> None:
        self.stopped.set()
        self.work.put(None)
        self.io.join(timeout=5)

    # ---- sending ------------------------------------------------------------------------
    def send(self, ident: bytes, kind: str, fields: dict | None = None, frames: Any = ()) -> None:
        """Queue a message for a client; only the I/O thread touches the socket.

        Latency matters less here than in a pool, and the app's threads should never
        contend for a lock with the app's own code paths.
        """
        self.outbox.append((ident, kind, fields, frames))
        if threading.current_thread() is not self.io:
            self._wakeup.wake()

    def _flush(self) -> None:
        while self.outbox:
            ident, kind, fields, frames = self.outbox.popleft()
            peer = ident.decode(errors="replace")
            self.sock.send_multipart([ident, *self.wire.encode(kind, peer, fields, frames)], copy=False)

    # ---- I/O thread -----------------------------------------------------------------------
    def _io_loop(self) -> None:
        next_beat = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wakeup.r, zmq.POLLIN)
        try:
            while not self.stopped.is_set():
                ready = dict(poller.poll(FLUSH_INTERVAL * 1000))
                if self._wakeup.r in ready:
                    self._wakeup.drain()
                while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._handle(self.sock.recv_multipart(copy=False))
                self.calls.flush()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + HEARTBEAT
                    for ident, seen in list(self.clients.items()):
                        if now - seen < CLIENT_TIMEOUT:
                            self.send(ident, Kind.HEARTBEAT)
                        else:
                            del self.clients[ident]
                            running = self.running
                            if running is not None and running[1] == ident:
                                log.warning("flame: the notebook that ran %s is gone; interrupting it", running[0])
                                self.calls.cancel(running[0])
                self._flush()
        except Exception:
            log.exception("flame: attach I/O thread failed")
        finally:
            self.sock.close()
            self._gate.stop()
            self.ctx.term()

    def _handle(self, parts: list) -> None:
        ident = parts[0].bytes
        msg = self.wire.decode(parts[1:], peer=ident.decode(errors="replace"))
        if msg is None:
            if ident not in self.refused:  # tell a client with the wrong key, once, unsigned
                if len(self.refused) > 10000:
                    self.refused.clear()
                self.refused.add(ident)
                self.sock.send_multipart([ident, b"", REFUSED])
            return
        head, frames = msg
        self.clients[ident] = time.monotonic()  # HEARTBEAT only proves the client is alive
        handler = self.handlers.get(head["k"])
        if handler is not None:
            handler(ident, head, frames)

    # ---- one handler per kind a client sends -------------------------------------------
    def _on_hello(self, ident: bytes, head: dict, frames: list) -> None:
        log.info("flame: notebook pid %s on %s attached", head.get("pid"), head.get("host"))
        self.send(ident, Kind.WELCOME, {**introduction(), "argv": sys.argv})

    def _on_work(self, ident: bytes, head: dict, frames: list) -> None:
        """RUN (a cell) or CALL: to the worker thread, one at a time."""
        self.calls.queued(head["id"])  # from now on a cancel skips it, until it starts
        self.work.put((ident, head["k"], head, frames))

    def _on_cancel(self, ident: bytes, head: dict, frames: list) -> None:
        # Still queued (behind another cell, or the worker's warm-up): answered now, never run.
        if self.calls.cancel(head["id"]) == "skipped":
            self.send(ident, *cancelled_reply(head["id"]))

    def _on_introspect(self, ident: bytes, head: dict, frames: list) -> None:
        """COMPLETE or INSPECT: answered on the answerer's thread, also while a cell runs, and
        never holding up this one (heartbeats to every client)."""
        request_id = head["id"]
        self.introspection.ask(head["k"], self.namespace, head,
                               lambda content: self.send(ident, Kind.REPLY, {"id": request_id, "content": content}))

    # ---- worker thread ---------------------------------------------------------------------
    def _work_loop(self) -> None:
        # The first completion would otherwise import jedi and load parso's grammar (1.5-2.6 s
        # measured on a fresh machine while a cell kept the GIL busy): do it now, in this
        # thread, before the first cell; serve() has long returned.
        introspect.warm(self.namespace)
        while True:
            item = self.work.get()
            if item is None:
                return
            try:
                self._execute(*item)
            except KeyboardInterrupt:
                pass  # a stray interrupt; Calls raises only inside the request a cancel targets

    def _execute(self, ident: bytes, kind: str, head: dict, frames: list) -> None:
        rid = head["id"]

        def work() -> Any:
            if kind == "run":
                count = head.get("count")
                value = run_source(head["code"], self.namespace, filename=f"<cell {count or rid}>",
                                   loop_for=_await_loop, count=count)
                data, md = result_bundle(value) if value is not None else (None, {})
                return {"data": data, "metadata": md,
                        "user_expressions": user_expressions(head.get("expressions"), self.namespace)}
            fn, args, kwargs = serialize.loads(frames)
            return fn(*args, **kwargs)
        self.running = (rid, ident)
        try:
            self.calls.execute(rid, "the cell" if kind == "run" else "the call", work,
                               lambda k, f, b: self.send(ident, k, f, b), "rp" in head)
        finally:
            self.running = None


def _await_loop() -> Any:
    """Where an attached cell's awaits run: the app's loop, else the node's own."""
    return aio.app_loop() or aio.node_loop()


_capture: Capture | None = None


def _shared_capture() -> Capture:
    """One capture per process: routers go on sys.stdout/sys.stderr once, falling back to the app's."""
    global _capture
    if _capture is None:
        _capture = Capture()
        _capture.install()
        display.install(display.to_calls(_capture))
    return _capture

