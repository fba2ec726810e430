"""Shared memory for large buffers between a pool and its runners on the same machine.

Each side that sends large buffers owns an *arena*: one shared-memory file in /dev/shm,
created 0600 with ``O_EXCL`` under an unguessable name, mapped once and reused. A message
carries, in its signed header, the arena's name, the region's offset and the buffers'
sizes, not the bytes; the receiver maps the arena once and unpickles straight from it, so
a result can come back as an array backed by that memory. The region stays the receiver's
until the objects made from it are gone: a finalizer then tells the sender (``free``), and
the region is reused. Reuse is what makes this fast here: fresh tmpfs pages cost about
1 ms per MB to fault in on this machine, four times a numpy copy.

Trust: the header's MAC covers the name, offset, sizes and sequence number; only this user
(or root, who can read the key anyway) can create or write the file, which the receiver
checks (owner, mode) before mapping it. The bytes are not MACed: whoever could change them
could read the pool's key.

Cleanup: a runner unlinks its arena when it exits, and a pool unlinks its own when it shuts
down or has no runner left; a pool unlinks the arena of a runner that died, and a runner
whose parent died unlinks the pool's (both are found by name: ``flame-<owner>-*``).
Mappings live on after an unlink, so values already received stay valid.
"""
from __future__ import annotations

import collections
import functools
import logging
import mmap
import os
import threading
import weakref
from typing import Any, Callable, Sequence

log = logging.getLogger("flame.shm")

DIR = "/dev/shm"
#: Out-of-band bytes in one message from which they travel through shared memory; below it
#: the copy into ZeroMQ costs less than the bookkeeping.
SHM_MIN = 1 << 20
#: Largest arena, in bytes (sparse: pages are allocated as they are first written). A message
#: that does not fit in what is free travels over the socket.
ARENA_MAX = 4 << 30
_ALIGN = 64


def pool_owner(runner_id: str) -> str:
    """The owner name of the pool's arena, from any of its runner ids
    (``<pool>-<random>-r<N>-<hex>``: hex has no "-r") or the ids' prefix
    (``<pool>-<random>-r``): ``<pool>-<random>-p``."""
    return runner_id[:runner_id.rfind("-r")] + "-p"


def available() -> bool:
    return os.path.isdir(DIR) and os.access(DIR, os.W_OK)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class Arena:
    """The shared memory one process sends large buffers through; regions are lent to the
    receiver until it frees them."""

    def __init__(self, owner: str, size: int = ARENA_MAX) -> None:
        self.name = f"flame-{owner}-{os.urandom(16).hex()}"  # not secrets: 8 ms of runner start-up
        path = os.path.join(DIR, self.name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.size = size
        self._touched = 0  # bytes from the start that have been written: their pages exist
        self._lock = threading.Lock()
        self._free = [(0, size)]  # (offset, length), sorted by offset
        #: offset -> (length, holders: peers that may still hold views of it)
        self.lent: dict[int, list] = {}

    def put(self, buffers: Sequence[Any], holder: str) -> list | None:
        """Copy ``buffers`` into a free region lent to ``holder``: the header field that names
        them, or None when no region is free (they then go over the socket)."""
        views = [memoryview(b).cast("B") if memoryview(b).format != "B" or memoryview(b).ndim != 1
                 else memoryview(b) for b in buffers]
        sizes = [v.nbytes for v in views]
        total = sum(_aligned(n) for n in sizes)
        with self._lock:
            offset = self._take(total)
            if offset is None:
                return None
            # Pages past what was ever written are allocated as they are written, and writing
            # to a full tmpfs is SIGBUS, not an error (Docker's /dev/shm is 64 MB): check first.
            fresh = offset + total - self._touched
            if fresh > 0 and _room() < fresh:
                self._give_back(offset, total)
                log.info("flame: /dev/shm is too full for %d MB: over the socket instead", total >> 20)
                return None
            self._touched = max(self._touched, offset + total)
            self.lent[offset] = [total, {holder}]
        at = offset
        for v in views:
            self.mm[at:at + v.nbytes] = v
            at += _aligned(v.nbytes)
        return [self.name, offset, sizes]

    def _take(self, total: int) -> int | None:
        for i, (offset, length) in enumerate(self._free):  # first fit: keeps the touched pages few
            if length >= total:
                if length == total:
                    del self._free[i]
                else:
                    self._free[i] = (offset + total, length - total)
                return offset
        return None

    def lend(self, offset: int, holder: str) -> None:
        """The region at ``offset`` is sent again, to ``holder`` (a call that moved runners)."""
        with self._lock:
            if offset in self.lent:
                self.lent[offset][1].add(holder)

    def release(self, offset: int, holder: str) -> None:
        """``holder`` is done with the region at ``offset`` (or is gone): reuse it once no one holds it."""
        with self._lock:
            entry = self.lent.get(offset)
            if entry is None:
                return
            entry[1].discard(holder)
            if entry[1]:
                return
            del self.lent[offset]
            self._give_back(offset, entry[0])

    def _give_back(self, offset: int, length: int) -> None:
        """Return a region to the free list, merged with its neighbours (lock held)."""
        self._free.append((offset, length))
        self._free.sort()
        merged = [self._free[0]]
        for o, n in self._free[1:]:
            last_o, last_n = merged[-1]
            if last_o + last_n == o:
                merged[-1] = (last_o, last_n + n)
            else:
                merged.append((o, n))
        self._free = merged

    def release_all(self, holder: str) -> None:
        for offset in [o for o, (_, holders) in list(self.lent.items()) if holder in holders]:
            self.release(offset, holder)

    def close(self) -> None:
        """Unlink the file; mappings (ours and receivers') stay valid until dropped."""
        unlink(self.name)


def _room() -> int:
    """Bytes still free in DIR."""
    st = os.statvfs(DIR)
    return st.f_bavail * st.f_frsize


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(DIR, name))
    except FileNotFoundError:
        pass


