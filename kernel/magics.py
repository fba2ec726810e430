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
        pool = self.shell.kernel.attached_pool
        if pool is not None and not code.lstrip().startswith(("%attach", "%detach", "%flame")):
            return pool, self._pinned.get(id(pool)), code, cursor, 0  # every cell runs there
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
        """%attach POOL: run the following cells on one runner of the pool POOL, in a namespace
        that lasts there (as %%remote cells). %attach PATH_OR_NAME: inside a running app (see
        flame.serve). Without an argument: say where cells run."""
        target = line.strip()
        if not target:
            print(self.shell.kernel.where())
            return
        print(self.shell.kernel.attach(target))

    @line_magic
    def detach(self, line: str) -> None:
        """%detach: run cells in this kernel again. The app keeps running; a pool's runner goes
        back to the pool (idle shutdown applies)."""
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
        return self.run_on(pool, cell, self._locals_read(cell))

    @cell_magic
    def flame_attached(self, line: str, cell: str) -> "RemoteValue | None":
        """The cells of a notebook attached to a pool (``%attach POOL``) run through this: on
        the pool's runner, in its namespace; nothing of this kernel's namespace is sent (the
        cells' variables live on the runner)."""
        kernel = self.shell.kernel
        pool = kernel.attached_pool
        if pool is None:
            raise RuntimeError("not attached to a pool")
        if pool.closed:
            kernel.detach()
            raise RuntimeError(f"{pool.name} is shut down; detached: cells run in this kernel again")
        return self.run_on(pool, cell, {}, attached=True)

    def pinned(self, pool: object) -> str | None:
        """The runner holding ``pool``'s interactive namespace (%%remote, %attach), if any."""
        return self._pinned.get(id(pool))

    def unpin(self, pool: object) -> str | None:
        """Let ``pool``'s namespace runner go back to the pool (idle shutdown applies to it)."""
        return self._pinned.pop(id(pool), None)

    def _locals_read(self, cell: str) -> dict:
        """The local values ``cell`` reads that can be pickled (pools and builtins aside)."""
        import cloudpickle
        import flame

        ns = self.shell.user_ns
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
        return variables

    def run_on(self, pool: object, cell: str, variables: dict, attached: bool = False) -> "RemoteValue | None":
        """Run ``cell`` on ``pool``'s namespace runner (booted or chosen at the first cell)."""
        import flame

        pinned = self._pinned.get(id(pool))
        future = pool.submit_to(pinned, flame.run_cell, cell, variables)
        runner = None
        try:
            bundle = future.result()
            runner = future.runner_id
            return None if bundle is None else RemoteValue(*bundle)
        except flame.RunnerDied:
            if attached:  # said now; the next cell boots or takes another runner
                print(f"runner {future.runner_id} died: the namespace of the cells run there is lost; "
                      f"still attached to {pool.name}, the next cell runs on a fresh runner")
            else:
                runner = future.runner_id  # the next %%remote cell says it runs elsewhere
            raise
        except BaseException:
            runner = future.runner_id
            raise
        finally:
            if runner is None:
                self._pinned.pop(id(pool), None)
            else:
                if pinned is not None and runner != pinned:
                    print(f"%%remote: runner {pinned} is gone; this cell ran on {runner} "
                          "with a fresh namespace")
                self._pinned[id(pool)] = runner
