"""Progress of a batch of calls: ``pool.map`` and ``flame.gather`` show one line while they wait.

The line appears once the batch has taken PROGRESS_AFTER seconds, is updated in place, and
is finalised when the batch ends. Where it goes is chosen like output sinks are: the
flamebook kernel installs a factory that shows it in the calling cell (``display_data`` with
a display id, then ``update_display_data``); outside a kernel there is none, unless
``FLAME_PROGRESS=1`` asks for a plain line on stderr.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Protocol

#: Seconds a batch runs before its progress line appears.
PROGRESS_AFTER = 1.0
#: Seconds between two updates of the line.
PROGRESS_EVERY = 0.25


class Progress(Protocol):
    """Where one batch's progress line goes. Methods are called from a helper thread."""

    def update(self, text: str, final: bool = False) -> None:
        """Show ``text`` in place of the line shown before; ``final`` for the last time."""


class StderrProgress:
    """A plain line on ``sys.stderr``, rewritten in place with a carriage return."""

    def __init__(self) -> None:
        self.err = sys.stderr

    def update(self, text: str, final: bool = False) -> None:
        try:
            self.err.write("\r" + text + ("\n" if final else ""))
            self.err.flush()
        except (ValueError, OSError):
            pass


def _default() -> Progress | None:
    return StderrProgress() if os.environ.get("FLAME_PROGRESS") == "1" else None


_factory: Callable[[], Progress | None] = _default


def set_progress_factory(factory: Callable[[], Progress | None] | None) -> None:
    """Choose how each batch makes its progress line (called in the caller's thread when the
    batch starts; may return None for none). ``None`` restores the default."""
    global _factory
    _factory = factory or _default


def make() -> Progress | None:
    """A progress line from the factory (None: none is shown), for what is not a batch of calls."""
    try:
        return _factory()
    except Exception:
        return None


def describe(title: str, pending: Iterable[Any], total: int, done: int, failed: int, elapsed: float) -> str:
    """``map(work): 12/40 done, 1 failed, on pool-1-...-r1, r2 · 3.2 s``."""
    working = sorted({f.runner_id for f in pending if not f.done() and getattr(f, "runner_id", None)})
    on = f", on {', '.join(working[:4])}{' ...' if len(working) > 4 else ''}" if working else ""
    fails = f", {failed} failed" if failed else ""
    return f"{title}: {done}/{total} done{fails}{on} · {elapsed:.1f} s"


class Tracker:
    """Counts a batch's futures as they settle and keeps its progress line (if any) current."""

    def __init__(self, title: str, futures: Iterable[Any]) -> None:
        self.title = title
        futures = list(futures)
        self.total = len(futures)
        #: the futures not yet done: a done one (its result) is not kept alive from here
        self.pending: set = set()
        self.done = self.failed = 0
        self.started = time.monotonic()
        self.progress = _factory()
        self._ended = threading.Event()
        self._shown = False
        self._finished = False
        self._show_lock = threading.Lock()
        if self.progress is None or not futures:
            return
        lock = threading.Lock()
        self.pending.update(futures)

        def count(f: Any) -> None:
            with lock:
                self.pending.discard(f)
                self.done += 1
                if f.cancelled() or f.exception() is not None:
                    self.failed += 1
        for f in futures:
            f.add_done_callback(count)
        threading.Thread(target=self._keep, name="flame-progress", daemon=True).start()

    def _text(self) -> str:
        with contextlib.suppress(RuntimeError):  # the set changed size: its next look will do
            return describe(self.title, list(self.pending), self.total, self.done, self.failed,
                            time.monotonic() - self.started)
        return f"{self.title}: {self.done}/{self.total} done"

    def _keep(self) -> None:
        if self._ended.wait(PROGRESS_AFTER):
            return
        self._shown = True
        while True:
            self._safe(self._text(), False)
            if self._ended.wait(PROGRESS_EVERY):
                return

    def _safe(self, text: str, final: bool) -> None:
        with self._show_lock:  # the final line is the last one, whichever thread shows it
            if self._finished:
                return
            self._finished = final
            try:
                self.progress.update(text, final)  # type: ignore[union-attr]
            except Exception:
                pass

    def close(self) -> None:
        """The batch has ended: finalise the line, if it was shown."""
        self._ended.set()
        if self._shown:
            self._safe(self._text(), True)

