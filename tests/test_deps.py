"""Dependencies travel (issue #25): a host needs only Python.

Runners log in over a real sshd as REMOTE_USER, whose Python is a venv made ``--without-pip``
from the system Python with nothing installed (no pyzmq, cloudpickle, psutil, numpy), or with
older versions than this process's; whatever they import of those came from this process.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import uuid
from importlib import metadata

import pytest

import flame
from services import REMOTE_USER
from test_codesync import _track, close_backends  # noqa: F401 - each test's SSH connections end with it


def backend(sshd, remote_host, venv="nothing", modules=(), cache=None, env=None, **kw):
    """An SSH backend to REMOTE_USER with a venv that has ``modules`` (none by default), and a
    code cache of its own in REMOTE_USER's home (new unless given)."""
    cache = cache or new_cache(remote_host)
    return _track(flame.SSHBackend([f"{REMOTE_USER}@127.0.0.1:{sshd.port}"], python=remote_host.venv(venv, modules),
                                   key=sshd.client_key, known_hosts=None,
                                   env={"FLAME_CODE_CACHE": cache, **(env or {})}, **kw))


def new_cache(remote_host):
    return os.path.join(remote_host.home, "caches", uuid.uuid4().hex[:12])


def site_packages(python):
    return subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_host_with_nothing_installed_runs_numpy_and_pandas_calls(sshd, remote_host, make_pool):
    import numpy as np
    import pandas as pd
    cache = new_cache(remote_host)
    b = backend(sshd, remote_host, cache=cache)
    assert os.listdir(site_packages(remote_host.venvs["nothing"])) == [], "the host has nothing installed"
    pool = make_pool(backend=b, max=1)

    def frame(n):  # by value: pd and np are this module's, pickled by reference
        df = pd.DataFrame({"x": np.arange(n)})
        return int(df.x.sum()), pd.__version__, np.__version__, pd.__file__, np.__file__
    total, pv, nv, pf, nf = pool.call(frame, 10)
    assert (total, pv, nv) == (45, pd.__version__, np.__version__)
    assert pf.startswith(cache) and nf.startswith(cache), "pandas and numpy came from this process"

    def facts():
        import getpass
        import sys
        import cloudpickle
        import psutil
        import zmq
        return getpass.getuser(), sys.executable, [m.__file__ for m in (zmq, cloudpickle, psutil)]
    user, python, files = pool.call(facts)
    assert user == REMOTE_USER and python == remote_host.venvs["nothing"]
    assert all(f.startswith(cache) for f in files), files

    def only_inside():  # this process never imported it: the runner's import hook asks
        import tqdm
        return tqdm.__version__, tqdm.__file__
    version, where = pool.call(only_inside)
    assert version == metadata.version("tqdm") and where.startswith(cache)
    assert pool.code_bytes_sent > 10_000_000, "numpy and pandas count as code sent"

    # A second pool on the same host (and cache) sends almost nothing.
    second = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)
    assert second.call(frame, 4)[0] == 6
    assert second.call(only_inside)[0] == version
    assert second.code_bytes_sent < 200_000, second.code_bytes_sent


def test_a_host_with_an_older_version_gets_this_ones(sshd, remote_host, make_pool):
    python = remote_host.venv("old-cloudpickle", ("zmq", "cloudpickle", "psutil", "tqdm"))
    site = site_packages(python)
    [info] = glob.glob(os.path.join(site, "cloudpickle-*.dist-info"))
    meta = os.path.join(info, "METADATA")
    with open(meta) as f:
        text = f.read()
    ours = metadata.version("cloudpickle")
    with open(meta, "w") as f:
        f.write(text.replace(f"Version: {ours}", "Version: 2.0.0", 1))
    os.rename(info, os.path.join(site, "cloudpickle-2.0.0.dist-info"))
    cache = new_cache(remote_host)
    pool = make_pool(backend=backend(sshd, remote_host, venv="old-cloudpickle", cache=cache), max=1)

    def versions():
        import cloudpickle
        import zmq
        from importlib import metadata
        return metadata.version("cloudpickle"), cloudpickle.__file__, zmq.__file__
    version, cp_file, zmq_file = pool.call(versions)
    assert version == ours and cp_file.startswith(cache), "this process's cloudpickle, not the host's 2.0.0"
    assert zmq_file.startswith(site), "the host's pyzmq is this process's version: used, not sent"
    # The import hook, too, leaves a host's package of this process's version where it is.
    assert pool.call(lambda: __import__("tqdm").__file__).startswith(site)


def test_a_package_installed_nowhere_names_it_and_the_runner_lives_on(sshd, remote_host, make_pool):
    pool = make_pool(backend=backend(sshd, remote_host), max=1)
    [runner_id] = [pool.call(lambda: __import__("os").getpid())]
    with pytest.raises(ModuleNotFoundError, match="flame_nowhere_pkg"):
        pool.call(lambda: __import__("flame_nowhere_pkg"))
    assert pool.call(lambda: __import__("os").getpid()) == runner_id


