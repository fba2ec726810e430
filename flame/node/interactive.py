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

    IPython syntax (magics, ``!cmd``) goes through IPython's transformer when IPython is
    installed; ``get_ipython()`` is then whatever the process has (None in a plain app).
    """
    from . import display as rich

    if any(ch in source for ch in "%!?"):
        try:
            from IPython.core.inputtransformer2 import TransformerManager
            source = TransformerManager().transform_cell(source)
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
