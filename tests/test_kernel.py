"""The flamebook kernel, started through jupyter_client like any frontend would."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from conftest import wait_for
from kernel_util import collect, execute, of_type, press_stop, start, streams


@pytest.fixture(scope="module")
def kernel():
    km, kc = start()
    execute(kc, "import flame, os, time, threading\npool = flame.Pool(max=2, idle_shutdown_after=60)\n"
                "pool.call(os.getpid)")
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def value_of(kc, expr):
    msg_id, (reply, msgs) = execute(kc, expr)
    assert reply["content"]["status"] == "ok", reply["content"]
    return [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", msg_id)][0]


def test_kernelspec_is_installed_with_signal_interrupts():
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec("flamebook")
    assert spec.display_name == "Python 3 (flamebook)"
    assert spec.interrupt_mode == "signal"
    assert spec.argv[1:3] == ["-m", "kernel"]


def test_remote_output_streams_into_the_calling_cell_while_it_runs(kernel):
    km, kc = kernel
    code = ("def ticks(n):\n    for i in range(n):\n        print(f'tick {i}', flush=True)\n"
            "        time.sleep(0.5)\n    return n\npool.call(ticks, 3)")
    msg_id, (reply, msgs) = execute(kc, code)
    assert reply["content"]["status"] == "ok"
    lines = streams(msgs, msg_id)
    assert "".join(t for _, t in lines) == "tick 0\ntick 1\ntick 2\n"
    assert lines[-1][0] - lines[0][0] >= 0.6, "lines arrive one by one while the cell runs"
    idle = [t for t, m in msgs if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
            and m["parent_header"]["msg_id"] == msg_id][0]
    assert lines[0][0] < idle - 0.6


def test_output_of_a_call_from_an_earlier_cell_stays_in_that_cell(kernel):
    km, kc = kernel
    first, (reply, _) = execute(kc, "def later():\n    time.sleep(1.0)\n    print('from the first cell')\n"
                                    "fut = pool.submit(later)")
    assert reply["content"]["status"] == "ok"
    second, (reply, msgs) = execute(kc, "time.sleep(2.5); print('second cell')")
    assert streams(msgs, first) and "".join(t for _, t in streams(msgs, first)) == "from the first cell\n"
    assert "".join(t for _, t in streams(msgs, second)) == "second cell\n"


def test_output_of_a_call_from_a_background_thread(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "th = threading.Thread(target=lambda: pool.call(print, 'from a thread'))\n"
                                      "th.start(); th.join()")
    assert "".join(t for _, t in streams(msgs, cell)) == "from a thread\n"


def test_carriage_return_progress_is_passed_through(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "def bar():\n    import sys\n    for i in range(3):\n"
                                      "        sys.stderr.write(f'\\r{i}/3'); time.sleep(0.05)\n"
                                      "    sys.stderr.write('\\n')\npool.call(bar)")
    assert "".join(t for _, t in streams(msgs, cell, "stderr")) == "\r0/3\r1/3\r2/3\n"


def test_rich_display_from_remote_code(kernel):
    km, kc = kernel
    code = """
def show():
    import sys
    assert 'IPython' not in sys.modules
    from IPython.display import display, HTML, Markdown, Image
    import base64
    png = base64.b64decode('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==')
    display(HTML('<b>bold</b>'), Markdown('*md*'), Image(data=png))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([1, 2, 3])
    display(fig)
