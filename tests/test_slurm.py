"""SlurmBackend against a real single-node Slurm (slurmctld + slurmd + munge, two fake GPUs)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

import flame
from conftest import ROOT, kill_runner_mid_call, wait_for


def backend(tmp_path, **kw):
    kw.setdefault("python", sys.executable)
    # No PYTHONPATH: flame reaches the jobs over the pool's connection (code sync).
    return flame.SlurmBackend(work_dir=str(tmp_path / "slurm"), **kw)


def no_flame_jobs(slurm):
    return not [j for j in slurm.jobs() if " flame-" in j]


@pytest.fixture(autouse=True)
def clean_queue(slurm):
    yield
    assert wait_for(lambda: no_flame_jobs(slurm), timeout=15), slurm.jobs()


def test_cold_boot_call_streamed_output_and_job_name(slurm, tmp_path, make_pool, collect):
    pool = make_pool(backend=backend(tmp_path), max=1, boot_timeout=60)

    def talk():
        import os, time
        for i in range(3):
            print(f"job says {i}", flush=True)
            time.sleep(0.3)
        return os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_JOB_NAME")
    fut = pool.submit(talk)
    assert wait_for(lambda: "job says 0" in collect.text(), timeout=60)
    assert not fut.done()
    job_id, job_name = fut.result(timeout=30)
    assert job_id and job_name == f"flame-{pool.runners[0].id}"
    assert collect.text() == "job says 0\njob says 1\njob says 2\n"
    assert any(job_id in j and "RUNNING" in j for j in slurm.jobs())
    key_files = [f for f in os.listdir(tmp_path / "slurm") if f.endswith(".key")]
    assert key_files and all(os.stat(tmp_path / "slurm" / f).st_mode & 0o777 == 0o600 for f in key_files)
    pool.shutdown()
    assert wait_for(lambda: no_flame_jobs(slurm), timeout=15), "shutting the runner down ends its job"


def test_runner_killed_mid_call_gives_runner_died(slurm, tmp_path, make_pool):
    fut = kill_runner_mid_call(make_pool(backend=backend(tmp_path), max=1, boot_timeout=60))
    with pytest.raises(flame.RunnerDied, match="Slurm job"):
        fut.result(timeout=15)


def test_idle_shutdown_ends_the_job(slurm, tmp_path, make_pool):
    pool = make_pool(backend=backend(tmp_path), max=1, idle_shutdown_after=0.5, boot_timeout=60)
    pool.call(lambda: None)
    assert wait_for(lambda: pool.runners == [] and no_flame_jobs(slurm), timeout=15)


def test_gpu_runners_get_different_gpus_and_a_third_caller_waits(slurm, tmp_path, make_pool):
    pool = make_pool(backend=backend(tmp_path, gpus_per_runner=1), max=3, boot_timeout=60)

    def gpu(seconds):
        import os, time
        time.sleep(seconds)
        return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ["SLURM_JOB_ID"]
    futures = [pool.submit(gpu, 3.0) for _ in range(3)]
    # Two jobs run on the node's two GPUs; the third runner's job waits in the queue.
    assert wait_for(lambda: sorted(j.split()[2] for j in slurm.jobs() if " flame-" in j)
                    == ["PENDING", "RUNNING", "RUNNING"], timeout=30), slurm.jobs()
    first_two = [f.result(timeout=60) for f in futures[:2]]
    assert sorted(g for g, _ in first_two) == ["0", "1"]
    gpus, job = futures[2].result(timeout=60)  # waited for a free runner
    assert job in {j for _, j in first_two}, "the third caller ran on one of the two GPU jobs"
    assert sorted(r.gpus[0] for r in pool.runners if r.state == "ready") == ["0", "1"]


def test_impossible_gres_is_a_boot_error_with_slurms_reason(slurm, tmp_path, make_pool):
    pool = make_pool(backend=backend(tmp_path, gpus_per_runner=3), max=1)
    with pytest.raises(flame.BootError, match="Requested node configuration is not available"):
        pool.call(lambda: 1)


def test_job_pending_past_boot_timeout_is_cancelled(slurm, tmp_path, make_pool):
    pool = make_pool(backend=backend(tmp_path, sbatch_args=["--begin=now+1hour"]), max=1, boot_timeout=3)
    with pytest.raises(flame.BootError, match=r"(?s)boot_timeout=3 s.*PENDING \(BeginTime\)"):
        pool.call(lambda: 1)
    assert wait_for(lambda: no_flame_jobs(slurm), timeout=10), "the pending job was cancelled"


def test_bad_python_path_is_a_boot_error(slurm, tmp_path, make_pool):
    pool = make_pool(backend=backend(tmp_path, python="/nonexistent/python3"), max=1, boot_timeout=60)
    with pytest.raises(flame.BootError, match="(?s)exited during boot.*nonexistent"):
        pool.call(lambda: 1)


def test_sigkilled_parent_leaves_no_job(slurm, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import flame, sys, time
        b = flame.SlurmBackend(python=sys.executable, env={{"PYTHONPATH": {ROOT!r}}},
                               work_dir={str(tmp_path / "slurm")!r})
        pool = flame.Pool(b, min=2, max=2, parent_timeout=2, boot_timeout=60)
        list(pool.map(lambda _: __import__("time").sleep(0.3), range(2)))
        print("ready", flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    assert parent.stdout.readline().strip() == "ready"
    assert len([j for j in slurm.jobs() if " flame-" in j]) == 2
    parent.kill()
    parent.wait()
    t0 = time.monotonic()
    assert wait_for(lambda: no_flame_jobs(slurm), timeout=15)
    assert time.monotonic() - t0 < 2 + 5


def test_one_squeue_reads_every_job_of_the_backend(slurm, tmp_path, make_pool, monkeypatch):
    import shutil
    from flame.backends.slurm import POLL_INTERVAL
    shim, log = tmp_path / "bin", tmp_path / "squeue.calls"
    shim.mkdir()
    (shim / "squeue").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {shutil.which("squeue")} "$@"\n')
    (shim / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    pool = make_pool(backend=backend(tmp_path), max=2, boot_timeout=60)
    started = time.monotonic()
    futures = [pool.submit(time.sleep, 2) for _ in range(2)]
    for f in futures:
        f.result(timeout=60)
    elapsed = time.monotonic() - started
    polls = [line for line in log.read_text().splitlines() if "%i|%T|%r|%N" in line]
    jobs_per_poll = [len(line.split("-j ")[1].split()[0].split(",")) for line in polls]
    assert 2 in jobs_per_poll, "both runners' jobs read by one squeue"
    assert len(polls) <= elapsed / POLL_INTERVAL + 4, "one squeue per interval, not one per job"


def test_two_parents_on_one_machine_do_not_collide(slurm, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import flame, sys
        b = flame.SlurmBackend(python=sys.executable, env={{"PYTHONPATH": {ROOT!r}}},
                               work_dir={str(tmp_path / "slurm")!r})
        with flame.Pool(b, max=1, boot_timeout=60) as pool:
            print(pool.call(lambda x: x * 2, int(sys.argv[1])), flush=True)
    """))
    parents = [subprocess.Popen([sys.executable, str(script), str(n)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
               for n in (20, 21)]
    outs = [p.communicate(timeout=120) for p in parents]
    assert [o.strip() for o, _ in outs] == ["40", "42"], [e[-2000:] for _, e in outs]


def test_a_job_cancelled_mid_call_is_retried_on_a_new_job(slurm, tmp_path, make_pool):
    # Preemption, as scancel does it: with retries the call runs again, on another job.
    pool = make_pool(backend=backend(tmp_path), max=1, boot_timeout=60, retries=1)
    marks = tmp_path / "runs"

    def job_then_wait(path):
        import os, time
        with open(path, "a") as f:
            f.write(os.environ["SLURM_JOB_ID"] + "\n")
        if open(path).read().count("\n") == 1:
            time.sleep(60)  # cancelled meanwhile
        return os.environ["SLURM_JOB_ID"]

    fut = pool.submit(job_then_wait, str(marks))
    assert wait_for(lambda: marks.exists() and marks.read_text().endswith("\n"), timeout=60)
    first = marks.read_text().split()[0]
    subprocess.run(["scancel", first], check=True)
    second = fut.result(timeout=90)
    assert second != first and marks.read_text().split() == [first, second]
    assert fut.attempts == 2


def test_a_node_with_only_python_gets_flames_needs_from_the_shared_cache(slurm, tmp_path, make_pool):
    """Deps (issue #25): the home directory, and so the code cache, is shared with the nodes."""
    import numpy as np
    from conftest import CODE_CACHE
    venv = tmp_path / "bare"
    subprocess.run([f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "-m", "venv",
                    "--without-pip", str(venv)], check=True)
    pool = make_pool(backend=backend(tmp_path, python=str(venv / "bin" / "python")), max=1, boot_timeout=60)

    def where():
        import sys
        import cloudpickle
        import psutil
        import zmq
        return sys.executable, [m.__file__ for m in (zmq, cloudpickle, psutil, np)], int(np.arange(4).sum())
    python, files, total = pool.call(where)
    assert python == str(venv / "bin" / "python") and total == 6
    assert all(f.startswith(CODE_CACHE + "/") for f in files), files


def test_install_true_pip_installs_what_does_not_load_on_the_node(slurm, tmp_path, make_pool):
    """A node unlike the machine that filled the shared cache: its pyzmq entry does not load
    there (simulated: an entry under pyzmq's name that raises), so the node pip-installs it."""
    from flame import deps
    cache = tmp_path / "cache"
    pyzmq = deps.index()[0]["pyzmq"]
    (cache / pyzmq.digest / "zmq").mkdir(parents=True)
    (cache / pyzmq.digest / "zmq" / "__init__.py").write_text("raise ImportError('built for another node')\n")
    for d in (cache, cache / pyzmq.digest, cache / pyzmq.digest / "zmq"):
        os.chmod(d, 0o700)
    venv = tmp_path / "bare"
    subprocess.run([f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "-m", "venv",
                    "--without-pip", str(venv)], check=True)
    b = backend(tmp_path, python=str(venv / "bin" / "python"), install=True, env={"FLAME_CODE_CACHE": str(cache)})
    pool = make_pool(backend=b, max=1, boot_timeout=240)

    def where():
        import zmq
        from importlib import metadata
        return zmq.__file__, metadata.version("pyzmq")
    path, version = pool.call(where)
    assert path.startswith(str(cache / "env-")) and version == pyzmq.version, path
