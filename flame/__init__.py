"""flame: elastic pools of Python runners, after Elixir's FLAME.

    import flame
    with flame.Pool(max=4) as pool:
        pool.call(lambda x: x * 2, 21)

Names are loaded on first use, so ``python -m flame.node`` (which imports this
package) pays only for what a runner needs.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pool": "flame.pool",
    "Remote": "flame.remote",
    "RemoteGone": "flame.remote",
    "inspect_remote": "flame.remote",
    "pools": "flame.registry",
    "shutdown_all": "flame.registry",
    "CallFuture": "flame.call",
    "Backend": "flame.backends.base",
    "RunnerSpec": "flame.backends.base",
    "RunnerHandle": "flame.backends.base",
    "LocalBackend": "flame.backends.local",
    "SSHBackend": "flame.backends.ssh",
    "SlurmBackend": "flame.backends.slurm",
    "RunnerInfo": "flame.runner",
    "gpus": "flame.gpu",
    "serve": "flame.attach",
    "connect": "flame.attach",
    "serve_script": "flame.attach",
    "AttachError": "flame.attach",
    "AppGone": "flame.attach",
    "AppConnection": "flame.attach",
    "Serving": "flame.attach",
    "GPU": "flame.gpu",
    "OutputSink": "flame.call",
    "set_sink_factory": "flame.call",
    "gather": "flame.call",
    "run_cell": "flame.node.interactive",
    "set_progress_factory": "flame.progress",
    "Progress": "flame.progress",
    "FlameError": "flame.errors",
    "RemoteError": "flame.errors",
    "RunnerDied": "flame.errors",
    "BootError": "flame.errors",
    "CallTimeout": "flame.errors",
    "SerializationError": "flame.errors",
    "PoolClosed": "flame.errors",
    "CodeSyncError": "flame.codesync",
    "DepsError": "flame.deps",
    "MapResults": "flame.mapping",
    "register_joblib": "flame.joblib_backend",
    "report": "flame.node.report",
    "Chart": "flame.chart",
    "view": "flame.view",
    "ref": "flame.remote",
    "PoolView": "flame.view",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flame' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .backends.base import Backend, RunnerHandle, RunnerSpec
    from .backends.local import LocalBackend
    from .backends.slurm import SlurmBackend
    from .backends.ssh import SSHBackend
    from .call import CallFuture, OutputSink, set_sink_factory
    from .errors import (BootError, CallTimeout, FlameError, PoolClosed, RemoteError, RunnerDied,
                         SerializationError)
    from .pool import Pool, pools, shutdown_all
    from .remote import Remote, RemoteGone, inspect_remote, ref
    from .codesync import CodeSyncError
    from .deps import DepsError
    from .attach import AppConnection, AppGone, AttachError, Serving, connect, serve, serve_script
    from .gpu import GPU, gpus
    from .call import gather
    from .node.interactive import run_cell
    from .progress import Progress, set_progress_factory
    from .runner import RunnerInfo
    from .mapping import MapResults
    from .joblib_backend import register_joblib
    from .node.report import report
    from .chart import Chart
    from .view import PoolView, view
