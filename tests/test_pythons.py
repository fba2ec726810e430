"""Python 3.10 to 3.13: the other supported interpreters run pools and attach too.

Each pyenv interpreter found gets a throwaway venv with only what a runner needs (pyzmq,
cloudpickle, psutil); flame runs from this checkout. The 3.10 run is the one that tells
``concurrent.futures.TimeoutError`` from the builtin TimeoutError (they are one since 3.11).
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

VERSIONS = ("3.10", "3.12", "3.13")

SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time
    import flame

    async def later(x):
        await asyncio.sleep(0.05)
        return x * 2

    with flame.Pool(max=2) as pool:
        assert pool.call(lambda: sys.version_info[:2]) == sys.version_info[:2]
        assert list(pool.map(later, range(4))) == [0, 2, 4, 6]
        value = pool.spawn(list, range(3))
        assert value.get() == [0, 1, 2] and len(value) == 3

    served = flame.serve(connection_file=sys.argv[1])
    app = flame.connect(sys.argv[1])
    assert app.call(time.sleep, 0.3) is None   # waits in 0.1 s slices: concurrent.futures.TimeoutError
    assert app.run("21 * 2")["data"]["text/plain"] == "42"
    app.close()
    served.stop()
    print("OK", sys.version_info[:2])
""")


def interpreter(version: str) -> str | None:
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", "python3")))
    return found[-1] if found else None


@pytest.mark.parametrize("version", VERSIONS)
def test_other_python_versions_run_pools_and_attach(version, tmp_path):
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} here (pyenv)")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                          os.path.join(ROOT, "constraints.txt"),
                          "pyzmq", "cloudpickle", "psutil"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert pip.returncode == 0, pip.stderr[-2000:]
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    out = subprocess.run([str(venv / "bin" / "python"), str(script), str(tmp_path / "app.json")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK"), out.stdout
