"""The parent's endpoint: one ZeroMQ ROUTER per pool, its wake-ups, sending, waiting and the tick.

Threads: any thread sends (callers send their own calls: no hand-off); one thread at a time
receives, checks and hands messages to the pool, either the I/O thread or a caller blocked
waiting for its result (leader/followers): that hand-off between two Python threads, a GIL
ping-pong, cost more than the network hop. The I/O thread also runs the pool's tick.

A caller alone in ``wait()`` receives in ZeroMQ's blocking receive, holding the socket for
at most RECV_SLICE_MS; another thread that needs the socket meanwhile pokes it out with a
message from the endpoint's own DEALER. Otherwise receivers poll the socket's file
descriptor, which is edge-triggered: any socket operation can consume the edge that
announces an incoming message. Whoever operates on the socket re-checks ``ZMQ_EVENTS`` and
wakes the thread that polls it when a message is waiting. Plain ``select.poll`` on that
descriptor and two pipes replaced ``zmq.select`` here, which truncated its timeout to whole
milliseconds and spun for the last one before every tick (thousands of wake-ups a second).
"""
from __future__ import annotations

import logging
import math
import os
import select
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

import zmq

from .node.boot import BOOT
from .listen import curve_client, is_loopback, listener
from .wire import WakePipe, Wire, pending, recv_ready, send_parts

log = logging.getLogger("flame.pool")

#: How often the I/O thread runs the pool's tick (heartbeats, deadlines, placement).
TICK = 0.05
#: The longest one blocking receive lasts (the caller then looks at its deadline and flags).
RECV_SLICE_MS = 20
#: The routing id of the endpoint's own DEALER, whose messages only wake a blocking receive.
POKE = b"\x00poke"

#: handle(peer, header, frames), called for each checked message, in arrival order.
Handler = Callable[[str, dict, list], None]
#: serve(peer, digest): the code archive named ``digest`` for a booting runner, or None.
Server = Callable[[str, str], "bytes | None"]


def private_dir() -> str:
    """A new directory only this user can enter (mode 0700, a random name), for the pool's
    ``ipc://`` socket: short enough for a socket path (at most 107 bytes) wherever TMPDIR is."""
    base = tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="flame-ipc-", dir=base if len(base) < 60 else "/tmp")


