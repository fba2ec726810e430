"""Code sync (issue #12): flame and the local code reach runners on other machines over the
pool's connection.

Runners log in over a real sshd as REMOTE_USER, who cannot read this test's temporary
directory (it holds the local package) and whose Python is a venv with only pyzmq,
cloudpickle and psutil: whatever of flame or the package it runs came over the wire.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import flame
from flame.codesync import CodeSyncError, LocalCode, flame_archive
from conftest import CODE_CACHE, wait_for
from services import REMOTE_USER


@pytest.fixture
def local(tmp_path):
    """A directory only root can read, first on sys.path, for local modules; forgotten after."""
    d = tempfile.mkdtemp(prefix="flame-local-code-")  # 0700: REMOTE_USER cannot read it
    sys.path.insert(0, d)
    before = set(sys.modules)
    yield d
    sys.path.remove(d)
    for name in set(sys.modules) - before:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(d):
            del sys.modules[name]
    shutil.rmtree(d, ignore_errors=True)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))


_opened: list = []


@pytest.fixture(autouse=True)
def close_backends():
    """Each test's SSH connections end with it."""
    yield
    while _opened:
        _opened.pop().close()


def remote_backend(sshd, remote_host, venv="bare", cache=None, **kw):
    return _track(flame.SSHBackend([f"{REMOTE_USER}@127.0.0.1:{sshd.port}"], python=remote_host.venv(venv, **kw),
                            key=sshd.client_key, known_hosts=None,
                            env={"FLAME_CODE_CACHE": cache} if cache else None))


def _track(backend):
    _opened.append(backend)
    return backend


def package(d, name="mymodel", value=1):
    write(os.path.join(d, name, "__init__.py"), f"""
        from .core import train
        VERSION = {value}
    """)
    write(os.path.join(d, name, "core.py"), f"""
        import os
        def train(x):
            return x * {value}, os.path.abspath(__file__)
    """)
    write(os.path.join(d, name, "data", "weights.txt"), "package data\n")


def test_local_package_import_inside_the_call_and_a_bare_remote_python(sshd, remote_host, local, make_pool):
    package(local)
    write(os.path.join(local, "helpers.py"), "def shout(s):\n    return s.upper() + '!'\n")
    os.makedirs(os.path.join(local, "bigdata"))  # not a package: a data directory stays here
    write(os.path.join(local, "bigdata", "rows.csv"), "a,b\n")
    mymodel = importlib.import_module("mymodel")
    pool = make_pool(backend=remote_backend(sshd, remote_host), max=1)

    # A function of the local package, pickled by reference.
    value, where = pool.call(mymodel.train, 21)
    assert value == 21
    cache = pool.call(lambda: __import__("flame.node.boot", fromlist=["x"]).cache_root())
    assert where.startswith(cache) and not where.startswith(local)

    def inside():  # by value; imports a module this process never imported
        import helpers
        import mymodel
        from importlib import resources
        return helpers.shout("hi"), resources.files("mymodel").joinpath("data/weights.txt").read_text()
    assert pool.call(inside) == ("HI!", "package data\n")

    def facts():
        import flame, getpass, os, sys, importlib.util
        return (getpass.getuser(), os.access(local, os.R_OK), flame.__file__, sys.prefix,
                importlib.util.find_spec("bigdata") is None)
    user, can_read, flame_file, prefix, no_data_dir = pool.call(facts)
    assert user == REMOTE_USER and not can_read, "the runner cannot read the local files"
    assert flame_file.startswith(cache), "flame itself came over the wire"
    assert prefix.startswith(remote_host.dir) and not os.path.exists(os.path.join(prefix, "lib", "flame"))
    assert no_data_dir, "directories that are not packages stay here"


