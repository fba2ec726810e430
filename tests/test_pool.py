"""Calls, placement, idle shutdown and live output against real runner processes."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

import flame
from flame import serialize
from conftest import second_caller_wait, wait_for


@pytest.fixture(params=["spawned", "forked"])
def pool_backend(request):
    """Every pool here runs both ways: runners as fresh interpreters, and runners forked from a
    template process that preloaded numpy (``LocalBackend(preload=...)``)."""
    if request.param == "spawned":
        return None
    return lambda: flame.LocalBackend(preload=["numpy"])


def test_lambda_closure_and_kwargs(make_pool):
    pool = make_pool(max=1)
    offset = 100
    assert pool.call(lambda x, y=0: x + y + offset, 1, y=2) == 103

    def make_adder(n):
        return lambda x: x + n
    assert pool.call(make_adder(5), 1) == 6


def test_functions_and_classes_from_main_go_by_value(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import flame, os

        class Point:
            def __init__(self, x, y): self.x, self.y = x, y
            def norm2(self): return self.x ** 2 + self.y ** 2

        def where(p):
            return (os.getpid(), p.norm2(), type(p).__name__)

        if __name__ == "__main__":
            with flame.Pool(max=1) as pool:
                pid, n, name = pool.call(where, Point(3, 4))
                back = pool.call(lambda: Point(1, 2))
            assert pid != os.getpid()
            print("OK", n, name, back.norm2(), type(back).__name__)
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK 25 Point 5 Point"


def test_large_numpy_buffers_travel_out_of_band(make_pool):
    arr = np.arange(8 * 1024 * 1024, dtype=np.float64)  # 64 MB
    frames = serialize.dumps(arr)
    assert len(frames) == 2 and frames[1].nbytes == arr.nbytes  # payload + one zero-copy buffer
    assert len(frames[0]) < 1024
    pool = make_pool(max=1)
    back = pool.call(lambda a: a * 2, arr)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr * 2)
    back[0] = 1.0  # results are ordinary writable arrays


def test_submit_map_cast_acall(make_pool, tmp_path):
    pool = make_pool(max=2)
    fut = pool.submit(pow, 2, 10)
    assert fut.result(timeout=30) == 1024
    assert list(pool.map(lambda a, b: a * b, range(10), range(10))) == [i * i for i in range(10)]
    marker = tmp_path / "cast"
    pool.cast(lambda p: open(p, "w").write("done"), str(marker))
    assert wait_for(lambda: marker.exists() and marker.read_text() == "done")

    async def main():
        return await asyncio.gather(*(pool.acall(lambda i: i + 1, i) for i in range(4)))
    assert asyncio.run(main()) == [1, 2, 3, 4]


def _size(i, payload):
    return i, len(payload)


def test_map_sends_calls_together_in_order_small_and_large(make_pool):
    # A map queues every call under one decision; the calls one decision starts on a runner
    # go as one message when their frames ride inline. Calls with large arguments (out of
    # band, or in shared memory) go on their own, and the runner still runs all in order.
    pool = make_pool(max=1)
    pool.call(int)
    sent = pool._endpoint.wire._seq
    payloads = [b"x" * (300_000 if i % 97 == 0 else i % 7) for i in range(1500)]
    assert list(pool.map(_size, range(1500), payloads)) == [(i, len(p)) for i, p in enumerate(payloads)]
    messages = pool._endpoint.wire._seq - sent
    assert messages < 1500 - 10, f"{messages} messages for 1500 calls: none went together"
    # a function first seen inside such a message is known to the runner for the ones after it
    assert list(pool.map(lambda i: -i, range(40))) == [-i for i in range(40)]


def test_a_fresh_pool_boots_while_its_first_call_is_pickled(make_pool):
    # The boot starts before the call is pickled (in a fresh process, pickling's first use
    # imports cloudpickle: that overlaps the runner's boot); a call that fails to pickle takes
    # its runner back with it (test_failures: test_unpicklable_argument_is_named).
    pool = make_pool(max=3)
    seen = []

    class Probe:
        def __reduce__(self):
            seen.append([r.state for r in pool.runners])
            return int, ()
    assert pool.call(lambda x: x, Probe()) == 0
    assert seen and seen[0] in (["booting"], ["ready"])
    assert len(pool.runners) == 1


def test_empty_pool_boots_on_first_call_and_only_what_demand_needs(make_pool):
    pool = make_pool(max=4)
    assert pool.runners == []
    assert pool.call(lambda: 1) == 1
    for _ in range(5):
        pool.call(lambda: 1)  # sequential calls reuse the one runner
    assert len(pool.runners) == 1


def test_max_runners_and_max_concurrency(make_pool):
    pool = make_pool(max=2, max_concurrency=2)

    def busy(i):
        import os, threading, time
        start = time.monotonic()
        time.sleep(0.6)
        return os.getpid(), threading.get_ident(), start
    results = list(pool.map(busy, range(6)))
    pids = [r[0] for r in results]
    assert len(set(pids)) == 2, "two runners at most"
    assert len(pool.runners) == 2
    # Never more than max_concurrency=2 calls at once on one runner.
    for pid in set(pids):
        starts = sorted(start for p, _, start in results if p == pid)
        for s in starts:
            overlapping = [t for t in starts if t <= s < t + 0.55]
            assert len(overlapping) <= 2, starts


def test_waiting_callers_are_served_fifo(make_pool):
    pool = make_pool(max=1)
    pool.call(lambda: None)
    futures = []
    for i in range(6):
        futures.append(pool.submit(lambda i: (i, __import__("time").monotonic()), i))
    results = [f.result(timeout=30) for f in futures]
    assert [i for i, _ in results] == list(range(6))
    starts = [t for _, t in results]
    assert starts == sorted(starts)


def test_min_runners_stay_warm_and_idle_ones_shut_down(make_pool):
    pool = make_pool(min=1, max=3, idle_shutdown_after=0.5)
    assert wait_for(lambda: [r.state for r in pool.runners] == ["ready"])
    list(pool.map(lambda _: __import__("time").sleep(0.3), range(3)))
    assert len(pool.runners) == 3
    pids = {r.pid for r in pool.runners}
    assert wait_for(lambda: len(pool.runners) == 1, timeout=10)
    gone = [pid for pid in pids if not psutil.pid_exists(pid)]
    assert len(gone) == 2
    time.sleep(1.0)
    assert len(pool.runners) == 1  # never below min


def test_idle_pool_goes_empty(make_pool):
    pool = make_pool(max=2, idle_shutdown_after=0.3)
    pid = pool.call(os.getpid)
    assert pid != os.getpid()
    assert wait_for(lambda: pool.runners == [])
    assert wait_for(lambda: not psutil.pid_exists(pid))
    assert pool.call(lambda: 2) == 2  # boots again on demand


def test_output_streams_while_the_call_runs(make_pool, collect):
    pool = make_pool(max=1)

    def slow():
        import sys, time
        for i in range(3):
            print(f"tick {i}")
            time.sleep(0.4)
        sys.stderr.write("done\n")
        return "finished"
    fut = pool.submit(slow)
    assert wait_for(lambda: "tick 0" in collect.text(), timeout=10)
    assert not fut.done(), "first line must arrive while the call is still running"
    assert fut.result(timeout=30) == "finished"
    assert collect.text() == "tick 0\ntick 1\ntick 2\n"
    assert collect.text("stderr") == "done\n"
    times = [t for t, k, s in collect.events if k == "stdout"]
    assert times[-1] - times[0] >= 0.6, "lines arrive one by one, not in one batch at the end"


def test_concurrent_calls_keep_their_output_apart(make_pool, collect):
    pool = make_pool(max=1, max_concurrency=3)

    def chatty(tag):
        import time
        for i in range(20):
            print(f"{tag}{i}")
            time.sleep(0.005)
        return tag
    futures = [pool.submit(chatty, tag) for tag in "abc"]
    assert [f.result(timeout=30) for f in futures] == list("abc")
    for tag, sink in zip("abc", collect.made):
        text = "".join(t for _, k, t in sink.events if k == "stdout")
        assert text == "".join(f"{tag}{i}\n" for i in range(20))


def test_subprocess_and_c_level_output_reach_the_call(make_pool, collect):
    pool = make_pool(max=1)

    def noisy():
        import os
        import subprocess
        import sys
        os.system("echo from a shell; echo shell error >&2")
        subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
        os.write(1, b"written to fd 1\n")  # as C code writes, under sys.stdout
        os.write(2, b"written to fd 2\n")
        return "done"
    # Drained when the call ends: everything is there the moment the result is.
    assert pool.call(noisy) == "done"
    out, err = collect.text(), collect.text("stderr")
    for line in ("from a shell\n", "from a child\n", "written to fd 1\n"):
        assert line in out
    assert "shell error\n" in err and "written to fd 2\n" in err
    # stderr also stays in the runner's log, for the error a crash would show.
    handle = next(iter(pool._runners.values())).handle
    assert "written to fd 2" in handle.stderr_tail() and "written to fd 1" not in handle.stderr_tail()


def test_threads_a_call_starts_write_to_that_call(make_pool, collect):
    pool = make_pool(max=1, max_concurrency=2)

    def with_helpers(tag):
        import threading
        from concurrent.futures import ThreadPoolExecutor
        t = threading.Thread(target=lambda: print(f"{tag} from a thread"))
        t.start()
        t.join()
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda i: print(f"{tag} worker {i}"), range(2)))
        return tag
    futures = [pool.submit(with_helpers, tag) for tag in "ab"]
    assert [f.result(timeout=30) for f in futures] == ["a", "b"]
    for tag, sink in zip("ab", collect.made):
        lines = sorted("".join(t for _, k, t in sink.events if k == "stdout").splitlines())
        assert lines == [f"{tag} from a thread", f"{tag} worker 0", f"{tag} worker 1"]


def test_output_after_its_call_ended_goes_to_the_log_not_the_next_call(make_pool, collect):
    pool = make_pool(max=1)

    def leave_a_thread():
        import threading
        import time
        threading.Thread(target=lambda: (time.sleep(0.3), print("late line")), daemon=True).start()
        return "left"
    assert pool.call(leave_a_thread) == "left"
    handle = next(iter(pool._runners.values())).handle
    assert wait_for(lambda: "late line" in handle.stderr_tail())  # the runner's log
    assert pool.call(lambda: "next") == "next"
    assert "late line" not in collect.text()


def test_default_sink_writes_to_callers_stdout(make_pool, capsys):
    pool = make_pool(max=1)
    pool.call(lambda: print("hello from the runner"))
    assert "hello from the runner" in capsys.readouterr().out


def test_options_are_validated_at_the_door():
    with pytest.raises(ValueError, match="max"):
        flame.Pool(max=0)
    with pytest.raises(ValueError, match="min"):
        flame.Pool(min=3, max=2)
    with pytest.raises(TypeError, match="max_concurrency"):
        flame.Pool(max_concurrency=1.5)
    with pytest.raises(ValueError, match="timeout"):
        flame.Pool(timeout=0)
    with pytest.raises(TypeError, match="backend"):
        flame.Pool(backend="local")
    with pytest.raises(TypeError, match="idle_shutdown_after"):
        flame.Pool(idle_shutdown_after="1")


def test_shutdown_waits_then_refuses_calls(make_pool):
    pool = make_pool(max=1)
    fut = pool.submit(lambda: (__import__("time").sleep(0.3), "ok")[1])
    pool.shutdown()
    assert fut.result() == "ok"
    assert pool.runners == []
    with pytest.raises(flame.PoolClosed):
        pool.submit(lambda: 1)


def test_shutdown_waits_for_a_call_another_thread_makes_or_cancels_it(make_pool, tmp_path):
    """Pool.call waits on an Outcome, not a Future: shutdown must still wait for it, or cancel it."""
    import concurrent.futures
    import threading
    for cancel in (False, True):
        pool = make_pool(max=1)
        pool.call(os.getpid)
        path = str(tmp_path / f"ticks-{cancel}")
        got: dict = {}

        def caller():
            try:
                got["value"] = pool.call(lambda p: (_tick_for(p, 1.0), "done")[1], path)
            except BaseException as exc:  # noqa: BLE001
                got["error"] = exc
        t = threading.Thread(target=caller)
        t.start()
        assert wait_for(lambda: os.path.exists(path))
        pool.shutdown(cancel_futures=cancel)
        t.join(timeout=10)
        assert not t.is_alive()
        if cancel:
            assert isinstance(got.get("error"), concurrent.futures.CancelledError), got
            size = os.path.getsize(path)
            time.sleep(0.3)
            assert os.path.getsize(path) == size, "the remote work went on"
        else:
            assert got == {"value": "done"}


def test_a_caller_waiting_alone_lets_other_threads_call_at_once(make_pool, monkeypatch):
    """The caller alone in wait() holds the socket in a blocking receive; another thread that
    needs it pokes it out, or its call would wait for the first caller's."""
    assert second_caller_wait(make_pool, monkeypatch) < 1.5


