"""Signed ZeroMQ framing, shared by the parent and the node side.

Every message is ``[signature, header, *frames]``.  ``header`` is compact JSON
(kind, sender, recipient, sequence number, call fields); ``frames`` are pickle-5
payloads and out-of-band buffers.  The signature is HMAC-SHA256 over the header
and every frame, so a tampered buffer is caught as surely as a tampered header:
small frames are MACed directly (length-prefixed), large ones through their
SHA-256 digest so that it can be computed once, outside any lock.  Messages are checked *before* anything is
unpickled: bad signature, wrong recipient, wrong sender or a sequence number not
above the last one seen from that sender are dropped and counted.

This module must stay light: the runner imports it at start.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import struct
from typing import Any, Iterable, Sequence

log = logging.getLogger("flame.wire")

KEY_BYTES = 32
_LEN = struct.Struct("!Q")
#: Frames adding up to less than this are MACed inline; larger ones through their digest.
INLINE_MAX = 64 * 1024


def frames_digest(frames: Iterable[Any], base: Any = None) -> bytes:
    """SHA-256 over the length-prefixed bytes of every frame (bytes, memoryview, zmq.Frame).

    ``base`` is a :func:`frames_hasher` result to continue from, so the digest of a
    large argument can be computed once, outside any lock, and extended later.
    """
    return frames_hasher(frames, base).digest()


def frames_hasher(frames: Iterable[Any], base: Any = None) -> Any:
    """The running SHA-256 behind :func:`frames_digest` (``base`` is copied, not changed)."""
    h = hashlib.sha256() if base is None else base.copy()
    for f in frames:
        view = memoryview(f)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        h.update(_LEN.pack(view.nbytes))
        h.update(view)
    return h


# Plain ints: pyzmq's enum flags cost a Python-level operation each, several per message.
_EVENTS, _POLLIN, _SNDMORE = 15, 1, 2  # zmq.EVENTS, zmq.POLLIN, zmq.SNDMORE (libzmq ABI constants)


def send_parts(sock: Any, parts: Sequence[Any]) -> None:
    """``sock.send_multipart(parts, copy=False)`` without the enum arithmetic."""
    last = len(parts) - 1
    for i, part in enumerate(parts):
        sock.send(part, _SNDMORE if i < last else 0, copy=False)


def recv_ready(sock: Any) -> list:
    """Every complete multipart message waiting on ``sock`` (zmq.Frame parts), without blocking."""
    batch = []
    while sock.getsockopt(_EVENTS) & _POLLIN:
        frame = sock.recv(0, copy=False)
        parts = [frame]
        while frame.more:
            frame = sock.recv(0, copy=False)
            parts.append(frame)
        batch.append(parts)
    return batch


def pending(sock: Any) -> bool:
    """Whether a message is waiting on ``sock``."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def listener(ctx: Any, host: str) -> tuple[Any, bytes | None]:
    """A ROUTER for peers to connect to, and its CurveZMQ public key when ``host`` is not loopback.

    Off loopback the HMAC still authenticates every frame; CURVE encrypts them as well.
    """
    import zmq
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    public = None
    if not is_loopback(host):
        public, secret = zmq.curve_keypair()
        sock.curve_secretkey = secret
        sock.curve_server = True
    return sock, public


def curve_client(sock: Any, server_key: str | bytes | None) -> None:
    """Make ``sock`` a CurveZMQ client of the listener whose public key is ``server_key`` (if any)."""
    if not server_key:
        return
    import zmq
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def _small(frames: Sequence[Any]) -> bool:
    total = 0
    for f in frames:
        total += memoryview(f).nbytes
        if total >= INLINE_MAX:
            return False
    return True


class Wire:
    """Signs outgoing and checks incoming messages for one endpoint named ``me``.

    Not thread-safe: the caller serialises :meth:`encode` (sequence numbers must
    reach the peer in order) and calls :meth:`decode` from one thread.
    """

    def __init__(self, key: bytes, me: str) -> None:
        if not isinstance(key, bytes) or len(key) < KEY_BYTES:
            raise ValueError(f"wire key must be at least {KEY_BYTES} random bytes")
        self._key = key
        self.me = me
        self._seq = 0
        self._last: dict[str, int] = {}
        self.dropped = 0

    def encode(self, kind: str, to: str, fields: dict | None = None,
               frames: Sequence[Any] = (), digest: bytes | None = None) -> list:
        """Build a signed message. ``digest`` may be precomputed with :func:`frames_digest`."""
        self._seq += 1
        head = {"k": kind, "f": self.me, "t": to, "q": self._seq}
        if fields:
            head.update(fields)
        header = json.dumps(head, separators=(",", ":")).encode()
        return [self._sign(header, frames, digest), header, *frames]

    def _sign(self, header: bytes, frames: Sequence[Any], digest: bytes | None = None) -> bytes:
        # One-shot C HMAC; b"i" / b"d" keep the inline and digest encodings apart.
        if _small(frames):  # the verifier decides by size alone, so the signer must too
            body = b"".join(_LEN.pack(len(f)) + bytes(f) for f in frames)
            return hmac.digest(self._key, header + b"i" + body, "sha256")
        return hmac.digest(self._key, header + b"d" + (digest or frames_digest(frames)), "sha256")

    def decode(self, parts: Sequence[Any], peer: str | None = None) -> tuple[dict, list] | None:
        """Check a received message; return ``(header, frames)`` or None when it is dropped.

        ``peer`` is the sender's transport identity when known (a ROUTER's routing id):
        the signed header must name the same sender.
        """
        if len(parts) < 2:
            return self._drop("too few frames")
        sig, header, frames = bytes(parts[0]), bytes(parts[1]), list(parts[2:])
        if not hmac.compare_digest(self._sign(header, frames), sig):
            return self._drop("bad signature")
        try:
            head = json.loads(header)
            sender, seq = head["f"], head["q"]
        except (ValueError, KeyError, TypeError):
            return self._drop("malformed header")
        if head.get("t") != self.me:
            return self._drop(f"addressed to {head.get('t')!r}, not {self.me!r}")
        if peer is not None and sender != peer:
            return self._drop(f"sender {sender!r} arrived on connection {peer!r}")
        if not isinstance(seq, int) or seq <= self._last.get(sender, 0):
            return self._drop(f"replayed or reordered sequence number from {sender!r}")
        self._last[sender] = seq
        return head, frames

    def forget(self, peer: str) -> None:
        """Drop the replay state of a peer that is gone."""
        self._last.pop(peer, None)

    def _drop(self, why: str) -> None:
        self.dropped += 1
        log.warning("flame: dropped a message (%s); %d dropped so far", why, self.dropped)
        return None
