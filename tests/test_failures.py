"""Bad input and bad luck: remote errors, unpicklable values, timeouts, cancels, dead runners, failed boots."""
from __future__ import annotations

import _thread
from concurrent.futures import CancelledError
import os
import stat
import threading
import time

import psutil
import pytest

import flame
from conftest import EVIL, gone, slow_repr, wait_for


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
    assert wait_for(lambda: gone(pid))
    assert pool.call(os.getpid) != pid


def test_keyboard_interrupt_while_waiting_cancels_the_remote_call(make_pool, tmp_path, sigint_handled):
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
    python = _fake_python(tmp_path, f'exec {sys.executable} -c "{older}" "$@"')
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


# ---- nothing a user's object does while being reported may kill the runner -------------------
class StrRaises(Exception):
    def __str__(self):
        raise ValueError("no str for you")


class ReprAndReduceRaise(Exception):
    def __repr__(self):
        raise RuntimeError("no repr")

    def __reduce__(self):
        raise RuntimeError("no reduce")


class ReduceExits:
    def __reduce__(self):
        raise SystemExit("pickling this exits")


def raise_str_raises():
    raise StrRaises("hidden")


def test_exception_whose_str_raises_is_reported_and_the_runner_lives(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    with pytest.raises(StrRaises) as info:
        pool.call(raise_str_raises)
    assert "could not be rendered" in info.value.__cause__.text
    assert "ValueError: no str for you" in info.value.__cause__.text
    assert pool.call(os.getpid) == pid, "the runner lived"


def test_exception_whose_repr_and_reduce_raise_comes_back_as_remote_error(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)

    def fail():
        raise ReprAndReduceRaise("kept")
    with pytest.raises(flame.RemoteError) as info:
        pool.call(fail)
    assert info.value.type_name.endswith("ReprAndReduceRaise") and "kept" in info.value.message
    assert pool.call(os.getpid) == pid


@pytest.mark.parametrize("make", [
    lambda: [1, 2, __import__("threading").Lock()],  # fails half-way through the pickle
    lambda: ReduceExits(),  # __reduce__ raises SystemExit, not an Exception
], ids=["half-way", "system-exit"])
def test_result_that_fails_to_pickle_is_named_and_the_runner_lives(make_pool, make):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    with pytest.raises(flame.SerializationError, match="cannot send the result of"):
        pool.call(make)
    assert pool.call(os.getpid) == pid


# ---- the pool lock is never held around blocking work -------------------------------------------
class _SlowHandle(flame.RunnerHandle):
    def __init__(self, inner, exit_delay):
        self.inner, self.exit_delay = inner, exit_delay
        self.pid, self.host = inner.pid, inner.host

    def exit_status(self):
        time.sleep(self.exit_delay)  # a slow controller (squeue)
        return self.inner.exit_status()

    def stderr_tail(self, lines=40):
        return self.inner.stderr_tail(lines)


class SlowBackend(flame.LocalBackend):
    """Runners on this machine whose backend blocks: terminate for ``terminate_delay`` seconds,
    every exit_status for ``exit_delay`` seconds."""

    def __init__(self, terminate_delay=0.0, exit_delay=0.0):
        super().__init__()
        self.terminate_delay, self.exit_delay = terminate_delay, exit_delay

    def boot(self, spec):
        return _SlowHandle(super().boot(spec), self.exit_delay)

    def terminate(self, handle):
        time.sleep(self.terminate_delay)
        super().terminate(handle.inner)


class SlowBootBackend(SlowBackend):
    """Runners whose boot blocks for ``boot_delay`` seconds; terminate records who it stopped."""

    def __init__(self, boot_delay):
        super().__init__()
        self.boot_delay, self.terminated = boot_delay, []

    def boot(self, spec):
        time.sleep(self.boot_delay)
        return super().boot(spec)

    def terminate(self, handle):
        super().terminate(handle)
        self.terminated.append(handle.pid)


def test_shutdown_waits_for_a_boot_under_way_and_stops_its_runner():
    # A call that fails to pickle drops the runner booted for it while its boot still runs;
    # shutdown right after must wait for that boot and stop the runner it started (before,
    # it returned at once, and once raised joining a terminate thread not yet started).
    backend = SlowBootBackend(0.5)
    pool = flame.Pool(backend, max=1)
    lock = threading.Lock()
    with pytest.raises(flame.SerializationError):
        pool.submit(lambda: lock.locked())
    pool.shutdown()
    assert len(backend.terminated) == 1, "shutdown returned before the runner it booted was stopped"
    assert not psutil.pid_exists(backend.terminated[0]) or psutil.Process(backend.terminated[0]).status() == "zombie"


def test_a_blocking_terminate_does_not_stall_other_calls(make_pool):
    pool = make_pool(backend=SlowBackend(terminate_delay=8.0), max=2, idle_shutdown_after=None)
    first, second = list(pool.map(lambda _: (__import__("time").sleep(0.3), os.getpid())[1], range(2)))
    with pytest.raises(flame.RunnerDied):
        pool.call(exec, "import os; os._exit(1)", {})  # terminate() now blocks for 8 s
    t0 = time.monotonic()
    answered = 0
    while time.monotonic() - t0 < 4:
        pool.call(lambda: 1)
        answered += 1
    assert answered >= 20, f"only {answered} calls answered while terminate() blocked"


def test_a_slow_exit_status_neither_stalls_calls_nor_starves_heartbeats(make_pool):
    pool = make_pool(backend=SlowBackend(exit_delay=4.0), max=1, parent_timeout=2.0)
    pid = pool.call(os.getpid)
    t0 = time.monotonic()
    for _ in range(20):
        assert pool.call(os.getpid) == pid
    assert time.monotonic() - t0 < 3, "calls did not wait for exit_status"
    time.sleep(3.0)  # past parent_timeout: only heartbeats keep the runner
    assert pool.call(os.getpid) == pid, "heartbeats went on while exit_status blocked"


class SlowToUnpickle:
    def __reduce__(self):
        return (_slow_rebuild, ())


def _slow_rebuild():
    if os.environ.get("FLAME_RUNNER_ID") is None:  # on the parent only
        time.sleep(3)
    return "rebuilt"


def test_unpickling_a_result_happens_in_the_callers_thread(make_pool):
    pool = make_pool(max=2)
    list(pool.map(lambda _: __import__("time").sleep(0.3), range(2)))
    slow = pool.submit(SlowToUnpickle)
    time.sleep(0.5)  # its result arrives meanwhile: it is settled, not unpickled, on arrival
    assert slow.done()
    t0 = time.monotonic()
    for _ in range(10):
        pool.call(lambda: 1)
    assert time.monotonic() - t0 < 2
    assert slow.result() == "rebuilt"


# ---- a dead I/O or watch thread fails calls with its cause, never hangs them ----------------------
def test_pool_io_thread_dying_fails_pending_calls_with_the_cause(make_pool, caplog):
    pool = make_pool(max=1)
    assert pool.call(lambda: 1) == 1
    fut = pool.submit(time.sleep, 30)

    def broken_tick(now):
        raise RuntimeError("tick exploded")
    pool._endpoint._tick = broken_tick
    with pytest.raises(flame.PoolClosed, match="I/O thread failed with RuntimeError: tick exploded"):
        fut.result(timeout=10)
    assert "Traceback" in caplog.text and "tick exploded" in caplog.text
    with pytest.raises(flame.PoolClosed):
        pool.submit(lambda: 1)


def _break_the_watch_thread():
    import gc
    import threading
    node = next(o for o in gc.get_objects() if hasattr(type(o), "watch_loop") and hasattr(o, "terminator"))
    node.terminator.verdict = None  # the next check raises TypeError in the watch thread
    threading.Event().wait(30)


def test_runner_watch_thread_dying_ends_the_runner_with_its_traceback(make_pool):
    pool = make_pool(max=1)
    t0 = time.monotonic()
    with pytest.raises(flame.RunnerDied, match="(?s)exit code 4.*watch thread failed.*TypeError") as info:
        pool.call(_break_the_watch_thread)
    assert time.monotonic() - t0 < 5
    assert "Traceback" in info.value.stderr


# ---- a cancel hits the call it was meant for, or nothing ---------------------------------------
def test_cancels_racing_the_end_of_calls_never_hit_another_call(make_pool):
    pool = make_pool(max=1, max_concurrency=4)
    list(pool.map(lambda _: None, range(4)))
    import random
    rng = random.Random(7)
    for _ in range(3):
        futures = [pool.submit(lambda i: sum(range(2000)) and i, i) for i in range(300)]
        for f in futures:
            if rng.random() < 0.5:
                f.cancel()
        for i, f in enumerate(futures):
            try:
                assert f.result(timeout=20) == i
            except CancelledError:
                assert f.cancelled()
            except KeyboardInterrupt:
                pytest.fail(f"call {i} was hit by a cancel meant for another call")
    assert list(pool.map(lambda i: i, range(8))) == list(range(8))


def _deliver_async_exceptions_late(delay):
    """In this runner, make every asynchronous exception arrive ``delay`` seconds after it is
    sent: the window between aiming a cancel at a thread and its landing, widened at will."""
    import ctypes
    import time
    real = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def late(ident, exc):
        time.sleep(delay)
        return real(ident, exc)
    ctypes.pythonapi.PyThreadState_SetAsyncExc = late


def _sleep_then(seconds, value):
    import time
    time.sleep(seconds)
    return value


def test_a_cancel_delivered_late_never_hits_the_next_call(make_pool):
    # The race of a cancel with the end of its call, made wide instead of a few bytecodes:
    # the cancel is aimed while call A runs; A ends and its thread takes up C before the
    # exception lands. It must land in A's own ending (and be caught there), never in C.
    pool = make_pool(max=1, max_concurrency=2)
    pool.call(_deliver_async_exceptions_late, 0.4)  # worker threads: cancels are async exceptions
    a = pool.submit(_sleep_then, 0.2, "a")
    b = pool.submit(_sleep_then, 1.2, "b")  # keeps the other worker thread busy
    c = pool.submit(_sleep_then, 0.6, "c")
    time.sleep(0.1)
    assert a.cancel()
    try:
        assert c.result(timeout=20) == "c"
    except KeyboardInterrupt:
        pytest.fail("the cancel meant for one call interrupted the next call on its thread")
    assert b.result(timeout=20) == "b"
    assert list(pool.map(lambda i: i, range(6))) == list(range(6))


def _logged_work(i, path):
    import time
    with open(path, "a") as f:
        f.write(f"{i}\n")
    time.sleep(0.02)
    return i


def _lose_the_next_reply():
    """In the runner: the next call's reply never leaves, as when ZeroMQ's I/O thread has not
    sent it yet at a SIGKILL (this call's own reply is sent by the post it was started with)."""
    import gc
    from flame.node.node import RunnerNode
    node = next(o for o in gc.get_objects() if isinstance(o, RunnerNode))
    post, seen = node.post, []

    def lossy(kind, fields=None, frames=()):
        if kind == "result":
            seen.append(kind)
            if len(seen) == 1:
                return
        post(kind, fields, frames)
    node.post = lossy


def _mark_then_die(path):
    import os
    import signal
    with open(path, "a") as f:
        f.write("ran\n")
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_call_started_after_a_lost_reply_is_not_run_again(make_pool, tmp_path):
    # B's reply is lost with its runner; C, sent ahead behind B, had started. Taking "the first
    # unanswered call" as the only one started would run C again elsewhere: the runner's
    # start count says C started, so C fails with RunnerDied instead.
    lose_a_reply_then_die(make_pool(max=1), str(tmp_path / "marks"))


def lose_a_reply_then_die(pool, path, why=None):
    """B's reply is lost, then C, sent ahead behind B, marks ``path`` and kills the runner:
    both must fail with RunnerDied (matching ``why``), and C must not run again."""
    pool.call(_lose_the_next_reply)
    b = pool.submit(time.sleep, 0.3)
    c = pool.submit(_mark_then_die, path)  # sent ahead: the pool is at max
    with pytest.raises(flame.RunnerDied, match=why):
        b.result(timeout=30)
    with pytest.raises(flame.RunnerDied):
        c.result(timeout=30)
    time.sleep(1.0)  # a second run, if any, has had time to write
    assert open(path).read() == "ran\n", "a call that had started ran again"
    assert pool.call(lambda: "next") == "next"


@pytest.mark.parametrize("concurrency", [1, 2])
def test_killing_runners_fails_only_the_calls_that_had_started(make_pool, tmp_path, concurrency):
    import random
    import signal
    # At max: every runner holds a call sent ahead besides the ones it runs.
    pool = make_pool(max=2, max_concurrency=concurrency, idle_shutdown_after=None)
    path = str(tmp_path / "ran")
    futures = [pool.submit(_logged_work, i, path) for i in range(400)]
    rng, kills = random.Random(3), 0
    while kills < 12 and not all(f.done() for f in futures):
        time.sleep(rng.uniform(0.1, 0.3))
        ready = [r for r in pool.runners if r.state == "ready" and r.active]
        if ready:
            os.kill(rng.choice(ready).pid, signal.SIGKILL)
            kills += 1
    failed = set()
    for i, f in enumerate(futures):
        try:
            assert f.result(timeout=60) == i
        except flame.RunnerDied:
            failed.add(str(i))
    assert kills >= 5
    ran = open(path).read().split()
    assert len(ran) == len(set(ran)), "a call ran twice"
    assert len(ran) >= 400 - len(failed)
    # A failed call had started: it ran (a reply ZeroMQ had not sent yet is lost with its runner,
    # and that call must fail, not run again), or it was running when the kill struck, before
    # its first line (at most max_concurrency per kill).
    unstarted = failed - set(ran)
    assert len(unstarted) <= kills * concurrency, f"{len(unstarted)} calls failed for {kills} kills without running"


def test_an_inspection_pending_on_a_runner_that_dies_raises_runner_died(make_pool):
    # Not its timeout: the runner that owes the answer is gone, so the request fails at once.
    import signal
    pool = make_pool(max=1)
    pool.call(flame.run_cell, slow_repr(60), {})
    pid = pool.runners[0].pid
    threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(flame.RunnerDied):
        pool.inspect("x", timeout=40)
    assert time.monotonic() - t0 < 30, "the request waited out its timeout"


def test_an_object_that_breaks_completion_costs_the_runner_nothing(make_pool):
    pool = make_pool(max=1)
    pool.call(flame.run_cell, EVIL, {})
    pid = pool.call(os.getpid)
    for text in ("evil.d", "evil.", "evil.x.y", "evil"):
        assert pool.complete(text)["status"] in ("ok", "error")
        assert pool.inspect(text)["status"] in ("ok", "error")
    assert pool.call(os.getpid) == pid


def test_a_slow_inspection_is_only_slow(make_pool):
    # Answered off the thread that hears the parent: heartbeats keep coming meanwhile, and
    # a runner that waits 2 s at most for them lives on.
    pool = make_pool(max=1, parent_timeout=2)
    pool.call(flame.run_cell, slow_repr(4), {})
    pid = pool.call(os.getpid)
    reply = pool.inspect("x", timeout=30)
    assert "slow" in reply["data"]["text/plain"]
    assert pool.call(os.getpid) == pid


# ---- retries ---------------------------------------------------------------------------------
def _die_the_first_time(path):
    """SIGKILLs its own runner on its first run; returns the run count on a later one."""
    import os
    import signal
    with open(path, "a") as f:
        f.write("run\n")
    runs = open(path).read().count("run\n")
    if runs == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return runs, os.getpid()


def _always_die():
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def _raise_and_count(path):
    with open(path, "a") as f:
        f.write("run\n")
    raise ValueError("its own error")


def test_a_call_whose_runner_dies_runs_again_with_retries(make_pool, tmp_path):
    pool = make_pool(max=1, retries=1)
    first = pool.call(os.getpid)
    fut = pool.submit(_die_the_first_time, str(tmp_path / "runs"))
    runs, pid = fut.result(timeout=60)
    assert runs == 2 and fut.attempts == 2
    assert pid != first, "the second run was on another runner"
    ok = pool.submit(os.getpid)
    assert ok.result(timeout=30) == pid and ok.attempts == 1
    # pool.call (no future of its own) is retried the same way
    assert pool.call(_die_the_first_time, str(tmp_path / "again"))[0] == 2


def test_runner_died_names_every_try_once_retries_are_spent(make_pool):
    pool = make_pool(max=2, retries=2)
    fut = pool.submit(_always_die)
    with pytest.raises(flame.RunnerDied, match=r"each of its 3 tries: \(1\) runner .*SIGKILL.*\(2\) .*\(3\) ") as info:
        fut.result(timeout=90)
    assert len({w for w in str(info.value).split() if w.startswith("pool-")}) == 3, "three runners"
    assert fut.attempts == 3


def test_a_call_that_raises_is_never_retried(make_pool, tmp_path):
    pool = make_pool(max=1, retries=2)
    path = str(tmp_path / "runs")
    fut = pool.submit(_raise_and_count, path)
    with pytest.raises(ValueError, match="its own error"):
        fut.result(timeout=30)
    assert open(path).read() == "run\n" and fut.attempts == 1


def test_without_retries_a_killed_runner_still_gives_runner_died(make_pool, tmp_path):
    pool = make_pool(max=1)
    path = str(tmp_path / "runs")
    with pytest.raises(flame.RunnerDied, match="SIGKILL"):
        pool.submit(_die_the_first_time, path).result(timeout=30)
    assert open(path).read() == "run\n"


def _mark_and_die(xs, path):
    with open(path, "a") as f:
        f.write("run\n")
    _always_die()


def test_a_call_on_a_lost_remotes_runner_is_not_retried(make_pool, tmp_path):
    # Its value is gone with the runner: the call fails rather than recompute it somewhere.
    pool = make_pool(max=2, retries=3)
    held = pool.spawn(list, range(3))
    path = str(tmp_path / "runs")
    with pytest.raises(flame.RunnerDied):
        pool.submit(_mark_and_die, held, path).result(timeout=30)
    with pytest.raises(flame.RunnerDied):
        held.get()
    assert open(path).read() == "run\n"


def test_retries_keep_the_deadline_from_submit(make_pool, tmp_path):
    pool = make_pool(max=1, retries=5, timeout=1.0)

    def slow_then_die(path):
        import os
        import signal
        import time
        with open(path, "a") as f:
            f.write("run\n")
        time.sleep(0.7)
        os.kill(os.getpid(), signal.SIGKILL)

    path = str(tmp_path / "runs")
    with pytest.raises((flame.RunnerDied, flame.CallTimeout)):
        pool.submit(slow_then_die, path).result(timeout=60)
    assert open(path).read().count("run") <= 2, "retried past its deadline"


def test_retries_is_checked_at_the_door():
    with pytest.raises(ValueError, match="retries"):
        flame.Pool(retries=-1)
    with pytest.raises(TypeError, match="retries"):
        flame.Pool(retries=1.5)
