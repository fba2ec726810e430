"""Remote objects: values that stay on a runner, operations where they live, distributed GC."""
from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

import flame
from conftest import ROOT, gone, wait_for
from kernel_util import execute, of_type, start


class Model:
    """A stand-in for a model loaded onto a GPU."""

    def __init__(self, weight):
        self.weight = weight
        self.calls = 0

    def generate(self, prompt):
        """Generate text for ``prompt``."""
        self.calls += 1
        return prompt * self.weight

    def noop(self):
        return None


def where(obj):
    return os.getpid(), id(obj)


def held_here():
    from flame.node import objects
    return objects.held()[0]


def test_spawn_keeps_the_value_and_operations_run_where_it_lives(make_pool):
    pool = make_pool(max=1)
    model = pool.spawn(Model, 3)
    assert isinstance(model, flame.Remote) and model.runner == pool.runners[0].id
    out = model.generate("ab")  # one round trip: the attribute access is lazy
    assert isinstance(out, flame.Remote) and out.get() == "ababab"
    assert model.calls.get() == 1 and model.weight.get() == 3
    assert repr(model).startswith("<test_remote.Model object") and str(out) == "ababab"
    assert len(out) == 6 and bool(out) and int(model.weight) == 3 and float(model.weight) == 3.0
    assert [0, 1, 2, 3][model.weight] == 3 and f"{model.weight:03d}" == "003"
    assert "generate" in dir(model) and "Generate text" in model.generate.__doc__
    # arithmetic and comparisons run remotely and give Remotes
    w = model.weight
    assert (w + 1).get() == 4 and (10 - w).get() == 7 and (w * w).get() == 9 and (-w).get() == -3
    assert (w == 3).get() is True and (w < 2).get() is False
    arr = pool.spawn(np.arange, 5)
    assert (arr * 2)[1:3].get().tolist() == [2, 4] and arr.sum().get() == 10
    assert list(pool.spawn(range, 250)) == list(range(250)), "iteration fetches items in chunks"


def test_remote_arguments_run_on_their_runner_as_the_real_object(make_pool):
    pool = make_pool(max=2)
    model = pool.spawn(Model, 2)
    pid, oid = pool.call(where, model)
    assert pool.call(lambda m: m.generate("x"), model) == "xx"
    assert pool.call(lambda ms: [m.weight for m in ms], [model, model]) == [2, 2]
    assert pool.call(lambda d: d["m"].weight, {"m": model}) == 2
    assert pool.call(where, model) == (pid, oid), "the same object, on the same runner"
    copy = pool.spawn(lambda m: m.weight + 40, model)
    assert copy.runner == model.runner and copy.get() == 42


def test_calls_with_a_remote_wait_for_its_runner_even_when_others_are_free(make_pool):
    pool = make_pool(max=2)
    list(pool.map(lambda _: time.sleep(0.3), range(2)))  # two runners up
    model = pool.spawn(Model, 1)
    busy = pool.submit_to(model.runner, time.sleep, 1.0)
    t0 = time.monotonic()
    pid, _ = pool.call(where, model)
    assert time.monotonic() - t0 > 0.7, "it waited for a slot on the runner holding the value"
    assert pid == next(r.pid for r in pool.runners if r.id == model.runner)
    busy.result()


def test_remotes_on_two_runners_in_one_call_both_arrive(make_pool):
    # (Until runners addressed each other this was a ValueError; see tests/test_peers.py.)
    pool = make_pool(max=2)
    list(pool.map(lambda _: time.sleep(0.3), range(2)))
    a = pool.spawn(Model, 1)
    b = pool.submit_to(next(r.id for r in pool.runners if r.id != a.runner), lambda: 1)
    b.result()
    other = [r.id for r in pool.runners if r.id != a.runner][0]
    while True:  # a value on the other runner
        b = pool.spawn(Model, 2)
        if b.runner == other:
            break
        pool.submit_to(a.runner, time.sleep, 0.5)
    assert pool.call(lambda x, y: (x.weight, y.weight), a, b) == (1, 2)


def test_releases_bring_the_runners_table_back_to_empty(make_pool):
    pool = make_pool(max=1)
    remotes = [pool.spawn(int, i) for i in range(500)]
    assert pool.runners[0].objects == 500 and pool.call(held_here) == 500
    t0 = time.monotonic()
    del remotes
    gc.collect()
    assert wait_for(lambda: pool.runners[0].objects == 0, timeout=5)
    assert time.monotonic() - t0 < 1.5
    assert pool.call(held_here) == 0


