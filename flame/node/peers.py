"""Runners addressing each other: a runner holding values serves them to other runners
(``Server``): copies (a call whose arguments name a value held elsewhere fetches it from its
holder directly, not through the parent), and operations through handles (``flame.ref``:
a Remote inside a call on another runner, whose operations run on the holder, sent from the
calling runner). Handles keep their values alive on the holder (``objects.OWNERS``).

The same security as the parent's wire: every message is signed (its MAC checked before
anything is unpickled, replays and messages addressed to another refused: ``wire.Wire``),
with the peer key of the holder's pool (``peer_key``: derived from the pool's key, so it lets
a runner ask that pool's runners for values, not speak for it to its parent). The listener is
a Unix socket in a new 0700 directory, so nobody but this user on this host reaches it; or,
where the backend says how runners on other hosts reach this one (``peer_host``, as
FLAME_PEER_HOST), TCP with CurveZMQ and ZAP (``listen.listener``): only holders of the peer
key get through the handshake, and its address carries the listener's public key
(``tcp://host:port#key``). A runner opens its listener when it first holds a value, and says
where it is (``Kind.PEER``) before that value's reply; others connect lazily, keep at most
MAX_OPEN connections and close those idle for IDLE seconds.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import logging
import os
import threading
import time
from typing import Any, Callable

from .. import serialize
from ..errors import RunnerDied
from ..wire import Kind, Wire, fast_digests
from .terminator import alive

log = logging.getLogger("flame.node")

#: Most connections to other runners a runner keeps open (the least recently used goes first).
MAX_OPEN = 8
#: Seconds a connection to another runner may stay unused before it is closed.
IDLE = 60.0
#: Seconds an answer may take before the call fails (a holder that dies fails it sooner: its
#: pool says so, ``gone``).
TIMEOUT = float(os.environ.get("FLAME_PEER_TIMEOUT", "120"))
#: Seconds between two batches of handle releases sent to holders.
RELEASE_EVERY = 0.5
#: The address of a holder this runner cannot reach (a Unix socket on another host): its
#: requests go through the parent (``node/relay.py``).
RELAY = "relay"


def peer_key(pool_key: bytes) -> bytes:
    """The key of the peer channel of a pool's runners, derived from the pool's key."""
    return hmac.new(pool_key, b"flame peers", hashlib.sha256).digest()


class _Node:
    """This runner's key, id, context and parent channel (``configure``)."""
    key: bytes | None = None  # its pool's peer key
    me = ""
    address = ""  # where it connects to its parent
    ctx: Any = None
    post: Callable[..., None] | None = None
    server: "Server | None" = None
    client: "Client | None" = None
    handles: "Handles | None" = None
    gone: set = set()  # runners its pool said are gone
    lock = threading.Lock()


def configure() -> bool:
    """Take this runner's settings from its node (``flame.node.this_runner``), once; False
    outside a runner (a served app holds no values for peers)."""
    if _Node.key is None:
        import sys
        node = getattr(sys.modules.get("flame.node"), "this_runner", None)
        if node is None:
            return False
        _Node.key, _Node.me, _Node.ctx, _Node.post = peer_key(node.peer_key), node.id, node.ctx, node.post
        _Node.address = node.address
    return True


def serving() -> None:
    """This runner holds a value: serve it to its peers from now on (once)."""
    if _Node.server is not None or not configure():
        return
    with _Node.lock:
        if _Node.server is None:
            _Node.server = Server(_Node.ctx, _Node.key, _Node.me, os.environ.get("FLAME_PEER_HOST", ""))
            _Node.post(Kind.PEER, {"address": _Node.server.address})
            from .terminator import cleanup
            cleanup.append(close)


def gone(runner_id: str) -> None:
    """Runner ``runner_id`` of this pool is gone: what it kept here goes, and asking it fails."""
    from . import objects
    _Node.gone.add(runner_id)
    objects.drop_owner(runner_id)


def close() -> None:
    if _Node.server is not None:
        _Node.server.close()


