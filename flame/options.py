"""Pool options checked at the door: a wrong type or value fails ``Pool(...)`` itself, not a
boot or a call later on."""
from __future__ import annotations

from typing import Any, Sequence


def check_pool(backend: Any, min: int, max: int, max_concurrency: int, idle_shutdown_after: float | None,
               boot_timeout: float, timeout: float | None, parent_timeout: float,
               code_sync: bool | Sequence[str] | None, code_exclude: Sequence[str], code_limit: int,
               deps: bool | None, deps_limit: int, retries: int) -> tuple[Any, bool | Sequence[str]]:
    """``Pool(...)``'s options checked; returns the backend (``LocalBackend()`` if None) and
    ``code_sync`` as the backend takes it."""
    from .backends.base import Backend
    if backend is None:
        from .backends.local import LocalBackend
        backend = LocalBackend()
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a flame Backend, got {backend!r}")
    number("min", min, minimum=0, integer=True)
    number("max", max, minimum=1, integer=True)
    if min > max:
        raise ValueError(f"min ({min}) must not exceed max ({max})")
    number("max_concurrency", max_concurrency, minimum=1, integer=True)
    number("idle_shutdown_after", idle_shutdown_after, minimum=0, optional=True, positive=True)
    number("boot_timeout", boot_timeout, minimum=0, positive=True)
    number("timeout", timeout, minimum=0, optional=True, positive=True)
    number("parent_timeout", parent_timeout, minimum=0, positive=True)
    number("code_limit", code_limit, minimum=1, integer=True)
    number("deps_limit", deps_limit, minimum=1, integer=True)
    if deps is not None and not isinstance(deps, bool):
        raise TypeError(f"deps must be True, False or None, got {deps!r}")
    if deps and not backend.remote:
        raise ValueError(f"deps is for runners on other machines; {backend!r} runners use this "
                         "process's installed packages")
    number("retries", retries, minimum=0, integer=True)
    patterns("code_exclude", code_exclude)
    return backend, _code_sync(code_sync, backend)


def number(name: str, value: Any, *, minimum: float, integer: bool = False,
           optional: bool = False, positive: bool = False) -> None:
    """Raise TypeError/ValueError unless ``value`` is a number (an int) within bounds."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {want}{' or None' if optional else ''}, got {value!r}")
    if value < minimum or (positive and value <= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else f'>= {minimum}'}, got {value!r}")


def _code_sync(value: bool | Sequence[str] | None, backend: Any) -> bool | Sequence[str]:
    """``code_sync`` as given, or the backend's default (on for runners on other machines)."""
    if value is None:
        value = backend.remote
    if not isinstance(value, bool) and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
        raise TypeError(f"code_sync must be True, False or a list of paths, got {value!r}")
    if value is not False and not backend.remote:
        raise ValueError(f"code_sync is for runners on other machines; {backend!r} runners "
                         "import from this file system")
    return value


def patterns(name: str, value: Sequence[str]) -> None:
    """Raise TypeError unless ``value`` is a list of glob patterns (not one string)."""
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"{name} must be a list of glob patterns, got {value!r}")
