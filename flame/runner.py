"""One runner's life as its pool sees it, and the snapshot the pool lists (RunnerInfo).

A Runner is written only by its own methods, which the pool calls under its lock: its boot
spec, its hello, the call messages it sends and the code it needs pushed first, the values
it holds, which of its calls had started when it died, and what its watch verdicts mean.
Messages go out through ``send`` (the pool's endpoint, bound to this runner's id).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import present
from .backends.base import RunnerHandle, RunnerSpec
from .errors import BootError, RunnerDied
from .wire import FN_CACHE_SIZE, INLINE_MAX, Kind, introduction

if TYPE_CHECKING:  # pragma: no cover
    import datetime

    from .call import Call
    from .codesync import CodeSync


@dataclass(frozen=True)
class RunnerInfo:
    """A snapshot of one runner, as listed by ``Pool.runners``."""

    id: str
    state: str
    pid: int | None
    host: str
    #: calls on the runner now (running, or sent ahead to it)
    active: int
    started: datetime.datetime
    gpus: tuple = ()
    python: str = ""
    idle_for: float | None = None
    extra: dict = field(default_factory=dict)
    #: values the runner holds for this pool's Remotes
    objects: int = 0
    #: their size in bytes, best effort (``nbytes`` where known, else ``sys.getsizeof``)
    object_bytes: int = 0
    #: calls it answered with a result, and with an error
    calls_done: int = 0
    failures: int = 0
    #: its CPU use (%, of one core) and resident memory (bytes) at its last heartbeat (None: not yet)
    cpu: float | None = None
    rss: int | None = None
    #: its GPUs' use at its last heartbeat: ``{"id", "util" (%), "memory_used", "memory_total"}`` each
    gpu_use: tuple = ()

    @property
    def runner_id(self) -> str:
        """The runner's id (``id``, by the name used everywhere else)."""
        return self.id


