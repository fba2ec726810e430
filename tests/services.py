"""Real daemons for the backend tests: an OpenSSH server and a single-node Slurm cluster.

Started by session fixtures as in ../shared/infra-notes.md; they need root and the Debian
packages openssh-server, slurm-wlm and munge (`make test` installs them).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


class Sshd:
    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "ssh")
        os.makedirs(self.dir)
        os.makedirs("/run/sshd", exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, name)],
                           check=True)
        self.client_key = os.path.join(self.dir, "client_key")
        # sshd reads authorized_keys as the user logging in: for REMOTE_USER too, it lives
        # where any user can read it (it holds only a public key).
        self.public = tempfile.mkdtemp(prefix="flame-sshd-")
        os.chmod(self.public, 0o755)
        auth = os.path.join(self.public, "authorized_keys")
        shutil.copy(self.client_key + ".pub", auth)
        os.chmod(auth, 0o644)
        self.port = free_port()
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.dir}/host_key
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {auth}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowUsers root@127.0.0.1 {REMOTE_USER}@127.0.0.1
AllowTcpForwarding yes
""")
        subprocess.run(["/usr/sbin/sshd", "-t", "-f", config], check=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", config, "-E", os.path.join(self.dir, "sshd.log")])
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError("sshd did not start")
        self.host = f"root@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.public, ignore_errors=True)


#: An unprivileged user for runners that must prove code came over the wire (RemoteHost).
REMOTE_USER = "flamerunner"


class RemoteHost:
    """The other side of an SSH login as REMOTE_USER: a user who cannot read the tests'
    files, a home for its code cache, and venvs it can run, made from the system Python of
    this one's minor version with only the packages named (copied from this venv), never flame.
    """

    def __init__(self) -> None:
        import site
        import sys
        self.python_base = f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
        if not os.path.exists(self.python_base):
            raise FileNotFoundError(self.python_base)
        self.dir = tempfile.mkdtemp(prefix="flame-remote-host-")
        os.chmod(self.dir, 0o755)
        self.home = os.path.join(self.dir, "home")
        self.created = subprocess.run(["id", REMOTE_USER], capture_output=True).returncode != 0
        if self.created:
            subprocess.run(["useradd", "--no-create-home", "--home-dir", self.home, "--shell", "/bin/sh",
                            "--password", "*", REMOTE_USER], check=True)
        else:
            subprocess.run(["usermod", "--home", self.home, REMOTE_USER], check=True)
        os.makedirs(self.home)
        shutil.chown(self.home, REMOTE_USER, REMOTE_USER)
        os.chmod(self.home, 0o700)
        self._site = site.getsitepackages()[0]
        self.venvs: dict[str, str] = {}

    def venv(self, name: str, modules: tuple[str, ...] = ("zmq", "cloudpickle", "psutil")) -> str:
        """The python of a venv (made once) that has ``modules``, copied from this venv."""
        if name not in self.venvs:
            path = os.path.join(self.dir, name)
            subprocess.run([self.python_base, "-m", "venv", "--without-pip", path], check=True)
            target = subprocess.run([os.path.join(path, "bin", "python"), "-c",
                                     "import site; print(site.getsitepackages()[0])"],
                                    check=True, capture_output=True, text=True).stdout.strip()
            for entry in os.listdir(self._site):
                top = entry.split("-")[0].split(".")[0].lower()
                wanted = {m: m for m in modules} | ({"pyzmq": "zmq"} if "zmq" in modules else {})
                if top in wanted:
                    src = os.path.join(self._site, entry)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(target, entry))
            subprocess.run(["chmod", "-R", "a+rX", path], check=True)
            self.venvs[name] = os.path.join(path, "bin", "python")
        return self.venvs[name]

    def stop(self) -> None:
        subprocess.run(["pkill", "-KILL", "-u", REMOTE_USER], capture_output=True)
        if self.created:
            subprocess.run(["userdel", REMOTE_USER], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


class Slurm:
    def __init__(self, root: str) -> None:
        d = self.dir = os.path.join(root, "slurm")
        for sub in ("state", "spool", "dev", "out"):
            os.makedirs(os.path.join(d, sub))
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self.munged = None
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.munged = "/run/munge/munged.pid"
        host = socket.gethostname().split(".")[0]
        ncpu = os.cpu_count() or 2
        for i in (0, 1):  # fake GPU device files (GRES needs File= entries)
            dev = os.path.join(d, "dev", f"nvidia{i}")
            if not os.path.exists(dev):
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        self.conf = os.path.join(d, "slurm.conf")
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=flametest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=2
MinJobAge=600
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={ncpu} Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        with open(os.path.join(d, "gres.conf"), "w") as f:
            f.write(f"NodeName={host} Name=gpu File={d}/dev/nvidia[0-1]\n")
        os.environ["SLURM_CONF"] = self.conf
        subprocess.run(["/usr/sbin/slurmctld", "-f", self.conf], check=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", self.conf], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.2)
        else:
            self.stop()
            raise RuntimeError(f"slurm node not idle ({state!r}); see {d}")

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], capture_output=True)
        for name in ("slurmd.pid", "slurmctld.pid"):
            try:
                pid = int(open(os.path.join(self.dir, name)).read())
                os.kill(pid, 15)
            except (OSError, ValueError):
                pass
        if self.munged:
            try:
                os.kill(int(open(self.munged).read()), 15)
            except (OSError, ValueError):
                pass
        os.environ.pop("SLURM_CONF", None)
