"""The runner's node (``python -m flame.node``): receive calls, execute them (``execute.py``,
shared with the node inside an attached app), stream their output, heartbeat the parent.

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

Both threads use the one ZeroMQ socket, each operation under ``sock_lock``. With
``concurrency == 1`` the main thread waits in a blocking receive, holding the lock
for at most RECV_SLICE. With worker threads it waits on the socket's file
descriptor outside the lock instead. That descriptor is edge-triggered: any socket
operation can consume the edge that announces an incoming message, so whoever
operates on the socket re-checks ``ZMQ_EVENTS`` afterwards and wakes the main
thread when a message is waiting.

Configuration comes from the environment (never argv, so the key never shows in
``ps``), and with ``--stdin`` from a JSON line on stdin as well (local runners and SSH: the
key then never is in the environment the process started with, which /proc/PID/environ
shows; EOF on stdin later means the parent is gone): FLAME_ADDRESS, FLAME_RUNNER_ID,
FLAME_KEY (hex) or FLAME_KEY_FILE,
FLAME_CONCURRENCY, FLAME_PARENT_TIMEOUT, FLAME_FAILSAFE, FLAME_HEARTBEAT,
FLAME_PARENT_PID, FLAME_CURVE_SERVER (the parent's CurveZMQ public key, off loopback),
FLAME_SHM (shared memory with the parent), FLAME_PEER_HOST (peers.py: a TCP listener for
runners on other hosts), FLAME_STARTS (the start count's file),
FLAME_BOOT, FLAME_CODE and FLAME_CODE_CACHE (code sync), FLAME_DEPS (the import hook,
``importer.py``), FLAME_WATCH_STDIN (SSH: exit when
stdin closes), FLAME_PRELOAD and FLAME_TEMPLATE_FD (forked from a template).
"""
from __future__ import annotations

import collections
import faulthandler
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, Callable

import zmq

from .. import serialize, shm
from ..keys import read_key
from ..wire import (FLUSH_INTERVAL, FN_CACHE_SIZE, HEARTBEAT, Kind, WakePipe, Wire, fast_digests, introduction, pending, recv_ready,
                    send_parts)
from .capture import Capture
from .execute import Calls, cancelled_reply
from .starts import StartCount
from .terminator import EXIT_BROKEN, Terminator, cleanup, exit_now, terminated, watch_stdin

log = logging.getLogger("flame.node")

PARENT = "parent"
#: The longest the main thread waits in one blocking receive (it then looks at its flags).
RECV_SLICE = 0.02


