"""Sockets that others may reach: the listeners of pools and served apps, and their peers.

A listener is a ZeroMQ ROUTER. Where only this user can reach it (``ipc://`` in a private
directory) it needs nothing more; where anyone can, CurveZMQ with a ZAP handler admits only
holders of the pool's key, and MAXMSGSIZE caps what a stranger's handshake can make ZeroMQ read
(see flame/pieces.py). Used by both sides, like ``wire``.
"""
from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from .node.boot import curve_client_keys
from .wire import FRAME_MAX, LOG_EVERY, LOG_FIRST

log = logging.getLogger("flame.wire")

#: What CurveZMQ adds to a frame on the wire (a MESSAGE command: name, nonce, box MAC, flags;
#: 33 bytes), which is what MAXMSGSIZE limits; rounded up.
CURVE_OVERHEAD = 256


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def listener(ctx: Any, key: bytes, curve: bool) -> tuple[Any, bytes | None, Any]:
    """A ROUTER for peers to connect to; with ``curve``, its CurveZMQ public key and the ZAP
    handler that admits only peers holding ``key`` (else None, None).

    The HMAC authenticates every frame, but only after ZeroMQ has read the whole frame into
    memory: a listener anyone can reach must refuse strangers in the handshake. CURVE with ZAP
    does (a peer's key pair is derived from ``key``: :func:`~flame.node.boot.curve_client_keys`),
    and encrypts as well; and a stranger's frames are limited to FRAME_MAX. Where only this
    user can reach the socket (``ipc://`` in a private directory) neither is needed.
    """
    import zmq
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    if not curve:
        return sock, None, None
    # A stranger's frame is read whole before the handshake refuses it: ZeroMQ hangs up at a
    # larger one (see pieces), and peers that hold the key cut theirs (Wire's ``cut``).
    sock.setsockopt(zmq.MAXMSGSIZE, FRAME_MAX + CURVE_OVERHEAD)
    from zmq.auth.thread import ThreadAuthenticator
    allowed = curve_client_keys(key)[0]
    # Started before the socket binds: a handshake with no ZAP handler to ask passes.
    gate = ThreadAuthenticator(ctx, log=logging.getLogger("flame.zap"))
    gate.start()
    gate.configure_curve_callback("*", _Allow(allowed))
    public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_server = True
    return sock, public, gate


class _Allow:
    """ZAP's answer: only the one public key of the pool's peers."""

    def __init__(self, public: bytes) -> None:
        self.public = public
        self.refused = 0
        self._logged = 0.0

    def callback(self, domain: str, key: bytes) -> bool:
        if hmac.compare_digest(key, self.public):
            return True
        # Logged quietly, like dropped messages: whoever can reach the socket can knock.
        self.refused += 1
        now = time.monotonic()
        if self.refused <= LOG_FIRST or now - self._logged >= LOG_EVERY:
            self._logged = now
            log.warning("flame: refused a peer without the pool's key in the CurveZMQ handshake; "
                        "%d refused so far", self.refused)
        return False


def curve_client(sock: Any, server_key: str | bytes | None, key: bytes) -> None:
    """Make ``sock`` a CurveZMQ client, holding ``key``, of the listener whose public key is
    ``server_key`` (if any)."""
    if not server_key:
        return
    public, secret = curve_client_keys(key)
    sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret
