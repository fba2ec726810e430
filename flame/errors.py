"""Exceptions raised by flame. All derive from FlameError."""
from __future__ import annotations


class FlameError(Exception):
    """Base class of every error flame raises itself."""


class RemoteError(FlameError):
    """A call raised an exception on the runner whose type cannot be rebuilt here.

    Carries the remote type name, message and formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
        return text


class RemoteTraceback(Exception):
    """Chained as ``__cause__`` of a re-raised remote exception so its remote traceback shows."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.text.rstrip()


class RunnerDied(FlameError):
    """The runner executing a call exited (crash, kill, OOM, lost machine) before answering."""

    def __init__(self, message: str, runner_id: str = "", exit_code: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.runner_id = runner_id
        self.exit_code = exit_code
        self.stderr = stderr


class BootError(FlameError):
    """A runner could not be started or did not connect within ``boot_timeout``."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class CallTimeout(FlameError, TimeoutError):
    """A call passed its deadline; its remote work was stopped."""


class SerializationError(FlameError, TypeError):
    """An argument or result could not be pickled or unpickled; the message names the object."""


class PoolClosed(FlameError, RuntimeError):
    """The pool was shut down before the call could run."""
