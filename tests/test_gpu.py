"""GPU sets for local runners, checked from inside real runners (no GPU needed: explicit gpu_ids)."""
from __future__ import annotations

import os
import time

import pytest

import flame
from conftest import wait_for


def visible():
    import os
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def busy_visible(seconds):
    import os
    import time
    time.sleep(seconds)
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_runners_get_disjoint_gpus(make_pool):
    pool = make_pool(backend=flame.LocalBackend(gpus_per_runner=1, gpu_ids=[0, 1, 2, 3]), max=4)
    seen = list(pool.map(busy_visible, [0.5] * 4))
    assert sorted(seen) == ["0", "1", "2", "3"]
    assert sorted(g for r in pool.runners for g in r.gpus) == ["0", "1", "2", "3"]


def test_gpus_per_runner_two_hands_out_pairs(make_pool):
    pool = make_pool(backend=flame.LocalBackend(gpus_per_runner=2, gpu_ids=["0", "1", "2", "3"]), max=4)
    seen = list(pool.map(busy_visible, [0.5] * 2))
    assert sorted(seen) == ["0,1", "2,3"]


def test_callers_wait_when_every_gpu_set_is_busy(make_pool):
    pool = make_pool(backend=flame.LocalBackend(gpus_per_runner=1, gpu_ids=["0", "1"]), max=4)
    t0 = time.monotonic()
    futures = [pool.submit(busy_visible, 0.8) for _ in range(4)]
    time.sleep(0.4)
    assert len(pool.runners) == 2, "never more GPU runners than free GPU sets"
    seen = [f.result(timeout=30) for f in futures]
    assert sorted(seen) == ["0", "0", "1", "1"]
    assert time.monotonic() - t0 >= 1.6  # two rounds
    assert len(pool.runners) == 2


def test_gpu_set_returns_after_idle_shutdown_and_after_death(make_pool):
    backend = flame.LocalBackend(gpus_per_runner=1, gpu_ids=["7"])
    pool = make_pool(backend=backend, max=2, idle_shutdown_after=0.3)
    assert pool.call(visible) == "7"
    assert backend.capacity() == 0
    assert wait_for(lambda: pool.runners == [] and backend.capacity() == 1)
    pid = pool.call(os.getpid)
    os.kill(pid, 9)
    assert wait_for(lambda: pool.runners == [] and backend.capacity() == 1)
    assert pool.call(visible) == "7"


def test_parent_cuda_visible_devices_is_the_set_to_choose_from(make_pool, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    backend = flame.LocalBackend(gpus_per_runner=1)
    assert backend.gpu_sets == (("2",), ("5",))
    pool = make_pool(backend=backend, max=2)
    assert sorted(list(pool.map(busy_visible, [0.4, 0.4]))) == ["2", "5"]


def test_asking_for_gpus_where_none_exist_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if flame.gpus():
        pytest.skip("this machine has GPUs")
    with pytest.raises(ValueError, match=r"gpus_per_runner=1 but GPU discovery .* offers 0 GPU"):
        flame.LocalBackend(gpus_per_runner=1)
    with pytest.raises(ValueError, match="offers 1 GPU"):
        flame.LocalBackend(gpus_per_runner=2, gpu_ids=[0])
    with pytest.raises(ValueError, match="twice"):
        flame.LocalBackend(gpus_per_runner=1, gpu_ids=[0, 0])


def test_pool_display_lists_gpus(make_pool):
    pool = make_pool(backend=flame.LocalBackend(gpus_per_runner=1, gpu_ids=["3"]), max=1)
    pool.call(visible)
    assert "<td>3</td>" in pool._repr_html_()