class RunnerNode:
    """The process a pool booted: receives calls, runs them, streams their output."""

    def __init__(self, env: dict[str, str], capture: Capture | None = None) -> None:
        self.id = env["FLAME_RUNNER_ID"]
        self.address = env["FLAME_ADDRESS"]
        self.concurrency = int(env.get("FLAME_CONCURRENCY", "1"))
        self.heartbeat = float(env.get("FLAME_HEARTBEAT", HEARTBEAT))
        ppid = env.get("FLAME_PARENT_PID")
        self.terminator = Terminator(float(env.get("FLAME_PARENT_TIMEOUT", "5")),
                                     float(env.get("FLAME_FAILSAFE", "60")),
                                     int(ppid) if ppid else None)
        key = read_key(env)
        self.wire = Wire(key, self.id, cut=bool(env.get("FLAME_CURVE_SERVER")))
        self.ctx = zmq.Context()
        # Peers (node/peers.py) are set up from here when first needed, not at boot: most
        # runners never hold a value or a handle.
        self.peer_key = key
        sys.modules[__package__].this_runner = self
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, self.id.encode())
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.LINGER, 2000)
        if env.get("FLAME_CURVE_SERVER"):  # the parent is off loopback (imported only then: boot time)
            from ..listen import curve_client
            curve_client(self.sock, env["FLAME_CURVE_SERVER"], key)
        self.sock.connect(self.address)
        self.sock_lock = threading.Lock()
        #: one entry per other thread waiting for sock_lock (list ops are atomic), as in the
        #: parent's endpoint: the main thread's blocking receive lets go of the lock for only a
        #: few microseconds at a time, and on a loaded machine a woken waiter missed every one
        #: (heartbeats and the terminator stalled for seconds).
        self._wanting: list = []
        self.recv_lock = threading.Lock()
        self._wakeup = WakePipe()
        #: calls received by the watch thread (or by main for the workers), FIFO
        self.inbox: collections.deque = collections.deque()
        self.capture = capture or Capture(runner=True)
        # With one call at a time the main thread runs it, and a cancel is a SIGINT.
        # Shared memory with a parent on this machine (shm.py): our arena for results, the
        # parent's mapped for arguments, and the frees our finalizers queue for the watch thread.
        self.shm = shm.Side(env.get("FLAME_SHM") == "1" and shm.available(), self.id)
        cleanup.append(self.shm.close)
        self.parent_owner = shm.pool_owner(self.id)
        self.calls = Calls(self.capture, signal_main=self.concurrency == 1,
                           pack=self._pack if self.shm.on else None)
        self.fns: collections.OrderedDict[str, list] = collections.OrderedDict()
        self.boot = "FLAME_BOOT" in env  # booted from code archives (code sync)
        if env.get("FLAME_DEPS") == "1":  # what calls import comes from the parent (deps)
            from .importer import install_hook
            install_hook(self, env)
        self.code: str | None = env.get("FLAME_CODE")  # the local code's archive on sys.path
        self.stopping = False
        self.busy = False  # the main thread is executing a call and not watching the socket
        #: a local runner's count of the calls it started, for its pool after a kill (starts.py)
        self.starts = StartCount(env["FLAME_STARTS"]) if env.get("FLAME_STARTS") else None
        if self.starts is not None:
            cleanup.append(self.starts.close)
        self.received = 0  # calls received so far
        self._main_ident = threading.main_thread().ident
        self.work_queue: queue.SimpleQueue = queue.SimpleQueue()
        value = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.gpus = [g for g in value.split(",") if g.strip()] if value.strip() else []
        self.load: Any = None  # stats.Load, made at the first heartbeat (off the boot's path)
        self.introspection: Any = None  # introspect.Answerer, made at the first request (imports jedi's way)
        self.handlers: dict[str, Callable[[dict, list], None]] = {
            Kind.CALL: self._on_call, Kind.CALLS: self._on_calls, Kind.CANCEL: self._on_cancel,
            Kind.SHUTDOWN: self._on_shutdown, Kind.CODE: self._on_code, Kind.FREE: self._on_free,
            Kind.RELEASE: self._on_release, Kind.COMPLETE: self._on_introspect,
            Kind.INSPECT: self._on_introspect, Kind.WELCOME: self._on_welcome,
            Kind.PEER_GONE: self._on_peer_gone, Kind.RELAY: self._on_relay, Kind.RELAYED: self._on_relay,
        }

    # ---- sending, from any thread --------------------------------------------------
    def post(self, kind: str, fields: dict | None = None, frames: list | tuple = ()) -> None:
        """Sign and send a message to the parent, at once."""
        # The main thread checks the socket before it next polls; any other thread's send may
        # consume the edge the main thread polls for, so it wakes main if a message waits.
        other = threading.get_ident() != self._main_ident
        if other:
            self._wanting.append(None)
        try:
            with self.sock_lock:  # sequence numbers are given in the order messages are sent
                send_parts(self.sock, self.wire.encode(kind, PARENT, fields, frames))
                waiting = other and pending(self.sock)
        finally:
            if other:
                self._wanting.pop()
        if waiting:
            self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    def _receive(self) -> list:
        with self.sock_lock:
            return recv_ready(self.sock)

    # ---- main thread --------------------------------------------------------------------
    def main_loop(self) -> None:
        hello = introduction()
        if self.gpus:
            from .stats import gpu_info  # subprocess and NVML: only on GPU runners
            hello["gpu_info"] = gpu_info(self.gpus)
        hello.update(gpus=self.gpus, blake3=fast_digests())
        if self.boot:
            from .boot import cache_root
            hello["cache"] = cache_root()
        self.post("hello", hello)
        if self.concurrency == 1:
            self._receive_blocking()
        else:
            self._receive_polling()

    def _receive_blocking(self) -> None:
        """With one call at a time: wait in ZeroMQ's own blocking receive, as a raw pyzmq loop
        does. Checking the socket's descriptor from Python instead (``_receive_polling``) costs
        four ZeroMQ operations and a poll per call, against one receive: about 14 us of a warm
        call here (4%). While this thread waits it holds the socket, so another thread's
        message waits at most RECV_SLICE; none is on a call's path, since this thread runs the
        calls and sends their replies."""
        sock, inbox, recv, wanting = self.sock, self.inbox, self.sock.recv, self._wanting
        sock.setsockopt(zmq.RCVTIMEO, int(RECV_SLICE * 1000))
        while True:
            if wanting:
                _give_way(wanting)
            with self.recv_lock:  # calls the watch thread took in meanwhile go first
                if not inbox:
                    if self.stopping and not self.calls.running:
                        return
                    parts = None
                    with self.sock_lock:
                        try:
                            frame = recv(0, copy=False)
                            parts = [frame]
                            while frame.more:
                                frame = recv(0, copy=False)
                                parts.append(frame)
                        except zmq.Again:  # RECV_SLICE passed: look at the flags, then wait again
                            pass
                    if parts is not None:
                        self.handle(parts)
            while inbox:
                self._dispatch(inbox.popleft())

    def _receive_polling(self) -> None:
        """With worker threads sending replies: wait on the socket's descriptor, outside the
        socket's lock, so that a worker's reply never waits for this thread."""
        import select
        poller = select.poll()
        poller.register(self.sock.getsockopt(zmq.FD), select.POLLIN)
        poller.register(self._wakeup.r, select.POLLIN)
        wakeup, inbox = self._wakeup, self.inbox
        while True:
            # take_in drains the socket, re-arming its edge-triggered descriptor; after calls
            # ran, loop to take in what arrived meanwhile before sleeping on it.
            self.take_in()
            if inbox:
                while inbox:
                    self._dispatch(inbox.popleft())
                continue
            if self.stopping and not self.calls.running:
                return
            # The timeout only bounds the cost of a lost edge; wake-ups are explicit.
            for fd, _ in poller.poll(100):
                if fd == wakeup.r:
                    wakeup.drain()

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
        self.terminator.heard()  # HEARTBEAT only proves the parent is alive: nothing more
        handler = self.handlers.get(head["k"])
        if handler is not None:
            handler(head, frames)

    # ---- one handler per kind the parent sends ---------------------------------------
    def _on_call(self, head: dict, frames: list) -> None:
        self._take_call(head, frames)
        if threading.get_ident() != self._main_ident:
            self._wake()

    def _on_calls(self, head: dict, frames: list) -> None:
        """Several calls in one message, each with its count of frames."""
        at = 0
        for sub in head["c"]:
            n = sub["n"]
            self._take_call(sub, frames[at:at + n])
            at += n
        if threading.get_ident() != self._main_ident:
            self._wake()

    def _on_cancel(self, head: dict, frames: list) -> None:
        if self.calls.cancel(head["id"]) == "skipped":  # sent ahead, not started: answer now
            self.post(*cancelled_reply(head["id"]))

    def _on_shutdown(self, head: dict, frames: list) -> None:
        self.stopping = True
        self._wake()

    def _on_code(self, head: dict, frames: list) -> None:
        """The pool's local code changed: take it in before the next call."""
        self.fns.clear()  # as the parent does: functions by reference must be looked up again
        self._take_code(head["h"], frames[0] if frames else None)

    def _on_free(self, head: dict, frames: list) -> None:
        """A region of our arena the parent no longer uses."""
        self.shm.release(head.get("at", -1), PARENT)

    def _on_release(self, head: dict, frames: list) -> None:
        """Values no Remote refers to any more."""
        from . import objects
        objects.release(head["ids"])

    def _on_introspect(self, head: dict, frames: list) -> None:
        """COMPLETE or INSPECT, against the namespace ``%%remote`` cells run in: answered on
        the answerer's thread, also while a call runs, and never holding up the socket."""
        from . import interactive, introspect
        if self.introspection is None:  # handle() runs on one thread at a time (recv_lock)
            self.introspection = introspect.Answerer("flame-node-introspect")
        request_id = head["id"]
        self.introspection.ask(head["k"], interactive.NAMESPACE, head,
                               lambda content: self.post(Kind.REPLY, {"id": request_id, "content": content}))

    def _on_peer_gone(self, head: dict, frames: list) -> None:
        """A runner of our pool is gone: the values it kept here go, and asking it fails."""
        from . import peers
        peers.gone(head["id"])

    def _on_relay(self, head: dict, frames: list) -> None:
        """RELAY: another runner's request for a value held here, through the parent; RELAYED:
        the answer to one of ours (``relay.py``)."""
        from . import peers, relay
        frames = [bytes(f) for f in frames]
        if head["k"] == Kind.RELAY:
            relay.asked(head, frames, peers.answer_relayed)
        else:
            relay.answered(head, frames)

    def _on_welcome(self, head: dict, frames: list) -> None:
        if head.get("blake3") and fast_digests():
            self.wire.fast_peers.add(PARENT)

    def _take_call(self, head: dict, frames: list) -> None:
        call_id, nf = head["id"], head.get("nf")
        index = self.received  # its place among the calls sent here, as the pool counts them
        self.received += 1
        entry = self._function(head["fn"], frames[0] if nf else None)
        if entry is None:  # cannot happen while both sides mirror the LRU; answer, never hang
            self.post("error", {"id": call_id, "type": "flame.errors.FlameError",
                                "msg": f"runner {self.id} does not hold function {head['fn']}", "tb": ""})
            return
        self.calls.queued(call_id)
        self.inbox.append((call_id, head.get("name", "?"), entry, frames[1 if nf else 0:], head.get("m"), index,
                           "rp" in head))

    def _take_code(self, digest: str, data: Any) -> None:
        """Unpack archive ``digest`` (sent, or already in this host's cache), put it on
        ``sys.path`` in place of the previous one, and drop every module imported from that
        one: the next call imports the new code."""
        from . import boot
        try:
            root = boot.trusted_root()
            path = os.path.join(root, digest)
            if data is not None:
                boot.install(root, digest, data)
            elif not os.path.isdir(path) or boot.untrusted(path) is not None:
                self.post(Kind.CODE_MISSING, {"h": digest})
                return
        except Exception as exc:
            log.warning("flame runner %s: cannot take in code archive %s: %s", self.id, digest[:12], exc)
            self.post("code-missing", {"h": digest})
            return
        old = os.path.join(root, self.code) if self.code else None
        boot.switch(old, path)
        self.code = digest

    def _dispatch(self, item: tuple) -> None:
        if self.concurrency == 1:
            self.busy = True
            try:
                self.execute(*item)
            except KeyboardInterrupt:
                pass  # a stray SIGINT; Calls raises only inside the call a cancel targets
            finally:
                self.busy = False
            if self.shm.frees:
                self._send_frees()
        else:
            self.work_queue.put(item)

    def _function(self, digest: str, payload: Any) -> list | None:
        """The LRU of functions by content hash, in the same order the parent keeps it."""
        fns = self.fns
        if payload is not None:
            entry = fns[digest] = [bytes(payload), None]
            if len(fns) > FN_CACHE_SIZE:
                fns.popitem(last=False)
            return entry
        entry = fns.get(digest)
        if entry is not None:
            fns.move_to_end(digest)
        return entry

    def execute(self, call_id: str, name: str, entry: list, arg_frames: list, shared: list | None = None,
                index: int = 0, reports: bool = False) -> None:
        if self.starts is not None:
            self.starts.started(index)  # before anything of the call runs (its arguments' unpickling too)
        taken = []

        def work() -> Any:
            if entry[1] is None:
                entry[1] = serialize.loads([entry[0]])
            frames = arg_frames
            if shared is not None:  # its large arguments wait in the parent's shared memory
                frames = [*arg_frames, *self.shm.take(shared, self.parent_owner, PARENT)]
                taken.append(True)
            args, kwargs = serialize.loads(frames)
            return entry[1](*args, **kwargs)
        self.calls.execute(call_id, f"{name}()", work, self.post, reports)
        if shared is not None and not taken:  # cancelled before it ran, or its memory unreadable
            self.shm.frees.append((PARENT, shared[1]))

    def _send_frees(self) -> None:
        """Tell the parent which regions of its memory we let go of: at once after a call,
        else at the next flush."""
        self.shm.send_frees(self._send_free)

    def _send_free(self, _peer: str, offset: int) -> None:
        self.post("free", {"at": offset})

    def _pack(self, frames: list) -> tuple[list, dict]:
        """A result's large buffers into our arena, when they are worth it and there is room."""
        frames, ref = self.shm.put(frames, PARENT)
        return (frames, {"m": ref}) if ref is not None else (frames, {})

    def worker(self) -> None:
        while True:
            item = self.work_queue.get()
            try:
                self.execute(*item)
            except KeyboardInterrupt:
                continue  # a stray interrupt; Calls raises only inside the call a cancel targets
            self._send_frees()

    # ---- watch thread ----------------------------------------------------------------
    def watch_loop(self) -> None:
        """Flush output, take in cancels while main is busy, heartbeat, ask the terminator.

        This thread alone heartbeats and runs the terminator: if it fails, the runner exits
        at once, with the traceback in its log (the parent shows it in RunnerDied).
        """
        try:
            next_beat = time.monotonic() + self.heartbeat
            while True:
                time.sleep(FLUSH_INTERVAL)
                if self.busy or self.concurrency > 1:
                    self.take_in()  # the main thread is not looking at the socket: take in cancels
                # The verdict first: leaving must not wait on the socket.
                why = self.terminator.verdict()
                if why is not None:
                    exit_now(why, self.id, parent_gone=why.startswith("parent process"))
                self.calls.flush()
                self._send_frees()
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat
                    if self.load is None:
                        from .stats import Load
                        self.load = Load(self.gpus)
                    objects = sys.modules.get("flame.node.objects")  # imported by the first spawn
                    self.post(Kind.HEARTBEAT, {**self.load.sample(), "held": len(objects.TABLE) if objects else 0})
        except BaseException as exc:  # noqa: BLE001
            log.exception("flame runner %s: its watch thread failed", self.id)
            exit_now(f"its watch thread failed: {type(exc).__name__}: {exc}", self.id, EXIT_BROKEN)


