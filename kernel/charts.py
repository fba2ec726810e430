"""Live charts in the cell: what calls report (``flame.report``) drawn as one chart per cell,
updated in place while they run (``update_display_data``), at most a few times a second."""
from __future__ import annotations

import collections
import threading
import time
import uuid
from typing import Any

from .ipykernel_adapter import iopub_topic

#: Least time between two updates of one chart: reports arrive batched per flush on each
#: runner, and with many runners redrawing on each batch would flood the frontend.
INTERVAL = 0.25
#: Charts kept per kernel (one per cell that reported): older cells' charts are let go.
KEPT = 64


class CellChart:
    """The live chart of one cell: one display, updated in place."""

    def __init__(self, kernel: Any, parent: dict) -> None:
        import flame
        self.kernel, self.parent = kernel, parent
        self.chart = flame.Chart()
        self.display_id = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._shown = False
        self._dirty = False
        self._last = 0.0
        self._timer: threading.Timer | None = None

    def add(self, key: str, index: int | None, points: list) -> None:
        """Reports of one call (on the thread that received them)."""
        with self._lock:
            self.chart.add(key, index, points)
            self._dirty = True
            wait = self._last + INTERVAL - time.monotonic()
            if wait > 0:
                if self._timer is None:  # one update later takes in whatever comes meanwhile
                    self._timer = threading.Timer(wait, self.show)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.show()

    def show(self, final: bool = False) -> None:
        """Send the chart as it is now, if it changed (``final``: with a PNG where one can be made)."""
        with self._lock:
            self._timer = None
            if not self._dirty and not (final and self._shown):
                return
            self._dirty = False
            self._last = time.monotonic()
            msg_type = "update_display_data" if self._shown else "display_data"
            self._shown = True
            content = {"data": self.chart.bundle(png=final), "metadata": {},
                       "transient": {"display_id": self.display_id}}
            k = self.kernel
            k.session.send(k.iopub_socket, msg_type, content, parent=self.parent,
                           ident=iopub_topic(k, msg_type))


class Charts:
    """The kernel's live charts, by the cell (request id) whose calls report."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._lock = threading.Lock()
        self._by_cell: collections.OrderedDict[str, CellChart] = collections.OrderedDict()

    def of(self, parent: dict) -> CellChart:
        cell = parent.get("header", {}).get("msg_id", "")
        with self._lock:
            chart = self._by_cell.get(cell)
            if chart is None:
                chart = self._by_cell[cell] = CellChart(self.kernel, parent)
                while len(self._by_cell) > KEPT:
                    self._by_cell.popitem(last=False)
            return chart

    def cell_done(self, parent: dict) -> None:
        """The cell finished: its chart shows everything reported so far, at once."""
        with self._lock:
            chart = self._by_cell.get(parent.get("header", {}).get("msg_id", ""))
        if chart is not None:
            chart.show(final=True)
