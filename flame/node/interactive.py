"""Run a notebook cell on a runner, in a namespace that lasts as long as the runner (``%%remote``)."""
from __future__ import annotations

import ast
from typing import Any, Callable

CO_COROUTINE = 0x0080  # inspect.CO_COROUTINE, without importing inspect on a runner

#: The runner's interactive namespace, shared by every ``%%remote`` cell sent to it.
NAMESPACE: dict[str, Any] = {"__name__": "__main__"}


def run_cell(source: str, variables: dict[str, Any], filename: str = "<remote-cell>") -> tuple | None:
    """Execute ``source`` with ``variables`` bound first (``%%remote``); the mime bundle
    ``(data, metadata)`` of the last expression's value, computed here, or None.

    Top-level ``await`` runs on the runner's own event loop.
    """
    NAMESPACE.update(variables)
    value = run_source(source, NAMESPACE, filename)
    return None if value is None else result_bundle(value)


def result_bundle(value: Any) -> tuple[dict, dict]:
    """The mime bundle of a cell's value, as an ``execute_result`` carries it."""
    from .display import mime_bundle
    return mime_bundle(value)


def remember(namespace: dict, value: Any, count: int | None) -> None:
    """Keep a cell's value as IPython does: ``_``, ``__``, ``___``, and ``Out[n]``/``_n``."""
    namespace["___"], namespace["__"] = namespace.get("__"), namespace.get("_")
    namespace["_"] = value
    if count is not None:
        namespace.setdefault("Out", {})[count] = value
        namespace[f"_{count}"] = value


def user_expressions(expressions: dict, namespace: dict) -> dict:
    """Jupyter's ``user_expressions``: each expression evaluated in ``namespace``, as a mime bundle."""
    out = {}
    for name, expr in (expressions or {}).items():
        try:
            data, md = result_bundle(eval(expr, namespace))
            out[name] = {"status": "ok", "data": data, "metadata": md}
        except Exception as exc:
            out[name] = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc), "traceback": []}
    return out


def run_source(source: str, namespace: dict, filename: str = "<cell>",
               loop_for: Callable[[], Any] | None = None, count: int | None = None) -> Any:
    """exec ``source`` in ``namespace`` like a notebook cell; the last expression's value (kept
    as ``_``, and ``Out[count]`` when the cell has an execution count), or None.

    IPython syntax (magics, ``!cmd``) goes through IPython when it is installed: the cell is
    transformed, and the first time it needs ``get_ipython()`` a shell is made over this
    namespace (history off; the process's own shell when it already has one).

    Top-level ``await X`` runs ``X`` on ``loop_for()`` (the node's own loop by default) while
    the rest of the cell runs here (see ``aio``). A cell whose top level needs a coroutine
    itself (``async for``, ``async with``) runs whole on that loop.
    """
    if any(ch in source for ch in "%!?"):
        try:
            from IPython.core.inputtransformer2 import TransformerManager
            source = TransformerManager().transform_cell(source)
            if "get_ipython()" in source:
                _shell(namespace)
        except ImportError:
            pass
    tree = ast.parse(source, filename, "exec")
    awaiting = "await" in source or "async" in source
    if awaiting:
        from . import aio
        tree = ast.fix_missing_locations(_AwaitCalls().visit(tree))
        namespace["__flame_await__"] = aio.awaiter(loop_for or aio.node_loop)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    import linecache
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    try:
        code = compile(tree, filename, "exec")
    except SyntaxError:
        if not awaiting:
            raise
        code = compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & CO_COROUTINE:
        aio.wait(eval(code, namespace), (loop_for or aio.node_loop)())
    else:
        exec(code, namespace)
    if last is not None:
        code = compile(last, filename, "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if awaiting else 0)
        value = eval(code, namespace)
        if code.co_flags & CO_COROUTINE:
            value = aio.wait(value, (loop_for or aio.node_loop)())
        if value is not None:
            remember(namespace, value, count)
        return value
    return None


class _AwaitCalls(ast.NodeTransformer):
    """``await X`` at a cell's top level -> ``__flame_await__(X)``; awaits inside functions stay."""

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_Await(self, node: ast.Await) -> ast.AST:
        self.generic_visit(node)
        return ast.copy_location(ast.Call(ast.Name("__flame_await__", ast.Load()), [node.value], []), node)


def _shell(namespace: dict) -> object:
    """An IPython shell whose user namespace is ``namespace`` (made once, lazily)."""
    import sys

    from IPython.core.interactiveshell import InteractiveShell
    if InteractiveShell.initialized():
        shell = InteractiveShell.instance()
    else:
        from traitlets.config import Config
        config = Config()
        config.HistoryManager.enabled = False  # no sqlite file in the app's or runner's home
        main = sys.modules.get("__main__")
        if main is not None and getattr(main, "__dict__", None) is namespace:
            shell = InteractiveShell.instance(config=config, user_module=main)
        else:
            shell = InteractiveShell.instance(config=config, user_ns=namespace)
        shell.system = _system  # type: ignore[method-assign]  # `!cmd` output into the cell
    namespace.setdefault("get_ipython", shell.get_ipython)
    return shell


def _system(cmd: str) -> None:
    """``!cmd``: run it and write its output through sys.stdout, which is captured per call
    (IPython's own version writes to the process's file descriptors, which are not)."""
    import subprocess
    import sys
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
    proc.wait()
