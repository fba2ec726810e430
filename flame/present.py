"""How a pool shows itself and its errors: the HTML table, exit descriptions, remote tracebacks
pointed back at local source."""
from __future__ import annotations

import re
from typing import Any


def pool_html(pool: Any) -> str:
    """The pool as an HTML table of its runners (notebooks show a pool this way; ``%flame`` too)."""
    import datetime
    import html  # only when a pool is shown

    rows = []
    now = datetime.datetime.now()
    for r in pool.runners:
        up = str(now - r.started).split(".")[0]
        names = {g.get("id"): g.get("name") for g in r.extra.get("gpu_info", [])}
        gpus = ", ".join(f"{g} ({names[g]})" if names.get(g) else str(g) for g in r.gpus) or "–"
        rows.append(f"<tr><td>{html.escape(r.id)}</td><td>{r.state}</td><td>{html.escape(r.host)}</td>"
                    f"<td>{r.pid or ''}</td><td>{r.active}</td><td>{r.objects}</td>"
                    f"<td>{size(r.object_bytes) if r.objects else ''}</td><td>{up}</td>"
                    f"<td>{html.escape(gpus)}</td></tr>")
    body = "".join(rows) or '<tr><td colspan="9"><i>no runners</i></td></tr>'
    return (f"<div><b>flame.Pool {html.escape(pool.name)}</b> — {html.escape(repr(pool.backend))}, "
            f"max={pool.max}, max_concurrency={pool.max_concurrency}, waiting calls: {pool.waiting}"
            f"{' (shut down)' if pool.closed else ''}"
            "<table><thead><tr><th>runner</th><th>state</th><th>host</th><th>pid</th>"
            "<th>active calls</th><th>objects</th><th>held</th><th>uptime</th><th>GPUs</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def pool_text(pool: Any) -> str:
    """The pool in one line: its runners by state, its calls running and waiting."""
    import collections

    runners = pool.runners
    states = collections.Counter(r.state for r in runners)
    desc = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no runners"
    return (f"<flame.Pool {pool.name}: {desc}; {sum(r.active for r in runners)} running, "
            f"{pool.waiting} waiting; max={pool.max} max_concurrency={pool.max_concurrency}"
            f"{' (shut down)' if pool.closed else ''}>")


def size(nbytes: int) -> str:
    """``1.5 MB``: a byte count for people."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def describe_exit(code: int) -> str:
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def output_note(tail: str) -> str:
    """The runner's last output, for the end of an error message (nothing if it said nothing)."""
    return f"; last output:\n{tail}" if tail.strip() else ""


def local_source(tb: str, fn: Any) -> str:
    """Point remote traceback lines of functions sent by value back at their local source.

    cloudpickle renames the file of code it sends to "<dynamic-code>", so the runner
    cannot show source lines; the parent still has the code objects and linecache.
    """
    if "<dynamic-code>" not in tb or fn is None:
        return tb
    import linecache
    import re
    import types
    codes: dict[str, list] = {}
    seen: set = set()
    todo = [getattr(fn, "__code__", None) or getattr(getattr(fn, "__call__", None), "__code__", None)]
    env = getattr(fn, "__globals__", {})
    while todo:
        code = todo.pop()
        if not isinstance(code, types.CodeType) or code in seen or len(seen) > 500:
            continue
        seen.add(code)
        codes.setdefault(code.co_name, []).append(code)
        todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        for name in code.co_names:  # helpers defined next to fn (same notebook or script)
            value = env.get(name)
            if isinstance(value, types.FunctionType) and value.__module__ == getattr(fn, "__module__", None):
                todo.append(value.__code__)

    def fix(m: "re.Match[str]") -> str:
        line, name = int(m.group(1)), m.group(2)
        for code in codes.get(name, ()):
            lines = [n for _, _, n in code.co_lines() if n is not None]
            if lines and min(lines) <= line <= max(lines):
                src = linecache.getline(code.co_filename, line).strip()
                return f'File "{code.co_filename}", line {line}, in {name}' + (f"\n    {src}" if src else "")
        return m.group(0)
    return re.sub(r'File "<dynamic-code>", line (\d+), in (\S+)', fix, tb)


def explain_missing_module(exc: BaseException, runner: Any) -> None:
    """Add to a runner's ModuleNotFoundError, in place, that the module is installed here (its
    version) but not on the runner's host, and how to install it there (with ``deps=False``,
    installed packages are not sent; with deps on, the module is not one of theirs here)."""
    from .codesync import missing_module_hint
    from .errors import RemoteError
    name = getattr(exc, "name", None)
    text = exc.message if isinstance(exc, RemoteError) else str(exc)
    if not name:
        found = re.search(r"No module named '([^']+)'", text)
        name = found.group(1) if found else None
    hint = missing_module_hint(name, getattr(runner, "host", "") or "localhost",
                               getattr(runner, "executable", ""))
    if not hint:
        return
    if isinstance(exc, RemoteError):
        exc.message += hint
    elif isinstance(exc, ImportError):
        exc.msg = text + hint
        exc.args = (exc.msg,)
