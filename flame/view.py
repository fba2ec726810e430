"""A live view of pools (``pool.view()``, ``flame.view()``, the kernel's ``%flame``): a table
per pool of its runners, updated in place about once a second while it is shown and the pool
is open, then left showing the pool's final state.

Each runner's load (CPU, memory, GPU use) comes with its heartbeat (``node/stats.py``), its
calls done and failed are counted as its answers arrive: nothing here is on a call's path.
"""
from __future__ import annotations

import contextvars
import html
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING

from .present import size

if TYPE_CHECKING:  # pragma: no cover
    from .pool import Pool
    from .runner import RunnerInfo

log = logging.getLogger("flame.view")

#: Seconds between two updates of a shown view.
EVERY = 1.0
_COLUMNS = ("runner", "state", "host", "pid", "GPUs", "running", "done", "failed", "Remotes",
            "held", "CPU", "RSS", "GPU use")


class PoolView:
    """Pools as tables, live where IPython shows them. ``pools``: those to show (None: every
    pool of this process, including pools made while the view is shown)."""

    def __init__(self, pools: list[Pool] | None = None, every: float = EVERY) -> None:
        from .registry import pools as live
        self._all = pools is None
        self._pools: list[Pool] = list(live() if pools is None else pools)
        self.every = every
        self._rates: dict[int, tuple[float, int, float]] = {}  # id(pool) -> (time, ended, calls/s)

    # ---- what it shows ---------------------------------------------------------------------
    def _current(self) -> list[Pool]:
        if self._all:
            from .registry import pools as live
            for pool in live():
                if pool not in self._pools:
                    self._pools.append(pool)
        return self._pools

    def _rate(self, pool: Pool) -> float:
        """Calls ended per second since the last look at ``pool``."""
        now, ended = time.monotonic(), pool._inflight.ended
        seen = self._rates.get(id(pool))
        if seen is None:
            self._rates[id(pool)] = (now, ended, 0.0)
            return 0.0
        then, before, rate = seen
        if now - then >= 0.5 * self.every:  # a rate over at least half an update's interval
            rate = (ended - before) / (now - then)
            self._rates[id(pool)] = (now, ended, rate)
        return rate

    def tables(self) -> list[tuple[Pool, str, list[list[str]]]]:
        """Each pool shown: its summary line, and a row of text cells per runner."""
        return [(pool, _summary(pool, self._rate(pool)), [_row(r) for r in pool.runners])
                for pool in self._current()]

    def html(self, tables: list | None = None) -> str:
        tables = self.tables() if tables is None else tables
        if not tables:
            return "<i>no flame pools in this process</i>"
        head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
        parts = []
        for pool, summary, rows in tables:
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            body = body or f'<tr><td colspan="{len(_COLUMNS)}"><i>no runners</i></td></tr>'
            parts.append(f"<div><b>{html.escape(pool.name)}</b> — {html.escape(summary)}"
                         f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
        return "".join(parts)

    def text(self, tables: list | None = None) -> str:
        tables = self.tables() if tables is None else tables
        if not tables:
            return "no flame pools in this process"
        return "\n".join(f"{pool.name}: {summary}" + "".join("\n  " + " | ".join(row) for row in rows)
                         for pool, summary, rows in tables)

    def bundle(self) -> dict:
        tables = self.tables()  # one look at the pools for both forms
        return {"text/html": self.html(tables), "text/plain": self.text(tables)}

    def _repr_html_(self) -> str:
        return self.html()

    def __repr__(self) -> str:
        return self.text()

    # ---- live in IPython -------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        """Show it, then update it in place until every pool it shows is shut down."""
        from IPython.display import display
        display_id = uuid.uuid4().hex
        display(self.bundle(), raw=True, display_id=display_id)
        if any(not p.closed for p in self._current()):
            # In the context of the cell that showed it: its updates carry that cell's header.
            context = contextvars.copy_context()
            threading.Thread(target=context.run, args=(self._follow, display_id),
                             name="flame-view", daemon=True).start()

    def _follow(self, display_id: str) -> None:
        from IPython.display import update_display
        try:
            while True:
                time.sleep(self.every)
                pools = self._current()
                open_ = [p for p in pools if not p.closed]
                update_display(self.bundle(), raw=True, display_id=display_id)
                if not open_:
                    return  # the final state stays shown
        except Exception:  # the kernel is going away
            log.debug("flame: pool view stopped", exc_info=True)


def _summary(pool: Pool, rate: float) -> str:
    state = "shut down" if pool.closed else f"{pool.waiting} waiting, {rate:.1f} calls/s"
    return f"{pool.backend!r}, max={pool.max}, max_concurrency={pool.max_concurrency}; {state}"


def _row(r: RunnerInfo) -> list[str]:
    names = {g.get("id"): g.get("name") for g in r.extra.get("gpu_info", [])}
    gpus = ", ".join(f"{g} ({names[g]})" if names.get(g) else str(g) for g in r.gpus) or "–"
    use = ", ".join(f"{g['id']}: {g['util']}% {size(g['memory_used'])}/{size(g['memory_total'])}"
                    for g in r.gpu_use) or "–"
    return [r.id, r.state, r.host, str(r.pid or ""), gpus, str(r.active), str(r.calls_done),
            str(r.failures), str(r.objects), size(r.object_bytes) if r.objects else "",
            "" if r.cpu is None else f"{r.cpu:.0f}%", "" if r.rss is None else size(r.rss), use]


def view(*pools: Pool) -> PoolView:
    """A live view of ``pools`` (none named: every pool of this process)."""
    return PoolView(list(pools) if pools else None)
