"""FlameKernel: IPython's kernel, with flame pools made native."""
from __future__ import annotations

from ipykernel.ipkernel import IPythonKernel

from .outputs import CellSink

BANNER_EXTRA = ("flamebook: `import flame; pool = flame.Pool()` runs functions on runners; "
                "their output lands in the cell that called them. %flame lists pools; "
                "%%remote runs a cell on a runner.")


class FlameKernel(IPythonKernel):
    implementation = "flamebook"
    implementation_version = "0.1.0"

    @property
    def banner(self) -> str:  # type: ignore[override]
        return super().banner + "\n" + BANNER_EXTRA

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        import flame

        from .magics import FlameMagics
        flame.set_sink_factory(lambda: CellSink(self))
        self.shell.register_magics(FlameMagics)

    def do_shutdown(self, restart):
        # Stop every runner now rather than at interpreter exit: a restart must not wait
        # for runners of the old session to notice the missing heartbeat.
        from flame.pool import _shutdown_all
        _shutdown_all()
        return super().do_shutdown(restart)
