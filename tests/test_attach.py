"""Attach a real kernel to a real running app: its objects, completion, inspection, interrupts, failures."""
from __future__ import annotations

import _thread
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

import flame
from conftest import EVIL, ROOT, slow_repr
from kernel_util import collect, execute, kernel_session, of_type, press_stop, start, streams

APP = os.path.join(ROOT, "notebooks", "inventory_app.py")


@pytest.fixture
def app(tmp_path):
    path = str(tmp_path / "inventory.json")
    proc = subprocess.Popen([sys.executable, APP, path], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.readline().strip() == "app output, not captured"
    assert proc.stdout.readline().startswith("serving")
    yield proc, path
    proc.kill()
    proc.wait()


def serving(code: str, arg: str) -> subprocess.Popen:
    """A Python process running ``code``, which serves an app (``sys.argv[1]`` is ``arg``),
    once it has printed "up"."""
    proc = subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.stdout.readline().strip() != "up":
        proc.kill()
        proc.wait()
        pytest.fail("the app did not start serving")
    return proc


@pytest.fixture
def kernel():
    with kernel_session() as session:
        yield session


def text_of(msgs, cell):
    return "".join(t for _, t in streams(msgs, cell))


def shown(msgs, cell):
    return [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)]


def test_serve_writes_a_private_connection_file(app):
    proc, path = app
    assert os.stat(path).st_mode & 0o777 == 0o600
    info = json.load(open(path))
    assert info["pid"] == proc.pid and info["address"].startswith("tcp://127.0.0.1:")
    assert len(bytes.fromhex(info["key"])) == 32
    assert info["key"] not in " ".join(psutil.Process(proc.pid).cmdline())


def test_connect_api_from_plain_python(app):
    proc, path = app
    node = flame.connect(path)
    try:
        assert node.pid == proc.pid
        node.run("inventory.add('figs', 2)")
        assert node.call(lambda: __import__("__main__").inventory.items) == {"apples": 3, "figs": 2}
        assert "items" in node.complete("inventory.it")["matches"]
        with pytest.raises(ZeroDivisionError):
            node.run("1 / 0")
    finally:
        node.close()


def test_attached_cells_run_inside_the_app(app, kernel):
    proc, path = app
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, f"%attach {path}")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert f"attached to pid {proc.pid}" in text_of(msgs, cell)
    cell, (reply, msgs) = execute(kc, "import os\nprint(os.getpid())\nfirst = ticks\nfirst")
    assert text_of(msgs, cell) == f"{proc.pid}\n"
    first = int(shown(msgs, cell)[0])
    assert first > 0
    time.sleep(0.3)
    cell, (reply, msgs) = execute(kc, "ticks > first")  # the app kept doing its own work meanwhile
    assert shown(msgs, cell) == ["True"]
    cell, (reply, msgs) = execute(kc, "inventory.items['pears'] = 5\nrestock('apples')\ninventory.items")
    assert shown(msgs, cell) == ["{'apples': 13, 'pears': 5}"]
    assert "app heartbeat" not in text_of(msgs, cell), "the app's own output is not captured"
    # errors render with the remote traceback
    cell, (reply, msgs) = execute(kc, "restock(None, 'x')")
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "TypeError"
    assert "in restock" in "\n".join(of_type(msgs, "error", cell)[0]["content"]["traceback"])
    # completion and inspection come from the app's namespace
    kc.complete("inventory.it", 12)
    reply = kc.get_shell_msg(timeout=10)
    assert "items" in reply["content"]["matches"]
    kc.inspect("restock", 7)
    reply = kc.get_shell_msg(timeout=10)
    assert "Restock an item" in reply["content"]["data"]["text/plain"]
    # IPython syntax goes through IPython in the app
    cell, (reply, msgs) = execute(kc, "%time total = sum(inventory.items.values())\n!echo from-a-shell\ntotal")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert "Wall time" in text_of(msgs, cell) and shown(msgs, cell) == ["18"]
    assert "from-a-shell\n" in text_of(msgs, cell)
    # detach: the kernel is local again and the app goes on
    cell, (reply, msgs) = execute(kc, "%detach")
    assert "detached" in text_of(msgs, cell)
    cell, (reply, msgs) = execute(kc, "ticks")
    assert reply["content"]["ename"] == "NameError"
    assert proc.poll() is None


