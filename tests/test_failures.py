"""Bad input and bad luck: remote errors, unpicklable values, timeouts, cancels, dead runners, failed boots."""
from __future__ import annotations

import _thread
import os
import stat
import threading
import time

import psutil
import pytest

import flame
from conftest import wait_for


class Boom(Exception):
    pass


class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = threading.Lock()


def raises_boom():
    raise Boom("remote failure")


def test_remote_exception_keeps_its_type_and_remote_traceback(make_pool):
    pool = make_pool(max=1)
    with pytest.raises(Boom, match="remote failure") as info:
        pool.call(raises_boom)
    cause = info.value.__cause__
    assert isinstance(cause, flame.errors.RemoteTraceback)
    assert "raises_boom" in cause.text and "Boom: remote failure" in cause.text
    assert "flame/node" not in cause.text, "node frames are hidden"
    with pytest.raises(ZeroDivisionError):
        pool.call(lambda: 1 / 0)


def test_exception_that_cannot_travel_becomes_remote_error(make_pool):
    pool = make_pool(max=1)

    def fail():
        raise Unpicklable("holding a lock")
    with pytest.raises(flame.RemoteError) as info:
        pool.call(fail)
    assert info.value.type_name.endswith("Unpicklable")
    assert "holding a lock" in str(info.value) and "Remote traceback" in str(info.value)


def test_unpicklable_argument_is_named(make_pool):
    pool = make_pool(max=1)
    lock = threading.Lock()
    with pytest.raises(flame.SerializationError, match=r"argument 1 of .*<lambda>\(\): <unlocked _thread.lock"):
        pool.submit(lambda a, b: None, 1, lock)
    with pytest.raises(flame.SerializationError, match=r"keyword argument 'key'"):
        pool.submit(lambda **kw: None, key=lock)
    with pytest.raises(flame.SerializationError, match=r"variable 'lock' captured by"):
        pool.submit(lambda: lock.locked())
    assert pool.runners == []  # nothing was sent


