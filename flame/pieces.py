"""Frames no larger than FRAME_MAX on the wire, so that listeners can refuse larger ones.

A listener takes connections from anyone who can reach it, and ZeroMQ reads a whole frame into
memory before anything can check it: during a CurveZMQ handshake, a stranger's one frame
declaring 1 GiB took a listener's resident memory to 1 GiB (measured). ``MAXMSGSIZE`` makes
ZeroMQ hang up at a frame's size instead, so no legitimate frame may be larger: a message with a
larger frame travels as ``[map, *pieces]`` and is joined on arrival, before its signature is
checked (the signature covers the joined frames, so a forged map only makes the check fail).
"""
from __future__ import annotations

import struct
from typing import Any, Sequence

#: The largest frame a listener accepts (its ``MAXMSGSIZE``), and so the largest one sent.
FRAME_MAX = 1 << 20
#: Starts a map frame (the wire format's own first frames start ``FL\\x02`` or ``FL\\x03``).
MAGIC_PIECES = b"FL\x7f"
_COUNT = struct.Struct("!I")


def _nbytes(part: Any) -> int:
    return len(part) if type(part) is bytes else memoryview(part).nbytes


def cut(parts: Sequence[Any]) -> list:
    """``parts`` as they travel: unchanged when none is larger than FRAME_MAX, else a map (how
    many pieces each part became) and the pieces, which are views of the parts (no copy)."""
    sizes = [_nbytes(p) for p in parts]
    if max(sizes) <= FRAME_MAX:
        return list(parts)
    counts, pieces = [], []
    for part, size in zip(parts, sizes):
        if size <= FRAME_MAX:
            counts.append(1)
            pieces.append(part)
            continue
        view = memoryview(part)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        counts.append(-(-size // FRAME_MAX))
        pieces.extend(view[i:i + FRAME_MAX] for i in range(0, size, FRAME_MAX))
    return [MAGIC_PIECES + b"".join(_COUNT.pack(c) for c in counts), *pieces]


def join(parts: Sequence[Any]) -> list | None:
    """The parts that :func:`cut` made ``parts`` from (``parts[0]`` is the map), or None when
    the map does not fit the pieces."""
    counts_bytes = memoryview(parts[0])[len(MAGIC_PIECES):]
    n = counts_bytes.nbytes // _COUNT.size
    if n == 0 or counts_bytes.nbytes % _COUNT.size:
        return None
    counts = struct.unpack(f"!{n}I", counts_bytes)
    if min(counts) < 1 or sum(counts) != len(parts) - 1:
        return None
    joined, i = [], 1
    for c in counts:
        joined.append(parts[i] if c == 1 else b"".join(parts[i:i + c]))
        i += c
    return joined
