"""Completion and inspection against a live namespace: a runner's interactive one (the one
``%%remote`` cells run in), or an attached app's. ``answer`` is what both nodes call."""
from __future__ import annotations

import inspect as _inspect
import re
import threading
from typing import Any, Callable

_TOKEN = re.compile(r"[A-Za-z_][\w.]*$|$")


class Answerer:
    """Answers completion and inspection requests on a thread of its own, one at a time.

    Not on the thread that reads the socket: a slow ``__repr__`` or a cold jedi there would
    leave the parent's heartbeats unread, and the runner would take its parent for gone (an
    app, its clients). A slow answer must only be slow."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: Any = None
        self._lock = threading.Lock()

    def ask(self, kind: str, namespace: dict, head: dict, reply: Callable[[dict], None]) -> None:
        """Answer request ``head`` against ``namespace``; ``reply(content)`` sends the answer."""
        if self._queue is None:
            with self._lock:
                if self._queue is None:
                    import queue
                    self._queue = queue.SimpleQueue()
                    threading.Thread(target=self._loop, name=self._name, daemon=True).start()
        self._queue.put((kind, namespace, head, reply))

    def _loop(self) -> None:
        while True:
            kind, namespace, head, reply = self._queue.get()
            content = answer(kind, namespace, head)
            try:
                reply(content)
            except Exception:  # the node is going away
                return


def answer(kind: str, namespace: dict, head: dict) -> dict:
    """The content of the reply to a complete or inspect request ``head`` (its kind ``kind``).

    Guarded: what a user's object raises while it is completed or inspected (a ``__dir__``,
    a property, even ``sys.exit()``) becomes an error reply; it must never cost the thread
    that answers, which is a runner's or an app's I/O thread."""
    try:
        if kind == "complete":
            return complete(namespace, head["code"], head.get("cursor"))
        return inspect(namespace, head["code"], head.get("cursor"), head.get("detail", 0))
    except (Exception, SystemExit) as exc:
        return {"status": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": []}


def complete(namespace: dict, code: str, cursor: int) -> dict:
    """Jupyter complete_reply content: jedi on the live namespace when available, else rlcompleter."""
    cursor = len(code) if cursor is None else cursor
    try:
        import jedi
    except ImportError:
        jedi = None
    if jedi is not None:
        try:
            before = code[:cursor]
            line = before.count("\n") + 1
            column = len(before) - (before.rfind("\n") + 1)
            found = jedi.Interpreter(code, [namespace]).complete(line, column)
            if found:
                typed = len(found[0].name_with_symbols) - len(found[0].complete)
                return {"status": "ok", "matches": [c.name_with_symbols for c in found],
                        "cursor_start": cursor - typed, "cursor_end": cursor, "metadata": {}}
        except Exception:
            pass  # jedi trips on some live objects: fall back
    import rlcompleter
    token = _TOKEN.search(code[:cursor]).group(0)
    completer = rlcompleter.Completer(namespace)
    matches = []
    for state in range(500):
        match = completer.complete(token, state)
        if match is None:
            break
        matches.append(match.rstrip("("))
    start = cursor - len(token)
    if "." in token:  # Jupyter replaces only the last part of a dotted name
        cut = token.rfind(".") + 1
        matches = [m[cut:] for m in matches]
        start += cut
    return {"status": "ok", "matches": sorted(set(matches)), "cursor_start": start,
            "cursor_end": cursor, "metadata": {}}


def warm(namespace: dict) -> None:
    """Import jedi and load its grammar now, so that the first completion is answered at once."""
    try:
        complete(namespace, "import os\nos.pa", None)
    except Exception:
        pass


def _resolve(namespace: dict, dotted: str) -> tuple[bool, Any]:
    """Walk ``a.b.c`` through names and attributes only (never calls anything the user did not)."""
    import builtins
    parts = dotted.split(".")
    if parts[0] in namespace:
        obj = namespace[parts[0]]
    elif hasattr(builtins, parts[0]):
        obj = getattr(builtins, parts[0])
    else:
        return False, None
    for part in parts[1:]:
        try:
            obj = _inspect.getattr_static(obj, part)
            if hasattr(obj, "__get__") and not _inspect.isfunction(obj) and not isinstance(obj, type):
                obj = getattr(obj, "__func__", obj)
        except AttributeError:
            return False, None
    return True, obj


def inspect(namespace: dict, code: str, cursor: int, detail_level: int = 0) -> dict:
    """Jupyter inspect_reply content for the name at ``cursor``."""
    cursor = len(code) if cursor is None else cursor
    left = re.search(r"[A-Za-z_][\w.]*$", code[:cursor])
    right = re.match(r"\w*", code[cursor:])
    name = ((left.group(0) if left else "") + (right.group(0) if right else "")).strip(".")
    found, obj = _resolve(namespace, name) if name else (False, None)
    if not found:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
    lines = []
    try:
        lines.append(f"Signature: {name}{_inspect.signature(obj)}")
    except (TypeError, ValueError):
        pass
    lines.append(f"Type:      {type(obj).__name__}")
    if not callable(obj) or isinstance(obj, type):
        text = repr(obj)
        lines.append(f"Value:     {text if len(text) < 500 else text[:500] + '...'}")
    doc = _inspect.getdoc(obj)
    if doc:
        lines.append("Docstring:\n" + doc)
    if detail_level:
        try:
            lines.append("Source:\n" + _inspect.getsource(obj))
        except (OSError, TypeError):
            pass
    return {"status": "ok", "found": True, "data": {"text/plain": "\n".join(lines)}, "metadata": {}}
