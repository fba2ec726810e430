"""``flame.report(**metrics)``: numbers a call reports while it runs, drawn live in the cell
that made the call (one series per call, one panel per metric).

Reports ride with the call's output (batched by the same flush) and only when its caller
shows them: a call made where nobody draws them (a plain script without FLAME_PROGRESS=1)
keeps nothing and sends nothing.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import Any

log = logging.getLogger("flame.report")

#: The item of a chunk running now (``map(..., chunksize=n)``): its series is its own.
current_item = threading.local()


def report(*, step: float | None = None, series: str | None = None, **metrics: Any) -> None:
    """Report numbers from inside a call, e.g. ``flame.report(loss=0.3, step=epoch)``.

    Each metric is one panel of the calling cell's live chart, each call one series (named
    by ``series``, else by the call's index in its ``map``); x is ``step`` when given, else
    the count of the series' reports. Values must be numbers (NumPy and torch scalars too).
    Outside a call, or where nobody shows reports, it does nothing.
    """
    from . import capture
    out = capture.installed.current() if capture.installed is not None else None
    if out is None or not out.reports:
        log.debug("flame.report%s: not in a call whose caller shows reports; ignored", tuple(metrics))
        return
    values = {}
    for name, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"flame.report: {name}={value!r} is not a number") from None
        values[name] = number if math.isfinite(number) else None
    point: dict[str, Any] = {"metrics": values}
    if step is not None:
        point["step"] = float(step)
    if series is not None:
        point["series"] = str(series)
    item = getattr(current_item, "index", 0)
    if item:
        point["item"] = item
    out.report(point)
