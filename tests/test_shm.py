"""Large arguments and results through shared memory between a pool and its local runners
(issue #13): correct values, nothing left in /dev/shm whatever dies, and regions reused."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import flame
from flame import shm, wire
from conftest import ROOT, gone, wait_for

MB = 1 << 20


def segments(prefix=""):
    """Every file of ours in /dev/shm: arenas, and local runners' start counts."""
    return sorted(glob.glob(f"/dev/shm/flame-{prefix}*"))


def pool_prefix(runner_id):
    """What every /dev/shm name of a runner's pool starts with: ``<pool>-<random>-``
    (runner ids are ``<pool>-<random>-r<N>-<hex>``, the pool's arena ``<pool>-<random>-p``)."""
    return runner_id[:runner_id.rfind("-r") + 1]


def arenas(prefix=""):
    return [p for p in segments(prefix) if "-starts" not in p]


@pytest.fixture(autouse=True)
def nothing_left_in_dev_shm():
    before = set(segments())
    yield
    assert wait_for(lambda: set(segments()) <= before, timeout=10), set(segments()) - before


def echo(x):
    return x


def test_values_come_back_equal_through_shared_memory(make_pool):
    pool = make_pool(max=1)
    big = np.arange(4 * MB // 8, dtype=np.float64)
    frozen = big.copy()
    frozen.flags.writeable = False
    values = {
        "array": big,
        "2d": np.arange(3 * MB // 4, dtype=np.int32).reshape(-1, 1024),
        "read-only array": frozen,
        "bytes": os.urandom(2 * MB),
        "bytearray": bytearray(os.urandom(2 * MB)),
        "in containers": {"a": [big, (frozen, "x")], "b": {"c": np.ones(MB // 8)}},
    }
    for name, value in values.items():
        back = pool.call(echo, value)
        if name == "in containers":
            assert np.array_equal(back["a"][0], big) and np.array_equal(back["a"][1][0], frozen)
            assert back["a"][1][1] == "x" and np.array_equal(back["b"]["c"], np.ones(MB // 8))
        elif isinstance(value, np.ndarray):
            assert np.array_equal(back, value) and back.dtype == value.dtype and back.shape == value.shape
            assert back.flags.writeable == value.flags.writeable, name
        else:
            assert back == value and type(back) is type(value), name
    view = pool.call(echo, memoryview(bytes(range(256)) * (8 * 1024)))
    assert bytes(view) == bytes(range(256)) * (8 * 1024)
    # It went through shared memory both ways: the pool's arena lent a region, and the result
    # is backed by the runner's, not by a copy of a socket's frame.
    assert pool._shm.arena is not None and arenas(pool.runners[0].id)
    result = pool.call(echo, big)
    base = result
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and type(base.obj).__name__ == "Region"
    result[0] = 42.0  # writable, and ours: the runner's copy is not touched
    assert pool.call(lambda a: float(a[0]), big) == 0.0


def _anonymous(pid: int) -> int:
    """Bytes of a process's private memory (RssAnon: mappings of /dev/shm files are not in it)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_a_100_mb_round_trip_holds_three_copies_at_its_peak(make_pool):
    # The caller's array, the region it is copied into, the region the result is copied into
    # (the result is an array backed by that region): three copies of 100 MB. Measured while
    # the call runs: the parent's and the runner's private memory, plus the pages of the
    # pool's files in /dev/shm (each counted once, however many processes map them).
    pool = make_pool(max=1)
    pool.call(echo, np.ones(2 * MB // 8))  # the runner is up and both arenas exist
    runner = pool.runners[0]
    prefix = "/dev/shm/flame-" + runner.id[:runner.id.rfind("-r")]
    pids = (os.getpid(), runner.pid)

    def in_use():
        shared = sum(os.stat(p).st_blocks * 512 for p in glob.glob(prefix + "-*"))
        return sum(_anonymous(pid) for pid in pids) + shared
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.0002)
    base = in_use()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        big = np.ones(100 * MB // 8)
        back = pool.call(echo, big)
        assert back.shape == big.shape and back[-1] == 1.0
    finally:
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], in_use())
    copies = (peak[0] - base) / (100 * MB)
    assert copies < 3.3, f"a 100 MB round trip peaked at {copies:.2f} copies of the array"
    assert copies > 2.7, f"{copies:.2f} copies: the measure itself is broken (three are expected)"


def test_pandas_through_shared_memory(make_pool):
    pd = pytest.importorskip("pandas")
    pool = make_pool(max=1)
    frame = pd.DataFrame({"x": np.arange(MB // 4, dtype=np.float64), "y": np.arange(MB // 4)})
    back = pool.call(lambda df: df.assign(z=df.x * 2), frame)
    assert back["z"].sum() == frame["x"].sum() * 2 and list(back.columns) == ["x", "y", "z"]
    series = pool.call(echo, frame["x"])
    assert series.equals(frame["x"])


def test_regions_are_reused_not_grown(make_pool):
    pool = make_pool(max=1)
    a = np.random.rand(16 * MB // 8)
    for _ in range(12):
        b = pool.call(echo, a)
        del b
    ours = os.stat(os.path.join(shm.DIR, pool._shm.arena.name)).st_blocks * 512
    [theirs] = arenas(pool.runners[0].id)
    used = os.stat(theirs).st_blocks * 512
    # 12 round trips of 16 MB each way: a few regions, written again and again.
    assert ours <= 3 * 16 * MB and used <= 3 * 16 * MB, (ours, used)


def test_socket_when_shared_memory_is_off_and_below_the_threshold(make_pool):
    pool = make_pool(backend=flame.LocalBackend(shared_memory=False), max=1)
    a = np.arange(4 * MB // 8)
    assert np.array_equal(pool.call(echo, a), a)
    assert pool._shm.arena is None and not arenas(pool.runners[0].id)
    small = make_pool(max=1)
    assert np.array_equal(small.call(echo, a[:1000]), a[:1000])
    assert small._shm.arena is None


def test_a_runner_killed_mid_transfer_leaves_nothing(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    rid = pool.runners[0].id
    a = np.ones(32 * MB // 8)
    assert pool.call(lambda x: x * 1, a).sum() == a.size  # arenas made both ways
    assert arenas(rid)

    def hold_then_sleep(x):
        import time
        global KEPT
        KEPT = x * 2  # a result-sized value, held while the call sleeps
        time.sleep(60)
    fut = pool.submit(hold_then_sleep, a)
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(flame.RunnerDied):
        fut.result(timeout=10)
    assert wait_for(lambda: not segments(rid), timeout=10), segments(rid)
    assert not pool._shm.arena.lent, "what it held of the pool's memory is free again"
    pool.shutdown()
    assert not segments(pool_prefix(rid))


def test_a_parent_killed_mid_transfer_leaves_nothing(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, time, numpy as np, flame
        pool = flame.Pool(max=2, min=2, parent_timeout=2)
        a = np.ones(32 * 2**20 // 8)
        list(pool.map(lambda x: x * 2, [a, a]))  # both runners: arenas made, regions lent both ways
        futs = [pool.submit(lambda x: (__import__("time").sleep(60), x)[1], a) for _ in range(2)]
        print(pool.runners[0].id, flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        prefix = pool_prefix(parent.stdout.readline().strip())
        assert prefix and wait_for(lambda: len(arenas(prefix)) >= 3, timeout=20), segments(prefix)
    finally:
        parent.kill()
        parent.wait()
    # Its runners notice at once (by pid) and unlink their arenas and the parent's.
    assert wait_for(lambda: not segments(prefix), timeout=10), segments(prefix)


def test_a_pool_and_its_runners_sent_sigterm_together_leave_nothing(tmp_path):
    """As ``pkill -f`` does: the parent dies of the signal without cleaning up, and so would
    its runners without a handler."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import time, numpy as np, flame
        pool = flame.Pool(max=2, min=2)
        a = np.ones(32 * 2**20 // 8)
        list(pool.map(lambda x: x * 2, [a, a]))  # arenas on both sides, and the start counts
        print(pool.runners[0].id, *(r.pid for r in pool.runners), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        rid, *pids = parent.stdout.readline().split() or [""]
        prefix = pool_prefix(rid)
        assert prefix and len(pids) == 2 and segments(prefix)
        for pid in [parent.pid, *map(int, pids)]:
            os.kill(pid, signal.SIGTERM)
        assert parent.wait(timeout=10) == -signal.SIGTERM
        assert wait_for(lambda: all(gone(int(p)) for p in pids), timeout=10)
    finally:
        parent.kill()
        parent.wait()
    assert wait_for(lambda: not segments(prefix), timeout=10), segments(prefix)


def test_a_tampered_large_frame_is_refused_with_either_digest():
    key = os.urandom(32)
    for fast in (False, True):
        sender, receiver = wire.Wire(key, "a"), wire.Wire(key, "b")
        if fast:
            sender.fast_peers.add("b")
        big = os.urandom(9 * MB)
        parts = sender.encode("result", "b", {"id": 1}, [b"head", big])
        assert parts[0][:3] == (wire.MAGIC_FAST if fast else wire.MAGIC)
        assert receiver.decode(parts) is not None
        parts = sender.encode("result", "b", {"id": 2}, [b"head", big])
        tampered = bytearray(parts[1])
        tampered[MB] ^= 1
        assert receiver.decode([parts[0], bytes(tampered)]) is None
        assert receiver.dropped == 1


def test_a_full_dev_shm_sends_over_the_socket_instead_of_crashing(tmp_path, monkeypatch):
    """Writing past a full tmpfs through a mapping is SIGBUS: the arena checks the room first.
    A 4 MB tmpfs stands in for Docker's small /dev/shm."""
    small = tmp_path / "shm"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode:
        pytest.fail("this test needs root, to mount a small tmpfs", pytrace=False)
    try:
        monkeypatch.setattr(shm, "DIR", str(small))
        arena = shm.Arena("test-full")
        try:
            assert arena.put([os.urandom(3 * MB)], "h") is not None  # fits
            assert arena.put([os.urandom(3 * MB)], "h") is None  # would not: refused, not SIGBUS
            assert len(arena.lent) == 1 and arena._free[0][0] > 0
            arena.release(0, "h")
            assert arena.put([os.urandom(3 * MB)], "h") == [arena.name, 0, [3 * MB]], "reused"
        finally:
            arena.close()
            arena.mm.close()
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=True)  # lazy: never left mounted
