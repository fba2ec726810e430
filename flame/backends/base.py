"""The backend contract.

A backend knows how to start ``python -m flame.node`` somewhere and how to force
it to stop. Scheduling, deadlines, idle shutdown, liveness and graceful stop
(over the wire) belong to the pool, so a new backend is two methods and a handle.
"""
from __future__ import annotations

import abc
import base64
import functools
import os
import zlib
from dataclasses import dataclass, field
from typing import IO, Any


@dataclass
class RunnerSpec:
    """What a backend needs to start one runner."""

    #: Id of the runner, unique across processes and hosts (it has a random part): its ZeroMQ
    #: identity, and safe in file and job names.
    runner_id: str
    #: ZeroMQ address the runner connects back to.
    address: str
    #: FLAME_* variables for the runner, the pool's key among them: pass them through the
    #: environment, a 0600 file or stdin, never on a command line.
    env: dict[str, str] = field(repr=False)
    #: Calls the runner may run at once.
    concurrency: int = 1
    #: The pool's code sync (``codesync.CodeSync``) for a runner that boots from archives
    #: (FLAME_BOOT): SSH answers its bootstrap's request with ``boot_answer``, Slurm puts
    #: flame's needs in the shared cache first (``deps.stage``). None for local runners.
    boot: Any = field(default=None, repr=False)


class RunnerHandle(abc.ABC):
    """A backend's handle on one started runner."""

    #: Process id on the runner's machine, when known.
    pid: int | None = None
    #: Host the runner runs on.
    host: str = "localhost"

    @abc.abstractmethod
    def exit_status(self) -> int | None:
        """The exit code once the runner has ended (negative: killed by that signal), else None."""

    @abc.abstractmethod
    def stderr_tail(self, lines: int = 40) -> str:
        """The last lines the runner wrote to its stderr (and stdout), for error messages."""


class Backend(abc.ABC):
    """Starts and force-stops runners."""

    #: Interface the pool's socket binds to: loopback unless runners live elsewhere.
    bind_host: str = "127.0.0.1"
    #: Runners run on other machines, which may lack flame and the local code: they start
    #: with :func:`node_command`'s bootstrap, which fetches both from the pool (code sync).
    remote: bool = False
    #: Runners share this machine's memory: large buffers travel through shared memory (shm.py).
    shared_memory: bool = False
    #: The backend answers a booting runner's request for archives on its stdin (SSH: the
    #: host may lack pyzmq, so the bootstrap cannot use ZeroMQ).
    asks: bool = False
    #: Hosts pip-install compiled distributions that do not fit them (``install=True``).
    install: bool = False

    @abc.abstractmethod
    def boot(self, spec: RunnerSpec) -> RunnerHandle:
        """Start a runner for ``spec`` and return at once; raise with a clear message if it cannot start."""

    @abc.abstractmethod
    def terminate(self, handle: RunnerHandle) -> None:
        """Force the runner to stop and release what it held. Called once per handle, even after exit."""

    def capacity(self) -> int | None:
        """How many more runners could be booted right now, or None for no limit of the backend's own."""
        return None

    def connect_address(self, bound: str) -> str:
        """The address runners should connect to, given the one the pool bound."""
        return bound

    def acquire(self) -> None:
        """A pool starts using this backend (a backend may serve several)."""

    def release(self) -> None:
        """A pool that used this backend has shut down and its runners are gone: let go of what
        the last one needed (LocalBackend's template process)."""


def remote_options(install: bool, peer_host: str | None) -> tuple[bool, str | None]:
    """``install`` and ``peer_host`` of a backend whose runners are on other machines, checked."""
    if not isinstance(install, bool):
        raise TypeError(f"install must be True or False, got {install!r}")
    if peer_host is not None and (not isinstance(peer_host, str) or not peer_host):
        raise TypeError(f"peer_host must be a host address, '*' or None, got {peer_host!r}")
    return install, peer_host


def node_command(python: str, spec: RunnerSpec) -> list[str]:
    """The command that starts a runner: ``python -m flame.node``; when the spec's settings
    name code archives (FLAME_BOOT, for runners on other machines), the bootstrap of
    ``flame/node/boot.py`` instead, which fetches them first. Neither holds a secret."""
    if "FLAME_BOOT" not in spec.env:
        return [python, "-m", "flame.node"]
    return [python, "-c", _bootstrap()]


@functools.lru_cache(maxsize=1)
def _bootstrap() -> str:
    from ..node import boot
    with open(boot.__file__, "rb") as f:
        packed = base64.b64encode(zlib.compress(f.read(), 9)).decode()
    # The trailing comment names the process in ps (and for the tests' leak checks).
    return f"import base64,zlib;exec(zlib.decompress(base64.b64decode('{packed}')))  # flame.node boot"


def tail(source: str | IO[bytes], lines: int = 40) -> str:
    """The last ``lines`` lines of a log (a path, or a binary file open for reading), from at
    most its last 64 kB; "" when it cannot be read."""
    try:
        f = open(source, "rb") if isinstance(source, str) else source
        try:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
        finally:
            if isinstance(source, str):
                f.close()
    except (OSError, ValueError):
        return ""
    return "\n".join(text.splitlines()[-lines:])
