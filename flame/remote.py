"""Remote: the local handle of a value that lives on a runner (``pool.spawn``).

Operations on a Remote run where the value lives and give a new Remote: attribute access,
calls and method calls, ``[]``, arithmetic and comparisons. Attribute access is lazy: it
costs nothing until the attribute is used, so ``model.generate("hi")`` is one round trip.
Where Python needs a plain value (``repr``, ``str``, ``len``, ``bool``, ``int``, ``float``,
``__index__``, ``format``, ``dir``, ``__doc__``, the notebook's rich display) it is computed
on the runner and only it travels; iteration fetches items in chunks.

The value is freed on its runner once the last Remote that refers to it is garbage
collected here (or on :meth:`Remote.release`): releases travel batched, within a tick.
A runner holding values is never stopped for being idle. A Remote does not leave this
process by accident: pickling one outside flame's own calls raises.
"""
from __future__ import annotations

import pickle
import threading
from typing import Any, Iterator

from .errors import FlameError, SerializationError
from .node import objects

#: While flame pickles a call's arguments: ``runner``, the id of the runner it goes to ("": not
#: known yet; Remotes on it travel as references the runner resolves to the real objects, the
#: others as copies), ``pool`` its pool, ``uses`` the values on other runners it copies.
_sending = threading.local()

#: Items fetched per round trip when iterating over a Remote.
ITER_CHUNK = 100


class RemoteGone(FlameError):
    """The Remote was released, or its pool shut down."""


class _Held:
    """One value held on a runner: released there when the last Remote referring to it goes."""

    __slots__ = ("pool", "runner_id", "oid", "_origin", "nbytes", "released")

    def __init__(self, pool: Any, runner_id: str, oid: int, origin: Any, nbytes: int) -> None:
        self.pool, self.runner_id, self.oid = pool, runner_id, oid
        self._origin, self.nbytes = origin, nbytes  # origin: a text, or (held, path, op) made into one on demand
        self.released = False

    def release(self) -> None:
        """Release the value on its runner, once (release() or the last Remote collected)."""
        if not self.released:
            self.released = True
            self.pool._holdings.release(self.runner_id, self.oid)

    def __del__(self) -> None:
        # The last Remote on this value is gone. Cheaper than weakref.finalize, which costs
        # more than the rest of a Remote's bookkeeping on the per-operation path; and
        # release() inline, for the same reason (_release_object only appends).
        try:
            if not self.released:
                self.released = True
                self.pool._holdings.releases.append((self.runner_id, self.oid))
        except Exception:  # at interpreter exit, the pool may be half torn down
            pass

    @property
    def origin(self) -> str:
        """How the value was made, for messages: ``spawn(Model).generate()``."""
        if not isinstance(self._origin, str):
            base, path, op = self._origin
            what = {"call": "()", "getitem": "[]", "attr": ""}.get(op, f" {op} ...")
            self._origin = f"{base.origin}{''.join('.' + p for p in path)}{what}"
        return self._origin


class Remote:
    __slots__ = ("_held", "_path", "__weakref__")

    def __init__(self, held: _Held, path: tuple = ()) -> None:
        # Every Remote on the same value shares one _Held; the value is released when the last
        # of them (hence the _Held) is collected.
        self._held = held
        self._path = path

    # ---- the handle itself ------------------------------------------------------------------
    @property
    def runner_id(self) -> str:
        """The id of the runner that holds the value."""
        return self._held.runner_id

    @property
    def runner(self) -> str:
        """The same as :attr:`runner_id`."""
        return self._held.runner_id

    def get(self, timeout: float | None = None) -> Any:
        """Copy the value here. A value that cannot be pickled raises SerializationError naming
        it, and stays on the runner."""
        return self._call(objects.fetch, (self._held.oid, self._path), timeout=timeout)

    def release(self) -> None:
        """Free the value on its runner now (idempotent). Any later use raises RemoteGone."""
        self._held.release()

    def __reduce__(self) -> Any:
        held = self._held
        target = getattr(_sending, "runner", None)
        if target == held.runner_id and _sending.pool is held.pool:
            return objects.lookup, (held.oid, self._path)
        if target is not None:  # an argument of a call that runs elsewhere: a copy travels
            return held.pool._holdings.copy(held, self._path, target, _sending.pool, _sending.uses)
        token = getattr(held.pool, "token", None)
        if token is not None:  # a handle on a runner, in what it sends its pool
            return token(held, self._path)
        raise SerializationError(
            f"a Remote ({self._describe()}) cannot be pickled: it stays on its runner. Pass it to a "
            f"call of its pool (it arrives there as the real object), or use .get() to copy the value here")

    def _describe(self) -> str:
        held = self._held
        return f"{held.origin}{''.join('.' + p for p in self._path)} on runner {held.runner_id}"

    # ---- operations -----------------------------------------------------------------------
    def _call(self, fn: Any, args: tuple, timeout: float | None = None, arg_frames: list | None = None) -> Any:
        held = self._held
        if held.released:
            raise RemoteGone(f"the Remote {self._describe()} was released")
        return held.pool._holdings.on_holder(held, fn, args, arg_frames).result(timeout)

    def _op(self, op: str, args: tuple = (), kwargs: dict | None = None) -> "Remote":
        held = self._held
        frames = None
        if not (args or kwargs):  # an id, a path of names and an operation's name: plain pickle
            # (Remotes among the arguments are pickled as calls' are: those held elsewhere as copies)
            frames = [pickle.dumps(((held.oid, self._path, op, args, kwargs), {}), 5)]
        ref = self._call(objects.apply, (held.oid, self._path, op, args, kwargs), arg_frames=frames)
        return held.pool._holdings.remote(held.runner_id, ref, (held, self._path, op))

    def _plain(self, what: str, arg: Any = None) -> Any:
        return self._call(objects.plain, (self._held.oid, self._path, what, arg))

    def __getattr__(self, name: str) -> "Remote":
        if name[0] == "_" and name.startswith(("__", "_ipython", "_repr_", "_jupyter")):
            raise AttributeError(name)  # probes by IPython, pickle, copy: not the remote object's
        return Remote(self._held, self._path + (name,))

    def __call__(self, *args: Any, **kwargs: Any) -> "Remote":
        return self._op("call", args, kwargs)

    def __getitem__(self, key: Any) -> "Remote":
        return self._op("getitem", (key,))

    def __repr__(self) -> str:
        if self._held.released or self._held.pool.closed:
            return f"<flame.Remote {self._describe()} (gone)>"
        return self._plain("repr")

    def __str__(self) -> str:
        return self._plain("str")

    def __len__(self) -> int:
        return self._plain("len")

    def __bool__(self) -> bool:
        return self._plain("bool")

    def __int__(self) -> int:
        return self._plain("int")

    def __float__(self) -> float:
        return self._plain("float")

    def __index__(self) -> int:
        return self._plain("index")

    def __format__(self, spec: str) -> str:
        return self._plain("format", spec)

    def __dir__(self) -> list[str]:
        return self._plain("dir")

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return self._plain("doc")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self._plain("mimebundle")

    def __iter__(self) -> Iterator[Any]:
        it_id = None
        while True:
            it_id, items = self._plain("iter", (it_id, ITER_CHUNK))
            yield from items
            if len(items) < ITER_CHUNK:
                return

    __hash__ = object.__hash__


