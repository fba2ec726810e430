"""Pickling for calls: cloudpickle by value, pickle-5 out-of-band buffers.

Shared by the parent and the node side; keep it light.
"""
from __future__ import annotations

import pickle
import reprlib
from typing import Any, Sequence

from .errors import RemoteError, RemoteTraceback, SerializationError

#: Buffers at least this large travel as their own zero-copy frame; smaller ones stay in-band,
#: where one extra frame would cost more than the copy.
OOB_MIN_BYTES = 64 * 1024


def _cloudpickle() -> Any:
    """The cloudpickle module, imported at first use: a fresh pool imports it while its first
    runner boots (14 ms), and a runner when a call first needs it."""
    import cloudpickle
    return cloudpickle


#: Types plain pickle handles exactly as cloudpickle would, several times faster.
_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes})
_NO_ARGS = pickle.dumps(((), {}), protocol=5)


def dumps(obj: Any) -> list:
    """Pickle ``obj`` into ``[payload, *buffers]`` (buffers are sent without copying)."""
    if type(obj) in _PLAIN or _plain(obj):  # a Remote's reference (id, bytes) is one of these
        return [pickle.dumps(obj, protocol=5)]
    buffers: list = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OOB_MIN_BYTES:
            return True  # in-band
        buffers.append(view)
        return False

    return [_cloudpickle().dumps(obj, protocol=5, buffer_callback=keep_large), *buffers]


def loads(frames: Sequence[Any]) -> Any:
    """Inverse of :func:`dumps`; buffers may be zmq frames (used in place, not copied)."""
    return pickle.loads(frames[0], buffers=frames[1:])


_repr = reprlib.Repr()
_repr.maxother = _repr.maxstring = 100


def describe(obj: Any) -> str:
    """A short, safe description of an object for error messages."""
    try:
        text = _repr.repr(obj)
    except Exception:  # a broken __repr__ must not hide the real error
        text = "<unrepresentable>"
    return f"{text} (type {type(obj).__module__}.{type(obj).__qualname__})"


def culprit(fn: Any, args: tuple, kwargs: dict) -> str:
    """Name the first part of a call that does not pickle: an argument, or what a function captured."""
    of = f" of {_name(fn)}()" if fn is not None else ""
    for i, value in enumerate(args):
        if not _pickles(value):
            return f"argument {i}{of}: {describe(value)}"
    for name, value in kwargs.items():
        if not _pickles(value):
            return f"keyword argument {name!r}{of}: {describe(value)}"
    code = getattr(fn, "__code__", None)
    if code is not None and not args and not kwargs:
        for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if not _pickles(value):
                return f"variable {name!r} captured by {_name(fn)}: {describe(value)}"
        env = getattr(fn, "__globals__", {})
        for name in code.co_names:
            if name in env and not _pickles(env[name]):
                return f"global {name!r} used by {_name(fn)}: {describe(env[name])}"
    return f"the function {_name(fn)}"


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or describe(fn)


def _pickles(value: Any) -> bool:
    try:
        _cloudpickle().dumps(value, protocol=5, buffer_callback=lambda b: False)
        return True
    except Exception:
        return False


def dumps_function(fn: Any) -> bytes:
    """Pickle a function by value (cloudpickle); a SerializationError names what it captured that does not pickle."""
    try:
        return _cloudpickle().dumps(fn, protocol=5)
    except Exception as exc:
        raise SerializationError(f"cannot send {culprit(fn, (), {})}: "
                                 f"{type(exc).__name__}: {exc}") from exc


def _plain(value: Any, depth: int = 0) -> bool:
    """Whether plain pickle gives what cloudpickle would: scalars, and small tuples, lists and
    dicts of them."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if depth < 2 and (kind is tuple or kind is list) and len(value) <= 8:
        return all(_plain(v, depth + 1) for v in value)
    if depth < 2 and kind is dict and len(value) <= 8:
        return all(type(k) in _PLAIN and _plain(v, depth + 1) for k, v in value.items())
    return False


def dumps_args(fn: Any, args: tuple, kwargs: dict) -> list:
    """Pickle a call's arguments into frames; a SerializationError names the one that does not pickle."""
    if not kwargs:
        if not args:
            return [_NO_ARGS]
        for value in args:
            if not _plain(value):
                break
        else:
            return [pickle.dumps((args, {}), protocol=5)]
    try:
        return dumps((args, kwargs))
    except Exception as exc:
        raise SerializationError(f"cannot send {culprit(fn, args, kwargs)}: "
                                 f"{type(exc).__name__}: {exc}") from exc


def dumps_call(fn: Any, args: tuple, kwargs: dict) -> tuple[bytes, list]:
    """Pickle a call: the function alone (so it can be cached by content) and its arguments."""
    return dumps_function(fn), dumps_args(fn, args, kwargs)


def raise_unpicklable(what: str, obj: Any, exc: BaseException) -> None:
    """Raise a SerializationError that names ``obj``."""
    raise SerializationError(f"cannot send {what}: {describe(obj)}: {type(exc).__name__}: {exc}") from exc


def rebuild_error(head: dict, frames: Sequence[Any], tb: str) -> BaseException:
    """The exception an ``error`` message carries: its own type with the remote traceback
    chained when it unpickles here, else a RemoteError with type name, message and traceback."""
    if frames:
        try:
            exc = loads(frames)
            if isinstance(exc, BaseException):
                exc.__cause__ = RemoteTraceback(tb)
                exc.remote_traceback = tb  # type: ignore[attr-defined]
                return exc
        except Exception:
            pass
    return RemoteError(head.get("type", "Exception"), head.get("msg", ""), tb)
