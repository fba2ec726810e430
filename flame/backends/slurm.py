"""Runners as Slurm jobs: one ``sbatch`` job per runner.

The pool's key goes into a 0600 file (on a file system the compute nodes share; the
home directory by default) that the job reads, rather than into the job's environment
or script, which Slurm stores and shows. Runners connect back to ``connect_host``,
which compute nodes must be able to reach. Job state is read with one ``squeue`` for
all of a backend's jobs (a PENDING job's reason goes into BootError) and, once a job
has left the queue, its exit code with ``scontrol show job``.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
import time
from typing import Mapping, Sequence

from ..keys import write_private
from .base import Backend, RunnerHandle, RunnerSpec, node_command, remote_options, tail

log = logging.getLogger("flame.backends.slurm")

#: How often the state of a backend's jobs is read from Slurm, at most.
POLL_INTERVAL = 0.5
_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}


class _JobTracker:
    """Reads the state of every live job of one backend with one ``squeue`` per POLL_INTERVAL,
    so that a pool of hundreds of runners costs the controller no more than one runner."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, SlurmHandle] = {}
        self._checked = 0.0

    def add(self, handle: "SlurmHandle") -> None:
        with self._lock:
            self._jobs[handle.job_id] = handle
            self._checked = 0.0  # read the new job at the next check

    def discard(self, handle: "SlurmHandle") -> None:
        with self._lock:
            self._jobs.pop(handle.job_id, None)

    def refresh(self) -> None:
        with self._lock:
            if not self._jobs or time.monotonic() - self._checked < POLL_INTERVAL:
                return
            self._checked = time.monotonic()
            proc = subprocess.run(["squeue", "-h", "-j", ",".join(self._jobs), "-o", "%i|%T|%r|%N"],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
                log.warning("flame: squeue failed, job states not updated: %s", proc.stderr.strip())
                return  # a busy controller is no reason to declare runners dead
            queued = {}
            for line in proc.stdout.splitlines():
                job_id, state, reason, nodes = (line.split("|") + ["", "", ""])[:4]
                queued[job_id] = (state, reason, nodes)
            for job_id, handle in list(self._jobs.items()):
                state, reason, nodes = queued.get(job_id, ("", "", ""))
                if state:
                    handle.state, handle.reason = state, reason
                    if nodes and nodes != "(null)":
                        handle.host = nodes
                    if state in _ACTIVE:
                        continue
                handle.code = handle._final_code()  # left the queue: its exit code, once
                del self._jobs[job_id]


class SlurmHandle(RunnerHandle):
    def __init__(self, job_id: str, log_path: str, key_path: str, tracker: _JobTracker) -> None:
        self.job_id = job_id
        self.log_path = log_path
        self.key_path = key_path
        self.host = "?"
        self.state = "PENDING"
        self.reason = ""
        self.code: int | None = None
        self._tracker = tracker
        tracker.add(self)

    def exit_status(self) -> int | None:
        if self.code is None:
            self._tracker.refresh()
        return self.code

    def _final_code(self) -> int:
        info = _slurm(["scontrol", "show", "job", self.job_id], check=False)
        state = re.search(r"JobState=(\S+)", info)
        exit_code = re.search(r"ExitCode=(\d+):(\d+)", info)
        if state:
            self.state = state.group(1)
        if exit_code:
            code, sig = int(exit_code.group(1)), int(exit_code.group(2))
            if sig:
                return -sig
            if code or self.state in ("COMPLETED",):
                return code
        return 1 if self.state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else 0

    def stderr_tail(self, lines: int = 40) -> str:
        head = f"Slurm job {self.job_id}: {self.state}" + (f" ({self.reason})" if self.reason and self.reason != "None" else "")
        return "\n".join([head, *tail(self.log_path, lines).splitlines()])


def _slurm(argv: list[str], check: bool = True, input: str | None = None,
           env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=60,
                          env=dict(env) if env is not None else None)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


class SlurmBackend(Backend):
    """One Slurm job per runner. Compute nodes need a Python of this one's minor version:
    flame's dependencies wait in the shared home's code cache, and flame itself, the local
    code and the installed packages calls import come over the pool's connection."""

    remote = True

    def __init__(self, partition: str | None = None, gpus_per_runner: int = 0, cpus_per_runner: int = 1,
                 time: str | None = None, account: str | None = None, sbatch_args: Sequence[str] = (),
                 python: str = "python3", connect_host: str = "127.0.0.1", env: Mapping[str, str] | None = None,
                 work_dir: str | None = None, shared_cache: bool = True, install: bool = False,
                 peer_host: str | None = None) -> None:
        """
        Args:
            partition: partition to submit to. Defaults to the cluster's default.
            gpus_per_runner: GPUs per runner, requested as ``--gres=gpu:N``. Defaults to 0.
            cpus_per_runner: CPUs per runner (``--cpus-per-task``). Defaults to 1.
            time: wall-time limit of each job (``--time``). Defaults to the partition's.
            account: account to charge (``--account``). Defaults to the user's default.
            sbatch_args: further sbatch options, passed as given. Defaults to none.
            python: interpreter that runs runners on the compute nodes. Defaults to "python3".
            connect_host: address of this machine as compute nodes reach it; the pool binds it too.
                Defaults to 127.0.0.1 (a single-node cluster).
            env: extra environment variables for every runner. Defaults to none.
            work_dir: shared directory for job logs and key files (created 0700).
                Defaults to ~/.flamebook/slurm.
            shared_cache: compute nodes see this machine's home directory, so flame's own
                dependencies (pyzmq, cloudpickle, psutil) are put in its code cache before a job
                starts, and a node needs only Python; False: nodes must have them installed.
                Defaults to True.
            install: a node where this process's compiled packages do not load pip-installs the
                same versions into an environment in the code cache. Defaults to False.
            peer_host: how runners on other nodes reach these runners' listeners for values and
                handles (``flame.ref``): "*" binds every interface and advertises the node's
                name (nodes of one cluster reach each other), an address binds that one; TCP
                with CurveZMQ. None keeps them on a Unix socket: values between nodes travel
                through this process. Defaults to None (loopback unless asked).
        """
        for name, value, low in (("gpus_per_runner", gpus_per_runner, 0), ("cpus_per_runner", cpus_per_runner, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if isinstance(sbatch_args, str):
            raise TypeError("sbatch_args must be a list of options, not one string")
        self.partition, self.account, self.time = partition, account, time
        self.gpus_per_runner, self.cpus_per_runner = gpus_per_runner, cpus_per_runner
        self.sbatch_args = list(sbatch_args)
        self.python = python
        self.connect_host = connect_host
        self.bind_host = connect_host
        self.env = dict(env or {})
        self.work_dir = work_dir or os.path.join(os.path.expanduser("~"), ".flamebook", "slurm")
        self.shared_cache = bool(shared_cache)
        self.install, self.peer_host = remote_options(install, peer_host)
        self._tracker = _JobTracker()

    def __repr__(self) -> str:
        gpus = f", gpus_per_runner={self.gpus_per_runner}" if self.gpus_per_runner else ""
        return f"SlurmBackend(partition={self.partition!r}{gpus})"

    def connect_address(self, bound: str) -> str:
        if bound.startswith("ipc://"):  # connect_host is loopback: a single-node cluster
            return bound
        port = bound.rsplit(":", 1)[1]
        return f"tcp://{self.connect_host}:{port}"

    def sbatch_command(self, spec: RunnerSpec, log_path: str) -> list[str]:
        argv = ["sbatch", "--parsable", f"--job-name=flame-{spec.runner_id}", f"--output={log_path}",
                f"--cpus-per-task={self.cpus_per_runner}", "--ntasks=1"]
        if self.partition:
            argv.append(f"--partition={self.partition}")
        if self.gpus_per_runner:
            argv.append(f"--gres=gpu:{self.gpus_per_runner}")
        if self.time:
            argv.append(f"--time={self.time}")
        if self.account:
            argv.append(f"--account={self.account}")
        return argv + self.sbatch_args

    def boot(self, spec: RunnerSpec) -> RunnerHandle:
        os.makedirs(self.work_dir, mode=0o700, exist_ok=True)
        key_path = os.path.join(self.work_dir, f"{spec.runner_id}.key")
        log_path = os.path.join(self.work_dir, f"{spec.runner_id}.log")
        settings = {**self.env, **spec.env}
        if self.peer_host:
            settings["FLAME_PEER_HOST"] = self.peer_host
        if spec.boot is not None and spec.boot.deps is not None and self.shared_cache:
            # Compute nodes share this home: flame's needs wait for them in its cache, since
            # a node without pyzmq could not fetch them.
            from ..node.boot import cache_root
            root = settings.get("FLAME_CODE_CACHE") or cache_root()
            spec.boot.deps.stage(root)
            settings["FLAME_CODE_CACHE"] = root
        write_private(key_path, settings.pop("FLAME_KEY"), replace=False)  # ids are unique: never taken
        settings["FLAME_KEY_FILE"] = key_path
        env = {**os.environ, **settings}
        script = f"#!/bin/sh\nexec {shlex.join(node_command(self.python, spec))}\n"
        try:
            out = _slurm(self.sbatch_command(spec, log_path), input=script, env=env)
        except Exception:
            os.unlink(key_path)
            raise
        job_id = out.strip().split(";")[0]
        log.info("flame: runner %s is Slurm job %s", spec.runner_id, job_id)
        return SlurmHandle(job_id, log_path, key_path, self._tracker)

    def terminate(self, handle: RunnerHandle) -> None:
        assert isinstance(handle, SlurmHandle)
        if handle.code is None:
            _slurm(["scancel", handle.job_id], check=False)
        self._tracker.discard(handle)
        for path in (handle.key_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
