"""%flame and %%remote."""
from __future__ import annotations

import ast
import builtins
import logging

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import HTML, display

log = logging.getLogger("kernel.magics")


def names_read(source: str) -> set[str]:
    """Names a cell reads (loads), so that %%remote can send their local values along."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


class RemoteValue:
    """A ``%%remote`` cell's value as the runner rendered it: the cell's ``Out[n]``."""

    def __init__(self, data: dict, metadata: dict) -> None:
        self.data, self.metadata = data, metadata

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> tuple[dict, dict]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return self.data.get("text/plain", "<remote value>")


@magics_class
class FlameMagics(Magics):
    def __init__(self, shell):
        super().__init__(shell)
        self._pinned: dict[int, str] = {}  # id(pool) -> runner id holding its %%remote namespace

    def remote_target(self, code: str, cursor: int) -> tuple | None:
        """For a ``%%remote`` cell with the cursor in its body: ``(pool, runner id or None,
        body, cursor in body, offset of body)``; else None."""
        import flame
        if not code.lstrip().startswith("%%remote"):
            return None
        head, sep, body = code.lstrip().partition("\n")
        offset = len(code) - len(code.lstrip()) + len(head) + len(sep)
        if not sep or cursor < offset:
            return None  # completing the magic's own line
        name = head[len("%%remote"):].strip()
        if name:
            pool = self.shell.user_ns.get(name)
            if not isinstance(pool, flame.Pool):
                return None
        else:
            pools = flame.pools()
            if len(pools) != 1:
                return None
            pool = pools[0]
        return pool, self._pinned.get(id(pool)), body, cursor - offset, offset

    @line_magic
    def attach(self, line: str) -> None:
        """%attach PATH_OR_NAME: run the following cells inside a running app (see flame.serve)."""
        target = line.strip()
        if not target:
            print(self.shell.kernel.where())
            return
        print(self.shell.kernel.attach(target))

    @line_magic
    def detach(self, line: str) -> None:
        """%detach: run cells in this kernel again. The app keeps running."""
        print(self.shell.kernel.detach())

    @line_magic
    def flame(self, line: str) -> None:
        """%flame: every flame pool in this kernel as a live table of its runners (state, load,
        calls, Remotes, GPUs), updated about once a second while its pools are open."""
        import flame
        if not flame.pools():
            display(HTML("<i>no flame pools in this kernel</i>"))
            return
        display(flame.view())

    @cell_magic
    def remote(self, line: str, cell: str) -> "RemoteValue | None":
        """%%remote [pool]: run this cell on one runner of the pool, in a namespace that persists there.

        Local variables the cell reads are sent along (by value); the last expression is displayed.
        Without an argument, the kernel's only pool is used.
        """
        import cloudpickle
        import flame

        ns = self.shell.user_ns
        name = line.strip()
        if name:
            pool = ns.get(name)
            if not isinstance(pool, flame.Pool):
                raise NameError(f"%%remote: {name!r} is not a flame.Pool in this notebook")
        else:
            pools = flame.pools()
            if len(pools) != 1:
                raise ValueError(f"%%remote: there are {len(pools)} pools; name one: %%remote POOL")
            pool = pools[0]
        variables, skipped = {}, []
        for var in sorted(names_read(cell)):
            if var not in ns or var.startswith("_") or hasattr(builtins, var) and ns[var] is getattr(builtins, var):
                continue
            value = ns[var]
            if isinstance(value, flame.Pool):
                continue
            try:
                cloudpickle.dumps(value)
            except Exception:
                skipped.append(var)
                continue
            variables[var] = value
        if skipped:
            log.warning("%%remote: not sending %s (cannot be pickled)", ", ".join(skipped))
        pinned = self._pinned.get(id(pool))
        future = pool.submit_to(pinned, flame.run_cell, cell, variables)
        try:
            bundle = future.result()
            return None if bundle is None else RemoteValue(*bundle)
        finally:
            runner = future.runner_id
            if runner is not None:
                if pinned is not None and runner != pinned:
                    print(f"%%remote: runner {pinned} is gone; this cell ran on {runner} "
                          "with a fresh namespace")
                self._pinned[id(pool)] = runner
