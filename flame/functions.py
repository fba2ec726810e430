"""Pickled functions, reused while nothing they were pickled from has changed.

cloudpickle sends a notebook function by value: its code, defaults, closure and the
globals it reads.  Pickling that on every call costs more than the network hop, so
the pool keeps each function's pickle and reuses it while a snapshot of everything
the pickle captured is unchanged, compared by identity.  Identity is enough only for
values that cannot change in place, so a function is cached only when what it
captures is immutable (numbers, strings, tuples of them...), pickled by reference
(modules, importable functions and classes), or another function cached the same
way.  Anything else (a list, a dict, a class defined in the notebook) makes the
function uncacheable: it is pickled on every call, so a changed global is always seen.
"""
from __future__ import annotations

import hashlib
import sys
import types
import weakref
from typing import Any, Callable

_MISSING = object()
_FROZEN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes, range, type(...),
                           type(NotImplemented)})
#: Functions reachable from one cached function (helpers it calls), at most.
_MAX_FUNCTIONS = 32
#: Items a captured tuple or frozenset may hold and still be checked, at most.
_MAX_ITEMS = 256


def _cp() -> Any:
    """cloudpickle's module of internals, imported at the first function pickled: importing
    cloudpickle costs 14 ms, which a fresh pool spends while its first runner boots."""
    from cloudpickle import cloudpickle
    return cloudpickle


def _names(code: types.CodeType) -> Any:
    """The global names ``code`` (and code nested in it) reads or writes, as cloudpickle finds them."""
    extract = getattr(_cp(), "_extract_code_globals", None)
    if extract is not None:
        return extract(code)
    names = set(code.co_names)  # a superset: attribute names too; only ever costs a cache miss
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _by_reference(obj: Any) -> bool:
    check = getattr(_cp(), "_should_pickle_by_reference", None)
    try:
        return bool(check(obj)) if check is not None else False
    except Exception:
        return False


class _Snapshot:
    """What one by-value function's pickle captured, for identity comparison."""

    __slots__ = ("fn", "code", "defaults", "kwdefaults", "kwitems", "cells", "names", "values")

    def __init__(self, fn: types.FunctionType, names: tuple) -> None:
        self.fn = weakref.ref(fn)
        self.code = fn.__code__
        self.defaults = fn.__defaults__
        self.kwdefaults = fn.__kwdefaults__
        self.kwitems = tuple(self.kwdefaults.values()) if self.kwdefaults else ()
        self.cells = tuple(_cell(c) for c in fn.__closure__ or ())
        self.names = names
        env = fn.__globals__
        self.values = tuple(env.get(n, _MISSING) for n in names)

    def same(self) -> bool:
        fn = self.fn()
        if fn is None:
            return False
        if (fn.__code__ is not self.code or fn.__defaults__ is not self.defaults
                or fn.__kwdefaults__ is not self.kwdefaults or fn.__dict__):
            return False
        if self.kwitems and tuple(self.kwdefaults.values()) != self.kwitems:
            return False  # a dict: changed in place (its values are immutable, so == is exact)
        closure = fn.__closure__ or ()
        for cell, value in zip(closure, self.cells):
            if _cell(cell) is not value:
                return False
        env = fn.__globals__
        for name, value in zip(self.names, self.values):
            if env.get(name, _MISSING) is not value:
                return False
        return True


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell: a name the enclosing function has not bound yet
        return _MISSING


class _Entry:
    __slots__ = ("ref", "payload", "hash", "snapshots", "modules")

    def __init__(self, ref: Any, payload: bytes, snapshots: list, modules: int | None) -> None:
        self.ref = ref
        self.payload = payload
        self.hash = hashlib.blake2b(payload, digest_size=16).hexdigest()
        self.snapshots = snapshots
        #: len(sys.modules) when pickled, if the function uses modules: cloudpickle also
        #: records the submodules imported at that time, so a later import means re-pickling
        self.modules = modules

    def valid(self, fn: Any) -> bool:
        if self.ref() is not fn or (self.modules is not None and self.modules != len(sys.modules)):
            return False
        for snap in self.snapshots:
            if not snap.same():
                return False
        return True