class Endpoint:
    """A pool's socket. ``handle`` gets every checked message; ``tick(now)`` runs every TICK on
    the I/O thread; ``fail(exc)`` is told if the I/O thread dies; ``outstanding()`` says whether
    any call awaits its result; ``serve(peer, digest)`` answers the code requests of runners
    that boot from code archives (``flame/node/boot.py``); ``after()`` runs once each batch of
    messages received together has been handled."""

    def __init__(self, name: str, key: bytes, bind_host: str, handle: Handler,
                 tick: Callable[[float], None], fail: Callable[[BaseException], None],
                 outstanding: Callable[[], bool], serve: Server | None = None,
                 after: Callable[[], None] | None = None) -> None:
        self.name = name
        self.wire = Wire(key, "parent")
        self._handle, self._tick, self._fail, self._outstanding = handle, tick, fail, outstanding
        self._serve = serve
        self._after = after or (lambda: None)
        self._ctx = zmq.Context()
        # Only this user can reach a socket in a private directory; off loopback, the
        # handshake proves the key (see listen.listener). Either way, no stranger's frame reaches
        # memory, where the HMAC would be checked only after it had been read whole.
        curve = not is_loopback(bind_host)
        self._sock, self.curve_public, self._gate = listener(self._ctx, key, curve)
        self._dir: str | None = None
        if curve:
            self._sock.bind(f"tcp://{bind_host}:0")
        else:
            self._dir = private_dir()
            self._sock.bind(f"ipc://{self._dir}/pool")
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock_fd = self._sock.getsockopt(zmq.FD)
        self._sock.setsockopt(zmq.RCVTIMEO, RECV_SLICE_MS)  # bounds a blocking receive (see wait)
        self._sock_lock = threading.Lock()
        # A caller alone in wait() receives in ZeroMQ's blocking receive, holding the socket. A
        # thread that needs the socket meanwhile pokes it out: a message from a DEALER of our
        # own, over inproc, which that receive returns (and _dispatch ignores).
        self._blocked = False  # a caller waits in the blocking receive, holding _sock_lock
        self._wanting: list = []  # one entry per thread waiting for _sock_lock (list ops are atomic)
        inproc = f"inproc://flame-{name}-{os.getpid()}-{id(self):x}"
        self._sock.bind(inproc)
        self._poke = self._ctx.socket(zmq.DEALER)
        self._poke.setsockopt(zmq.ROUTING_ID, POKE)
        self._poke.setsockopt(zmq.LINGER, 0)
        curve_client(self._poke, self.curve_public, key)
        self._poke.connect(inproc)
        self._poke_lock = threading.Lock()
        # A caller receiving in wait() polls the socket and its own wake-up pipe: another
        # thread's socket operation may consume the edge it waits for (see send).
        self._lead = WakePipe()
        self._wakeup = WakePipe()
        self._sock_poll = select.poll()  # used only by the thread holding _recv_lock
        self._sock_poll.register(self._sock_fd, select.POLLIN)
        self._sock_poll.register(self._lead.r, select.POLLIN)
        self._recv_lock = threading.Lock()
        self._receiver: int | None = None  # the thread holding _recv_lock
        self._waiters: list = []  # one entry per caller blocked in wait (list ops are atomic)
        self._io_watching = True  # the I/O thread is waiting on the socket, not only on its pipe
        self.stopped = threading.Event()
        self.io = threading.Thread(target=self._io_loop, name=f"flame-{name}-io", daemon=True)

    @property
    def curve(self) -> bool:
        """Whether the socket encrypts with CurveZMQ (it listens off loopback)."""
        return bool(self._sock.curve_server)

    def start(self) -> None:
        self.io.start()

    def stop(self) -> None:
        """Stop the I/O thread; it closes the socket."""
        self.stopped.set()
        self.wake()
        if threading.current_thread() is not self.io and self.io.is_alive():
            self.io.join(timeout=5)

    # ---- sending --------------------------------------------------------------------------
    def send(self, to: str, kind: str, fields: dict | None = None, frames: list | tuple = (),
             digest: bytes | None = None) -> None:
        """Sign and send at once, from any thread."""
        # The receiving thread itself checks the socket before it next polls: it needs no wake-up
        # (it sends the calls that the results it handles make room for).
        receiver = self._receiver == threading.get_ident()
        self._hold()
        try:
            if self._sock.closed:
                return
            msg = self.wire.encode(kind, to, fields, frames, digest)
            send_parts(self._sock, [to.encode(), *msg])
            # With nobody polling, the next receiver checks the socket before it polls.
            waiters = bool(self._waiters)
            waiting = not receiver and (waiters or self._io_watching) and pending(self._sock)
        finally:
            self._sock_lock.release()
        if waiting:
            self.wake()
            if waiters:
                self._lead.wake()

    def nudge(self) -> None:
        """A call went out: make sure some thread watches the socket for its result."""
        if not self._io_watching and not self._waiters:
            self.wake()

    def _hold(self) -> None:
        """Acquire ``_sock_lock``; if a caller holds it in a blocking receive, poke it out first."""
        if self._sock_lock.acquire(False):
            return
        self._wanting.append(None)
        try:
            # Either the receiving caller sees this entry before it blocks, or this thread sees
            # it blocked and pokes (both at worst: a stray poke, ignored).
            if self._blocked:
                with self._poke_lock:
                    if not self._poke.closed:
                        try:
                            self._poke.send(b"", zmq.NOBLOCK)
                        except zmq.Again:  # pokes already queued: the caller wakes for those
                            pass
            self._sock_lock.acquire()
        finally:
            self._wanting.pop()

    def wake(self) -> None:
        """Wake the I/O thread."""
        self._wakeup.wake()

    # ---- receiving ------------------------------------------------------------------------
    def _receive(self, most: int = -1) -> list:
        self._hold()
        try:
            if self._sock.closed:
                return []
            return recv_ready(self._sock, most)
        finally:
            self._sock_lock.release()

    def _receive_blocking(self) -> list:
        """Wait in ZeroMQ's blocking receive for one message, at most RECV_SLICE_MS, unless
        another thread wants the socket (then nothing: the caller polls instead)."""
        sock = self._sock
        with self._sock_lock:
            if sock.closed:
                return []
            self._blocked = True
            try:
                if self._wanting:
                    return []
                frame = sock.recv(0, copy=False)
                parts = [frame]
                while frame.more:
                    frame = sock.recv(0, copy=False)
                    parts.append(frame)
                return [parts]
            except zmq.Again:
                return []
            finally:
                self._blocked = False

    def _dispatch(self, parts: list) -> None:
        ident = parts[0].bytes
        if ident == POKE:
            return
        try:
            peer = ident.decode()
        except UnicodeDecodeError:
            peer = repr(ident)
        if len(parts) == 4 and len(parts[1]) == len(BOOT) and parts[1].bytes == BOOT:
            self._code_request(ident, peer, parts[2].bytes, parts[3].bytes)
            return
        msg = self.wire.decode(parts[1:], peer=peer)
        if msg is not None:
            self._handle(peer, *msg)

    def _code_request(self, ident: bytes, peer: str, digest: bytes, mac: bytes) -> None:
        """A booting runner asks for a code archive: checked before anything is looked up."""
        if self._serve is None or not self.wire.check_request(peer, BOOT + ident + digest, mac):
            return
        data = self._serve(peer, digest.decode("ascii", "replace"))
        if data is None:
            return
        parts = [ident, BOOT, digest, data]
        if digest.startswith(b"mod:"):  # the import hook's head names the archives: signed
            parts.append(self.wire.answer_mac(digest, data))
        self._hold()
        try:
            if not self._sock.closed:
                send_parts(self._sock, parts)
        finally:
            self._sock_lock.release()

    def wait(self, future: Any, timeout: float | None = None) -> None:
        """Receive and handle messages in this thread until ``future.settled``, the timeout
        passes, or the endpoint stops."""
        if future.settled:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waiters.append(None)
        poll, lead = self._sock_poll.poll, self._lead
        try:
            while not future.settled and not self.stopped.is_set():
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if not self._recv_lock.acquire(timeout=0.05):
                    continue
                self._receiver = threading.get_ident()
                batch: list = []
                handled = False
                try:
                    if future.settled or self.stopped.is_set():
                        break
                    # Alone, this caller waits in ZeroMQ's blocking receive, as a raw pyzmq loop
                    # does: watching the descriptor instead costs two ZeroMQ operations and a
                    # poll more per call. With other waiters, it polls (they may send meanwhile).
                    alone = len(self._waiters) == 1 and not self._wanting
                    batch = [] if alone else self._receive()
                    if not batch:
                        if alone:
                            batch = self._receive_blocking()
                        else:
                            # The timeout only bounds the cost of a lost edge; wake-ups are explicit.
                            for fd, _ in poll(RECV_SLICE_MS):
                                if fd == lead.r:
                                    lead.drain()
                            batch = self._receive(1)
                        # One message at a time until this caller's result is in. If nothing
                        # else is awaited then, the socket is left unchecked: the I/O thread
                        # checks it at its next tick (one ZeroMQ operation less per call).
                        while batch:
                            handled = True
                            self._dispatch(batch.pop())
                            if not (future.settled and len(self._waiters) == 1 and not self._outstanding()):
                                batch = self._receive(1)
                finally:
                    try:
                        for parts in batch:  # handled even if Ctrl-C struck: nothing is lost
                            handled = True
                            self._dispatch(parts)
                    finally:
                        try:
                            if handled:
                                self._after()
                        finally:
                            self._receiver = None
                            self._recv_lock.release()
        finally:
            self._waiters.pop()
            if not self._waiters and self._outstanding():
                self.wake()  # others' calls are out: the I/O thread must watch the socket again

    def _receive_and_handle(self) -> bool:
        """Receive, check and handle what is waiting, unless another thread is doing so now.

        One thread at a time, from receive through handling: sequence numbers are checked
        in arrival order, and a call's output is delivered before its result.
        """
        if not self._recv_lock.acquire(blocking=False):
            return False
        self._receiver = threading.get_ident()
        batch: list = []
        try:
            batch = self._receive()
            for parts in batch:
                self._dispatch(parts)
            if batch:
                self._after()
        finally:
            self._receiver = None
            self._recv_lock.release()
        return bool(batch)

    def _io_loop(self) -> None:
        next_tick = time.monotonic()
        woken = True
        # Two poll sets: while callers wait in wait() they receive themselves, and the I/O
        # thread must not wake (and contend for the GIL) on every message.
        watch_all, watch_wake = select.poll(), select.poll()
        for p in (watch_all, watch_wake):
            p.register(self._wakeup.r, select.POLLIN)
        watch_all.register(self._sock_fd, select.POLLIN)
        try:
            while not self.stopped.is_set():
                got = self._receive_and_handle() if woken or not self._waiters else False
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self._tick(now)
                if got:
                    continue
                self._io_watching = not self._waiters
                # Round up: a timeout truncated to 0 ms would spin until the tick.
                wait_ms = math.ceil(max(0.0, next_tick - time.monotonic()) * 1000)
                ready = (watch_all if self._io_watching else watch_wake).poll(wait_ms)
                woken = False
                for fd, _ in ready:
                    if fd == self._wakeup.r:
                        woken = True
                        self._wakeup.drain()
        except BaseException as exc:  # noqa: BLE001 - reported to the pool, which fails its calls
            log.exception("flame: %s I/O thread failed", self.name)
            self.stopped.set()
            self._fail(exc)
        finally:
            self._hold()
            try:
                self._sock.close(linger=0)
            finally:
                self._sock_lock.release()
            with self._poke_lock:
                self._poke.close(linger=0)
            if self._gate is not None:
                self._gate.stop()
            self._ctx.term()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
            self._wakeup.close()
            self._lead.close()