def test_unpicklable_result_is_named_and_runner_survives(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    with pytest.raises(flame.SerializationError, match=r"result of .*<lambda>.*_thread.lock"):
        pool.call(lambda: __import__("threading").Lock())
    assert pool.call(os.getpid) == pid


def _ticker(path):
    import time
    while True:
        with open(path, "a") as f:
            f.write(".")
        time.sleep(0.05)


def _stops_growing(path):
    size = os.path.getsize(path)
    time.sleep(0.5)
    return os.path.getsize(path) == size


def test_timeout_stops_the_remote_work(make_pool, tmp_path):
    pool = make_pool(max=1, timeout=1.0)
    path = str(tmp_path / "ticks")
    pid = pool.call(os.getpid)
    t0 = time.monotonic()
    with pytest.raises(flame.CallTimeout) as info:
        pool.call(_ticker, path)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 5
    assert wait_for(lambda: _stops_growing(path), timeout=5)
    assert pool.call(os.getpid) == pid, "an interruptible call does not cost the runner"


def test_timeout_on_blocking_sleep_interrupts_it(make_pool):
    pool = make_pool(max=1, timeout=0.5)
    pid = pool.call(os.getpid)
    with pytest.raises(flame.CallTimeout):
        pool.call(time.sleep, 60)
    assert pool.call(os.getpid) == pid  # SIGINT broke the sleep; same runner serves on


def test_call_that_ignores_the_cancel_gets_its_runner_replaced(make_pool):
    pool = make_pool(max=1, timeout=0.5)

    def stubborn():
        import time
        while True:
            try:
                time.sleep(10)
            except KeyboardInterrupt:
                pass
    pid = pool.call(os.getpid)
    with pytest.raises(flame.CallTimeout):
        pool.call(stubborn)
    assert wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    assert pool.call(os.getpid) != pid


def test_keyboard_interrupt_while_waiting_cancels_the_remote_call(make_pool, tmp_path):
    pool = make_pool(max=1)
    path = str(tmp_path / "ticks")
    pid = pool.call(os.getpid)
    timer = threading.Timer(0.7, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pool.call(_ticker, path)
    assert time.monotonic() - t0 < 3
    assert wait_for(lambda: _stops_growing(path), timeout=5)
    assert pool.call(os.getpid) == pid


def test_future_cancel_stops_a_running_call(make_pool, tmp_path):
    pool = make_pool(max=1)
    path = str(tmp_path / "ticks")
    fut = pool.submit(_ticker, path)
    assert wait_for(lambda: os.path.exists(path))
    assert fut.cancel()
    assert wait_for(lambda: _stops_growing(path), timeout=5)
    assert pool.call(lambda: "next") == "next"


@pytest.mark.parametrize("how, expect", [
    ("os._exit(7)", "exit code 7"),
    ("os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
    ("ctypes.string_at(0)", "SIGSEGV"),
])
def test_runner_death_fails_the_call_and_the_pool_heals(make_pool, how, expect):
    pool = make_pool(max=1)
    code = compile(f"import os, signal, ctypes, time\nprint('about to die', flush=True)\n{how}\ntime.sleep(30)", "die", "exec")
    t0 = time.monotonic()
    with pytest.raises(flame.RunnerDied, match=expect) as info:
        pool.call(exec, code, {})
    assert time.monotonic() - t0 < 3, "death is noticed within about a second"
    if "SIGSEGV" in expect:
        assert "Segmentation fault" in info.value.stderr  # faulthandler's report, from the runner's stderr
    assert pool.call(lambda: "healed") == "healed"


def test_killed_runner_from_outside_gives_runner_died(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    fut = pool.submit(time.sleep, 30)
    time.sleep(0.3)
    os.kill(pid, 9)
    with pytest.raises(flame.RunnerDied, match="SIGKILL.*sleep"):
        fut.result(timeout=5)


def test_boot_failure_bad_interpreter(make_pool):
    pool = make_pool(backend=flame.LocalBackend(python="/nonexistent/python3"), max=2)
    t0 = time.monotonic()
    with pytest.raises(flame.BootError, match="/nonexistent/python3"):
        pool.call(lambda: 1)
    assert time.monotonic() - t0 < 5
    assert pool.runners == []


def _fake_python(tmp_path, body):
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_boot_failure_crash_at_import_carries_stderr(make_pool, tmp_path):
    python = _fake_python(tmp_path, "echo 'ImportError: libcuda.so.1: cannot open shared object' >&2; exit 1")
    pool = make_pool(backend=flame.LocalBackend(python=python), max=3)
    futures = [pool.submit(lambda: 1) for _ in range(3)]
    for f in futures:
        with pytest.raises(flame.BootError, match="libcuda") as info:
            f.result(timeout=10)
    assert "exit code 1" in str(info.value) and "libcuda" in info.value.stderr
    time.sleep(0.5)
    assert pool.runners == [], "no endless retry"


def test_boot_timeout_kills_the_runner(make_pool, tmp_path):
    python = _fake_python(tmp_path, "echo starting >&2; exec sleep 60")
    pool = make_pool(backend=flame.LocalBackend(python=python), max=1, boot_timeout=1.0)
    with pytest.raises(flame.BootError, match="did not connect within boot_timeout=1 s") as info:
        pool.call(lambda: 1)
    assert "starting" in info.value.stderr
    sleepers = [p for p in psutil.Process().children(recursive=True) if p.name() == "sleep"]
    assert wait_for(lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in sleepers))


def test_runner_of_another_flamebook_version_is_named_as_such(make_pool, tmp_path):
    import sys
    older = "import flame.wire as w; w.MAGIC = b'FL\\x01'; from flame.node.node import main; main()"
    python = _fake_python(tmp_path, f'exec {sys.executable} -c "{older}"')
    pool = make_pool(backend=flame.LocalBackend(python=python), max=1, boot_timeout=3.0)
    with pytest.raises(flame.BootError, match="another version of it") as info:
        pool.call(lambda: 1)
    assert "same flamebook installed on both sides" in str(info.value)


def test_min_pool_with_broken_boot_does_not_loop(make_pool):
    pool = make_pool(backend=flame.LocalBackend(python="/nonexistent/python3"), min=2, max=2)
    time.sleep(1.0)
    assert pool.runners == []
    with pytest.raises(flame.BootError):
        pool.call(lambda: 1)