def test_an_edit_and_a_reload_reach_every_runner(sshd, remote_host, local, make_pool):
    package(local, value=2)
    mymodel = importlib.import_module("mymodel")
    pool = make_pool(backend=remote_backend(sshd, remote_host), min=2, max=2)
    assert wait_for(lambda: sum(r.state == "ready" for r in pool.runners) == 2, timeout=30)
    ids = {r.id for r in pool.runners}
    assert [pool.submit_to(rid, mymodel.train, 1).result(timeout=30)[0] for rid in sorted(ids)] == [2, 2]
    sent = pool.code_bytes_sent

    time.sleep(0.01)
    write(os.path.join(local, "mymodel", "core.py"), """
        import os
        def train(x):
            return x * 3, os.path.abspath(__file__)
    """)
    importlib.reload(importlib.import_module("mymodel.core"))
    importlib.reload(mymodel)
    assert mymodel.train(1)[0] == 3  # here
    assert [pool.submit_to(rid, mymodel.train, 1).result(timeout=30)[0] for rid in sorted(ids)] == [3, 3]
    assert pool.code_bytes_sent > sent, "the new code went out"

    def loaded():
        import sys
        return {name: m.__file__ for name, m in sys.modules.items() if name.startswith("mymodel")}
    new_dir = pool.call(mymodel.train, 1)[1].rsplit("/mymodel/", 1)[0]
    for rid in sorted(ids):
        files = pool.submit_to(rid, loaded).result(timeout=30)
        assert sorted(files) == ["mymodel", "mymodel.core"]
        assert all(f.startswith(new_dir + "/") for f in files.values()), "no stale module is left"
    # The runners share a host: the second got only the archive's name.
    again = pool.code_bytes_sent
    assert [pool.submit_to(rid, mymodel.train, 2).result(timeout=30)[0] for rid in sorted(ids)] == [6, 6]
    assert pool.code_bytes_sent == again, "unchanged code: nothing re-sent"


def test_a_second_pool_on_the_same_host_sends_nothing(sshd, remote_host, local, make_pool, tmp_path):
    package(local)
    mymodel = importlib.import_module("mymodel")
    cache = tempfile.mkdtemp(prefix="flame-cache-")
    shutil.chown(cache, REMOTE_USER, REMOTE_USER)
    try:
        first = make_pool(backend=remote_backend(sshd, remote_host, cache=cache), max=1)
        assert first.call(mymodel.train, 2)[0] == 2
        sent = first.code_bytes_sent
        assert sent >= len(flame_archive().data), "a fresh cache gets flame and the local code"
        first.shutdown()
        second = make_pool(backend=remote_backend(sshd, remote_host, cache=cache), max=1)
        assert second.call(mymodel.train, 3)[0] == 3
        assert second.code_bytes_sent == 0
        # flame's archive and the local code's, besides installed packages ("d-", deps)
        assert len([e for e in os.listdir(cache) if not e.startswith("d-")]) == 2
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def test_missing_pyzmq_with_deps_off_gives_a_boot_error_naming_it(sshd, remote_host, make_pool):
    backend = remote_backend(sshd, remote_host, venv="nozmq", modules=("cloudpickle", "psutil"))
    pool = make_pool(backend=backend, max=1, deps=False)
    with pytest.raises(flame.BootError) as info:
        pool.call(lambda: 1)
    text = str(info.value)
    assert "lacks pyzmq" in text and "-m pip install 'pyzmq==" in text, text
    assert remote_host.venvs["nozmq"] in text


def test_another_python_minor_version_gives_a_boot_error(sshd, make_pool):
    other = next((p for v in ("3.12.1", "3.10.13", "3.13.0", "3.11.7")
                  for p in [f"/root/.pyenv/versions/{v}/bin/python"]
                  if os.path.exists(p) and not v.startswith("%d.%d." % sys.version_info[:2])), None)
    if other is None:
        pytest.skip("no Python of another minor version here (pyenv)")
    backend = _track(flame.SSHBackend([sshd.host], python=other, key=sshd.client_key, known_hosts=None))
    pool = make_pool(backend=backend, max=1)
    with pytest.raises(flame.BootError, match=r"the parent runs Python %d\.%d" % sys.version_info[:2]):
        pool.call(lambda: 1)


