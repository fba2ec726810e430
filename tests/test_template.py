"""LocalBackend(preload=[...]): runners forked from a template process (issue #14).

The pool's own behaviour with forked runners is covered by running all of test_pool.py both
ways; here, what is particular to the template: its life, its errors, and forked runners
dying, being cancelled and outliving nothing.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import flame
from conftest import ROOT, gone, kill_runner_mid_call, runner_processes, wait_for


def templates():
    found = []
    for p in runner_processes():
        try:
            if p.cmdline()[-1] == "flame.node.template_process" and p.ppid() == os.getpid():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_runners_are_forked_from_one_template_with_the_preloads(make_pool):
    pool = make_pool(backend=flame.LocalBackend(preload=["decimal", "numpy"]), min=2, max=2)
    assert wait_for(lambda: sum(r.state == "ready" for r in pool.runners) == 2, timeout=30)
    [template] = templates()
    pids = {r.pid for r in pool.runners}
    assert {psutil.Process(pid).ppid() for pid in pids} == {template.pid}

    def facts():
        import os, sys, threading
        return (os.getpid(), "decimal" in sys.modules and "numpy" in sys.modules, os.getsid(0) == os.getpid(),
                os.environ.get("FLAME_KEY"), sorted(t.name for t in threading.enumerate()))
    pid, preloaded, own_session, key, threads = pool.call(facts)
    assert pid in pids and preloaded and own_session
    assert key is None, "the key is not left in the runner's environment"
    assert "flame-node-watch" in threads
    assert not psutil.Process(template.pid).threads()[1:], "the template holds no thread of its own"
    pool.shutdown()
    assert wait_for(lambda: not psutil.pid_exists(template.pid) or gone(template.pid), timeout=10)


def test_a_preload_that_fails_to_import_gives_a_boot_error_naming_it(make_pool):
    pool = make_pool(backend=flame.LocalBackend(preload=["json", "no_such_module_xyz"]), max=1)
    with pytest.raises(flame.BootError, match="preload 'no_such_module_xyz' failed to import: ModuleNotFoundError"):
        pool.call(lambda: 1)
    with pytest.raises(TypeError, match="preload must be a list of module names"):
        flame.LocalBackend(preload="numpy")
    with pytest.raises(TypeError, match="preload must be a list of module names"):
        flame.LocalBackend(preload=["not a module"])


def test_a_forked_runner_killed_mid_call_gives_runner_died(make_pool):
    pool = make_pool(backend=flame.LocalBackend(preload=[]), max=1)
    fut = kill_runner_mid_call(pool)
    with pytest.raises(flame.RunnerDied, match="SIGKILL"):
        fut.result(timeout=10)
    assert pool.call(lambda: "healed") == "healed"


def test_cancel_stops_a_forked_runners_call(make_pool):
    pool = make_pool(backend=flame.LocalBackend(preload=[]), max=1)
    pid = pool.call(os.getpid)
    fut = pool.submit(time.sleep, 60)
    time.sleep(0.5)
    assert fut.cancel()
    assert pool.call(os.getpid) == pid, "the runner lived on after its call was interrupted"


def test_the_template_restarts_if_it_dies(make_pool):
    pool = make_pool(backend=flame.LocalBackend(preload=[]), max=2)
    first = pool.call(os.getpid)
    [template] = templates()
    template.kill()
    template.wait(5)
    assert pool.call(os.getpid) == first, "its runners live on"
    pool.submit(time.sleep, 0.5)
    second = pool.submit(os.getpid).result(timeout=30)  # a second runner: a new template
    assert second != first
    [again] = templates()
    assert again.pid != template.pid and psutil.Process(second).ppid() == again.pid


def test_each_forked_runner_gets_its_own_gpus(make_pool):
    backend = flame.LocalBackend(preload=[], gpus_per_runner=1, gpu_ids=["0", "1"])
    pool = make_pool(backend=backend, min=2, max=2)
    assert wait_for(lambda: sum(r.state == "ready" for r in pool.runners) == 2, timeout=30)
    seen = {pool.submit_to(r.id, lambda: os.environ["CUDA_VISIBLE_DEVICES"]).result(timeout=10)
            for r in pool.runners}
    assert seen == {"0", "1"}


def test_nothing_outlives_a_sigkilled_parent(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import flame, os, time
        pool = flame.Pool(flame.LocalBackend(preload=["json"]), min=2, max=2, parent_timeout=2)
        pids = list(pool.map(lambda _: (__import__("time").sleep(0.3), __import__("os").getpid())[1], range(2)))
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        family = [p for p in runner_processes() if p.ppid() == parent.pid]
        assert len(family) == 1, "one template, the parent's child"
        template = family[0].pid
        assert {psutil.Process(p).ppid() for p in pids} == {template}
    finally:
        parent.kill()
        parent.wait()
    assert wait_for(lambda: all(gone(p) for p in [*pids, template]), timeout=15)
