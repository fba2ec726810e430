"""No orphans: runners exit when their parent dies, and when they never reach it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from conftest import ROOT, gone, wait_for
from harness import FakeParent


def test_sigkilled_parent_leaves_no_runner(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import flame, os, sys, time
        pool = flame.Pool(min=2, max=2, max_concurrency=1)
        futures = [pool.submit(time.sleep, 60) for _ in range(2)]  # both runners busy
        time.sleep(0.5)
        while len([r for r in pool.runners if r.active]) < 2:
            time.sleep(0.05)
        print(" ".join(str(r.pid) for r in pool.runners), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    t0 = time.monotonic()
    assert wait_for(lambda: all(gone(p) for p in pids), timeout=8)
    assert time.monotonic() - t0 < 6


def test_runner_that_never_reaches_its_parent_exits_after_the_failsafe():
    env = dict(os.environ, FLAME_RUNNER_ID="lost", FLAME_ADDRESS="tcp://127.0.0.1:9",
               FLAME_KEY=os.urandom(32).hex(), FLAME_FAILSAFE="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "flame.node"], env=env, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 3
    assert "failsafe" in proc.stderr


def test_runner_exits_when_the_parent_goes_silent():
    # No parent pid to watch (as for a remote runner): only the heartbeat timeout can tell.
    parent = FakeParent(FLAME_PARENT_TIMEOUT="1")
    try:
        head, _ = parent.recv(kinds=("hello",))
        parent.send_raw(parent.wire.encode("welcome", parent.runner_id))
        t0 = time.monotonic()
        assert parent.proc.wait(timeout=10) == 3
        assert 0.5 < time.monotonic() - t0 < 5
        assert b"no word from the parent" in parent.proc.stdout.read()
    finally:
        parent.close()