class Runner:
    """One runner: booting -> ready -> stopping -> dead."""

    def __init__(self, runner_id: str, boot_deadline: float, send: Callable[..., None]) -> None:
        self.id = runner_id
        self._send = send
        self.state = "booting"
        self.handle: RunnerHandle | None = None
        self.pid: int | None = None
        self.host = ""
        self.python = ""
        self.gpus: tuple = ()
        self.gpu_info: list = []
        self.started = time.time()  # a datetime in RunnerInfo: datetime is not imported to boot
        self.boot_deadline = boot_deadline
        self.stop_deadline: float | None = None
        #: the calls on this runner, by call id: running, or sent ahead
        self.calls: dict[str, Call] = {}
        #: values it holds for Remotes: object id -> bytes
        self.objects: dict[int, int] = {}
        self.last_active = time.monotonic()
        self.last_heard = time.monotonic()
        #: where it serves copies of its values to the pool's other runners (Kind.PEER), if it does
        self.peer_address: str | None = None
        #: (CPU %, RSS, GPUs' use) from its last heartbeat
        self.load: tuple = (None, None, ())
        #: values it said it holds at its last heartbeat (other runners' handles keep some)
        self.held = 0
        self.calls_done = self.failures = 0
        self.fns: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: the local code's archive the runner has (code sync), and where it keeps archives:
        #: (host, cache directory), from its hello
        self.code: str | None = None
        self.cache: tuple | None = None
        self.executable = ""
        #: calls sent to it so far (each call's ``order`` on it), and the file in which a local
        #: runner counts the calls it has started (``flame/node/starts.py``), if it has one
        self.sent = 0
        self.starts: str | None = None
        self.counted = False  # whether it has a start count at all

    # ---- booting ----------------------------------------------------------------------
    def spec(self, address: str, env: dict, concurrency: int, starts: str | None,
             code: CodeSync | None) -> RunnerSpec:
        """What the backend boots it with: the pool's ``env`` and this runner's own settings."""
        env = {**env, "FLAME_RUNNER_ID": self.id}
        if starts is not None:  # it counts the calls it starts there
            self.starts = env["FLAME_STARTS"] = starts
        self.counted = starts is not None
        if code is not None:  # it boots from archives it fetches from the pool (node/boot.py)
            env["FLAME_BOOT"] = json.dumps(code.boot_settings())
            self.code = code.code_digest()
        return RunnerSpec(self.id, address, env, concurrency, boot=code)

    def booted(self, handle: RunnerHandle) -> bool:
        """The backend started its process; False if the pool gave up on it meanwhile."""
        self.handle, self.pid, self.host = handle, handle.pid, handle.host
        return self.state != "dead"

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def serves(self, address: Any) -> None:
        """It serves copies of its values at ``address``: a Unix socket in its private
        directory, or TCP with CurveZMQ (``tcp://host:port#public key``, its backend's ``peer_host``)."""
        if isinstance(address, str) and (address.startswith("ipc://") or (
                address.startswith("tcp://") and "#" in address)):
            self.peer_address = address

    def sampled(self, head: dict) -> None:
        """Its heartbeat's load: CPU, memory, GPUs' use (a runner of an older flame sends none),
        and how many values it holds (for this pool's Remotes, or for other runners' handles)."""
        self.load = (head.get("cpu"), head.get("rss"), tuple(head.get("gpu") or ()))
        self.held = head.get("held", 0)

    def peer_gone(self, runner_id: str) -> None:
        """Runner ``runner_id`` of its pool is gone: the handles it had, and asking it, too."""
        if self.state == "ready":
            self._send(Kind.PEER_GONE, {"id": runner_id})

    def tally(self, ok: bool) -> None:
        """It answered a call, with a result (``ok``) or an error."""
        if ok:
            self.calls_done += 1
        else:
            self.failures += 1

    def hello(self, head: dict, pool_name: str, fast: bool, code: CodeSync | None) -> bool:
        """Its hello: booting -> ready, and welcome it. False if it was not booting."""
        if self.state != "booting":
            return False
        self.state = "ready"
        self.pid = head.get("pid", self.pid)
        self.host, self.python = head.get("host", self.host), head.get("python", "")
        self.gpus, self.gpu_info = tuple(head.get("gpus", ())), head.get("gpu_info", [])
        self.executable = head.get("executable", "")
        if head.get("cache"):
            self.cache = (self.host, head["cache"])
            if code is not None:
                code.host_has(self.cache, self.code)
        self.last_active = time.monotonic()
        self._send(Kind.WELCOME, {**introduction(), "pool": pool_name, "blake3": fast})
        return True

    # ---- calls ------------------------------------------------------------------------
    def start(self, calls: list[Call], concurrency: int, code: CodeSync | None,
              lend: Callable[[int, str], None]) -> None:
        """Send ``calls``, in order. Those whose frames all ride inline go as one ``calls``
        message: one send, one signature and one receive on each side for the lot (Dask's
        batched stream, in a simpler form: no timer, only what one placement decision starts
        together). The runner receives them in the order sent, which its start count relies on."""
        if len(calls) == 1:
            fields, frames, digest = self._take(calls[0], concurrency, code, lend)
            self._send(Kind.CALL, fields, frames, digest)
            return
        heads: list = []
        inline: list = []
        for call in calls:
            fields, frames, digest = self._take(call, concurrency, code, lend)
            if digest is not None or len(frames) > 2:  # out-of-band frames: a message of its own,
                self._send_inline(heads, inline)  # after the calls before it
                heads, inline = [], []
                self._send(Kind.CALL, fields, frames, digest)
            else:
                fields["n"] = len(frames)
                heads.append(fields)
                inline.extend(frames)
        self._send_inline(heads, inline)

    def _send_inline(self, heads: list, frames: list) -> None:
        if len(heads) == 1:
            del heads[0]["n"]
            self._send(Kind.CALL, heads[0], frames)
        elif heads:
            self._send(Kind.CALLS, {"c": heads}, frames)

    def _take(self, call: Call, concurrency: int, code: CodeSync | None,
              lend: Callable[[int, str], None]) -> tuple[dict, list, Any]:
        """Mark ``call`` as running here; the fields, frames and digest of its message.
        ``lend``: the region of the pool's shared memory holding its arguments is now ours."""
        if code is not None and code.now is not None and self.code != code.now.digest:
            self._push_code(code)
        call.state, call.runner, call.order = "running", self, self.sent
        self.sent += 1
        fields = {"id": call.id, "fn": call.fn_hash, "name": call.name}
        if getattr(call.sink, "reports", False):  # its caller shows what it reports: only then is anything sent
            fields["rp"] = 1
        if call.shm is not None:
            fields["m"] = call.shm
            lend(call.shm[1], self.id)
        # Sent ahead to a busy runner: its arguments are kept, should it have to go elsewhere.
        call.ahead = len(self.calls) >= concurrency
        self.calls[call.id] = call
        frames = list(call.arg_frames)
        # The out-of-band frames are the arguments' (hashed at submit, outside the lock),
        # unless a function too large to ride inline pushes every frame out of band.
        digest = call.arg_digest
        if not self._knows(call.fn_hash):
            fields["nf"] = 1
            frames.insert(0, call.fn_payload)
            if len(call.fn_payload) >= INLINE_MAX:
                digest = None
        if not call.ahead and not call.retries:
            call.arg_frames = call.arg_digest = None  # sent; let large buffers go
        return fields, frames, digest

    def _push_code(self, code: CodeSync) -> None:
        """The local code changed since it got it: send the new archive ahead of its next call,
        or only its name where its host is known to have it."""
        archive = code.now
        self._send(Kind.CODE, {"h": archive.digest}, code.frames_for(archive, self.cache, self.id))
        self.code = archive.digest
        self.fns.clear()  # the runner forgets its functions too: some refer to the old modules

    def code_missing(self, code: CodeSync | None, digest: str | None) -> None:
        """Its host's cache lost an archive: the next call sends it whole."""
        if code is not None:
            code.host_lost(self.cache, digest)
        self.code = None

    def _knows(self, fn_hash: str) -> bool:
        """Record that ``fn_hash`` is sent now; True if the runner already holds it (mirrors its LRU)."""
        fns = self.fns
        if fn_hash in fns:
            fns.move_to_end(fn_hash)
            return True
        fns[fn_hash] = None
        if len(fns) > FN_CACHE_SIZE:
            fns.popitem(last=False)
        return False

    def answered(self, call_id: str) -> None:
        """A call of its is done (answered, failed or dropped): its slot is free."""
        if self.calls.pop(call_id, None) is not None:
            self.last_active = time.monotonic()

    def cancel(self, call_id: str) -> None:
        self._send(Kind.CANCEL, {"id": call_id})

    # ---- values held for Remotes ------------------------------------------------------
    def hold(self, oid: int, nbytes: int) -> None:
        self.objects[oid] = nbytes  # one dict store: atomic, no lock needed

    def release(self, ids: list[int]) -> None:
        """Values no Remote refers to any more: forget them, and tell the runner."""
        for oid in ids:
            self.objects.pop(oid, None)
        if not self.objects:
            self.last_active = time.monotonic()  # its idle time starts when the last value goes
        self._send(Kind.RELEASE, {"ids": ids})

    # ---- life -------------------------------------------------------------------------
    def heartbeat(self) -> None:
        if self.state == "ready":
            self._send(Kind.HEARTBEAT)

    def stop(self, grace: float) -> None:
        """Ask it to stop; past ``grace`` seconds its verdict is "stop overdue"."""
        self.state = "stopping"
        self.stop_deadline = time.monotonic() + grace
        self._send(Kind.SHUTDOWN)

    def die(self, error: BaseException, retry: bool) -> tuple[list[Call], list[tuple[Call, BaseException]]]:
        """It is gone (or given up on), with ``error``: dead from now on. Returns what becomes
        of the calls it had, which it lets go of: those that run again elsewhere, in the order
        they were sent (none unless ``retry``: the pool is not shutting down), and the others,
        each with the error it fails with.

        A call that provably never started runs again when the runner died (RunnerDied). A
        runner starts its calls in the order they were sent. A local one counts them in its
        start count (node/starts.py) before it starts each: the calls past it provably never
        started. A runner without one (on another machine) gives no such proof: a reply still
        in ZeroMQ's hands when it was killed is lost, and the call sent after it may have run,
        so none of its calls runs again for that. Only a call sent ahead kept its arguments
        (the others let them go once sent). Any other call runs again only if it has retries
        left (``Call.run_again``)."""
        self.state = "dead"
        started = self._started_calls()
        again, failed = [], []
        requeue = retry and isinstance(error, RunnerDied)
        for call in sorted(self.calls.values(), key=lambda c: c.order):
            never = (started is not None and call.state == "running" and call.order >= started
                     and call.arg_frames is not None)
            if (requeue and never) or (retry and not never and call.run_again(error)):
                again.append(call)
            else:
                failed.append((call, error if never else call.failure(error)))
        self.calls.clear()
        return again, failed

    def _started_calls(self) -> int | None:
        """How many of the calls sent to it the runner had started, by its start count, or
        None without one. Read once the process is gone; the file is unlinked then. Only a
        file of this user's that nobody else can write counts (not a symlink): another user's
        would decide which calls run twice."""
        if self.starts is None:
            return None
        path, self.starts = self.starts, None
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            data = os.pread(fd, 8, 0)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return int.from_bytes(data, "little") if len(data) == 8 else None

    def verdict(self, now: float, exit_code: int | None, silent_after: float) -> str | None:
        """What the runner's state and ``exit_code`` (from its handle) call for, or None:
        "exited", "boot timeout", "stop overdue" or "silent". Pure, like the terminator's."""
        if self.state == "dead":
            return None
        if exit_code is not None:
            return "exited"
        if self.state == "booting" and now > self.boot_deadline:
            return "boot timeout"
        if self.state == "stopping" and self.stop_deadline is not None and now > self.stop_deadline:
            return "stop overdue"
        if self.state == "ready" and now - self.last_heard > silent_after:
            return "silent"
        return None

    def error_for(self, why: str, code: int | None, tail: str, boot_timeout: float,
                  refused: str | None) -> BootError | RunnerDied | None:
        """What a verdict means for its calls: a BootError (the boot failed), a RunnerDied, or
        None (it stopped as asked: drop it quietly)."""
        note = present.output_note(tail)
        if why == "exited":
            how = present.describe_exit(code)
            if self.state == "booting":
                return BootError(f"runner {self.id} exited during boot ({how})" + note, tail)
            if self.state == "stopping" and not self.calls:
                return None
            names = ", ".join(f"{c.name}()" for c in self.calls.values())
            return RunnerDied(f"runner {self.id} died ({how})" + (
                f" while running {names}" if names else "") + self._not_again() + note,
                self.id, code, tail)
        if why == "boot timeout":
            return BootError(f"runner {self.id} did not connect within boot_timeout={boot_timeout:g} s"
                             + (f"; its messages were refused: {refused}" if refused else "") + note, tail)
        if why == "silent":
            return RunnerDied(f"runner {self.id} stopped answering (no heartbeat for "
                              f"{time.monotonic() - self.last_heard:.0f} s)" + self._not_again() + note,
                              self.id)
        return None  # "stop overdue"

    def _not_again(self) -> str:
        """Why calls sent ahead to it fail rather than run elsewhere, where that is so."""
        if self.counted or len(self.calls) < 2:
            return ""
        return ("; calls sent to it are not run again, since it keeps no start count this "
                "process can read (any of them may have started)")

    def info(self) -> RunnerInfo:
        import datetime
        idle = (time.monotonic() - self.last_active
                if self.state == "ready" and not self.calls and not self.objects and not self.held else None)
        return RunnerInfo(self.id, self.state, self.pid, self.host or "localhost", len(self.calls),
                          datetime.datetime.fromtimestamp(self.started), tuple(self.gpus), self.python, idle,
                          {"gpu_info": list(self.gpu_info)} if self.gpu_info else {},
                          max(len(self.objects), self.held), sum(self.objects.values()), self.calls_done, self.failures,
                          *self.load)
