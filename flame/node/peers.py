"""Runners addressing each other: a runner holding values serves copies of them to the other
runners of its pool (``Server``), and a call whose arguments name a value held on another
runner fetches it from there directly (``fetch``), not through the parent.

The same security as the parent's wire: every message is signed with the pool's key, its MAC
checked before anything is unpickled, replays and messages addressed to another refused
(``wire.Wire``); the listener is a Unix socket in a new 0700 directory, so nobody but this
user on this host reaches it. A runner opens its listener when it first holds a value, and
says where it is (``Kind.PEER``) before that value's reply; the others connect lazily, keep at
most MAX_OPEN connections and close those idle for IDLE seconds.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable

from .. import serialize
from ..errors import RunnerDied
from ..wire import Kind, Wire

log = logging.getLogger("flame.node")

#: Most connections to other runners a runner keeps open (the least recently used goes first).
MAX_OPEN = 8
#: Seconds a connection to another runner may stay unused before it is closed.
IDLE = 60.0
#: Seconds a copy may take to arrive before the call fails (its holder dying fails it sooner:
#: the parent interrupts the call).
TIMEOUT = float(os.environ.get("FLAME_PEER_TIMEOUT", "120"))


class _Node:
    """What this runner told us at start (``setup``): its key, id, ZeroMQ context, and how to
    tell its parent where it serves."""
    key: bytes | None = None
    me = ""
    ctx: Any = None
    post: Callable[..., None] | None = None
    server: "Server | None" = None
    client: "Client | None" = None
    lock = threading.Lock()


def setup(key: bytes, me: str, ctx: Any, post: Callable[..., None]) -> None:
    _Node.key, _Node.me, _Node.ctx, _Node.post = key, me, ctx, post


def serving() -> None:
    """This runner holds a value: serve copies to its peers from now on (once)."""
    if _Node.server is not None or _Node.key is None:
        return
    with _Node.lock:
        if _Node.server is None:
            _Node.server = Server(_Node.ctx, _Node.key, _Node.me)
            _Node.post(Kind.PEER, {"address": _Node.server.address})


def close() -> None:
    if _Node.server is not None:
        _Node.server.close()


class Server:
    """A ROUTER in a private directory, answering FETCH with a copy of a held value."""

    def __init__(self, ctx: Any, key: bytes, me: str) -> None:
        import tempfile

        import zmq
        self.dir = tempfile.mkdtemp(prefix="flame-peer-")  # 0700: only this user gets in
        self.address = f"ipc://{self.dir}/s"
        self.wire = Wire(key, me)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self._stop = False
        self.sent = 0  # copies sent (tests check that values went runner to runner)
        threading.Thread(target=self._loop, name="flame-node-peers", daemon=True).start()

    def _loop(self) -> None:
        from . import objects
        sock = self.sock
        while not self._stop:
            try:
                if not sock.poll(200):
                    continue
                ident, *parts = sock.recv_multipart(copy=False)
            except Exception:  # closed at exit
                return
            peer = bytes(ident).decode("utf-8", "replace")
            got = self.wire.decode(parts, peer)
            if got is None or got[0].get("k") != Kind.FETCH:
                continue  # dropped (unsigned, replayed, not for us), quietly: Wire logs it
            head = got[0]
            fields: dict = {"id": head.get("id")}
            frames: list = []
            try:
                frames = serialize.dumps(objects.lookup(head["oid"], tuple(head.get("path") or ())))
            except BaseException as exc:  # noqa: BLE001 - its asker must hear why
                fields["error"] = f"{type(exc).__name__}: {exc}"
                frames = []
            try:
                sock.send_multipart([ident, *self.wire.encode(Kind.VALUE, peer, fields, frames)], copy=False)
                self.sent += "error" not in fields
            except Exception:
                log.warning("flame runner %s: could not send a copy to %s", self.wire.me, peer, exc_info=True)

    def close(self) -> None:
        import shutil
        self._stop = True
        shutil.rmtree(self.dir, ignore_errors=True)


class Client:
    """This runner's connections to its peers, by address."""

    def __init__(self, ctx: Any, key: bytes, me: str) -> None:
        self.ctx, self.me = ctx, me
        self.wire = Wire(key, me)
        self.socks: collections.OrderedDict[str, list] = collections.OrderedDict()  # address -> [sock, last used]
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def _sock(self, address: str) -> Any:
        import zmq
        now = time.monotonic()
        for addr, (sock, used) in list(self.socks.items()):
            if addr != address and (now - used > IDLE or len(self.socks) >= MAX_OPEN):
                sock.close(0)
                del self.socks[addr]
        entry = self.socks.get(address)
        if entry is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.me.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            entry = self.socks[address] = [sock, now]
        entry[1] = now
        self.socks.move_to_end(address)
        return entry[0]

    def fetch(self, address: str, holder: str, oid: int, path: tuple, origin: str) -> Any:
        with self.lock:  # one transfer at a time per runner: the wire's sequence is in order
            sock = self._sock(address)
            request = next(self._ids)
            sock.send_multipart(self.wire.encode(Kind.FETCH, holder, {"id": request, "oid": oid, "path": list(path)}),
                                copy=False)
            deadline = time.monotonic() + TIMEOUT
            while True:
                if sock.poll(100):  # in slices: a cancel (KeyboardInterrupt) lands between them
                    got = self.wire.decode(sock.recv_multipart(copy=False), holder)
                    if got is not None and got[0].get("id") == request:
                        break
                elif time.monotonic() > deadline:
                    sock.close(0)
                    self.socks.pop(address, None)
                    raise RunnerDied(f"runner {holder}, which holds the value from {origin}, did not "
                                     f"send it within {TIMEOUT:g} s", holder)
        head, frames = got
        if "error" in head:
            raise LookupError(f"runner {holder} could not send the value from {origin}: {head['error']}")
        return serialize.loads(frames)


def fetch(address: str, holder: str, oid: int, path: tuple, origin: str) -> Any:
    """A copy of the value ``oid`` (and ``path``) held on runner ``holder``, fetched from it
    directly: how a Remote held elsewhere arrives in a call's arguments here."""
    if _Node.client is None:
        with _Node.lock:
            if _Node.client is None:
                _Node.client = Client(_Node.ctx, _Node.key, _Node.me)
    return _Node.client.fetch(address, holder, oid, path, origin)
