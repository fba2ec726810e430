"""Rich display on a runner, without a full IPython shell.

IPython is imported only when a call imports it: a post-import hook on the
``IPython`` package replaces ``IPython.display.display`` (and its friends) with
versions that turn objects into mime bundles here and hand them to the call's
output, which the node sends as ``display`` messages. The parent's sink shows
them in the cell that made the call.
"""
from __future__ import annotations

import base64
import importlib.machinery
import sys
from typing import Any, Callable

_REPRS = [("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"),
          ("image/svg+xml", "_repr_svg_"), ("image/png", "_repr_png_"),
          ("image/jpeg", "_repr_jpeg_"), ("text/latex", "_repr_latex_"),
          ("application/json", "_repr_json_"), ("application/javascript", "_repr_javascript_")]

#: Set by the node: publish(payload) sends a display event for the current call.
publish: Callable[[dict], None] | None = None


def mime_bundle(obj: Any, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
    """The mime bundle of one object: IPython's own formatters when IPython is loaded (as it
    is whenever a call uses ``IPython.display``), else a light equivalent of them."""
    data: dict = {}
    metadata: dict = {}
    if type(obj).__module__.startswith("matplotlib") and hasattr(obj, "savefig"):
        import io
        buf = io.BytesIO()
        obj.savefig(buf, format="png", bbox_inches="tight")
        data["image/png"] = base64.b64encode(buf.getvalue()).decode()
    if "IPython" in sys.modules:
        got, md = _formatter().format(obj, include=include, exclude=exclude)
        for mime, value in got.items():
            data.setdefault(mime, base64.b64encode(value).decode() if isinstance(value, bytes) else value)
        metadata.update(md or {})
        return data, metadata
    method = getattr(obj, "_repr_mimebundle_", None)
    if callable(method):
        try:
            got = method(include=include, exclude=exclude)
        except TypeError:
            got = method()
        if isinstance(got, tuple):
            got, md = got
            metadata.update(md or {})
        data.update(got or {})
    for mime, name in _REPRS:
        if mime in data:
            continue
        method = getattr(obj, name, None)
        if not callable(method) or isinstance(obj, type):
            continue
        try:
            value = method()
        except NotImplementedError:
            continue
        if isinstance(value, tuple):
            value, md = value
            metadata[mime] = md
        if value is None:
            continue
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        data[mime] = value
    data.setdefault("text/plain", repr(obj))
    if include:
        data = {k: v for k, v in data.items() if k in include}
    if exclude:
        data = {k: v for k, v in data.items() if k not in exclude}
    return data, metadata


_display_formatter: Any = None


def _formatter() -> Any:
    """The shell's display formatter when there is a shell, else one of our own (no shell, no
    history file: a runner has no business creating one)."""
    global _display_formatter
    from IPython.core.interactiveshell import InteractiveShell
    if InteractiveShell.initialized():
        return InteractiveShell.instance().display_formatter
    if _display_formatter is None:
        from IPython.core.formatters import DisplayFormatter
        _display_formatter = DisplayFormatter()
    return _display_formatter


def display(*objs: Any, include: Any = None, exclude: Any = None, metadata: dict | None = None,
            transient: dict | None = None, display_id: Any = None, raw: bool = False,
            clear: bool = False, update: bool = False, **kwargs: Any) -> Any:
    """Replacement for ``IPython.display.display`` on runners."""
    if publish is None:
        print(*objs)
        return None
    if display_id is True:
        import uuid
        display_id = uuid.uuid4().hex
    transient = dict(transient or {})
    if display_id:
        transient["display_id"] = display_id
    if clear:
        clear_output(wait=True)
    for obj in objs:
        if raw:
            data, md = dict(obj), {}
        else:
            data, md = mime_bundle(obj, include, exclude)
        md.update(metadata or {})
        publish({"data": data, "metadata": md, "transient": transient, "update": bool(update)})
    if display_id:
        from IPython.display import DisplayHandle
        return DisplayHandle(display_id)
    return None


def update_display(obj: Any, *, display_id: Any, **kwargs: Any) -> None:
    kwargs["update"] = True
    display(obj, display_id=display_id, **kwargs)


def clear_output(wait: bool = False) -> None:
    if publish is not None:
        publish({"clear_output": True, "wait": bool(wait)})


def _patch(module: Any) -> None:
    for name, fn in (("display", display), ("update_display", update_display),
                     ("clear_output", clear_output)):
        if hasattr(module, name):
            setattr(module, name, fn)


class _AfterImport:
    """Patches IPython's display functions right after IPython's own modules are executed.

    A meta path finder by protocol (``find_spec``), not by subclassing ``importlib.abc``'s,
    whose import costs a runner 12 ms at start."""

    TARGETS = ("IPython.core.display_functions", "IPython.display", "IPython.core.display")

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in self.TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _patch(module)
        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def to_calls(capture: Any) -> Callable[[dict], None]:
    """The publisher both nodes install: a display goes to the call that made it (its
    capture's current output), and one made outside any call is printed as text, as a
    terminal IPython would."""
    def publish(payload: dict) -> None:
        out = capture.current()
        if out is None:
            print(payload.get("data", {}).get("text/plain", ""))
        else:
            out.display(payload)
    return publish


def install(publisher: Callable[[dict], None]) -> None:
    global publish
    publish = publisher
    for name in _AfterImport.TARGETS:
        if name in sys.modules:
            _patch(sys.modules[name])
    sys.meta_path.insert(0, _AfterImport())
