"""The runner's import hook: the distributions a call imports come from the parent.

First on ``sys.meta_path``, for each top-level module the runner has not imported yet and
that is not in the standard library, it asks the parent which distribution provides it
there (naming the host's version of it, if any, and what the host is: compiled code is sent
only where it fits). The answer is "the host's" (the host has
that version, or it is not installed on the parent) or the distribution's archive, fetched
in parts into this host's code cache, checked, and put first on ``sys.path``; then the usual
finders find the module there. So ``import tqdm`` inside a call works on a host without
tqdm, and a host with another version of a package the parent has uses the parent's.

One round trip per new top-level name, on a socket of its own (identity ``<runner_id>/deps``):
an import can happen on any thread, also inside the handling of a message on the main
socket, where waiting for an answer on that socket would wait forever.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import sys
import threading
import time
from typing import Any

log = logging.getLogger("flame.node.importer")

#: Parts of an archive asked for before the first one arrives (a transfer's window).
WINDOW = 4
#: Seconds without an answer before a fetch is given up (the import then fails).
PATIENCE = 60.0


class Importer:
    """A ``sys.meta_path`` finder that fetches distributions from the pool."""

    def __init__(self, ctx: Any, runner_id: str, address: str, key: bytes, curve_server: str | None,
                 root: str) -> None:
        self.ctx, self.address, self.key, self.curve_server = ctx, address, key, curve_server
        self.ident = f"{runner_id}/deps".encode()
        self.root = root
        self.lock = threading.RLock()
        self.asked: set[str] = set()
        self.sock: Any = None
        self._host: dict | None = None  # top-level module -> {distribution: version}, of this host
        self._facts: dict | None = None  # what this host is (boot.host_facts), for compiled code

    # ---- the finder --------------------------------------------------------------------
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if path is not None or name in self.asked or name in sys.stdlib_module_names or name == "flame":
            return None
        with self.lock:
            if name in self.asked:
                return None
            self.asked.add(name)  # also while we fetch: our own imports do not ask again
            head = self._ask(name)
            if head.get("error"):
                raise ImportError(f"flame: {name}: {head['error']}", name=name)
            got = []
            for dist in head.get("get", ()):
                got.append(self._fetch(dist))
                log.info("flame runner: %s %s from the parent for `import %s`", dist["n"], dist["v"], name)
            if head.get("install"):  # compiled code that does not fit this host: pip (install=True)
                from .boot import pip_install
                pip = [where for where, dist in zip(got, head["get"]) if dist.get("pip")]
                try:
                    got.append(pip_install(self.root, head["install"], pip))
                except RuntimeError as exc:
                    raise ImportError(f"flame: {name}: {exc}", name=name) from None
                got = [g for g in got if g not in pip]
            for where in got:
                if where not in sys.path:
                    sys.path.insert(0, where)
            if got:
                import importlib
                importlib.invalidate_caches()
                for dist in head.get("get", ()):  # this host has it now, at this version
                    self._have(name)[_norm(dist["n"])] = dist["v"]
        return None  # the path finders find it now, here or on the host

    # ---- asking the parent ----------------------------------------------------------------
    def _have(self, name: str) -> dict:
        """This host's versions of the distributions that provide ``name`` (those fetched
        since included): its installed ones read once, at the first import that asks."""
        if self._host is None:
            from importlib import metadata
            by_top: dict = {}
            versions: dict = {}  # each distribution's read once, not once per module it provides
            try:
                for top, dists in metadata.packages_distributions().items():
                    for d in dists:
                        if d not in versions:
                            try:
                                versions[d] = metadata.version(d)
                            except Exception:
                                versions[d] = None
                        if versions[d] is not None:
                            by_top.setdefault(top, {})[_norm(d)] = versions[d]
            except Exception:  # a broken distribution's metadata: ask as if it had none
                pass
            self._host = by_top
        return self._host.setdefault(name, {})

    def _socket(self) -> Any:
        if self.sock is None:
            import zmq
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.ident)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve_server:
                from .boot import curve_client_keys
                public, secret = curve_client_keys(self.key)
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = (
                    self.curve_server.encode(), public, secret)
            sock.connect(self.address)
            self.sock = sock
        return self.sock

    def _request(self, ref: str) -> None:
        from .boot import BOOT, request_mac
        self._socket().send_multipart([BOOT, ref.encode(), request_mac(self.key, self.ident, ref)])

    def _answers(self) -> Any:
        """Answers as they come: (ref, data, rest); StopIteration-free, raises on silence."""
        from .boot import BOOT
        sock = self._socket()
        while True:
            if not sock.poll(int(PATIENCE * 1000)):
                raise ImportError("flame: the parent did not answer the runner's import hook")
            parts = sock.recv_multipart()
            if len(parts) >= 3 and parts[0] == BOOT:
                yield parts[1].decode(), parts[2], parts[3:]

    def _ask(self, name: str) -> dict:
        from .boot import host_facts
        if self._facts is None:
            self._facts = host_facts()
        ref = f"mod:{name} {json.dumps({'have': self._have(name), 'facts': self._facts}, sort_keys=True)}"
        self._request(ref)
        for got, data, rest in self._answers():
            if got != ref:
                continue  # a late part of a fetch given up on
            mac = hmac.new(self.key, b"FLanswer" + ref.encode() + data, "sha256").digest()
            if not rest or not hmac.compare_digest(rest[0], mac):
                raise ImportError(f"flame: an unsigned answer for module {name}", name=name)
            return json.loads(data)
        raise AssertionError("unreachable")

    def _fetch(self, dist: dict) -> str:
        """Archive ``dist`` in this host's cache (fetched in parts if it is not there yet)."""
        from .boot import install, untrusted
        path = os.path.join(self.root, dist["h"])
        why = untrusted(self.root) or untrusted(path)
        if why is not None:
            raise ImportError(f"flame: code cache entry: {why}: refusing to run code from it")
        if os.path.isdir(path):
            return path
        started, n = time.monotonic(), dist["parts"]
        parts: dict[int, bytes] = {}
        asked = 0
        while asked < min(WINDOW, n):
            self._request(f"part:{dist['h']}:{asked}")
            asked += 1
        prefix = f"part:{dist['h']}:"
        for got, data, _ in self._answers():
            if not got.startswith(prefix):
                continue
            parts[int(got[len(prefix):])] = data
            if asked < n:
                self._request(f"{prefix}{asked}")
                asked += 1
            if len(parts) == n:
                break
        data = b"".join(parts[i] for i in range(n))
        if hashlib.sha256(data).hexdigest() != dist["c"]:
            raise ImportError(f"flame: {dist['n']} {dist['v']} arrived corrupted")
        where = install(self.root, dist["h"], data)
        log.info("flame runner: fetched %s %s (%d bytes) in %.2f s", dist["n"], dist["v"], len(data),
                 time.monotonic() - started)
        return where


def _norm(name: str) -> str:
    import re
    return re.sub(r"[-_.]+", "-", name).lower()


def install_hook(node: Any, env: dict) -> Importer:
    """Put the import hook first on ``sys.meta_path`` for runner ``node``."""
    from .boot import trusted_root
    hook = Importer(node.ctx, node.id, node.address, node.peer_key, env.get("FLAME_CURVE_SERVER"), trusted_root())
    sys.meta_path.insert(0, hook)
    return hook