def test_freeing_a_large_value_gives_the_memory_back(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    before = psutil.Process(pid).memory_info().rss
    big = pool.spawn(np.ones, 150 * 1024 * 1024 // 8)
    assert pool.runners[0].object_bytes == 150 * 1024 * 1024
    assert psutil.Process(pid).memory_info().rss > before + 140e6
    del big
    assert wait_for(lambda: psutil.Process(pid).memory_info().rss < before + 50e6, timeout=5)


def test_ten_thousand_remotes_leak_nothing(make_pool):
    pool = make_pool(max=1)
    for _ in range(10):
        batch = [pool.spawn(str, i) for i in range(1000)]
        assert batch[-1].get() == "999"
        del batch
    gc.collect()
    assert wait_for(lambda: pool.runners[0].objects == 0, timeout=10)
    assert pool.call(held_here) == 0
    assert not pool._holdings.releases


def test_a_runner_holding_values_is_not_stopped_for_being_idle(make_pool):
    pool = make_pool(max=1, idle_shutdown_after=0.3)
    model = pool.spawn(Model, 1)
    pid = pool.runners[0].pid
    time.sleep(1.5)
    assert [r.pid for r in pool.runners] == [pid], "kept while a Remote refers to its value"
    model.release()
    model.release()  # idempotent
    assert wait_for(lambda: pool.runners == [] and gone(pid), timeout=5), "idle once released"


def test_a_dead_runner_takes_its_values_with_it(make_pool):
    pool = make_pool(max=1)
    model = pool.spawn(Model, 1)
    os.kill(pool.runners[0].pid, signal.SIGKILL)
    assert wait_for(lambda: pool.runners == [], timeout=5)
    with pytest.raises(flame.RunnerDied, match=r"runner .* is gone.*spawn\(Model\)"):
        model.generate("x")
    with pytest.raises(flame.RunnerDied):
        pool.call(where, model)
    assert pool.call(lambda: "healed") == "healed"


def test_bad_input_gets_a_clear_error(make_pool):
    pool = make_pool(max=1)
    with pytest.raises(ZeroDivisionError):
        pool.spawn(lambda: 1 / 0)
    assert pool.runners[0].objects == 0, "no Remote was made"
    lock = pool.spawn(__import__("threading").Lock)
    with pytest.raises(flame.SerializationError, match="lock"):
        lock.get()
    assert lock.locked().get() is False, "the value stayed on the runner"
    with pytest.raises(flame.SerializationError, match="cannot be pickled.*get"):
        pickle.dumps(lock)
    lock.release()
    with pytest.raises(flame.RemoteGone, match="released"):
        lock.locked()


def test_shutdown_releases_everything(make_pool):
    pool = make_pool(max=1)
    model = pool.spawn(Model, 1)
    pool.shutdown()
    with pytest.raises(flame.RemoteGone, match="shut down"):
        model.generate("x")
    assert "gone" in repr(model)


def test_spawn_of_a_class_from_main_goes_by_value(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import flame, os

        class Counter:
            def __init__(self): self.n = 0
            def bump(self, k=1):
                self.n += k
                return self.n

        if __name__ == "__main__":
            with flame.Pool(max=1) as pool:
                c = pool.spawn(Counter)
                c.bump()
                c.bump(5)
                print("OK", c.n.get(), pool.call(lambda x: type(x).__name__, c), pool.runners[0].objects > 0)
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK 6 Counter True"


def test_in_the_kernel_remotes_display_and_complete_from_their_runner():
    km, kc = start()
    try:
        execute(kc, "import flame, pandas as pd\npool = flame.Pool(max=1)\n"
                    "df = pool.spawn(pd.DataFrame, {'amount': [50, 150, 250], 'who': ['a', 'b', 'c']})\n"
                    "class Model:\n    '''A stand-in model.'''\n    def generate(self, s):\n        return s * 2\n"
                    "model = pool.spawn(Model)")
        cell, (reply, msgs) = execute(kc, "df")
        data = of_type(msgs, "execute_result", cell)[0]["content"]["data"]
        assert "<table" in data["text/html"] and "amount" in data["text/plain"]
        cell, (reply, msgs) = execute(kc, "int(df[df.amount > 100].amount.sum().get())")
        assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] == "400"
        kc.complete("model.gen", 9)
        assert kc.get_shell_msg(timeout=20)["content"]["matches"] == ["generate"]
        kc.complete("df.amo", 6)
        assert "amount" in kc.get_shell_msg(timeout=20)["content"]["matches"]
        kc.inspect("model", 5)
        assert "A stand-in model" in kc.get_shell_msg(timeout=20)["content"]["data"]["text/plain"]
        cell, (reply, msgs) = execute(kc, "pool")
        html = of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/html"]
        assert "<th>objects</th>" in html and " B</td>" in html  # how many, and their size
        execute(kc, "pool.shutdown()")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_runner_id_names_the_runner_on_futures_remotes_and_snapshots(make_pool):
    pool = make_pool(max=1)
    future = pool.submit(os.getpid)
    future.result()
    value = pool.spawn(list, "abc")
    assert future.runner_id == future.runner == pool.runners[0].runner_id == pool.runners[0].id
    assert value.runner_id == value.runner == future.runner_id
    assert pool.submit_to(value.runner_id, os.getpid).result() == future.result()


class Scaled:
    def __init__(self, scale, pause=0.3):
        import os
        import time
        time.sleep(pause)  # long enough that the spawns overlap: each takes a runner of its own
        self.scale, self.pid = scale, os.getpid()

    def apply(self, x):
        return x * self.scale


def test_spawn_map_makes_one_value_per_runner_at_once(make_pool):
    pool = make_pool(max=3)
    models = pool.spawn_map(Scaled, [1, 2, 3])
    assert [m.apply(10).get() for m in models] == [10, 20, 30], "in input order"
    assert len({m.runner_id for m in models}) == 3 and len({m.pid.get() for m in models}) == 3
    # (the results of apply() were values on the runners too, released once dropped)
    assert wait_for(lambda: sorted(r.objects for r in pool.runners) == [1, 1, 1], timeout=5)
    del models
    assert wait_for(lambda: sum(r.objects for r in pool.runners) == 0, timeout=5)


def test_spawn_map_that_fails_releases_what_the_others_made(make_pool):
    pool = make_pool(max=3)
    with pytest.raises(TypeError):
        pool.spawn_map(Scaled, [1, 2, 3], [0.2, "not a number", 0.2])
    assert wait_for(lambda: sum(r.objects for r in pool.runners) == 0, timeout=5), pool.runners
