"""Frames no larger than ``wire.FRAME_MAX`` on the wire, so that listeners can refuse larger ones.

A listener takes connections from anyone who can reach it, and ZeroMQ reads a whole frame into
memory before anything can check it: during a CurveZMQ handshake, a stranger's one frame
declaring 1 GiB took a listener's resident memory to 1 GiB (measured). ``MAXMSGSIZE`` makes
ZeroMQ hang up at a frame's size instead, so no legitimate frame may be larger: a message with a
larger frame travels as ``[MAGIC_PIECES + map, *pieces]`` (``wire.Wire`` adds the magic) and is
joined on arrival, before its signature is checked (the signature covers the joined frames, so
a forged map only makes the check fail). Imported only where a message is cut or joined.
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

_COUNT = struct.Struct("!I")


def _nbytes(part: Any) -> int:
    return len(part) if type(part) is bytes else memoryview(part).nbytes


def cut(parts: Sequence[Any], most: int) -> tuple[bytes, list] | None:
    """None when no part is larger than ``most`` bytes; else the map (how many pieces each
    part became) and the pieces, which are views of the parts (no copy)."""
    sizes = [_nbytes(p) for p in parts]
    if max(sizes) <= most:
        return None
    counts, pieces = [], []
    for part, size in zip(parts, sizes):
        if size <= most:
            counts.append(1)
            pieces.append(part)
            continue
        view = memoryview(part)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        counts.append(-(-size // most))
        pieces.extend(view[i:i + most] for i in range(0, size, most))
    return b"".join(_COUNT.pack(c) for c in counts), pieces


def join(counts: Any, pieces: Sequence[Any]) -> list | None:
    """The parts that :func:`cut` made ``pieces`` from, by its map ``counts``; None when the
    map does not fit the pieces."""
    counts = memoryview(counts)
    n = counts.nbytes // _COUNT.size
    if n == 0 or counts.nbytes % _COUNT.size:
        return None
    sizes = struct.unpack(f"!{n}I", counts)
    if min(sizes) < 1 or sum(sizes) != len(pieces):
        return None
    joined, i = [], 0
    for c in sizes:
        joined.append(pieces[i] if c == 1 else b"".join(pieces[i:i + c]))
        i += c
    return joined