pool.call(show)
"""
    cell, (reply, msgs) = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    shown = [m["content"]["data"] for m in of_type(msgs, "display_data", cell)]
    assert shown[0]["text/html"] == "<b>bold</b>"
    assert shown[1]["text/markdown"] == "*md*"
    assert "image/png" in shown[2]
    assert "image/png" in shown[3] and len(shown[3]["image/png"]) > 1000  # the figure


def test_stop_button_interrupts_a_blocking_remote_call(kernel):
    km, kc = kernel
    pid = int(value_of(kc, "pool.call(os.getpid)"))
    msg_id = kc.execute("pool.call(time.sleep, 60)")
    reply, msgs, took = press_stop(km, kc, msg_id)
    assert took < 3
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # the remote sleep was interrupted: the same runner answers at once
    t0 = time.monotonic()
    assert int(value_of(kc, "pool.call(os.getpid)")) == pid
    assert time.monotonic() - t0 < 5


def test_stop_button_stops_a_joblib_parallel_on_the_pool(kernel):
    pytest.importorskip("joblib", reason="joblib is in the test extra")
    km, kc = kernel
    execute(kc, "import joblib\nflame.register_joblib()\njpool = flame.Pool(max=2)")
    msg_id = kc.execute("with joblib.parallel_config(backend='flame', pool=jpool):\n"
                        "    joblib.Parallel(n_jobs=2)(joblib.delayed(time.sleep)(60) for _ in range(4))")
    time.sleep(2)  # the fits are running on the runners
    reply, msgs, took = press_stop(km, kc, msg_id)
    assert took < 5
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # the remote sleeps were stopped: both runners answer at once
    t0 = time.monotonic()
    assert value_of(kc, "len({f.result() for f in [jpool.submit(os.getpid) for _ in range(2)]})") in ("1", "2")
    assert time.monotonic() - t0 < 5
    execute(kc, "jpool.shutdown()")


def test_remote_exception_renders_like_a_local_one(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "def inner(x):\n    return 1 / x\n\ndef outer():\n    return inner(0)\n"
                                      "pool.call(outer)")
    content = reply["content"]
    assert content["status"] == "error" and content["ename"] == "ZeroDivisionError"
    error = of_type(msgs, "error", cell)[0]["content"]
    text = "\n".join(error["traceback"])
    assert "Remote traceback" in text
    assert "in outer" in text and "in inner" in text
    assert "return 1 / x" in text, "remote frames show the cell's source lines"


def test_remote_cell_magic_keeps_a_namespace_and_sends_locals(kernel):
    km, kc = kernel
    execute(kc, "y = 10")
    cell, (reply, msgs) = execute(kc, "%%remote pool\nimport os\nx = 41\nprint('on', os.getpid() != 0)\nx + y")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)] == ["51"]
    assert "".join(t for _, t in streams(msgs, cell)) == "on True\n"
    cell, (reply, msgs) = execute(kc, "%%remote pool\nx += 1\nx")
    assert [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)] == ["42"]
    cell, (reply, msgs) = execute(kc, "%%remote pool\nx")
    assert [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)] == ["42"]
    _, (reply, _) = execute(kc, "x")  # x lives on the runner, not here
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "NameError"


def test_pool_shows_itself_and_flame_magic_lists_pools(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "pool")
    html = of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/html"]
    assert "flame.Pool" in html and "<table>" in html and "ready" in html and "uptime" in html
    cell, (reply, msgs) = execute(kc, "%flame")
    html = of_type(msgs, "display_data", cell)[0]["content"]["data"]["text/html"]
    assert pool_name_in(html)


def pool_name_in(html):
    return "pool-" in html


def _runner_pids(kc):
    return [int(p) for p in value_of(kc, "[r.pid for r in pool.runners]").strip("[]").split(",") if p.strip()]


@pytest.mark.parametrize("how", ["shutdown", "restart", "kill"])
def test_kernel_end_leaves_no_runners(how):
    km, kc = start()
    try:
        # A parent_timeout far past the bound below: the runners must see their parent go, not
        # wait for its silence (a SIGKILLed kernel stays a zombie until its manager reaps it).
        execute(kc, "import flame\npool = flame.Pool(max=2, parent_timeout=30)\n"
                    "list(pool.map(lambda _: __import__('time').sleep(0.2), range(2)))")
        pids = _runner_pids(kc)
        assert len(pids) == 2
        if how == "shutdown":
            km.shutdown_kernel(now=False)
        elif how == "restart":
            km.restart_kernel(now=False)
        else:
            os.kill(km.provisioner.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for(lambda: all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
                                    for p in pids), timeout=10)
        assert time.monotonic() - t0 < 7
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


def _before_the_running_cell(kc, msg_id):
    """The shell reply to ``msg_id``, which must come before the running cell's execute_reply."""
    while True:
        msg = kc.get_shell_msg(timeout=30)
        assert msg["msg_type"] != "execute_reply", "answered only after the running cell"
        if msg["parent_header"]["msg_id"] == msg_id:
            return msg