def test_stop_button_interrupts_the_cell_not_the_app(app, kernel):
    proc, path = app
    km, kc = kernel
    execute(kc, f"%attach {path}")
    reply, msgs, took = press_stop(km, kc, kc.execute("n = 0\nwhile True:\n    n += 1"))
    assert took < 3
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    cell, (reply, msgs) = execute(kc, "before = ticks\nimport time; time.sleep(0.3)\nticks > before and n > 0")
    assert shown(msgs, cell) == ["True"]
    assert proc.poll() is None


def test_completion_works_while_a_cell_runs_in_the_app(app, kernel):
    proc, path = app
    km, kc = kernel
    execute(kc, f"%attach {path}")
    # Asked on a subshell (ipykernel 7) or, below, plainly: either way answered mid-cell.
    msg = kc.session.msg("create_subshell_request", {})
    kc.control_channel.send(msg)
    subshell = kc.get_control_msg(timeout=10)["content"]["subshell_id"]
    long_cell = kc.execute("import time\nt0 = time.time()\nwhile time.time() - t0 < 4:\n    pass")
    time.sleep(0.5)
    req = kc.session.msg("complete_request", {"code": "inventory.ad", "cursor_pos": 12})
    req["header"]["subshell_id"] = subshell
    kc.shell_channel.send(req)
    t0 = time.monotonic()
    while True:
        reply = kc.get_shell_msg(timeout=10)
        if reply["parent_header"]["msg_id"] == req["header"]["msg_id"]:
            break
    # The app warmed its completer at serve(): even the first completion in a busy app is quick.
    assert time.monotonic() - t0 < 1.0, "answered while the cell was still running"
    assert "add" in reply["content"]["matches"]
    # ...and so does a plain complete_request, as JupyterLab sends it (no subshell named)
    plain = kc.complete("resto", 5)
    t0 = time.monotonic()
    while True:
        reply = kc.get_shell_msg(timeout=10)
        if reply["parent_header"]["msg_id"] == plain:
            break
    assert time.monotonic() - t0 < 1.0, "answered while the cell was still running"
    assert reply["content"]["matches"] == ["restock"]
    collect(kc, long_cell, timeout=15)


def test_wrong_key_is_refused_with_a_clear_error(app, kernel, tmp_path):
    proc, path = app
    km, kc = kernel
    info = json.load(open(path))
    info["key"] = os.urandom(32).hex()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(info))
    bad.chmod(0o600)  # a private file with the wrong key (a loose one is refused before)
    cell, (reply, msgs) = execute(kc, f"%attach {bad}")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "AttachError" and "wrong key" in reply["content"]["evalue"]
    cell, (reply, msgs) = execute(kc, "import os; os.getpid()")
    assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] != str(proc.pid)
    assert proc.poll() is None


def test_app_killed_while_attached_fails_the_cell_and_detaches(app, kernel):
    proc, path = app
    km, kc = kernel
    execute(kc, "local_value = 42")
    execute(kc, f"%attach {path}")
    msg_id = kc.execute("import time\nwhile True:\n    time.sleep(0.1)")
    time.sleep(0.8)
    proc.kill()
    t0 = time.monotonic()
    reply, msgs = collect(kc, msg_id, timeout=20)
    assert time.monotonic() - t0 < 5
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "AppGone"
    cell, (reply, msgs) = execute(kc, "local_value")
    assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] == "42"


