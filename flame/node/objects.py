"""The runner's table of values held for Remotes (``pool.spawn``), and the operations on them.

Each value is kept under an id until the parent releases it (its last local Remote was
garbage collected, or released). Operations arrive as ordinary calls of the functions
below, which travel by reference, so an operation on a Remote costs what a call costs.
"""
from __future__ import annotations

import collections
import itertools
import operator
import sys
import threading
from typing import Any

from .aio import is_awaitable

#: id -> value, for this runner's pool
TABLE: dict[int, Any] = {}
_ids = itertools.count(1)
#: whether this runner serves its values to its peers yet (from its first value on)
_serving = False
#: id -> who keeps the value, and how many times: "parent" (its pool's Remotes) or the id of a
#: runner holding handles to it (``flame.ref``). The value goes when nobody keeps it.
OWNERS: dict[int, collections.Counter] = {}
#: the keeper of values made on this thread now: a peer's id while its request runs here
current = threading.local()

#: Operations that give a new value (kept here, a Remote there).
_BINARY = {name: getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
    "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge")}
_UNARY = {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert}


def size_of(value: Any) -> int:
    """Best effort: ``nbytes`` where known (numpy, pandas), else ``sys.getsizeof``."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return sys.getsizeof(value)
    try:
        nbytes = getattr(value, "nbytes", None)
        if isinstance(nbytes, int):
            return nbytes
        memory = getattr(value, "memory_usage", None)  # a pandas DataFrame
        if callable(memory):
            total = memory(deep=False)
            return int(total.sum()) if hasattr(total, "sum") else int(total)
        return sys.getsizeof(value)
    except Exception:
        return 0


def keep(value: Any) -> tuple[int, int]:
    """Hold ``value`` here; the reference ``(id, bytes)`` the parent wraps as a Remote."""
    global _serving
    if is_awaitable(value):
        return _keep_when_done(value)  # type: ignore[return-value]  # awaited by the node
    if not _serving:
        _serving = True
        from . import peers
        peers.serving()
    oid = next(_ids)
    TABLE[oid] = value
    OWNERS[oid] = collections.Counter((getattr(current, "owner", "parent"),))
    return oid, size_of(value)


async def _keep_when_done(awaitable: Any) -> tuple[int, int]:
    return keep(await awaitable)


def lookup(oid: int, path: tuple = ()) -> Any:
    """The value a Remote names (how a Remote argument arrives here as the real object)."""
    try:
        value = TABLE[oid]
    except KeyError:
        raise LookupError(f"this runner holds no object {oid}: it was released") from None
    for name in path:
        value = getattr(value, name)
    return value


def value(v: Any) -> Any:
    """``v`` itself: how a value relayed through the parent arrives in a call's arguments."""
    return v


def spawn(fn: Any, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``fn(*args, **kwargs)``, kept here."""
    return keep(fn(*args, **kwargs))


def apply(oid: int, path: tuple, op: str, args: tuple = (), kwargs: dict | None = None,
          hold: bool = True) -> Any:
    """One operation on a held value: kept here (a new reference) with ``hold``, else returned."""
    target = lookup(oid, path)
    if op == "call":
        value = target(*args, **(kwargs or {}))
    elif op == "attr":
        value = target
    elif op == "getitem":
        value = target[args[0]]
    elif op in _BINARY:
        value = _BINARY[op](args[0], target) if kwargs and kwargs.get("reflected") else _BINARY[op](target, args[0])
    elif op in _UNARY:
        value = _UNARY[op](target)
    else:
        raise ValueError(f"unknown operation {op!r}")
    return keep(value) if hold else value


def plain(oid: int, path: tuple, what: str, arg: Any = None) -> Any:
    """What Python needs as a plain value, computed here: repr, str, len, bool, int, float,
    index, format, dir, doc, the mime bundle, or the next chunk of an iteration."""
    target = lookup(oid, path)
    if what == "mimebundle":
        from .display import mime_bundle
        return mime_bundle(target)
    if what == "format":
        return format(target, arg)
    if what == "dir":
        return sorted(dir(target))
    if what == "doc":
        return getattr(target, "__doc__", None)
    if what == "inspect":
        from .introspect import inspect
        return inspect({"value": target}, "value", None, arg or 0)
    if what == "iter":  # arg = (iterator id or None, chunk size)
        it_id, size = arg
        if it_id is None:
            it_id = next(_ids)
            TABLE[it_id] = iter(target)
        items = list(itertools.islice(TABLE[it_id], size))
        if len(items) < size:
            TABLE.pop(it_id, None)
        return it_id, items
    return {"repr": repr, "str": str, "len": len, "bool": bool, "int": int, "float": float,
            "index": operator.index}[what](target)


def fetch(oid: int, path: tuple = ()) -> Any:
    """The value itself, to be copied to the parent (``Remote.get()``)."""
    return lookup(oid, path)


def release(ids: list[int], owner: str = "parent") -> None:
    """``owner`` no longer refers to the values ``ids`` (once each): those nobody keeps go."""
    for oid in ids:
        keepers = OWNERS.get(oid)
        if keepers is not None:
            keepers[owner] -= 1
            if keepers[owner] <= 0:
                del keepers[owner]
            if keepers:
                continue
            OWNERS.pop(oid, None)
        TABLE.pop(oid, None)


def pin(oid: int, owner: str) -> None:
    """``owner`` keeps value ``oid`` too (a handle to it arrived there)."""
    if oid not in TABLE:
        raise LookupError(f"this runner holds no object {oid}: it was released")
    OWNERS.setdefault(oid, collections.Counter())[owner] += 1


def drop_owner(owner: str) -> None:
    """``owner`` is gone: it keeps nothing any more."""
    for oid in [oid for oid, keepers in OWNERS.items() if owner in keepers]:
        keepers = OWNERS[oid]
        del keepers[owner]
        if not keepers:
            OWNERS.pop(oid, None)
            TABLE.pop(oid, None)


def held() -> tuple[int, int]:
    """How many values are held here, and their bytes (best effort)."""
    return len(TABLE), sum(size_of(v) for v in list(TABLE.values()))