def _binary(op: str, reflected: bool = False) -> Any:
    def method(self: Remote, other: Any) -> Remote:
        return self._op(op, (other,), {"reflected": True} if reflected else None)
    method.__name__ = f"__{'r' if reflected else ''}{op.rstrip('_')}__"
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and_", "or_", "xor",
            "lshift", "rshift"):
    setattr(Remote, f"__{_op.rstrip('_')}__", _binary(_op))
    setattr(Remote, f"__r{_op.rstrip('_')}__", _binary(_op, reflected=True))
for _op in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(Remote, f"__{_op}__", _binary(_op))
for _op in ("neg", "pos", "abs", "invert"):
    setattr(Remote, f"__{_op}__", lambda self, _o=_op: self._op(_o))


def remotes_in(args: tuple, kwargs: dict) -> list[Remote | Ref]:
    """The Remotes (and handles, ``flame.ref``) among a call's arguments, at the top level or
    inside a list, tuple or dict."""
    found = []
    kinds = _HANDLES  # a type lookup per item: a map's chunk scans every item of it
    for value in (*args, *kwargs.values()):
        if type(value) in kinds:
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if type(v) in kinds)
        elif isinstance(value, dict):
            found.extend(v for v in (*value.keys(), *value.values()) if type(v) in kinds)
    return found


class Ref:
    """A handle to a Remote's value, to pass to a call instead of the value (``flame.ref``)."""

    __slots__ = ("remote",)

    def __init__(self, remote: Remote) -> None:
        if not isinstance(remote, Remote):
            raise TypeError(f"flame.ref takes a flame.Remote, got {type(remote).__name__}")
        self.remote = remote

    @property
    def _held(self) -> _Held:
        return self.remote._held

    def _describe(self) -> str:
        return f"flame.ref({self.remote._describe()})"

    def __repr__(self) -> str:
        return f"<{self._describe()}>"

    def __reduce__(self) -> Any:
        held, path = self.remote._held, self.remote._path
        if getattr(_sending, "runner", None) is None:
            raise SerializationError(f"{self._describe()} travels only in the arguments of a call")
        return held.pool._holdings.handle(held, path, _sending.runner, _sending.uses, _sending.pool)


def ref(remote: Remote) -> Ref:
    """Pass ``remote`` to a call as a handle, not as its value: inside the call it is a
    ``flame.Remote`` whose operations run on the runner holding the value, sent from the
    calling runner directly. A handle can be kept there, returned (it arrives as a Remote),
    and used from many runners at once; the value lives while any handle to it does."""
    return Ref(remote)


_HANDLES = frozenset((Remote, Ref))


def _received(holder: str, oid: int, path: tuple, origin: str, nbytes: int) -> Remote:
    """A handle a runner sent in a result, arriving as a Remote of the pool of its holder (which
    pinned the value for that pool before it was sent)."""
    from .registry import pools
    pool = next((p for p in pools() if holder in p._fleet.runners), None)
    if pool is None:
        raise SerializationError(f"a handle to the value from {origin}: runner {holder} is no runner "
                                 "of a pool of this process")
    return Remote(pool._holdings.remote(holder, (oid, nbytes), origin)._held, tuple(path))


def inspect_remote(remote: Remote, detail_level: int = 0) -> dict:
    """Jupyter ``inspect_reply`` content (docstring, signature, type) for a Remote's value,
    computed on its runner: what a frontend shows for ``remote?``."""
    return remote._plain("inspect", detail_level)