def _give_way(wanting: list) -> None:
    """Sleep until the other threads waiting for the socket had their turn (at most a slice)."""
    until = time.monotonic() + RECV_SLICE
    while wanting and time.monotonic() < until:
        time.sleep(0.0002)


def main() -> None:
    faulthandler.enable()  # a segfault prints its Python traceback into the stderr tail
    if "--stdin" in sys.argv[1:]:
        from .boot import settings_from_stdin
        settings_from_stdin()
        watch_stdin()
    elif os.environ.pop("FLAME_WATCH_STDIN", None):  # the bootstrap read the settings (boot.py)
        watch_stdin()
    env = dict(os.environ)
    for name in ("FLAME_KEY", "FLAME_KEY_FILE"):
        os.environ.pop(name, None)  # user code and its subprocesses never see the key
    capture = Capture(runner=True)
    capture.install()  # from here on, file descriptors 1 and 2 lead to the running call
    faulthandler.enable(file=capture.log_stream)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=capture.log_stream)
    node = RunnerNode(env, capture)
    from . import display
    display.install(display.to_calls(node.capture))
    signal.signal(signal.SIGINT, node.calls.on_sigint)
    signal.signal(signal.SIGTERM, lambda *_: terminated(node.id, node.terminator))
    threading.Thread(target=node.watch_loop, name="flame-node-watch", daemon=True).start()
    if node.concurrency > 1:
        for i in range(node.concurrency):
            threading.Thread(target=node.worker, name=f"flame-node-worker-{i + 1}", daemon=True).start()
    node.main_loop()
    for fn in cleanup:
        fn()
    with node.sock_lock:
        node.sock.close()
    node.ctx.term()
