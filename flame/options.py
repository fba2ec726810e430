"""Pool options checked at the door: a wrong type or value fails ``Pool(...)`` itself, not a
boot or a call later on."""
from __future__ import annotations

from typing import Any, Sequence


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


def code_sync(value: bool | Sequence[str] | None, backend: Any) -> bool | Sequence[str]:
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