def test_a_package_installed_here_but_not_there_is_named(sshd, remote_host, make_pool):
    from importlib import metadata
    version = metadata.version("tqdm")
    pool = make_pool(backend=remote_backend(sshd, remote_host), max=1, deps=False)
    with pytest.raises(ModuleNotFoundError) as info:
        pool.call(lambda: __import__("tqdm"))
    text = str(info.value)
    assert f"tqdm is installed here (tqdm {version})" in text, text
    assert remote_host.venvs["bare"] in text and "deps=False" in text and "install it there" in text
    assert f"-m pip install 'tqdm=={version}'" in text


def test_code_over_the_limit_names_the_largest_files(local, sshd, make_pool):
    write(os.path.join(local, "huge.py"), "X = 1\n" + "#" * 300_000 + "\n")
    write(os.path.join(local, "small.py"), "Y = 2\n")
    backend = _track(flame.SSHBackend([sshd.host], key=sshd.client_key, known_hosts=None))
    with pytest.raises(CodeSyncError, match=r"over code_limit.*huge\.py \(0\.3 MB\)"):
        make_pool(backend=backend, code_sync=[local], code_limit=200_000)
    # Left out, it fits.
    make_pool(backend=backend, code_sync=[local], code_limit=200_000, code_exclude=["huge.py"]).shutdown()


def test_options_are_checked_at_the_door(sshd):
    with pytest.raises(ValueError, match="code_sync is for runners on other machines"):
        flame.Pool(flame.LocalBackend(), code_sync=True)
    ssh = _track(flame.SSHBackend([sshd.host], key=sshd.client_key, known_hosts=None))
    with pytest.raises(TypeError, match="code_sync must be"):
        flame.Pool(ssh, code_sync="src")
    with pytest.raises(TypeError, match="code_exclude must be"):
        flame.Pool(ssh, code_exclude="*.csv")
    with pytest.raises(CodeSyncError, match="does not exist"):
        flame.Pool(ssh, code_sync=["/nonexistent/src"])


def test_what_is_packed(local):
    package(local)
    write(os.path.join(local, "tool.py"), "Z = 1\n")
    write(os.path.join(local, "mymodel", "__pycache__", "core.cpython-311.pyc"), "junk")
    write(os.path.join(local, ".git", "config"), "[core]\n")
    write(os.path.join(local, "notes", "big.csv"), "1,2\n")  # not a package
    write(os.path.join(local, "env", "pyvenv.cfg"), "home = /usr\n")
    write(os.path.join(local, "mymodel", "venv", "pyvenv.cfg"), "home = /usr\n")
    importlib.import_module("mymodel")
    sync = LocalCode()
    files = sync.current().files
    assert {"mymodel/__init__.py", "mymodel/core.py", "mymodel/data/weights.txt", "tool.py"} <= set(files)
    assert not [f for f in files if f.startswith(("notes", "env", ".git")) or "__pycache__" in f
                or "venv" in f or f.startswith("flame/")], sorted(files)
    assert not [f for f in files if f.split("/")[0] in ("cloudpickle", "zmq", "json")], "installed code stays"
    same = sync.current()
    assert same.digest == LocalCode().current().digest, "the same files give the same name"
    only = LocalCode([os.path.join(local, "mymodel")], exclude=["*.txt"]).current().files
    assert set(only) == {"mymodel/__init__.py", "mymodel/core.py"}


def test_a_code_request_without_the_key_gets_nothing(make_pool, sshd):
    import zmq
    from flame.node.boot import BOOT, request_mac
    backend = _track(flame.SSHBackend([sshd.host], key=sshd.client_key, known_hosts=None))
    pool = make_pool(backend=backend, max=1)
    digest = flame_archive().digest
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    ident = b"intruder/boot"
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pool.address)
    try:
        dropped = pool._endpoint.wire.dropped
        sock.send_multipart([BOOT, digest.encode(), request_mac(os.urandom(32), ident, digest)])
        assert not sock.poll(1000), "a request signed with another key is not answered"
        assert pool._endpoint.wire.dropped == dropped + 1
        # Signed with the pool's key but from no runner of the pool: still nothing.
        sock.send_multipart([BOOT, digest.encode(), request_mac(pool._key, ident, digest)])
        assert not sock.poll(1000)
    finally:
        sock.close()
        ctx.term()