def test_completion_in_remote_cells_comes_from_the_runner(kernel):
    km, kc = kernel
    execute(kc, "%%remote pool\nzz_only_on_the_runner = {'a': 1}")
    code = "%%remote pool\nzz_only"
    kc.complete(code, len(code))
    reply = kc.get_shell_msg(timeout=30)["content"]
    assert "zz_only_on_the_runner" in reply["matches"]
    assert reply["cursor_start"] == len("%%remote pool\n") and reply["cursor_end"] == len(code)
    _, (r, _) = execute(kc, "zz_only_on_the_runner")
    assert r["content"]["ename"] == "NameError", "it lives on the runner only"
    # also while another cell keeps that very runner busy
    long_cell = kc.execute("%%remote pool\nimport time\ntime.sleep(4)")
    time.sleep(1.0)
    msg = _before_the_running_cell(kc, kc.complete("%%remote pool\nzz_only_on_the_runner.ke",
                                                   len("%%remote pool\nzz_only_on_the_runner.ke")))
    answered = time.monotonic()
    assert "keys" in msg["content"]["matches"]
    msg = _before_the_running_cell(kc, kc.inspect("%%remote pool\nzz_only_on_the_runner",
                                                  len("%%remote pool\nzz_only_on_the_runner")))
    assert msg["content"]["found"] and "dict" in msg["content"]["data"]["text/plain"]
    reply, msgs = collect(kc, long_cell, timeout=30)
    idle = [t for t, m in msgs if m["msg_type"] == "status" and m["parent_header"].get("msg_id") == long_cell
            and m["content"]["execution_state"] == "idle"]
    assert reply["content"]["status"] == "ok" and idle and answered < idle[0]


def test_map_and_gather_show_a_progress_line_updated_in_place(kernel):
    km, kc = kernel
    execute(kc, "ppool = flame.Pool(max=2)")
    cell, (reply, msgs) = execute(kc, "def slow(i):\n    time.sleep(0.4)\n    return i\n"
                                      "r = list(ppool.map(slow, range(8)))\nlen(r)")
    assert reply["content"]["status"] == "ok", reply["content"]
    first = of_type(msgs, "display_data", cell)
    updates = of_type(msgs, "update_display_data", cell)
    progress = [m for m in first if "map(slow)" in m["content"]["data"]["text/plain"]]
    assert len(progress) == 1, "one line, shown once..."
    display_id = progress[0]["content"]["transient"]["display_id"]
    assert updates and all(m["content"]["transient"]["display_id"] == display_id for m in updates), \
        "...then updated in place"
    texts = [m["content"]["data"]["text/plain"] for m in progress + updates]
    assert any("on pool-" in t for t in texts), "it names the runners working on it"
    assert "8/8 done" in texts[-1] and "failed" not in texts[-1]
    cell, (reply, msgs) = execute(kc, "futs = [ppool.submit(slow, i) for i in range(6)]\nsum(flame.gather(futs))")
    assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] == "15"
    texts = [m["content"]["data"]["text/plain"] for m in of_type(msgs, "display_data", cell)
             + of_type(msgs, "update_display_data", cell)]
    assert texts and "gather: 6/6 done" in texts[-1]
    cell, (reply, msgs) = execute(kc, "ppool.map(slow, range(2))")  # quick: no line at all
    assert not of_type(msgs, "display_data", cell)
    # As a cell's value, a map shows its results, read when the cell ends.
    assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] == "[0, 1]"
    execute(kc, "ppool.shutdown()")


def test_tqdm_inside_remote_calls_streams_through_stderr(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "def bar():\n    from tqdm import tqdm\n    for _ in tqdm(range(5)):\n"
                                      "        time.sleep(0.05)\npool.call(bar)")
    assert reply["content"]["status"] == "ok", reply["content"]
    err = "".join(t for _, t in streams(msgs, cell, "stderr"))
    assert "100%" in err and "5/5" in err