def test_flamebook_serve_runs_an_unmodified_script(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("import time\ncounter = {'n': 0}\nprint('started', flush=True)\n"
                      "while True:\n    counter['n'] += 1\n    time.sleep(0.05)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, FLAMEBOOK_ATTACH_DIR=str(tmp_path / "attach"))
    proc = subprocess.Popen([sys.executable, "-m", "kernel.cli", "serve", "--", "python", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "started"
        os.environ["FLAMEBOOK_ATTACH_DIR"] = env["FLAMEBOOK_ATTACH_DIR"]
        try:
            node = flame.connect("plain")  # found by name in the attach directory
        finally:
            del os.environ["FLAMEBOOK_ATTACH_DIR"]
        assert node.call(lambda: __import__("__main__").counter["n"]) > 0
        node.close()
    finally:
        proc.kill()
        proc.wait()


def test_notebook_going_away_never_harms_the_app(app):
    proc, path = app
    km, kc = start()
    execute(kc, f"%attach {path}")
    kc.execute("import time\nwhile True:\n    time.sleep(0.1)")  # still running in the app...
    time.sleep(0.5)
    os.kill(km.provisioner.process.pid, 9)  # ...when the notebook's kernel dies
    kc.stop_channels()
    km.cleanup_resources()
    time.sleep(1.0)
    assert proc.poll() is None
    node = flame.connect(path)  # the app still serves; the orphaned cell is interrupted
    t0 = time.monotonic()
    assert node.call(lambda: __import__("__main__").ticks) > 0
    assert time.monotonic() - t0 < 15
    node.close()


def test_app_serving_off_loopback_encrypts(tmp_path):
    path = str(tmp_path / "wide.json")
    code = ("import flame, sys, time\nx = 7\nflame.serve(address='tcp://0.0.0.0:0', connection_file=sys.argv[1])\n"
            "print('up', flush=True)\ntime.sleep(600)\n")
    proc = serving(code, path)
    try:
        info = json.load(open(path))
        host = __import__("socket").gethostname()
        assert info["curve_server_key"] and info["address"].startswith(f"tcp://{host}:")
        info["address"] = info["address"].replace(host, "127.0.0.1")
        json.dump(info, open(path, "w"))
        node = flame.connect(path)
        assert node.call(lambda: __import__("__main__").x) == 7
        node.close()
    finally:
        proc.kill()
        proc.wait()


def test_attached_cells_stream_their_output_while_they_run(app, collect):
    proc, path = app
    node = flame.connect(path)
    try:
        t0 = time.monotonic()
        node.run("import time\nprint('first'); time.sleep(1.5); print('second'); time.sleep(1.5)\n"
                 "print('third')")
        ended = time.monotonic()
    finally:
        node.close()
    lines = [(t, text) for t, kind, text in collect.events if kind == "stdout"]
    assert "".join(text for _, text in lines) == "first\nsecond\nthird\n"
    second = next(t for t, text in lines if "second" in text)
    assert second < ended - 1.0, "the second line arrived while the cell still ran, not at its end"
    assert second - t0 > 1.0


def test_connection_files_open_to_or_owned_by_others_are_refused(app, tmp_path, monkeypatch):
    # On a shared machine, a connection file someone else wrote (or could rewrite) names an
    # app that would get our cells and whose replies we would unpickle: never used.
    proc, path = app
    if os.geteuid() != 0:
        pytest.fail("this test needs root, to give a file to another user (`make test` runs as root)",
                    pytrace=False)
    import pwd
    other = pwd.getpwnam("nobody")
    info = json.dumps(json.load(open(path)))
    loose = tmp_path / "loose.json"
    loose.write_text(info)
    loose.chmod(0o644)
    with pytest.raises(flame.AttachError, match="can be read or written by other users"):
        flame.connect(str(loose))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: everyone may add files
    theirs = shared / "myapp-1.json"
    theirs.write_text(info)
    theirs.chmod(0o600)
    os.chown(theirs, other.pw_uid, other.pw_gid)
    with pytest.raises(flame.AttachError, match="belongs to another user"):
        flame.connect(str(theirs))
    monkeypatch.setenv("FLAMEBOOK_ATTACH_DIR", str(shared))
    with pytest.raises(flame.AttachError, match="other users' do"):
        flame.connect("myapp")
    from flame.keys import write_private
    ours = shared / "myapp-2.json"
    write_private(str(ours), info)
    os.utime(ours, (0, 0))  # older than theirs: picked all the same, being ours
    conn = flame.connect("myapp")
    try:
        assert conn.connection_file == str(ours) and conn.pid == proc.pid
    finally:
        conn.close()


def test_serve_makes_the_attach_directory_private(tmp_path, monkeypatch):
    where = tmp_path / "fresh" / "attach"
    monkeypatch.setenv("FLAMEBOOK_ATTACH_DIR", str(where))
    proc = serving("import flame, time\nflame.serve(name='private')\nprint('up', flush=True)\ntime.sleep(600)\n", "")
    try:
        assert os.stat(where).st_mode & 0o777 == 0o700
        conn = flame.connect("private")
        assert conn.pid == proc.pid
        conn.close()
    finally:
        proc.kill()
        proc.wait()


def test_serve_never_writes_its_key_through_a_planted_file(tmp_path):
    target = tmp_path / "readable-by-all"
    target.write_text("")
    target.chmod(0o644)
    planted = tmp_path / "conn.json"
    planted.symlink_to(target)  # as someone who could write the directory would plant it
    code = ("import flame, sys, time\nflame.serve(connection_file=sys.argv[1])\n"
            "print('up', flush=True)\ntime.sleep(600)\n")
    proc = serving(code, str(planted))
    try:
        assert target.read_text() == "", "the key went into the planted file"
        assert not planted.is_symlink() and os.stat(planted).st_mode & 0o777 == 0o600
        assert len(bytes.fromhex(json.load(open(planted))["key"])) == 32
    finally:
        proc.kill()
        proc.wait()


def test_attached_cells_have_out_n_history_and_user_expressions(app, kernel):
    proc, path = app
    km, kc = kernel
    execute(kc, f"%attach {path}")
    msg_id = kc.execute("inventory.items['kiwis'] = 4\nlen(inventory.items)",
                        user_expressions={"apples": "inventory.items['apples']", "bad": "1/0"})
    reply, msgs = collect(kc, msg_id)
    result = of_type(msgs, "execute_result", msg_id)[0]["content"]
    assert result["data"]["text/plain"] == "2"
    assert result["execution_count"] == reply["content"]["execution_count"]
    n = result["execution_count"]
    exprs = reply["content"]["user_expressions"]
    assert exprs["apples"]["status"] == "ok" and exprs["apples"]["data"]["text/plain"] == "3"
    assert exprs["bad"]["status"] == "error" and exprs["bad"]["ename"] == "ZeroDivisionError"
    cell, (reply, msgs) = execute(kc, f"(_, Out[{n}], _{n}, os.getpid() if 'os' in dir() else __import__('os').getpid())")
    assert shown(msgs, cell) == [f"(2, 2, 2, {proc.pid})"], "the value is kept in the app, as IPython would"
    execute(kc, "%detach")
    cell, (reply, msgs) = execute(kc, "In[-4]")  # the kernel's own history has the attached cells
    assert "len(inventory.items)" in shown(msgs, cell)[0]
    cell, (reply, msgs) = execute(kc, "%history -l 4")
    assert "len(inventory.items)" in text_of(msgs, cell)


@contextlib.contextmanager
def attached(tmp_path, setup: str):
    """An app that runs ``setup``, then serves; yields (its process, a connection to it)."""
    path = str(tmp_path / "app.json")
    proc = serving("import flame, sys, time\n" + setup + "flame.serve(connection_file=sys.argv[1])\n"
                   "print('up', flush=True)\ntime.sleep(600)\n", path)
    app = None
    try:
        app = flame.connect(path)
        yield proc, app
    finally:
        if app is not None:
            app.close()
        proc.kill()
        proc.wait()


def test_an_object_that_breaks_completion_costs_the_served_app_nothing(tmp_path):
    # Completion and inspection run the app's objects' code (__getattr__, __dir__) on the
    # app's I/O thread; whatever that code raises, SystemExit included, must come back as a
    # reply, and the app must go on serving.
    with attached(tmp_path, EVIL) as (proc, app):
        for text in ("evil.d", "evil.", "evil.x.y", "evil"):
            reply = app.complete(text)
            assert reply["status"] in ("ok", "error"), reply
            reply = app.inspect(text)
            assert reply["status"] in ("ok", "error"), reply
        assert app.call(lambda: 7) == 7
        assert "time" in app.complete("tim")["matches"]


def test_a_slow_inspection_in_a_served_app_is_only_slow(tmp_path):
    # Longer than a client waits for the app's heartbeats (APP_TIMEOUT): answered off the
    # app's I/O thread, so the heartbeats go on and the client stays attached.
    with attached(tmp_path, slow_repr(7)) as (proc, app):
        assert "slow" in app.inspect("x")["data"]["text/plain"]
        assert app.call(lambda: 7) == 7


def test_cancels_in_a_served_app_hit_their_cell_or_nothing(tmp_path):
    # Force thread switches at every chance, so that a cancel races the end of its cell as
    # often as it can: it must interrupt that cell or nothing, never the next one, and every
    # cell must answer.
    path = str(tmp_path / "racy.json")
    code = ("import flame, sys, time\nsys.setswitchinterval(1e-6)\nn = 0\n"
            "flame.serve(connection_file=sys.argv[1])\nprint('up', flush=True)\ntime.sleep(600)\n")
    proc = serving(code, path)
    app = None
    try:
        app = flame.connect(path)
        hit_wrong = lost = 0
        for i in range(300):
            rid = f"race{i}"
            _, req = app._requests.new(request_id=rid)
            app._send("run", {"id": rid, "code": "n += 1"})
            if i % 2 == 0:
                app._send("cancel", {"id": rid})
            try:
                req.future.result(timeout=5)
            except KeyboardInterrupt:
                hit_wrong += i % 2  # an odd cell was never cancelled
            except Exception as exc:
                if type(exc).__name__ == "TimeoutError":
                    lost += 1
            finally:
                app._requests.drop(rid)
        assert lost == 0, f"{lost} cells never answered"
        assert hit_wrong == 0, f"{hit_wrong} cells were hit by a cancel meant for another"
        assert app.call(lambda: 7) == 7
    finally:
        if app is not None:
            app.close()
        proc.kill()
        proc.wait()


LATE_ASYNC_EXCEPTIONS = """
import ctypes, time
_real = ctypes.pythonapi.PyThreadState_SetAsyncExc
def _late(ident, exc):
    time.sleep(0.4)
    return _real(ident, exc)
ctypes.pythonapi.PyThreadState_SetAsyncExc = _late
"""


def test_a_late_cancel_in_a_served_app_never_hits_the_next_cell(app):
    # The race of a cancel with the end of its cell, made wide: every asynchronous exception
    # lands 0.4 s after it is aimed. The first cell ends meanwhile and the worker takes up
    # the second; the cancel must not interrupt the second, and both must answer.
    _, path = app
    conn = flame.connect(path)
    try:
        conn.run(LATE_ASYNC_EXCEPTIONS)
        _, first = conn._requests.new(request_id="late1")
        conn._send("run", {"id": "late1", "code": "import time\ntime.sleep(0.2)"})
        _, second = conn._requests.new(request_id="late2")
        conn._send("run", {"id": "late2", "code": "import time\ntime.sleep(0.6)\n'second'"})
        time.sleep(0.1)
        conn._send("cancel", {"id": "late1"})
        try:
            value = second.future.result(timeout=10)
        except KeyboardInterrupt:
            pytest.fail("the cancel meant for the first cell interrupted the second")
        assert value["data"]["text/plain"] == "'second'"
        with contextlib.suppress(KeyboardInterrupt):
            first.future.result(timeout=10)  # answered, whether the cancel came in time or not
        assert conn.run("1 + 1")["data"]["text/plain"] == "2"
    finally:
        conn.close()


def test_a_cell_cancelled_while_queued_never_runs(app, sigint_handled):
    """A cancel that reaches the app while the cell waits (behind another, or behind the
    worker's warm-up) skips it and is answered at once; it used to be lost, the cell ran
    later, and the next one waited behind it."""
    _, path = app
    conn = flame.connect(path)
    try:
        busy = threading.Thread(target=conn.run, args=("import time\ntime.sleep(2)",))
        busy.start()
        time.sleep(0.5)
        timer = threading.Timer(0.5, _thread.interrupt_main)
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                conn.run("ran_queued = True")
        finally:
            timer.cancel()
        assert time.monotonic() - t0 < 1.5, "answered when cancelled, not after the cell before it"
        busy.join(10)
        assert conn.run("'ran_queued' in globals()")["data"]["text/plain"] == "False"
    finally:
        conn.close()


def test_attached_cells_report_into_a_live_chart(app, kernel):
    proc, path = app
    km, kc = kernel
    execute(kc, f"%attach {path}")
    cell, (reply, msgs) = execute(kc, "import flame, time\nfor i in range(4):\n"
                                      "    flame.report(stock=inventory.items['apples'] + i, step=i)\n"
                                      "    time.sleep(0.3)\n")
    assert reply["content"]["status"] == "ok", reply["content"]
    charts = [m["content"]["data"]["application/vnd.vegalite.v5+json"] for m in
              of_type(msgs, "display_data", cell) + of_type(msgs, "update_display_data", cell)
              if "application/vnd.vegalite.v5+json" in m["content"]["data"]]
    assert len(charts) >= 2, "drawn while the cell ran, then complete"
    values = charts[-1]["data"]["values"]
    assert [(v["x"], v["value"]) for v in values] == [(i, 3 + i) for i in range(4)]
