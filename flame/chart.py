"""A live chart of what calls report (``flame.report``): one series per call, one panel per
metric, as a Vega-Lite spec that JupyterLab, VS Code and nbviewer-like tools draw natively.

A Chart is data only: the kernel decides when to show it (``bundle()``), and how often.
"""
from __future__ import annotations

import math
from typing import Any

#: Points kept per series: past twice this many, every other one is dropped (the last is kept).
MAX_POINTS = 2000
VEGALITE = "application/vnd.vegalite.v5+json"


class Chart:
    """The reports of the calls of one cell, by series."""

    def __init__(self, title: str = "") -> None:
        self.title = title
        #: series label -> metric -> [(x, value)]
        self.series: dict[str, dict[str, list[tuple[float, float]]]] = {}
        self._counts: dict[str, int] = {}  # reports per series, the x of those without a step
        self._labels: dict[Any, str] = {}  # a call's key -> the label of its unnamed series
        self.points = 0

    def label(self, key: Any, index: int | None, point: dict) -> str:
        """The series a report goes to: its own name, else its map index, else the call's
        place among the calls of this cell that reported."""
        name = point.get("series")
        if name is not None:
            return str(name)
        if index is not None:
            return str(index + int(point.get("item") or 0))
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = f"call {len(self._labels) + 1}"
        return label

    def add(self, key: Any, index: int | None, points: list[dict]) -> None:
        """Reports of one call (``key`` tells calls apart), each ``{"metrics": {...}, "step": x,
        "series": name, "item": offset in its chunk}``."""
        for point in points:
            label = self.label(key, index, point)
            count = self._counts[label] = self._counts.get(label, 0) + 1
            x = point.get("step")
            x = count if x is None else x
            metrics = self.series.setdefault(label, {})
            for name, value in point.get("metrics", {}).items():
                line = metrics.setdefault(str(name), [])
                line.append((x, value))
                self.points += 1
                if len(line) > 2 * MAX_POINTS:
                    last = line[-1]
                    del line[::2]  # halve it, evenly
                    if line[-1] != last:
                        line.append(last)

    def metrics(self) -> list[str]:
        names: dict[str, None] = {}
        for metrics in self.series.values():
            names.update(dict.fromkeys(metrics))
        return list(names)

    def spec(self) -> dict:
        """The chart as a Vega-Lite v5 spec, its data inline."""
        values = [{"series": label, "metric": metric, "x": x,
                   "value": v if v is not None and math.isfinite(v) else None}
                  for label, metrics in self.series.items()
                  for metric, line in metrics.items() for x, v in line]
        layer = {"mark": {"type": "line", "point": len(values) < 200, "tooltip": True},
                 "encoding": {"x": {"field": "x", "type": "quantitative", "title": "step"},
                              "y": {"field": "value", "type": "quantitative", "title": None,
                                    "scale": {"zero": False}},
                              "color": {"field": "series", "type": "nominal", "title": "series"}},
                 "width": 420, "height": 180}
        spec: dict[str, Any] = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
                                "data": {"values": values}}
        if self.title:
            spec["title"] = self.title
        if len(self.metrics()) <= 1:
            layer["encoding"]["y"]["title"] = (self.metrics() or ["value"])[0]
            spec.update(layer)
        else:  # one panel per metric, each with its own scale
            spec.update({"facet": {"row": {"field": "metric", "type": "nominal", "title": None,
                                           "sort": self.metrics()}},
                         "spec": layer, "resolve": {"scale": {"y": "independent"}}})
        return spec

    def text(self) -> str:
        """The last value of each metric of each series, for text views."""
        lines = [f"{self.title or 'flame.report'}: {len(self.series)} series, {self.points} points"]
        for label, metrics in self.series.items():
            last = ", ".join(f"{m}={_number(line[-1][1])}" for m, line in metrics.items() if line)
            lines.append(f"  {label}: {last}")
        return "\n".join(lines)

    def bundle(self, png: bool = False) -> dict:
        """The mime bundle to show: Vega-Lite, a text summary, and with ``png`` a picture for
        static views of a saved notebook where a renderer (vl-convert-python) is installed."""
        data: dict[str, Any] = {VEGALITE: self.spec(), "text/plain": self.text()}
        if png:
            try:
                import base64

                import vl_convert  # optional: not a dependency
                data["image/png"] = base64.b64encode(vl_convert.vegalite_to_png(data[VEGALITE])).decode()
            except Exception:  # not installed, or it could not draw this one
                pass
        return data


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"