def test_compiled_code_for_another_platform_is_refused_with_both_named(sshd, remote_host, make_pool):
    pool = make_pool(backend=backend(sshd, remote_host, env={"FLAME_HOST_MACHINE": "riscv64"}), max=1)
    with pytest.raises(flame.BootError) as info:
        pool.call(lambda: 1)
    text = str(info.value)
    assert "riscv64" in text and "x86_64" in text and "install=True" in text, text
    assert "pyzmq" in text or "psutil" in text, text


def test_install_true_pip_installs_what_does_not_fit(sshd, remote_host, make_pool):
    cache = new_cache(remote_host)
    b = backend(sshd, remote_host, cache=cache, env={"FLAME_HOST_MACHINE": "riscv64"}, install=True)
    pool = make_pool(backend=b, max=1, boot_timeout=240)

    def where():
        import cloudpickle
        import psutil
        import zmq
        from importlib import metadata
        return zmq.__file__, psutil.__file__, cloudpickle.__file__, metadata.version("pyzmq"), metadata.version("psutil")
    zf, pf, cf, zv, pv = pool.call(where)
    env = os.path.join(cache, "env-")
    assert zf.startswith(env) and pf.startswith(env), (zf, pf)
    assert cf.startswith(cache) and not cf.startswith(env), "pure Python is sent, not installed"
    assert (zv, pv) == (metadata.version("pyzmq"), metadata.version("psutil")), "the exact versions"


def test_deps_limit_names_the_largest_and_deps_false_uses_the_host(sshd, remote_host, make_pool):
    pool = make_pool(backend=backend(sshd, remote_host), max=1, deps_limit=100_000)
    with pytest.raises(flame.BootError, match=r"over deps_limit .*Largest: pyzmq"):
        pool.call(lambda: 1)
    pool = make_pool(backend=backend(sshd, remote_host), max=1, deps=False)
    with pytest.raises(flame.BootError, match="lacks pyzmq, cloudpickle, psutil"):
        pool.call(lambda: 1)
    with pytest.raises(ValueError, match="deps is for runners on other machines"):
        flame.Pool(deps=True)


def test_a_big_transfer_shows_a_progress_line(sshd, remote_host, make_pool):
    import numpy as np
    lines = []

    class Line:
        def update(self, text, final=False):
            lines.append((text, final))
    flame.set_progress_factory(Line)
    try:
        pool = make_pool(backend=backend(sshd, remote_host), max=1)
        assert pool.call(lambda: int(np.ones(3).sum())) == 3
    finally:
        flame.set_progress_factory(None)
    numpy_lines = [t for t, _ in lines if "numpy" in t]
    assert numpy_lines and "MB/s" in numpy_lines[-1], lines
    assert any(final for t, final in lines if "numpy" in t)


def test_a_cache_entry_of_another_user_is_refused(sshd, remote_host, make_pool):
    import numpy as np
    cache = new_cache(remote_host)
    pool = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)
    assert pool.call(lambda: np.__file__).startswith(cache)
    pool.shutdown()
    [entry] = [d for d in glob.glob(os.path.join(cache, "d-*"))
               if glob.glob(os.path.join(d, "numpy-*.dist-info"))]
    shutil.chown(entry, "root", "root")  # as if another user had put it there
    again = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)
    with pytest.raises(ImportError, match="belongs to another user"):
        again.call(lambda: np.ones(1))
    os.chmod(cache, 0o777)
    third = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)
    with pytest.raises(flame.BootError, match="can be written by other users"):
        third.call(lambda: 1)


def fake_dist(site, version):
    """Install distribution ``fakedep`` at ``version`` into ``site`` by hand, as pip would
    (package, dist-info, RECORD), replacing the one there."""
    import base64
    import hashlib
    for old in glob.glob(os.path.join(site, "fakedep*")):
        shutil.rmtree(old)
    files = {"fakedep/__init__.py": f"VERSION = {version!r}\n",
             f"fakedep-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: fakedep\nVersion: {version}\n"}
    record = []
    for rel, text in files.items():
        os.makedirs(os.path.join(site, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(site, rel), "w") as f:
            f.write(text)
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{rel},sha256={digest},{len(text)}")
    record.append(f"fakedep-{version}.dist-info/RECORD,,")
    with open(os.path.join(site, f"fakedep-{version}.dist-info", "RECORD"), "w") as f:
        f.write("\n".join(record) + "\n")


def test_a_reinstall_here_reaches_the_next_runner_and_a_running_one_keeps_its_own(
        sshd, remote_host, make_pool, tmp_path):
    site = str(tmp_path / "site-packages")  # as `pip install --target` makes it
    os.makedirs(site)
    fake_dist(site, "1.0")
    sys.path.append(site)
    try:
        cache = new_cache(remote_host)
        pool = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)

        def version():
            import fakedep
            return fakedep.VERSION, fakedep.__file__
        v, where = pool.call(version)
        assert v == "1.0" and where.startswith(cache), where
        fake_dist(site, "2.0")  # `pip install -U` here
        assert pool.call(version)[0] == "1.0", "a running runner keeps what it imported"
        again = make_pool(backend=backend(sshd, remote_host, cache=cache), max=1)
        assert again.call(version)[0] == "2.0", "the next runner gets the new version"
    finally:
        sys.path.remove(site)