class FunctionCache:
    """Pickles of recently sent functions, each with the hash the runners know it by."""

    def __init__(self, size: int = 256, dumps: Callable[[Any], bytes] | None = None) -> None:
        self._size = size
        self._dumps = dumps or (lambda fn: _cp().dumps(fn, protocol=5))
        # A plain dict: each operation is atomic, so callers in several threads and weakref
        # callbacks (run by the GC at any point) need no lock.
        self._entries: dict[int, _Entry] = {}
        self.hits = self.misses = 0

    def get(self, fn: Any) -> tuple[bytes, str]:
        """``(pickle, hash)`` of ``fn``, from the cache when nothing it captured has changed.

        Raises whatever pickling ``fn`` raises.
        """
        entries = self._entries
        entry = entries.get(id(fn))
        if entry is not None and entry.valid(fn):
            self.hits += 1
            return entry.payload, entry.hash
        self.misses += 1
        snapshots, modules = _plan(fn)
        # Snapshot before pickling: a global rebound meanwhile then fails the next check.
        payload = self._dumps(fn)
        if snapshots is None:
            entries.pop(id(fn), None)
            return payload, hashlib.blake2b(payload, digest_size=16).hexdigest()
        entry = _Entry(weakref.ref(fn, lambda _, k=id(fn): entries.pop(k, None)), payload, snapshots,
                       len(sys.modules) if modules else None)
        entries[id(fn)] = entry
        if len(entries) > self._size:
            try:  # drop the oldest entry (dicts keep insertion order)
                del entries[next(iter(entries))]
            except (KeyError, RuntimeError, StopIteration):
                pass  # another thread changed the dict meanwhile: trim next time
        return entry.payload, entry.hash


def _plan(fn: Any) -> tuple[list | None, bool]:
    """Snapshots of every by-value function ``fn`` reaches, or None when ``fn`` is not cacheable.

    Also says whether any module is captured (see _Entry.modules).
    """
    if not isinstance(fn, types.FunctionType):
        return None, False  # bound methods, partials, callable objects: pickled every time
    snapshots: list[_Snapshot] = []
    seen: set[int] = set()
    uses_modules = False
    todo: list[Any] = [fn]

    def frozen(value: Any, depth: int = 0) -> bool:
        nonlocal uses_modules
        kind = type(value)
        if kind in _FROZEN_TYPES or value is _MISSING:
            return True
        if kind is tuple or kind is frozenset:
            return depth < 4 and len(value) <= _MAX_ITEMS and all(frozen(v, depth + 1) for v in value)
        if kind is types.BuiltinFunctionType:  # len, math.sqrt; not a bound method like [].append
            return value.__self__ is None or isinstance(value.__self__, types.ModuleType)
        if isinstance(value, types.ModuleType):
            uses_modules = True
            return _by_reference(value)
        if isinstance(value, types.FunctionType):
            if _by_reference(value):
                return True
            todo.append(value)  # a helper sent by value: snapshot it too
            return True
        if isinstance(value, type):
            return _by_reference(value)  # a class defined in the notebook can change: no caching
        return False

    if _by_reference(fn):
        return [], False  # an importable function: its pickle is its name
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if len(seen) > _MAX_FUNCTIONS or f.__dict__:
            return None, False
        # Names not bound yet are kept too (as missing): binding one later must be noticed.
        names = tuple(_names(f.__code__))
        snap = _Snapshot(f, names)
        for value in (*snap.values, *snap.cells, *(snap.defaults or ()), *snap.kwitems):
            if not frozen(value):
                return None, False
        snapshots.append(snap)
    return snapshots, uses_modules