class Server:
    """A ROUTER in a private directory: FETCH with ``oid`` answers with a copy of a held value,
    FETCH with frames runs ``fn(*args)`` from them here (an operation through a handle) for
    the asker, whose the values it makes are."""

    def __init__(self, ctx: Any, key: bytes, me: str, host: str = "") -> None:
        import tempfile

        import zmq
        self.dir = self.gate = None
        if host:  # reachable from other hosts: CurveZMQ, and ZAP admits only the peer key
            from ..listen import listener
            self.sock, public, self.gate = listener(ctx, key, curve=True)
            self.sock.bind(f"tcp://{'0.0.0.0' if host == '*' else host}:*")
            port = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
            name = _host_name() if host == "*" else host
            self.address = f"tcp://{name}:{port}#{public.decode()}"
        else:
            # 0700: only this user gets in. Inside the private directory of its connection to
            # its parent where it has one (the pool's, or an SSH tunnel's), which goes with the
            # pool or the SSH connection: a killed runner leaves nothing behind for long.
            self.dir = tempfile.mkdtemp(prefix="flame-peer-", dir=_private_dir(_Node.address))
            self.address = f"ipc://{self.dir}/s"
            self.sock = ctx.socket(zmq.ROUTER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.bind(self.address)
        self.wire = Wire(key, me)
        self._stop = False
        self.sent = 0  # copies and answers sent (tests check that values went runner to runner)
        threading.Thread(target=self._loop, name="flame-node-peers", daemon=True).start()

    def _loop(self) -> None:
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
            head, frames = got
            if head.get("b3") and fast_digests():  # large answers digested with BLAKE3, as with the parent
                self.wire.fast_peers.add(peer)
            fields, out = reply(peer, head, frames)
            try:
                sock.send_multipart([ident, *self.wire.encode(Kind.VALUE, peer, fields, out)], copy=False)
                self.sent += "error" not in fields
            except Exception:
                log.warning("flame runner %s: could not answer %s", self.wire.me, peer, exc_info=True)

    def close(self) -> None:
        import shutil
        self._stop = True
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self.gate is not None:
            self.gate.stop()


def reply(peer: str, head: dict, frames: list) -> tuple[dict, list]:
    """The answer to runner ``peer``'s FETCH (here or relayed): its fields and frames."""
    fields: dict = {"id": head.get("id")}
    try:
        out = serialize.dumps(_answer(peer, head, frames))
    except BaseException as exc:  # noqa: BLE001 - its asker must hear why
        fields["error"] = f"{type(exc).__name__}: {exc}"
        fields["type"] = type(exc).__name__
        try:  # the exception itself where it pickles: the asker raises the same type
            exc.__traceback__ = None
            out = serialize.dumps(exc)
        except BaseException:  # noqa: BLE001
            out = []
    return fields, out


def answer_relayed(head: dict, frames: list) -> None:
    """A FETCH relayed to this holder through the parent (``relay.py``): answered the same
    way, if its asker holds this pool's peer key, back the same way."""
    from . import relay
    asker, request = head.get("from", "?"), head.get("id")
    if not configure() or not hmac.compare_digest(str(head.get("mac", "")), relay.mac(_Node.key, request, _Node.me)):
        fields, out = {"id": (head.get("req") or {}).get("id"), "error": "not signed with this pool's peer key",
                       "type": "PermissionError"}, []
    else:
        fields, out = reply(asker, head.get("req") or {}, frames)
    _Node.post(Kind.RELAYED, {"id": request, "to": asker, "req": fields}, out)


def _answer(peer: str, head: dict, frames: list) -> Any:
    from . import objects
    if not frames:
        return objects.lookup(head["oid"], tuple(head.get("path") or ()))
    fn, args = serialize.loads(frames)
    objects.current.owner = peer  # what it makes is the asker's to keep (its handles)
    try:
        return fn(*args)
    finally:
        objects.current.owner = "parent"


def _private_dir(address: str) -> str | None:
    """The directory of Unix socket ``address`` if it is this user's own and nobody else's
    (0700, not a symlink), else None."""
    import stat
    if not address.startswith("ipc://"):
        return None
    where = os.path.dirname(address.removeprefix("ipc://"))
    try:
        st = os.lstat(where)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077:
        return where
    return None


def _host_name() -> str:
    import socket
    return socket.getfqdn()


class Client:
    """This runner's connections to other runners, by address."""

    def __init__(self, ctx: Any, me: str) -> None:
        self.ctx, self.me = ctx, me
        self.wires: dict[tuple, Wire] = {}  # (peer key, over TCP) -> its wire (holders of other pools too)
        self.socks: collections.OrderedDict[str, list] = collections.OrderedDict()  # address -> [sock, last used]
        self.lock = threading.Lock()
        self._ids = itertools.count(1)

    def _sock(self, address: str, key: bytes) -> Any:
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
            where, _, server_key = address.partition("#")
            if server_key:  # a TCP listener: CurveZMQ, with the keys the peer key gives
                from ..listen import curve_client
                curve_client(sock, server_key, key)
            sock.connect(where)
            entry = self.socks[address] = [sock, now]
        entry[1] = now
        self.socks.move_to_end(address)
        return entry[0]

    def ask(self, address: str, holder: str, key: bytes, fields: dict, frames: list, origin: str,
            pid: int | None = None) -> Any:
        """Ask ``holder`` (at ``address``, on the peer channel ``key``; process ``pid`` on this
        host, watched while it answers); its answer, unpickled."""
        if holder in _Node.gone:
            raise RunnerDied(f"runner {holder} is gone, and with it the value from {origin}", holder)
        if address == RELAY:  # a holder this runner cannot reach: through the parent
            from . import relay
            request = next(self._ids)
            fields = {"id": request, **fields}
            return _opened(*relay.ask(_Node.post, _Node.gone, TIMEOUT, holder, key, fields, frames, origin),
                           holder, origin)
        with self.lock:  # one request at a time per runner: each wire's sequence stays in order
            tcp = "#" in address  # a listener that takes no frame over FRAME_MAX: cut larger ones
            wire = self.wires.get((key, tcp))
            if wire is None:
                wire = self.wires[(key, tcp)] = Wire(key, self.me, cut=tcp)
            sock = self._sock(address, key)
            request = next(self._ids)
            fields = {"id": request, "b3": 1, **fields} if fast_digests() else {"id": request, **fields}
            sock.send_multipart(wire.encode(Kind.FETCH, holder, fields, frames), copy=False)
            deadline = time.monotonic() + TIMEOUT
            while True:
                if sock.poll(100):  # in slices: a cancel (KeyboardInterrupt) lands between them
                    got = wire.decode(sock.recv_multipart(copy=False), holder)
                    if got is not None and got[0].get("id") == request:
                        break
                elif holder in _Node.gone or (pid and not alive(pid)) or time.monotonic() > deadline:
                    sock.close(0)
                    self.socks.pop(address, None)
                    why = (f"did not answer within {TIMEOUT:g} s" if time.monotonic() > deadline else "is gone")
                    raise RunnerDied(f"runner {holder}, which holds the value from {origin}, {why}", holder)
        return _opened(*got, holder, origin)


def _opened(head: dict, frames: list, holder: str, origin: str) -> Any:
    """A holder's answer: its value, or its error raised."""
    if "error" in head:
        if head.get("type") == "LookupError":
            raise LookupError(f"runner {holder} no longer holds the value from {origin}: {head['error']}")
        if head.get("type") == "RunnerDied":
            raise RunnerDied(f"runner {holder}, which holds the value from {origin}, is gone", holder)
        if frames:
            raise serialize.loads(frames)
        from ..errors import RemoteError
        raise RemoteError(head.get("type", "Exception"),
                          f"on runner {holder}, for the value from {origin}: {head['error']}")
    return serialize.loads(frames)


def _client() -> Client:
    if _Node.client is None:
        if not configure():
            raise RuntimeError("runner-to-runner requests are made only on a pool's runners")
        with _Node.lock:
            if _Node.client is None:
                _Node.client = Client(_Node.ctx, _Node.me)
    return _Node.client


def fetch(address: str, holder: str, oid: int, path: tuple, origin: str, key: bytes,
          pid: int | None = None) -> Any:
    """A copy of the value ``oid`` (and ``path``) held on runner ``holder``, fetched from it
    directly: how a Remote held elsewhere arrives in a call's arguments here."""
    return _client().ask(address, holder, key, {"oid": oid, "path": list(path)}, [], origin, pid)


def handle(address: str, holder: str, oid: int, path: tuple, origin: str, nbytes: int, key: bytes,
           pid: int | None = None) -> Any:
    """A handle (``flame.ref``) arriving here: a Remote whose operations run on ``holder``,
    sent from here; the value stays there while this Remote (or one made from it) lives."""
    from . import objects
    if not configure():
        raise RuntimeError("a handle (flame.ref) is used only on a pool's runners")
    side = _handles()
    side.peers[holder] = (address, key, pid)
    side.ask(holder, objects.pin, (oid, _Node.me), origin)
    return side.remote_at(holder, oid, origin, nbytes, tuple(path))


def _handles() -> "Handles":
    if _Node.handles is None:
        with _Node.lock:
            if _Node.handles is None:
                _Node.handles = Handles()
    return _Node.handles


class _Answer:
    """What an operation through a handle waits on (``Remote._call`` calls ``result``)."""

    __slots__ = ("side", "held", "fn", "args")

    def __init__(self, side: "Handles", held: Any, fn: Any, args: tuple) -> None:
        self.side, self.held, self.fn, self.args = side, held, fn, args

    def result(self, timeout: float | None = None) -> Any:
        return self.side.ask(self.held.runner_id, self.fn, self.args, self.held.origin)


class Handles:
    """This runner's handles (Remotes of values held on other runners): the "pool" their
    ``_Held`` names, as a pool is for the parent's Remotes. Operations go to the holder;
    releases go there in batches, every RELEASE_EVERY seconds."""

    name = "handles"
    closed = False

    def __init__(self) -> None:
        self._holdings = self  # a Remote asks its pool's holdings; here they are one
        self.peers: dict[str, tuple] = {}  # holder -> (address, peer key, pid)
        self.releases: list = []
        threading.Thread(target=self._release_loop, name="flame-node-handles", daemon=True).start()

    def ask(self, holder: str, fn: Any, args: tuple, origin: str) -> Any:
        from ..remote import _sending
        address, key, pid = self.peers[holder]
        before = (getattr(_sending, "runner", None), getattr(_sending, "pool", None), getattr(_sending, "uses", None))
        _sending.runner, _sending.pool, _sending.uses = holder, self, []
        try:  # Remotes among the arguments: those held there as references, the others as copies
            frames = serialize.dumps((fn, args))
        finally:
            _sending.runner, _sending.pool, _sending.uses = before
        return _client().ask(address, holder, key, {}, frames, origin, pid)

    # ---- what a Remote asks of its pool's holdings ------------------------------------
    def on_holder(self, held: Any, fn: Any, args: tuple, arg_frames: list | None = None) -> _Answer:
        return _Answer(self, held, fn, args)

    def remote(self, runner_id: str, ref: tuple, origin: Any) -> Any:
        return self.remote_at(runner_id, ref[0], origin, ref[1])

    def remote_at(self, runner_id: str, oid: int, origin: Any, nbytes: int, path: tuple = ()) -> Any:
        from ..remote import Remote, _Held
        return Remote(_Held(self, runner_id, oid, origin, nbytes), path)

    def release(self, runner_id: str, oid: int) -> None:
        self.releases.append((runner_id, oid))

    def copy(self, held: Any, path: tuple, target: str, pool: Any, uses: list) -> tuple:
        """A handle of this runner in the arguments of an operation on another handle: its
        value travels from its holder to the one asked, directly."""
        address, key, pid = self.peers[held.runner_id]
        uses.append(held)
        return fetch, (address, held.runner_id, held.oid, path, held.origin, key, pid)

    def token(self, held: Any, path: tuple) -> tuple:
        """A handle of this runner in what it sends its pool (a result): the pool keeps the
        value from now on (pinned for it before this returns), and gets a Remote of it."""
        from . import objects
        self.ask(held.runner_id, objects.pin, (held.oid, "parent"), held.origin)
        from ..remote import _received
        return _received, (held.runner_id, held.oid, path, held.origin, held.nbytes)

    def _release_loop(self) -> None:
        from . import objects
        while True:
            time.sleep(RELEASE_EVERY)
            if not self.releases:
                continue
            releases, self.releases = self.releases, []
            by_holder: dict[str, list] = {}
            for holder, oid in releases:
                by_holder.setdefault(holder, []).append(oid)
            for holder, ids in by_holder.items():
                if holder in _Node.gone:
                    continue
                try:
                    self.ask(holder, objects.release, (ids, _Node.me), "its handles")
                except Exception as exc:
                    log.debug("flame: releasing handles on %s failed: %s", holder, exc)