def test_slurm_jobs_get_the_code_over_the_wire(slurm, local, make_pool, tmp_path):
    package(local, value=7)
    mymodel = importlib.import_module("mymodel")
    backend = flame.SlurmBackend(python=sys.executable, work_dir=str(tmp_path / "slurm"))
    pool = make_pool(backend=backend, max=1, boot_timeout=60)
    assert pool.call(len, "job") == 3  # the job has booted and fetched the code
    # Now the only copies of the package are the archive and the job's cache: the job (on
    # this machine, as root) could read any file, so there must be none left to read.
    # The archive as it is now: the boot's import hook requests import modules here (deps),
    # and an import since the last look would rebuild it without the package.
    pool._code.refresh()
    shutil.rmtree(os.path.join(local, "mymodel"))
    value, where = pool.call(mymodel.train, 6)
    assert value == 42 and where.startswith(CODE_CACHE + "/"), where
    assert pool.code_bytes_sent > 0


def test_a_host_without_blake3_gets_sha256_digests(sshd, remote_host, make_pool):
    pool = make_pool(backend=remote_backend(sshd, remote_host), max=1, deps=False)  # else blake3 travels
    big = bytearray(os.urandom(12 * 2**20))
    assert pool.call(lambda b: b[::-1], big) == big[::-1]
    assert pool.runners[0].id not in pool._endpoint.wire.fast_peers


def test_an_archive_missing_from_the_hosts_cache_is_sent_whole(sshd, remote_host, local, make_pool):
    package(local, value=2)
    mymodel = importlib.import_module("mymodel")
    pool = make_pool(backend=remote_backend(sshd, remote_host), max=1)
    assert pool.call(mymodel.train, 1)[0] == 2
    [r] = pool._runners.values()
    write(os.path.join(local, "mymodel", "core.py"), """
        import os
        def train(x):
            return x * 5, os.path.abspath(__file__)
    """)
    importlib.reload(importlib.import_module("mymodel.core"))
    importlib.reload(mymodel)
    new = pool._code.refresh().digest
    pool._code.host_has(r.cache, new)  # as if another runner had brought it, and it was deleted since
    sent = pool.code_bytes_sent
    pool.call(mymodel.train, 1)  # the runner says it lacks the archive; this call may run the old code
    assert wait_for(lambda: r.code is None, timeout=10)
    assert pool.call(mymodel.train, 1)[0] == 5, "the next call gets the archive whole, and runs it"
    assert pool.code_bytes_sent > sent


def test_a_code_cache_other_users_can_write_is_never_run_from(sshd, remote_host, make_pool):
    # FLAME_CODE_CACHE on a shared, world-writable directory: another user's tree named like
    # flame's archive would run as the runner's user, with the pool's key in reach.
    shared = tempfile.mkdtemp(prefix="flame-shared-cache-")
    os.chmod(shared, 0o1777)
    outbox = tempfile.mkdtemp(prefix="flame-planted-")
    os.chmod(outbox, 0o777)
    marker = os.path.join(outbox, "ran")
    entry = os.path.join(shared, flame_archive().digest)
    write(os.path.join(entry, "flame", "__init__.py"), "")
    write(os.path.join(entry, "flame", "node", "__init__.py"), "")
    write(os.path.join(entry, "flame", "node", "__main__.py"), f"open({marker!r}, 'w').write('planted')\n")
    subprocess.run(["chmod", "-R", "a+rX", entry], check=True)
    try:
        pool = make_pool(backend=remote_backend(sshd, remote_host, cache=shared), max=1)
        with pytest.raises(flame.BootError, match="refusing to run code from it"):
            pool.call(int)
        assert not os.path.exists(marker), "the planted code ran"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(outbox, ignore_errors=True)
