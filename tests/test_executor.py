"""flame.Pool as a concurrent.futures.Executor, checked by CPython's own executor suites
(ExecutorTest, WaitTests, AsCompletedTests from the interpreter's ``test`` package), run on
Python 3.13 in a throwaway venv with only what a runner needs; flame from this checkout."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import textwrap

import pytest

import flame
from conftest import ROOT
from test_pythons import interpreter

SUITES = textwrap.dedent('''
    import sys, unittest
    from test import support
    from test.test_concurrent_futures import executor, test_as_completed, test_wait, util
    import flame

    support.use_resources = ["walltime"]  # test_map_timeout: 6 s of sleeping, worth it


    class PoolMixin(util.ExecutorMixin):
        """The executor under test: Pool(max=max_workers)."""

        @staticmethod
        def executor_type(max_workers=None, **kwargs):
            return flame.Pool(max=max_workers if max_workers is not None else 4)


    class PoolExecutorTest(PoolMixin, executor.ExecutorTest, util.BaseTestCase):
        def test_max_workers_negative(self):
            # The stdlib test checks ThreadPoolExecutor's own words ("max_workers must be
            # greater than 0"); the adapter passes max_workers on as Pool's option ``max``,
            # whose check says so in its words. What matters is the same: ValueError, at once.
            for number in (0, -1):
                with self.assertRaisesRegex(ValueError, "max must be >= 1"):
                    self.executor_type(max_workers=number)


    class PoolWaitTests(PoolMixin, test_wait.WaitTests, util.BaseTestCase):
        pass


    class PoolAsCompletedTests(PoolMixin, test_as_completed.AsCompletedTests, util.BaseTestCase):
        pass


    if __name__ == "__main__":
        unittest.main(verbosity=2)
''')


def test_a_pool_is_an_executor():
    assert issubclass(flame.Pool, concurrent.futures.Executor)


def test_cpythons_executor_suites_pass_against_pool(tmp_path):
    python = interpreter("3.13")
    if python is None:
        pytest.fail("no Python 3.13 here (pyenv): CPython's executor suites come from its test package",
                    pytrace=False)
    if subprocess.run([python, "-c", "import test.test_concurrent_futures.executor"]).returncode:
        pytest.fail(f"{python} has no test package (test.test_concurrent_futures)", pytrace=False)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                          os.path.join(ROOT, "constraints.txt"), "pyzmq", "cloudpickle", "psutil"],
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert pip.returncode == 0, pip.stderr[-2000:]
    script = tmp_path / "suites.py"
    script.write_text(SUITES)
    out = subprocess.run([str(venv / "bin" / "python"), str(script)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT))
    report = out.stderr[-6000:]
    assert out.returncode == 0, report
    assert "OK" in report and "skipped" not in report.split("Ran")[-1], report


def test_a_map_dropped_unread_still_runs_its_calls(make_pool, tmp_path):
    # As Executor.map: only a map whose results are being read cancels the rest when dropped.
    from conftest import wait_for
    pool = make_pool(max=2)
    marks = tmp_path / "marks"
    pool.map(lambda i, p: open(p, "a").write(f"{i}\n"), range(6), [str(marks)] * 6)
    assert wait_for(lambda: marks.exists() and len(marks.read_text().split()) == 6, timeout=30)
