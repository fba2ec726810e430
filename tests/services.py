"""Real daemons for the backend tests: an OpenSSH server and a single-node Slurm cluster.

Started by session fixtures as in ../shared/infra-notes.md; they need root and the Debian
packages openssh-server, slurm-wlm and munge (`make test` installs them).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
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
        auth = os.path.join(self.dir, "authorized_keys")
        shutil.copy(self.client_key + ".pub", auth)
        os.chmod(auth, 0o600)
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
AllowUsers root@127.0.0.1
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