def test_many_threads_calling_at_once_all_get_their_results(make_pool):
    import threading
    pool = make_pool(max=2)
    pool.call(os.getpid)
    got: dict = {}

    def caller(k):
        got[k] = [pool.call(lambda x: x * 2, i) for i in range(100)]
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == {k: [i * 2 for i in range(100)] for k in range(8)}


def test_heartbeats_reach_a_runner_while_the_caller_waits_in_its_receive(make_pool):
    """The I/O thread's heartbeats need the socket the waiting caller holds: a runner whose
    parent falls silent for parent_timeout exits."""
    pool = make_pool(max=1, parent_timeout=2.0)  # twice the heartbeat interval
    pid = pool.call(os.getpid)
    assert pool.call(time.sleep, 4.0) is None
    assert pool.call(os.getpid) == pid


def _tick_for(path, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with open(path, "a") as f:
            f.write(".")
        time.sleep(0.02)


def test_context_manager_stops_runners():
    with flame.Pool(max=2) as pool:
        pids = set(pool.map(lambda _: (__import__("time").sleep(0.2), __import__("os").getpid())[1], range(2)))
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def test_calls_sent_ahead_to_busy_runners_can_still_be_cancelled(make_pool, tmp_path):
    pool = make_pool(max=1)
    first = pool.submit(time.sleep, 1.5)
    marker = tmp_path / "ran"
    second = pool.submit(lambda p: open(p, "w").write("x"), str(marker))  # sent ahead: pool at max
    time.sleep(0.3)
    assert second.cancel()
    assert first.result(timeout=10) is None, "the running call was not disturbed"
    assert pool.call(lambda: "after") == "after"
    assert not marker.exists()


def test_progress_outside_a_kernel_is_a_stderr_line_only_when_asked(tmp_path):
    script = tmp_path / "batch.py"
    script.write_text(textwrap.dedent("""
        import time, flame
        def slow(i):
            import time
            time.sleep(0.3)
            return i
        with flame.Pool(max=2) as pool:
            print(sum(pool.map(slow, range(10))))
    """))
    for asked in (False, True):
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env.pop("FLAME_PROGRESS", None)
        if asked:
            env["FLAME_PROGRESS"] = "1"
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=60)
        assert out.stdout.strip() == "45"
        if asked:
            assert "map(slow): 10/10 done" in out.stderr
        else:
            assert "map(" not in out.stderr


def test_a_pool_of_64_runners_maps_over_them_with_no_error_and_no_leak():
    """The keynote's 64 machines, as local runners: all boot, a map runs across them, and
    shutdown leaves none (the suite's leak check runs after this test too)."""
    with flame.Pool(min=64, max=64, boot_timeout=300, parent_timeout=60, idle_shutdown_after=None) as pool:
        assert wait_for(lambda: sum(r.state == "ready" for r in pool.runners) == 64, timeout=300)
        pids = {r.pid for r in pool.runners}
        assert len(pids) == 64
        out = list(pool.map(lambda x: (x * 2, os.getpid()), range(2000)))
        assert [v for v, _ in out] == [x * 2 for x in range(2000)]
        used = {pid for _, pid in out}
        assert used <= pids and len(used) > 1
    assert pool.runners == []
    assert wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                    for p in pids), timeout=30)
