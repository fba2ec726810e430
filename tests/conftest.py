"""Shared fixtures. Every test must leave no runner behind: checked after each test."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import psutil
import pytest

import flame

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where runners on "other machines" (SSH, Slurm) keep code archives during the tests: removed
#: at the end. Slurm jobs inherit it; SSH backends pass it in their env.
CODE_CACHE = tempfile.mkdtemp(prefix="flame-test-code-")
os.environ["FLAME_CODE_CACHE"] = CODE_CACHE


def runner_processes() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            booted = any(part.endswith("# flame.node boot") for part in cmd[1:3])  # code sync's bootstrap
            # A template process, and the runners forked from it, have the template's command line.
            if ("flame.node" in cmd or "flame.node.template_process" in cmd or booted) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(autouse=True)
def no_runner_left_behind(request):
    before = {p.pid for p in runner_processes()}
    yield
    deadline = time.monotonic() + 10
    left = []
    while time.monotonic() < deadline:
        left = [p for p in runner_processes() if p.pid not in before]
        if not left:
            return
        time.sleep(0.1)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    pytest.fail(f"{request.node.nodeid} left runner processes behind: {[p.pid for p in left]}")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CODE_CACHE, ignore_errors=True)
    left = runner_processes()
    if left:
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        session.exitstatus = 1
        sys.stderr.write(f"\nrunner processes outlived the test suite: {[p.pid for p in left]}\n")
    import glob
    import tempfile
    # A runner's peer listener directory goes with it, also when it is killed (its pool removes it).
    tmp = tempfile.gettempdir()
    peers = [d for d in glob.glob(os.path.join(tmp, "flame-peer-*")) + glob.glob(os.path.join(tmp, "flame-ipc-*", "flame-peer-*"))
             if os.stat(d).st_uid == os.geteuid()]
    if peers:
        for d in peers:
            shutil.rmtree(d, ignore_errors=True)
        session.exitstatus = 1
        sys.stderr.write(f"\npeer listener directories outlived the test suite: {peers}\n")


@pytest.fixture
def sigint_handled():
    """Ctrl-C as Python handles it. A test run as a background job (``cmd &`` in a script)
    inherits SIGINT ignored, and then ``_thread.interrupt_main()`` does nothing."""
    import signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def pool_backend():
    """A factory of the backend ``make_pool`` uses when given none; None: the Pool's default.
    Overridden where a suite runs against several (test_pool.py: runners forked or not)."""
    return None


@pytest.fixture
def make_pool(pool_backend):
    pools = []

    def make(**kwargs):
        if "backend" not in kwargs and pool_backend is not None:
            kwargs["backend"] = pool_backend()
        pool = flame.Pool(**kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(wait=False)


class Collect:
    """An output sink that records (monotonic time, kind, text) for the calls made while installed."""

    def __init__(self):
        self.events = []

    def __call__(self):
        return _CallSink(self)

    def text(self, name="stdout"):
        return "".join(t for _, k, t in self.events if k == name)


class _CallSink:
    def __init__(self, owner):
        self.owner = owner
        self.events = []

    def stream(self, name, text):
        item = (time.monotonic(), name, text)
        self.events.append(item)
        self.owner.events.append(item)

    def display(self, data):
        item = (time.monotonic(), "display", data)
        self.events.append(item)
        self.owner.events.append(item)


@pytest.fixture
def collect():
    sinks = Collect()
    made = []

    def factory():
        s = sinks()
        made.append(s)
        return s

    sinks.made = made
    flame.set_sink_factory(factory)
    yield sinks
    flame.set_sink_factory(None)


def kill_runner_mid_call(pool):
    """SIGKILL the pool's runner while it runs a call; the future of that call."""
    import signal
    pid = pool.call(os.getpid)
    fut = pool.submit(time.sleep, 60)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    return fut


def second_caller_wait(make_pool, monkeypatch, **options) -> float:
    """Seconds a second thread's call takes while another caller waits alone in its blocking
    receive (for a 3 s call), where one receive may last 10 s and no heartbeat arrives for
    60 s: short only if that thread pokes the waiting caller out of the socket."""
    import threading
    from flame import endpoint, wire
    monkeypatch.setattr(endpoint, "RECV_SLICE_MS", 10_000)
    monkeypatch.setattr(wire, "HEARTBEAT", 60.0)
    pool = make_pool(max=2, min=2, parent_timeout=120, **options)
    assert wait_for(lambda: len([r for r in pool.runners if r.state == "ready"]) == 2)
    took: list = []

    def second():
        time.sleep(0.5)  # the first call is in its blocking receive by now
        t0 = time.monotonic()
        assert pool.call(lambda: "second") == "second"
        took.append(time.monotonic() - t0)
    t = threading.Thread(target=second)
    t.start()
    assert pool.call(time.sleep, 3.0) is None
    t.join(timeout=10)
    assert took, "the second call did not finish"
    return took[0]


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _need_root_and(*paths):
    missing = [p for p in paths if not os.path.exists(p)]
    if os.geteuid() != 0 or missing:
        pytest.fail(f"this test needs root and {missing or paths} (`make test` installs and runs as root)",
                    pytrace=False)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    from services import Sshd
    _need_root_and("/usr/sbin/sshd")
    server = Sshd(str(tmp_path_factory.mktemp("services")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    from services import Slurm
    _need_root_and("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
    cluster = Slurm(str(tmp_path_factory.mktemp("services")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def remote_host(sshd):
    """REMOTE_USER, who cannot read the tests' files, with venvs of this Python's minor version
    (see services.RemoteHost); sshd lets it log in with the client key."""
    from services import RemoteHost
    _need_root_and("/usr/sbin/useradd", f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}")
    host = RemoteHost()
    yield host
    host.stop()


#: A cell binding ``evil`` to an object whose every hook raises (completion and inspection tests).
EVIL = """
class Evil:
    def __dir__(self): raise RuntimeError('no dir')
    def __getattr__(self, name): raise SystemExit('no ' + name)
    def __repr__(self): raise RuntimeError('no repr')
    @property
    def __doc__(self): raise RuntimeError('no doc')
evil = Evil()
"""


def slow_repr(seconds: float) -> str:
    """A cell that binds ``x`` to an object whose repr takes ``seconds``."""
    return ("import time\nclass Slow:\n    def __repr__(self):\n"
            f"        time.sleep({seconds})\n        return 'slow'\nx = Slow()\n")
