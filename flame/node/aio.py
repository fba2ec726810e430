"""asyncio on nodes: coroutine calls, and ``await`` in ``%%remote`` and attached cells.

A node has its own event loop, on a thread of its own, started at the first coroutine it
meets and living as long as the node. A call whose function returns an awaitable is awaited
there; the thread that runs the call blocks until it is done, so with ``max_concurrency=N``
up to N coroutines of one runner run concurrently on that one loop.

In a cell, only the awaited work runs on a loop: each top-level ``await X`` becomes a call
that runs ``X`` on the loop and blocks the cell's thread until it is done. The cell's own
code (a ``time.sleep``, a long loop) stays on the cell's thread, so in an attached app it
can never freeze the app's loop. The loop is the app's own when there is one (named with
``serve(loop=...)``, running where ``serve()`` was called, or found running later, as when
``flamebook serve`` runs a script that calls ``asyncio.run`` or starts uvicorn), else the
node's own.

Cancelling (a timeout, ``future.cancel()``, the stop button) reaches the blocked thread as a
KeyboardInterrupt; the task is then cancelled on its loop (the coroutine sees
CancelledError) and the thread waits for it to end before it reports the call cancelled. A
task that ignores the cancellation keeps its call open: the parent then replaces the runner
after its grace period, as for any call that does not stop.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from . import capture
from .capture import task_output

_lock = threading.Lock()
_own_loop: Any = None
#: Where attached cells' awaits run; set by serve(), or found by app_loop().
app_loop_hint: Any = None


def node_loop() -> Any:
    """The node's own event loop, started on a thread of its own at first use."""
    global _own_loop
    with _lock:
        if _own_loop is None:
            import asyncio
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="flame-node-loop", daemon=True).start()
            _own_loop = loop
        return _own_loop


def app_loop() -> Any:
    """The app's running event loop: the one named or seen at serve(), else one found
    running now in this process (the main thread's first), else None."""
    global app_loop_hint
    hint = app_loop_hint
    if hint is not None and hint.is_running() and not hint.is_closed():
        return hint
    import asyncio
    import gc
    found = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)
             and o is not _own_loop and o.is_running() and not o.is_closed()]
    main = threading.main_thread().ident
    found.sort(key=lambda o: getattr(o, "_thread_id", None) != main)
    if found:
        app_loop_hint = found[0]
        return found[0]
    return None


def wait(awaitable: Any, loop: Any = None) -> Any:
    """Run ``awaitable`` on ``loop`` (the node's own by default) and block this thread until it
    is done; what it prints goes to the call (or cell) this thread runs."""
    import asyncio
    loop = loop or node_loop()
    output = capture.installed.current() if capture.installed is not None else None
    ended = threading.Event()

    async def task() -> Any:
        if output is not None:
            task_output.set(output)  # this task's (and its children's) prints go to the call
        try:
            return await awaitable
        finally:
            ended.set()

    future = asyncio.run_coroutine_threadsafe(task(), loop)
    try:
        while not ended.wait(0.05):  # short waits: a cancel can reach this thread between them
            pass
    except KeyboardInterrupt:
        future.cancel()  # the coroutine sees CancelledError
        while not ended.wait(0.05):
            pass
        raise
    return future.result()


def is_awaitable(value: Any) -> bool:
    """Whether ``value`` must be awaited (a coroutine, a Future, anything with ``__await__``)."""
    return hasattr(type(value), "__await__")


def awaiter(loop_for: Callable[[], Any]) -> Callable[[Any], Any]:
    """The ``__flame_await__(x)`` that cells' top-level awaits become: ``x`` runs on
    ``loop_for()`` while the cell's thread waits."""
    def await_(awaitable: Any) -> Any:
        return wait(awaitable, loop_for())
    return await_
