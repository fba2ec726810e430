"""Run a notebook cell on a runner, in a namespace that lasts as long as the runner (``%%remote``)."""
from __future__ import annotations

import ast
from typing import Any

#: The runner's interactive namespace, shared by every ``%%remote`` cell sent to it.
NAMESPACE: dict[str, Any] = {"__name__": "__main__"}


def run_cell(source: str, variables: dict[str, Any], filename: str = "<remote-cell>") -> None:
    """Execute ``source`` with ``variables`` bound first; display the last expression's value."""
    from . import display as rich

    NAMESPACE.update(variables)
    tree = ast.parse(source, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), NAMESPACE)
    if last is not None:
        value = eval(compile(last, filename, "eval"), NAMESPACE)
        if value is not None:
            NAMESPACE["_"] = value
            rich.display(value)
