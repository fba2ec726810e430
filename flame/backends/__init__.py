"""Backends start and force-stop runner processes; everything else lives in the pool."""
from .base import Backend, RunnerHandle, RunnerSpec
from .local import LocalBackend

__all__ = ["Backend", "RunnerHandle", "RunnerSpec", "LocalBackend"]