def sweep(owner: str) -> None:
    """Unlink every arena of ``owner`` (a runner that died, a parent that is gone). What cannot
    be unlinked (another user's file named like ours, a directory) is passed over: the rest
    still goes."""
    import glob
    for path in glob.glob(os.path.join(DIR, f"flame-{glob.escape(owner)}-*")):
        try:
            os.unlink(path)
        except OSError:
            pass


class Mappings:
    """The arenas this process receives from, each mapped once, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._types: dict[int, type] = {}

    def _map(self, name: str, owner: str) -> mmap.mmap:
        with self._lock:
            mm = self._maps.get(name)
            if mm is not None:
                return mm
            if not name.startswith(f"flame-{owner}-") or "/" in name:
                raise ValueError(f"shared memory {name!r} does not belong to {owner!r}")
            fd = os.open(os.path.join(DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                st = os.fstat(fd)
                if st.st_uid != os.getuid() or st.st_mode & 0o077:
                    raise ValueError(f"shared memory {name!r} is not this user's alone")
                mm = self._maps[name] = mmap.mmap(fd, st.st_size)
            finally:
                os.close(fd)
            return mm

    def take(self, ref: list, owner: str, freed: Callable[[int], None]) -> list:
        """The buffers ``ref`` names, as views of the arena; ``freed(offset)`` is called once no
        object made from them is left."""
        import ctypes
        name, offset, sizes = ref
        mm = self._map(name, owner)
        total = sum(_aligned(n) for n in sizes)
        if offset < 0 or offset + total > len(mm):
            raise ValueError(f"shared memory region {offset}+{total} is outside {name!r}")
        kind = self._types.get(total)
        if kind is None:  # a ctypes array over the region: weakly referenceable, unlike a memoryview
            kind = self._types[total] = type("Region", (ctypes.c_char * total,), {})
        region = kind.from_buffer(mm, offset)
        weakref.finalize(region, _call_quietly, freed, offset)
        whole = memoryview(region).cast("B")
        views, at = [], 0
        for n in sizes:
            views.append(whole[at:at + n])
            at += _aligned(n)
        return views

    def forget(self, name_prefix: str) -> None:
        """Drop the mappings of arenas whose name starts with ``name_prefix`` (their views live on)."""
        with self._lock:
            for name in [n for n in self._maps if n.startswith(name_prefix)]:
                del self._maps[name]


def _call_quietly(fn: Callable[[int], None], offset: int) -> None:
    try:
        fn(offset)
    except Exception:  # at interpreter exit, or a socket already closed: nothing to free then
        pass


def oob_total(frames: Sequence[Any]) -> int:
    return sum(memoryview(f).nbytes for f in frames[1:])


class Side:
    """One process's shared memory with its peers on this machine; the pool and the runner
    each have one. Whether it is on, our arena (made on first use), the peers' arenas mapped,
    and the frees of peers' regions that our finalizers queued: they may run inside any code,
    locks held, so they only append, and the thread that sends sends them (``send_frees``)."""

    def __init__(self, on: bool, owner: str) -> None:
        self.on = on
        self.owner = owner
        self.arena: Arena | None = None
        self.mappings = Mappings()
        #: (peer, offset) of peers' regions no longer used here
        self.frees: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def put(self, frames: list, holder: str) -> tuple[list, list | None]:
        """``frames`` with their out-of-band buffers moved into our arena, and the region's
        reference; ``frames`` unchanged and None when off, not worth it or out of room."""
        if not self.on or len(frames) < 2 or oob_total(frames) < SHM_MIN:
            return frames, None
        arena = self.arena
        if arena is None:
            with self._lock:
                if self.arena is None:
                    self.arena = Arena(self.owner)
                arena = self.arena
        ref = arena.put(frames[1:], holder)
        return (frames[:1], ref) if ref is not None else (frames, None)

    def take(self, ref: list, owner: str, peer: str) -> list:
        """The buffers ``ref`` names in ``peer``'s arena (named for ``owner``); a free goes back
        to ``peer`` once no object made from them is left."""
        return self.mappings.take(ref, owner, functools.partial(self._freed, peer))

    def _freed(self, peer: str, offset: int) -> None:
        self.frees.append((peer, offset))

    def send_frees(self, send: Callable[[str, int], None]) -> None:
        """Send the frees queued so far with ``send(peer, offset)``."""
        frees = self.frees
        while frees:
            try:
                peer, offset = frees.popleft()
            except IndexError:  # another thread took the last one
                return
            send(peer, offset)

    def lend(self, offset: int, holder: str) -> None:
        self.arena.lend(offset, holder)

    def release(self, offset: int, holder: str) -> None:
        """``holder`` no longer uses our region at ``offset``."""
        if self.arena is not None:
            self.arena.release(offset, holder)

    def forget(self, peer: str) -> None:
        """``peer`` is gone: what it held of ours is ours again, and its arena is unmapped."""
        if self.arena is not None:
            self.arena.release_all(peer)
        self.mappings.forget(f"flame-{peer}-")

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
