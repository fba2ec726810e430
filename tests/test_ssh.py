"""SSHBackend against a real OpenSSH server on loopback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import flame
from conftest import CODE_CACHE, ROOT, gone, kill_runner_mid_call, wait_for


def backend(sshd, hosts=None, **kw):
    kw.setdefault("python", sys.executable)
    # No PYTHONPATH: flame reaches the runners over the connection (code sync).
    return flame.SSHBackend(hosts or [sshd.host], key=sshd.client_key, known_hosts=None,
                            env={"FLAME_CODE_CACHE": CODE_CACHE}, **kw)


def under_sshd(pid):
    return any(p.name() == "sshd" for p in psutil.Process(pid).parents())


def test_cold_boot_call_and_streamed_output(sshd, make_pool, collect):
    pool = make_pool(backend=backend(sshd), max=2)

    def talk():
        import os, time
        for i in range(3):
            print(f"remote {i}", flush=True)
            time.sleep(0.3)
        return os.getpid()
    fut = pool.submit(talk)
    assert wait_for(lambda: "remote 0" in collect.text(), timeout=30)
    assert not fut.done()
    pid = fut.result(timeout=30)
    assert collect.text() == "remote 0\nremote 1\nremote 2\n"
    assert pid != os.getpid() and under_sshd(pid), "the runner was started through sshd"
    cmd = psutil.Process(pid).cmdline()
    assert cmd[-3] == "-c" and cmd[-2].endswith("# flame.node boot") and cmd[-1] == "--stdin"
    assert not any(pool._key.hex() in part for part in cmd), "the key is not on the command line"
    assert pool.runners[0].host == __import__("socket").gethostname()  # as the runner reports it


def test_runner_killed_mid_call_gives_runner_died(sshd, make_pool):
    pool = make_pool(backend=backend(sshd), max=1)
    fut = kill_runner_mid_call(pool)
    with pytest.raises(flame.RunnerDied, match="SIGKILL"):
        fut.result(timeout=10)
    assert pool.call(lambda: "healed") == "healed"


def test_a_call_sent_ahead_to_a_killed_ssh_runner_is_not_run_again(sshd, make_pool, tmp_path):
    # B's reply is lost with its runner (still in ZeroMQ's hands at the SIGKILL); C, sent
    # ahead behind B, had started. An SSH runner keeps no start count the pool can read, so
    # neither runs again: both fail with RunnerDied, which says why.
    from test_failures import lose_a_reply_then_die
    lose_a_reply_then_die(make_pool(backend=backend(sshd), max=1), str(tmp_path / "marks"), "not run again")


def test_idle_shutdown_ends_the_remote_process(sshd, make_pool):
    pool = make_pool(backend=backend(sshd), max=1, idle_shutdown_after=0.5)
    pid = pool.call(os.getpid)
    assert wait_for(lambda: pool.runners == [] and gone(pid), timeout=10)


def test_losing_the_ssh_connection_ends_the_runner(sshd, make_pool):
    b = backend(sshd)
    pool = make_pool(backend=b, max=1, parent_timeout=30)  # not the heartbeat: stdin EOF
    pid = pool.call(os.getpid)
    b.close()
    t0 = time.monotonic()
    assert wait_for(lambda: gone(pid), timeout=10)
    assert time.monotonic() - t0 < 5


def test_sigkilled_parent_leaves_nothing_on_the_host(sshd, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import flame, os, sys, time
        b = flame.SSHBackend([{sshd.host!r}], python=sys.executable, key={sshd.client_key!r},
                             known_hosts=None, env={{"FLAME_CODE_CACHE": {CODE_CACHE!r}}})
        pool = flame.Pool(b, min=2, max=2)
        pids = list(pool.map(lambda _: (__import__("time").sleep(0.3), __import__("os").getpid())[1], range(2)))
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(set(pids)) == 2
    parent.kill()
    parent.wait()
    assert wait_for(lambda: all(gone(p) for p in pids), timeout=10)


def test_bad_python_gives_boot_error_with_the_reason(sshd, make_pool):
    pool = make_pool(backend=backend(sshd, python="/nonexistent/python3"), max=1)
    with pytest.raises(flame.BootError, match="(?s)exited during boot.*nonexistent") as info:
        pool.call(lambda: 1)
    assert "127" in str(info.value)


def test_unreachable_host_is_named_and_the_next_host_is_tried(sshd, make_pool, caplog):
    dead = "root@127.0.0.1:1"
    pool = make_pool(backend=backend(sshd, hosts=[dead, sshd.host], connect_timeout=3), max=1)
    assert pool.call(lambda: "ok") == "ok"
    assert "127.0.0.1:1" in caplog.text
    pool2 = make_pool(backend=backend(sshd, hosts=[dead], connect_timeout=3), max=1)
    with pytest.raises(flame.BootError, match=r"root@127\.0\.0\.1:1"):
        pool2.call(lambda: 1)


def test_runners_spread_across_hosts(sshd, make_pool):
    port = sshd.host.rsplit(":", 1)[1]
    hosts = [sshd.host, f"root@localhost:{port}"]  # two names for the one test server
    pool = make_pool(backend=backend(sshd, hosts=hosts), max=2)
    list(pool.map(lambda _: __import__("time").sleep(0.5), range(2)))
    used = sorted(r.handle.ssh_host.spec for r in pool._runners.values())
    assert used == sorted(hosts)


def test_a_new_connection_gets_a_new_tunnel(sshd, make_pool):
    b = backend(sshd)
    pool = make_pool(backend=b, max=1, boot_timeout=15)
    pid = pool.call(os.getpid)
    b.close()  # the connection, and the tunnel it carried, are gone; so is the runner
    assert wait_for(lambda: gone(pid) and pool.runners == [], timeout=15)
    assert pool.call(lambda: "through a fresh tunnel") == "through a fresh tunnel"


def test_large_frames_over_ssh_are_digested_with_blake3(sshd, make_pool):
    pool = make_pool(backend=backend(sshd, python=sys.executable), max=1)
    big = bytearray(os.urandom(12 * 2**20))  # out of band: a frame of its own, both ways
    assert pool.call(lambda b: b[::-1], big) == big[::-1]
    rid = pool.runners[0].id
    assert rid in pool._endpoint.wire.fast_peers, "both sides have blake3: large frames use it"
    assert pool._shm.arena is None, "an SSH runner shares no memory with us"
