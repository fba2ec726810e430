"""Run a notebook cell on a runner, in a namespace that lasts as long as the runner (``%%remote``)."""
from __future__ import annotations

import ast
from typing import Any

#: The runner's interactive namespace, shared by every ``%%remote`` cell sent to it.
NAMESPACE: dict[str, Any] = {"__name__": "__main__"}


def run_cell(source: str, variables: dict[str, Any], filename: str = "<remote-cell>") -> None:
    """Execute ``source`` with ``variables`` bound first; display the last expression's value."""
    NAMESPACE.update(variables)
    run_source(source, NAMESPACE, filename)


def run_source(source: str, namespace: dict, filename: str = "<cell>") -> None:
    """exec ``source`` in ``namespace`` like a notebook cell: the last expression's value is displayed.

    IPython syntax (magics, ``!cmd``) goes through IPython when it is installed: the cell is
    transformed, and the first time it needs ``get_ipython()`` a shell is made over this
    namespace (history off; the process's own shell when it already has one).
    """
    from . import display as rich

    if any(ch in source for ch in "%!?"):
        try:
            from IPython.core.inputtransformer2 import TransformerManager
            source = TransformerManager().transform_cell(source)
            if "get_ipython()" in source:
                _shell(namespace)
        except ImportError:
            pass
    tree = ast.parse(source, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    import linecache
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        value = eval(compile(last, filename, "eval"), namespace)
        if value is not None:
            namespace["_"] = value
            rich.display(value)


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
