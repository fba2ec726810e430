"""Remote output -> iopub, stamped with the parent header of the cell that made the call."""
from __future__ import annotations

import sys
from typing import Any

from .ipykernel_adapter import iopub_topic


class CellSink:
    """Output sink for one call, bound to the cell (request) that was executing when it was made.

    Made in the caller's thread at submit; its methods run on the pool's I/O thread.
    ipykernel's iopub socket is safe to use from any thread (sends are queued onto
    the iopub thread), and so keeps remote output ordered with local output.
    """

    #: what calls report (flame.report) is drawn in the cell's live chart
    reports = True

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.parent = kernel.get_parent("shell")
        # Local output printed before the call must not be overtaken by remote output.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass

    def _send(self, msg_type: str, content: dict) -> None:
        k = self.kernel
        k.session.send(k.iopub_socket, msg_type, content, parent=self.parent,
                       ident=iopub_topic(k, msg_type))

    def stream(self, name: str, text: str) -> None:
        self._send("stream", {"name": name, "text": text})

    def display(self, data: dict) -> None:
        if data.get("clear_output"):
            self._send("clear_output", {"wait": bool(data.get("wait"))})
            return
        content = {"data": data.get("data", {}), "metadata": data.get("metadata", {}),
                   "transient": data.get("transient", {})}
        self._send("update_display_data" if data.get("update") else "display_data", content)

    def report(self, points: list, key: str, index: int | None) -> None:
        self.kernel.charts.of(self.parent).add(key, index, points)


class CellProgress:
    """A batch's progress line in the cell that started it: one display, updated in place."""

    def __init__(self, kernel: Any) -> None:
        import uuid
        self.kernel = kernel
        self.parent = kernel.get_parent("shell")
        self.display_id = uuid.uuid4().hex
        self.shown = False

    def update(self, text: str, final: bool = False) -> None:
        k = self.kernel
        msg_type = "update_display_data" if self.shown else "display_data"
        self.shown = True
        k.session.send(k.iopub_socket, msg_type, {"data": {"text/plain": text}, "metadata": {},
                                                  "transient": {"display_id": self.display_id}},
                       parent=self.parent, ident=iopub_topic(k, msg_type))
