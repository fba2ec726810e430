"""joblib's "flame" backend: Parallel and scikit-learn's n_jobs on a pool's runners."""
from __future__ import annotations

import os

import pytest

import flame

joblib = pytest.importorskip("joblib", reason="joblib is in the test extra")


@pytest.fixture(autouse=True)
def registered():
    flame.register_joblib()


def _pid_and_print(i):
    import os
    print(f"task {i}", flush=True)
    return os.getpid()


def test_parallel_runs_its_tasks_on_the_pools_runners_with_output(make_pool, collect):
    pool = make_pool(max=2)
    with joblib.parallel_config(backend="flame", pool=pool):
        pids = joblib.Parallel(n_jobs=-1)(joblib.delayed(_pid_and_print)(i) for i in range(20))
    assert len(pids) == 20 and os.getpid() not in pids
    assert set(pids) <= {r.pid for r in pool.runners}
    assert sorted(collect.text().splitlines()) == sorted(f"task {i}" for i in range(20))


def test_without_a_pool_one_is_made_for_the_call_and_shut_down(collect):
    from conftest import gone, wait_for
    before = set(flame.pools())
    with joblib.parallel_config(backend="flame"):
        pids = joblib.Parallel(n_jobs=2)(joblib.delayed(_pid_and_print)(i) for i in range(6))
    assert os.getpid() not in pids
    assert set(flame.pools()) == before, "the pool made for the call was shut down after it"
    assert wait_for(lambda: all(gone(pid) for pid in set(pids)), timeout=15)


def _fail_on(i):
    if i == 3:
        raise KeyError(f"task {i}")
    return i


def test_a_tasks_exception_is_raised_as_joblib_raises_it(make_pool):
    pool = make_pool(max=2)
    with joblib.parallel_config(backend="flame", pool=pool):
        with pytest.raises(KeyError, match="task 3"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(_fail_on)(i) for i in range(8))
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(_fail_on)(i) for i in (1, 2)) == [1, 2]


def test_large_arrays_travel_as_flames_buffers(make_pool):
    np = pytest.importorskip("numpy")
    pool = make_pool(max=2)
    big = np.arange(4 << 20, dtype=np.float64)  # 32 MB, which loky would memmap
    with joblib.parallel_config(backend="flame", pool=pool):
        sums = joblib.Parallel(n_jobs=2)(joblib.delayed(np.sum)(big[i::4]) for i in range(4))
    assert sums == [big[i::4].sum() for i in range(4)]


def test_grid_search_on_the_pool_equals_n_jobs_1(make_pool):
    pytest.importorskip("sklearn", reason="scikit-learn is in the test extra")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": ["scale", 0.1]}
    alone = GridSearchCV(SVC(), grid, cv=3, n_jobs=1).fit(X, y)
    pool = make_pool(max=2)
    with joblib.parallel_config(backend="flame", pool=pool):
        spread = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    assert spread.best_params_ == alone.best_params_
    assert list(spread.cv_results_["mean_test_score"]) == list(alone.cv_results_["mean_test_score"])
    assert all(r.state == "ready" for r in pool.runners) and len(pool.runners) == 2
