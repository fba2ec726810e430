"""Runners on hosts reachable over SSH (asyncssh).

asyncssh rather than the ssh binary: one connection per host carries every runner's
session and the reverse tunnel, with no ControlMaster sockets to manage, and the
library reports connection loss and exit status as events rather than exit codes of
a child process.

Runners connect back to the parent through a reverse tunnel on the same connection
(the remote end listens on the host's loopback), so nothing but SSH needs to be
reachable. The FLAME_* settings, the key among them, travel as one line on the
session's stdin, never on the remote command line; stdin stays open, and its EOF
(connection lost, parent gone) makes the runner exit at once.

The session also carries what a booting runner lacks (``flame/node/boot.py``'s ``ask``): a
host with nothing but Python asks for pyzmq and the rest on its stdout, and gets them on
its stdin, before it can speak ZeroMQ.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import shlex
import threading
from typing import Any, Mapping, Sequence

from ..node.boot import ASK
from .base import Backend, RunnerHandle, RunnerSpec, node_command, remote_options

log = logging.getLogger("flame.backends.ssh")


class _Host:
    def __init__(self, spec: str) -> None:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"host must be 'user@host:port', 'host:port' or 'host', got {spec!r}")
        self.spec = spec
        user, _, rest = spec.rpartition("@")
        host, sep, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
        self.user = user or None
        self.host = host if sep else rest
        try:
            self.port = int(port) if sep else 22
        except ValueError:
            raise ValueError(f"bad port in host {spec!r}") from None
        self.runners = 0

    def __repr__(self) -> str:
        return self.spec


class SSHHandle(RunnerHandle):
    def __init__(self, host: _Host, process: Any, pid: int) -> None:
        self.ssh_host = host
        self.host = host.host
        self.process = process
        self.pid = pid
        self.code: int | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.boot: Any = None  # the pool's code sync, which answers the bootstrap's request
        self.runner_id = ""

    def exit_status(self) -> int | None:
        return self.code

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self.tail)[-lines:])


class SSHBackend(Backend):
    """Runners on SSH hosts, spread across them; a host that is down is skipped for the next.

    A host needs a Python of this one's minor version: flame itself, its dependencies, the
    local code and the installed packages calls import come over the connection (code sync,
    deps).
    """

    remote = True
    asks = True

    def __init__(self, hosts: Sequence[str], python: str = "python3", key: str | None = None,
                 known_hosts: str | None | tuple = (), connect_timeout: float = 10.0,
                 env: Mapping[str, str] | None = None, cwd: str | None = None,
                 install: bool = False, peer_host: str | None = None) -> None:
        """
        Args:
            hosts: where runners may start, as "user@host:port" (user and port optional).
            python: interpreter that runs runners on the hosts. Defaults to "python3".
            key: path of the private key to log in with. Defaults to the SSH agent and ~/.ssh keys.
            known_hosts: known_hosts file to check host keys against; None turns checking off.
                Defaults to ~/.ssh/known_hosts.
            connect_timeout: seconds to reach a host before trying the next. Defaults to 10.
            env: extra environment variables for every runner. Defaults to none.
            cwd: working directory of runners on the hosts. Defaults to the login directory.
            install: a host that compiled code of this process's packages does not fit (another
                OS, architecture or C library) pip-installs the same versions into an
                environment in its code cache, instead of failing to boot. Defaults to False.
            peer_host: how runners on other hosts reach these runners' listeners for values and
                handles (``flame.ref``): an address of the host, or "*" for every interface,
                advertised by the host's name; TCP with CurveZMQ. None keeps them on a Unix
                socket, and values between hosts travel through this process. Defaults to None.
        """
        if isinstance(hosts, str) or not hosts:
            raise ValueError("hosts must be a non-empty list of 'user@host:port' strings")
        self.hosts = [_Host(h) for h in hosts]
        self.python = python
        self.key = key
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.env = dict(env or {})
        self.cwd = cwd
        self.install, self.peer_host = remote_options(install, peer_host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._conns: dict[str, Any] = {}
        # (host, parent address) -> (conn, address on the host, its directory there)
        self._tunnels: dict[tuple[str, str], tuple[Any, str, str]] = {}
        self._alock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"SSHBackend(hosts={[h.spec for h in self.hosts]!r}, python={self.python!r})"

    # ---- the asyncio loop all SSH connections live on -------------------------------------
    def _run(self, coro: Any, timeout: float) -> Any:
        with self._loop_lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="flame-ssh", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _connection(self, h: _Host) -> Any:
        import asyncssh
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            conn = self._conns.get(h.spec)
            if conn is not None and not conn.is_closed():
                return conn
            options: dict[str, Any] = {"port": h.port, "connect_timeout": self.connect_timeout}
            if h.user:
                options["username"] = h.user
            if self.key:
                options["client_keys"] = [self.key]
            if self.known_hosts != ():
                options["known_hosts"] = self.known_hosts
            conn = await asyncssh.connect(h.host, **options)
            self._conns[h.spec] = conn
            return conn

    async def _tunnel(self, h: _Host, conn: Any, address: str) -> str:
        """The address on the host that leads back to the parent's ``address`` (one per
        connection and pool: a tunnel goes with the connection that carried it).

        A Unix socket in a new 0700 directory (sshd makes it 0600, StreamLocalBindMask),
        not a loopback port: on a shared host, any user can connect to a port and have the
        parent read whatever they send before its signature is checked."""
        key = (h.spec, address)
        known = self._tunnels.get(key)
        if known is not None and known[0] is conn:
            return known[1]
        made = await conn.run("mktemp -d /tmp/flame-ipc-XXXXXXXXXXXXXXXX", check=True)
        where = made.stdout.strip()
        path = f"{where}/pool"
        if address.startswith("ipc://"):
            await conn.forward_remote_path(path, address.removeprefix("ipc://"))
        else:
            host, _, port = address.removeprefix("tcp://").rpartition(":")
            await conn.forward_remote_path_to_port(path, host, int(port))
        self._tunnels[key] = (conn, f"ipc://{path}", where)
        return f"ipc://{path}"

    # ---- the contract --------------------------------------------------------------------------
    def boot(self, spec: RunnerSpec) -> RunnerHandle:
        errors: list[str] = []
        tried: set[str] = set()
        while len(tried) < len(self.hosts):
            with self._count_lock:  # boots run in parallel: count a runner when its host is chosen
                h = min((x for x in self.hosts if x.spec not in tried), key=lambda x: x.runners)
                h.runners += 1
            tried.add(h.spec)
            try:
                return self._run(self._boot_on(h, spec), self.connect_timeout + 20)
            except Exception as exc:
                with self._count_lock:
                    h.runners -= 1
                errors.append(f"{h.spec}: {type(exc).__name__}: {exc}")
                log.warning("flame: cannot start a runner on %s (%s); trying the next host", h.spec, exc)
        raise RuntimeError("no SSH host could start a runner: " + "; ".join(errors))

    async def _boot_on(self, h: _Host, spec: RunnerSpec) -> SSHHandle:
        conn = await self._connection(h)
        settings = {**self.env, **spec.env, "FLAME_ADDRESS": await self._tunnel(h, conn, spec.address)}
        if self.peer_host:
            settings["FLAME_PEER_HOST"] = self.peer_host
        cd = f"cd {shlex.quote(self.cwd)} && " if self.cwd else ""
        # `echo $$; exec` tells us the runner's pid before Python starts, for terminate().
        command = f"{cd}echo $$; exec {shlex.join(node_command(self.python, spec))} --stdin"
        process = await conn.create_process(command, encoding=None)
        process.stdin.write(json.dumps(settings).encode() + b"\n")
        line = await asyncio.wait_for(process.stdout.readline(), self.connect_timeout)
        try:
            pid = int(line.strip())
        except ValueError:
            process.close()
            raise RuntimeError(f"unexpected output from {h.spec}: {line!r}") from None
        handle = SSHHandle(h, process, pid)
        handle.boot, handle.runner_id = spec.boot, spec.runner_id
        asyncio.ensure_future(self._follow(handle))
        return handle

    async def _follow(self, handle: SSHHandle) -> None:
        """Collect the runner's output for error messages, and its exit status; answer its
        bootstrap's request for archives (only the first line can be one: later lines are the
        runner's output)."""
        process = handle.process

        async def pump(stream: Any, first: bool) -> None:
            async for line in stream:
                if first and line.startswith(ASK) and handle.boot is not None:
                    await self._answer(handle, line[len(ASK):])
                first = False
                handle.tail.append(line.decode("utf-8", "replace").rstrip("\n"))
        await asyncio.gather(pump(process.stdout, True), pump(process.stderr, False), return_exceptions=True)
        await process.wait_closed()
        if process.exit_signal:
            import signal
            name = process.exit_signal[0]
            handle.code = -getattr(signal, f"SIG{name}", signal.SIGTERM)
        elif process.exit_status is not None and process.exit_status >= 0:
            handle.code = process.exit_status
        else:
            handle.tail.append(f"(SSH connection to {handle.ssh_host.spec} lost)")
            handle.code = 255

    async def _answer(self, handle: SSHHandle, request: bytes) -> None:
        """Send a booting runner the archives it asked for, on its stdin; a progress line
        for a big answer. Packing runs off the loop that carries every connection."""
        from ..deps import SHOW_OVER, Transfer
        loop = asyncio.get_running_loop()
        try:
            head, datas = await loop.run_in_executor(
                None, handle.boot.boot_answer, handle.host, json.loads(request), handle.runner_id)
        except Exception as exc:
            log.warning("flame: cannot answer runner %s's request: %s", handle.runner_id, exc)
            head, datas = {"error": f"the parent could not answer: {type(exc).__name__}: {exc}"}, []
        stdin = handle.process.stdin
        stdin.write(json.dumps(head).encode() + b"\n")
        total = sum(len(d) for d in datas)
        shown = Transfer(f"{len(datas)} archive(s) to runner {handle.runner_id}", total) if total > SHOW_OVER else None
        done = 0
        for data in datas:
            for at in range(0, len(data), 1 << 20):
                stdin.write(data[at:at + (1 << 20)])
                await stdin.drain()
                done += min(1 << 20, len(data) - at)
                if shown is not None:
                    shown.update(done)

    def terminate(self, handle: RunnerHandle) -> None:
        assert isinstance(handle, SSHHandle)
        try:
            self._run(self._terminate(handle), 15)
        except Exception as exc:
            log.warning("flame: could not stop runner pid %s on %s: %s", handle.pid, handle.ssh_host, exc)
        with self._count_lock:
            handle.ssh_host.runners = max(0, handle.ssh_host.runners - 1)

    async def _terminate(self, handle: SSHHandle) -> None:
        if handle.code is None:
            conn = self._conns.get(handle.ssh_host.spec)
            if conn is not None and not conn.is_closed():
                await conn.run(f"kill -9 {handle.pid} 2>/dev/null", check=False)
            handle.process.stdin.write_eof() if not handle.process.stdin.is_closing() else None
            try:
                await asyncio.wait_for(handle.process.wait_closed(), 5)
            except asyncio.TimeoutError:
                handle.process.close()

    def close(self) -> None:
        """Close the SSH connections (runners on them exit as their stdin closes)."""
        if self._loop is None:
            return

        async def close_all() -> None:
            for conn, _, where in self._tunnels.values():
                if not conn.is_closed():
                    await conn.run(f"rm -rf {shlex.quote(where)}", check=False)
            for conn in self._conns.values():
                conn.close()
        try:
            self._run(close_all(), 5)
        except Exception:
            pass
