"""Signed ZeroMQ framing, shared by the parent and the node side.

Every message is one signed ZeroMQ frame holding a header (kind, sender, recipient,
sequence number, call fields) and the small payload frames, followed by large buffers
as frames of their own (see :class:`Wire`).  The signature is HMAC-SHA256 over the
header and every frame, so a tampered buffer is caught as surely as a tampered
header: small frames are MACed directly, large ones through their SHA-256 digest so
that it can be computed once, outside any lock.  Messages are checked *before*
anything is unpickled, the header included: bad signature, wrong recipient, wrong
sender or a sequence number not above the last one seen from that sender are
dropped and counted.

This module must stay light: the runner imports it at start.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import struct
import time
from typing import Any, Iterable, Sequence

from .keys import KEY_BYTES

#: The largest frame a CurveZMQ listener accepts (its ``MAXMSGSIZE``, with CURVE_OVERHEAD), and
#: so the largest one a ``Wire(cut=True)`` sends: larger ones travel in pieces (flame/pieces.py).
FRAME_MAX = 1 << 20

log = logging.getLogger("flame.wire")

_LEN = struct.Struct("!Q")

class Kind:
    """THE table of message kinds. Each is a short string on the wire (the header's ``"k"``);
    each line says what it carries, and who sends it to whom. Parent: a pool; runner: a node
    a pool booted; app: a served app (``flame.serve``); client: a notebook attached to one."""

    HELLO = "hello"        #: runner -> parent, client -> app: who I am (introduction(), gpus, cache)
    WELCOME = "welcome"    #: parent -> runner, app -> client: who I am, in answer to a hello
    HEARTBEAT = "heartbeat"  #: parent -> runner, app -> client: I am alive (every HEARTBEAT)
    SHUTDOWN = "shutdown"  #: parent -> runner: finish and exit
    CALL = "call"          #: parent -> runner, client -> app: one call (id, function hash, arguments)
    CALLS = "calls"        #: parent -> runner: several inline calls in one message ("c": their heads)
    RUN = "run"            #: client -> app: a cell's code to run in the app's namespace
    CANCEL = "cancel"      #: parent -> runner, client -> app: interrupt the call with this id
    RESULT = "result"      #: runner -> parent, app -> client: a call's pickled value
    ERROR = "error"        #: runner -> parent, app -> client: a call's exception and traceback
    STREAM = "stream"      #: runner -> parent, app -> client: a call's stdout/stderr text
    DISPLAY = "display"    #: runner -> parent, app -> client: a call's rich display message (JSON)
    REPORT = "report"      #: runner -> parent, app -> client: numbers a call reported (flame.report; JSON)
    COMPLETE = "complete"  #: parent -> runner, client -> app: completion request (id, code, cursor)
    INSPECT = "inspect"    #: parent -> runner, client -> app: inspection request (id, code, cursor)
    REPLY = "reply"        #: runner -> parent, app -> client: the answer to a complete/inspect
    CODE = "code"          #: parent -> runner: a new local-code archive (or its name, if cached)
    CODE_MISSING = "code-missing"  #: runner -> parent: the archive named is not in my cache
    RELEASE = "release"    #: parent -> runner: drop these held values (Remotes gone)
    FREE = "free"          #: either way: a region of your shared-memory arena I no longer read
    PEER = "peer"          #: runner -> parent: where I serve copies of my values to the pool's runners
    FETCH = "fetch"        #: runner -> runner: a copy of this value you hold, please (id, oid, path)
    VALUE = "value"        #: runner -> runner: the copy asked for (pickled), or why not ("error")
    PEER_GONE = "peer-gone"  #: parent -> runner: runner "id" is gone (its handles and pins with it)
    RELAY = "relay"        #: runner -> parent -> runner "to": a FETCH for a holder it cannot reach ("req", "mac")
    RELAYED = "relayed"    #: holder -> parent -> runner "to": the VALUE of a relayed FETCH ("req")

    #: app -> client, unsigned, once: your key is wrong (the whole frame, not a signed message)
    REFUSED = b'{"k":"refused"}'

    ALL = frozenset(v for k, v in vars().items() if k.isupper() and isinstance(v, str))


class WakePipe:
    """A pipe that wakes a thread polling it. Another thread's socket operation may consume
    the edge of a ZeroMQ descriptor that a poller waits for, so that thread writes here too.
    Both ends are non-blocking: a full pipe means a wake-up is due anyway."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except OSError:  # full (a wake-up is due), or closed by a shutdown meanwhile
            pass

    def drain(self) -> None:
        """Take the wake-ups written so far (after the poll that saw them)."""
        try:
            os.read(self.r, 65536)
        except OSError:  # empty, or closed by a shutdown meanwhile
            pass

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


#: How often a parent (and a served app) sends HEARTBEAT to its peers, in seconds.
HEARTBEAT = 1.0
#: How long output may sit in a call's buffer before it is sent (runner and served app).
#: Livebook uses 50 ms; shorter keeps progress bars lively, longer batches tight print loops better.
FLUSH_INTERVAL = 0.02

#: Functions a runner keeps by content hash. Both sides keep the same LRU, updated in the
#: same order, so the parent knows which functions a runner holds without asking.
FN_CACHE_SIZE = 256
#: Frames smaller than this ride inline in the signed first frame; larger ones go out of band.
INLINE_MAX = 64 * 1024


#: Frames at least this large are hashed in chunks, on several threads at once.
PARALLEL_MIN = 8 * 1024 * 1024
_CHUNK = 2 * 1024 * 1024
_THREADS = max(1, min(8, os.cpu_count() or 1))


_blake3: Any = False  # the blake3 module, None if not installed; imported at the first large frame
_has_blake3: bool | None = None


def fast_digests() -> bool:
    """Whether this process can digest frames with BLAKE3 (the ``blake3`` package). Looked up
    without importing it: the import costs 5 ms, and most runners never see a large frame."""
    global _has_blake3
    if _has_blake3 is None:
        import importlib.util
        try:
            _has_blake3 = importlib.util.find_spec("blake3") is not None
        except ImportError:  # a runner's import hook could not bring it (deps: another platform)
            _has_blake3 = False
    return _has_blake3


def _load_blake3() -> Any:
    global _blake3
    if _blake3 is False:
        try:
            import blake3
            _blake3 = blake3
        except ImportError:
            _blake3 = None
    return _blake3


def frames_digest(frames: Iterable[Any], fast: bool = False) -> bytes:
    """A digest of each frame's length and bytes (bytes, memoryview, zmq.Frame).

    ``fast``: BLAKE3, on every core (measured here: 100 MB in about 20 ms, against 70 ms
    for SHA-256 split across threads). Otherwise SHA-256, for peers without the blake3
    package: a frame of PARALLEL_MIN bytes or more contributes the SHA-256 of each of its
    chunks, hashed on several threads (hashlib releases the GIL).
    """
    b3mod = _load_blake3() if fast else None
    if b3mod is not None:
        b3 = b3mod.blake3(max_threads=b3mod.blake3.AUTO)
        for f in frames:
            view = memoryview(f)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            b3.update(_LEN.pack(view.nbytes))
            b3.update(view)
        return b3.digest()
    h = hashlib.sha256()
    for f in frames:
        view = memoryview(f)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        h.update(_LEN.pack(view.nbytes))
        h.update(view if view.nbytes < PARALLEL_MIN else _chunk_digests(view))
    return h.digest()


_hashers: Any = None


def _chunk_digests(view: memoryview) -> bytes:
    global _hashers
    if _hashers is None:  # made at the first large frame: most processes never need it
        from concurrent.futures import ThreadPoolExecutor
        _hashers = ThreadPoolExecutor(_THREADS, thread_name_prefix="flame-hash")
    chunks = [view[i:i + _CHUNK] for i in range(0, view.nbytes, _CHUNK)]
    return b"".join(_hashers.map(lambda c: hashlib.sha256(c).digest(), chunks))


# Plain ints: pyzmq's enum flags cost a Python-level operation each, several per message; and
# ``Socket.get`` skips the Python-level ``getsockopt`` wrapper (1 us of 3 per call, measured).
_EVENTS, _POLLIN, _SNDMORE = 15, 1, 2  # zmq.EVENTS, zmq.POLLIN, zmq.SNDMORE (libzmq ABI constants)


_send: Any = None  # pyzmq's backend Socket.send, bound at the first message (zmq loads lazily here)


def send_parts(sock: Any, parts: Sequence[Any]) -> None:
    """``sock.send_multipart(parts, copy=False)`` without the enum arithmetic, and through the
    backend's ``send``: ``zmq.Socket.send`` wraps it for DRAFT options, 0.45 us a frame."""
    global _send
    send = _send
    if send is None:
        import zmq.backend
        send = _send = zmq.backend.Socket.send
    last = len(parts) - 1
    for i, part in enumerate(parts):
        send(sock, part, _SNDMORE if i < last else 0, False)


def recv_ready(sock: Any, most: int = -1) -> list:
    """Every complete multipart message waiting on ``sock`` (zmq.Frame parts), without blocking;
    at most ``most`` of them if given."""
    batch = []
    while most and sock.get(_EVENTS) & _POLLIN:
        most -= 1
        frame = sock.recv(0, copy=False)
        parts = [frame]
        while frame.more:
            frame = sock.recv(0, copy=False)
            parts.append(frame)
        batch.append(parts)
    return batch


def pending(sock: Any) -> bool:
    """Whether a message is waiting on ``sock``."""
    return bool(sock.get(_EVENTS) & _POLLIN)


def split(frames: Sequence[Any]) -> int:
    """How many leading ``frames`` travel inside the signed first frame; the rest go out of band.

    Frames under INLINE_MAX ride inline until the first large one, so a pickle and its
    small companions cost one ZeroMQ frame while large buffers are never copied.
    """
    for i, f in enumerate(frames):
        if (len(f) if type(f) is bytes else memoryview(f).nbytes) >= INLINE_MAX:
            return i
    return len(frames)


def out_of_band_digest(frames: Sequence[Any], fast: bool = False) -> tuple | None:
    """``(fast, digest)`` of the frames that :func:`split` sends out of band, or None if none.

    Computed once, outside locks, for a large argument; pass it to :meth:`Wire.encode`.
    """
    k = split(frames)
    return (fast, frames_digest(frames[k:], fast)) if k < len(frames) else None


_HEAD = struct.Struct("!I")
_pack, _unpack_from = _HEAD.pack, _HEAD.unpack_from
_dumps, _loads = pickle.dumps, pickle.loads
#: Starts every message: a peer running another flamebook version is named as such, not as a forger.
MAGIC = b"FL\x02"
#: The same format, its out-of-band frames digested with BLAKE3 rather than SHA-256.
MAGIC_FAST = b"FL\x03"
#: Starts the map of a message whose frames travel in pieces (flame/pieces.py).
MAGIC_PIECES = b"FL\x7f"
_SIG = len(MAGIC) + 32  # then HMAC-SHA256


def _cut(msg: list) -> list:
    """``msg`` as a Wire(cut=True) sends it: whole, or its map and pieces (flame/pieces.py)."""
    from .pieces import cut
    made = cut(msg, FRAME_MAX)
    return msg if made is None else [MAGIC_PIECES + made[0], *made[1]]


class Wire:
    """Signs outgoing and checks incoming messages for one endpoint named ``me``.

    A message is ``[first, *out_of_band]``.  ``first`` is MAGIC (the format's version),
    the signature (32 bytes), then the header's length and the header (a pickled dict, loaded only once the signature is
    checked), then each inline frame with its length.  The signature is HMAC-SHA256 over
    everything in ``first`` after it, followed, when there are out-of-band frames, by their
    SHA-256 digest; the header counts them ("o"), so none can be dropped or added.

    Not thread-safe: the caller serialises :meth:`encode` (sequence numbers must
    reach the peer in order) and calls :meth:`decode` from one thread.
    """

    def __init__(self, key: bytes, me: str, cut: bool = False) -> None:
        if not isinstance(key, bytes) or len(key) < KEY_BYTES:
            raise ValueError(f"wire key must be at least {KEY_BYTES} random bytes")
        # Keyed once; each message copies the keyed state instead of setting up a new HMAC
        # (about twice as fast for the small messages of the per-call path). The state is
        # OpenSSL's HMAC object where the stdlib wraps one: its copy/update/digest are C calls,
        # about 1 us less per message here than the Python wrapper's (measured, Python 3.11).
        keyed = hmac.new(key, digestmod="sha256")
        self._hmac = getattr(keyed, "_hmac", None) or keyed
        self.me = me
        #: whether what it sends goes to a listener that takes no frame over FRAME_MAX (one
        #: that others can reach: see :func:`listener`); a larger one is cut into pieces
        self.cut = cut
        self._seq = 0
        self._last: dict[str, int] = {}
        self.dropped = 0
        #: why the last message from each named peer was dropped, for error messages
        self.refused: dict[str, str] = {}
        self._quiet: dict[str, list] = {}  # peer -> [dropped since last logged, when logged]
        #: peers that said they digest with BLAKE3 too (hello/welcome): large frames to them are
        #: digested with it
        self.fast_peers: set[str] = set()

    def encode(self, kind: str, to: str, fields: dict | None = None,
               frames: Sequence[Any] = (), digest: tuple | None = None) -> list:
        """Build a signed message.

        ``digest`` is the out-of-band frames' ``(fast, digest)`` when precomputed
        (:func:`out_of_band_digest`); one of the wrong kind for ``to`` is computed again.
        """
        self._seq += 1
        head = {"k": kind, "f": self.me, "t": to, "q": self._seq}
        if fields:
            head.update(fields)
        k = split(frames) if frames else 0
        if k < len(frames):
            head["o"] = len(frames) - k
        header = _dumps(head, 5)
        if k:
            body = [_pack(len(header)), header]
            for f in frames[:k]:
                body.append(_pack(len(f) if type(f) is bytes else memoryview(f).nbytes))
                body.append(f)
            signed = b"".join(body)
        else:
            signed = _pack(len(header)) + header
        mac = self._hmac.copy()
        mac.update(signed)
        if k == len(frames):
            first = MAGIC + mac.digest() + signed
            return _cut([first]) if self.cut and len(first) > FRAME_MAX else [first]
        oob = frames[k:]
        fast = to in self.fast_peers
        if digest is None or digest[0] != fast:
            digest = (fast, frames_digest(oob, fast))
        mac.update(digest[1])
        msg = [(MAGIC_FAST if fast else MAGIC) + mac.digest() + signed, *oob]
        return _cut(msg) if self.cut else msg

    def _mac(self, *data: Any) -> bytes:
        mac = self._hmac.copy()
        for d in data:
            mac.update(d)
        return mac.digest()

    def decode(self, parts: Sequence[Any], peer: str | None = None) -> tuple[dict, list] | None:
        """Check a received message; return ``(header, frames)`` or None when it is dropped.

        ``peer`` is the sender's transport identity when known (a ROUTER's routing id):
        the signed header must name the same sender.  Inline frames come back as
        memoryviews of the first frame, out-of-band ones as received.
        """
        if not parts:
            return self._drop("no frames", peer)
        first = memoryview(parts[0])
        magic = first[:3]
        fast = magic != MAGIC  # one comparison for the common case
        if fast and magic == MAGIC_PIECES:
            from .pieces import join
            parts = join(first[3:], parts[1:])
            if parts is None or memoryview(parts[0])[:3] == MAGIC_PIECES:
                return self._drop("malformed map of pieces", peer)
            first = memoryview(parts[0])
            magic = first[:3]
            fast = magic != MAGIC
        if fast and magic != MAGIC_FAST:
            return self._drop("not flamebook's wire format, or another version of it: is the same "
                              "flamebook installed on both sides?", peer)
        n = len(parts)
        if fast and n > 1 and not fast_digests():
            return self._drop("large frames digested with BLAKE3, and blake3 is not installed here", peer)
        size = first.nbytes - _SIG
        if size < 4:
            return self._drop("too short", peer)
        signed = first[_SIG:]
        mac = self._hmac.copy()
        mac.update(signed)
        if n > 1:
            mac.update(frames_digest(parts[1:], fast))
        if not hmac.compare_digest(mac.digest(), first[3:_SIG]):
            return self._drop("bad signature", peer)
        try:
            end = 4 + _unpack_from(signed)[0]
            head = _loads(signed[4:end])  # signed by a holder of the key
            sender, seq = head["f"], head["q"]
            frames: list = []
            while end < size:
                start = end + 4
                end = start + _unpack_from(signed, end)[0]
                if end > size:
                    raise ValueError("frame past the end")
                frames.append(signed[start:end])
            if head.pop("o", 0) != n - 1:
                raise ValueError("out-of-band frame count")
        except Exception:
            return self._drop("malformed message", peer)
        if n > 1:
            frames.extend(parts[1:])
        if head.get("t") != self.me:
            return self._drop(f"addressed to {head.get('t')!r}, not {self.me!r}", peer)
        if peer is not None and sender != peer:
            return self._drop(f"sender {sender!r} arrived on connection {peer!r}", peer)
        if type(seq) is not int or seq <= self._last.get(sender, 0):
            return self._drop(f"replayed or reordered sequence number from {sender!r}", peer)
        self._last[sender] = seq
        return head, frames

    def check_request(self, peer: str, signed: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is the HMAC of ``signed`` under the key (a code request, which a
        runner sends before flame is importable: see ``flame/node/boot.py``); dropped if not."""
        if hmac.compare_digest(self._mac(signed), mac):
            return True
        self._drop("bad signature on a code request", peer)
        return False

    def answer_mac(self, ref: bytes, data: bytes) -> bytes:
        """The HMAC of an answer to the import hook (``flame/node/importer.py`` checks it)."""
        return self._mac(b"FLanswer", ref, data)

    def forget(self, peer: str) -> None:
        """Drop the replay state of a peer that is gone."""
        self._last.pop(peer, None)
        self.refused.pop(peer, None)

    def _drop(self, why: str, peer: str | None = None) -> None:
        """Count a dropped message; log it, quietly: whoever can reach a socket can send garbage.

        The first LOG_FIRST drops are logged with their reason; after that, at most one line
        per peer every LOG_EVERY seconds, with the count since the last one.
        """
        self.dropped += 1
        name = peer if peer is not None else "?"
        if peer is not None:
            if len(self.refused) > 1000:  # peers are named by whoever connects: keep it bounded
                self.refused.clear()
            self.refused[peer] = why
        if self.dropped <= LOG_FIRST:
            log.warning("flame: dropped a message%s (%s); %d dropped so far",
                        f" from {peer!r}" if peer else "", why, self.dropped)
            return None
        now = time.monotonic()
        quiet = self._quiet.get(name)
        if quiet is None:
            if len(self._quiet) > 1000:
                self._quiet.clear()
            quiet = self._quiet[name] = [0, now - LOG_EVERY]
        quiet[0] += 1
        if now - quiet[1] >= LOG_EVERY:
            log.warning("flame: dropped %d more message(s)%s in the last %.0f s (last: %s); "
                        "%d dropped in all", quiet[0], f" from {peer!r}" if peer else "",
                        min(now - quiet[1], LOG_EVERY), why, self.dropped)
            quiet[0], quiet[1] = 0, now
        return None


#: Dropped messages logged one by one, with their reason, before the log goes quiet.
LOG_FIRST = 5
#: After that, seconds between two summary lines about the same peer.
LOG_EVERY = 60.0


def introduction() -> dict:
    """Who this process is, as ``hello`` and ``welcome`` tell the peer: pid, host, python, executable, cwd."""
    import sys
    # sys.version, not platform.python_version(): importing platform costs a runner 7 ms at
    # start; os.uname(), not socket.gethostname() (the same name): importing socket costs 3.5 ms,
    # on both sides of a boot's critical path.
    return {"pid": os.getpid(), "host": os.uname().nodename, "python": sys.version.split()[0],
            "executable": sys.executable, "cwd": os.getcwd()}


def output_message(call_id: str, kind: str, data: Any) -> tuple[str, dict, tuple]:
    """``(kind, fields, frames)`` of a message carrying a call's output event.

    ``kind`` is "stdout" or "stderr" with text, "display" with a display payload (a dict), or
    "report" with a list of reports.
    """
    if kind == "display" or kind == "report":
        return kind, {"id": call_id}, (json.dumps(data).encode(),)
    return "stream", {"id": call_id, "n": kind}, (data.encode("utf-8", "replace"),)


def read_output(kind: str, head: dict, frames: Sequence[Any]) -> tuple[str, tuple]:
    """Inverse of :func:`output_message`: the sink method to call and its arguments."""
    if kind == "display" or kind == "report":
        return kind, (json.loads(bytes(frames[0])),)
    return "stream", (head.get("n", "stdout"), bytes(frames[0]).decode("utf-8", "replace"))
