"""asyncio everywhere: coroutine functions on runners, and top-level await in %%remote and attached cells."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

import flame
from conftest import ROOT, gone, wait_for
from kernel_util import collect, execute, kernel_session, of_type, press_stop, streams


async def double_later(x):
    import asyncio
    await asyncio.sleep(0.05)
    print(f"doubling {x}")
    return 2 * x


async def fails_later():
    import asyncio
    await asyncio.sleep(0.01)
    raise ValueError("async failure")


def returns_an_awaitable(x):
    return double_later(x)


def test_coroutine_functions_run_on_the_runner(make_pool, collect):
    pool = make_pool(max=1)
    assert pool.call(double_later, 21) == 42
    assert pool.call(returns_an_awaitable, 5) == 10
    assert list(pool.map(double_later, range(3))) == [0, 2, 4]
    assert "doubling 21\n" in collect.text(), "output of a coroutine reaches its call"
    with pytest.raises(ValueError, match="async failure") as info:
        pool.call(fails_later)
    assert "in fails_later" in info.value.__cause__.text

    async def main():
        return await asyncio.gather(*(pool.acall(double_later, i) for i in range(3)))
    assert asyncio.run(main()) == [0, 2, 4]


def test_one_loop_per_runner_lives_as_long_as_the_runner(make_pool):
    pool = make_pool(max=1)

    async def loop_id():
        import asyncio
        return id(asyncio.get_running_loop())

    async def start_background():
        import asyncio
        import builtins
        builtins.flame_bg = asyncio.get_running_loop().create_task(asyncio.sleep(0.2, "done"))

    async def background_result():
        import builtins
        return await builtins.flame_bg
    assert pool.call(loop_id) == pool.call(loop_id)
    pool.call(start_background)
    assert pool.call(background_result) == "done", "a task a call started went on after it"


def test_max_concurrency_runs_coroutines_concurrently_on_one_runner(make_pool):
    pool = make_pool(max=1, max_concurrency=20)

    async def nap(i):
        import asyncio
        import os
        await asyncio.sleep(0.5)
        return os.getpid()
    pool.call(nap, 0)  # booted
    t0 = time.monotonic()
    pids = list(pool.map(nap, range(20)))
    took = time.monotonic() - t0
    assert len(set(pids)) == 1
    assert took < 2.0, f"20 coroutines of 0.5 s took {took:.2f} s"


async def write_after(path, seconds):
    import asyncio
    open(path + ".started", "w").close()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        with open(path + ".cancelled", "w") as f:
            f.write("seen")
        raise
    with open(path, "w") as f:
        f.write("must not happen")


def test_timeout_and_cancel_cancel_the_task_remotely(make_pool, tmp_path):
    pool = make_pool(max=1, timeout=0.5)
    pid = pool.call(os.getpid)
    path = str(tmp_path / "side-effect")
    with pytest.raises(flame.CallTimeout):
        pool.call(write_after, path, 2.0)
    assert wait_for(lambda: os.path.exists(path + ".cancelled"))
    time.sleep(2.0)
    assert not os.path.exists(path), "the cancelled coroutine did not go on"
    assert pool.call(os.getpid) == pid, "a cancelled task does not cost the runner"

    pool2 = make_pool(max=1)
    path2 = str(tmp_path / "other")
    fut = pool2.submit(write_after, path2, 2.0)
    assert wait_for(lambda: os.path.exists(path2 + ".started"), timeout=30)  # running remotely
    assert fut.cancel()
    assert wait_for(lambda: os.path.exists(path2 + ".cancelled"))
    time.sleep(2.0)
    assert not os.path.exists(path2)


async def ignores_cancel():
    import asyncio
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass


def test_a_task_that_ignores_cancellation_gets_its_runner_replaced(make_pool):
    pool = make_pool(max=1, timeout=0.5)
    pid = pool.call(os.getpid)
    with pytest.raises(flame.CallTimeout):
        pool.call(ignores_cancel)
    assert wait_for(lambda: gone(pid))
    assert pool.call(os.getpid) != pid


# ---- cells -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel():
    with kernel_session() as session:
        yield session


def value(msgs, cell):
    return [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)]


def test_remote_cells_may_await_on_the_runners_loop(kernel):
    km, kc = kernel
    execute(kc, "import flame\npool = flame.Pool(max=1)")
    cell, (reply, msgs) = execute(kc, "%%remote pool\nimport asyncio\n"
                                      "async def answer():\n    await asyncio.sleep(0.05)\n    print('awaited')\n    return 42\n"
                                      "loop_name = type(asyncio.get_event_loop_policy()).__name__\n"
                                      "x = await answer()\nx + 0")
    assert reply["content"]["status"] == "ok", reply["content"]
    assert value(msgs, cell) == ["42"]
    assert "".join(t for _, t in streams(msgs, cell)) == "awaited\n"
    cell, (reply, msgs) = execute(kc, "%%remote pool\nawait asyncio.sleep(0.01, 'still the same loop')")
    assert value(msgs, cell) == ["'still the same loop'"]
    execute(kc, "pool.shutdown()")


def test_the_kernels_own_cells_keep_autoawait(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "import asyncio\nawait asyncio.sleep(0.01, 'local await')")
    assert reply["content"]["status"] == "ok"
    assert value(msgs, cell) == ["'local await'"]


FASTAPI_APP = '''
import asyncio, contextlib, sys
import flame
from fastapi import FastAPI
import uvicorn


@contextlib.asynccontextmanager
async def lifespan(app):
    flame.serve(connection_file=sys.argv[1])  # inside the app's running loop
    print("serving", flush=True)
    yield

app = FastAPI(lifespan=lifespan)
state = {"hits": 0}
lock = asyncio.Lock()

@app.get("/hit")
async def hit():
    async with lock:
        state["hits"] += 1
    return state

async def fetch_count():
    await asyncio.sleep(0.01)
    async with lock:  # bound to the app's loop: only works there
        return state["hits"], id(asyncio.get_running_loop())

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


@pytest.fixture
def fastapi_app(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from services import free_port, wait_port
    script = tmp_path / "web.py"
    script.write_text(FASTAPI_APP)
    conn, port = str(tmp_path / "web.json"), free_port()
    proc = subprocess.Popen([sys.executable, str(script), conn, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert "serving" in proc.stdout.readline()  # the lifespan ran: uvicorn binds the port next
        assert wait_port(port, timeout=30), "uvicorn did not listen"
        yield proc, conn, port
    finally:
        proc.kill()
        proc.wait()


def get(port, path):
    import json
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.load(r)


def test_attached_cells_await_on_a_fastapi_apps_loop(fastapi_app, kernel):
    proc, conn, port = fastapi_app
    km, kc = kernel
    for _ in range(3):
        get(port, "/hit")  # state that HTTP requests changed
    cell, (reply, msgs) = execute(kc, f"%attach {conn}")
    assert reply["content"]["status"] == "ok", reply["content"]
    try:
        cell, (reply, msgs) = execute(kc, "hits, loop_id = await fetch_count()\nhits")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert value(msgs, cell) == ["3"]
        # the awaited work ran on the app's own loop, the one serving HTTP
        cell, (reply, msgs) = execute(kc, "import asyncio\nloop_id == id(__import__('flame.node.aio', fromlist=['x']).app_loop())")
        assert value(msgs, cell) == ["True"]
        # completion after `await obj.` comes from the app
        asked = kc.complete("await fetch_co", 14)
        reply = kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != asked:  # a late reply to an earlier request
            reply = kc.get_shell_msg(timeout=10)
        assert "fetch_count" in reply["content"]["matches"], reply["content"]
        # the stop button cancels the awaited task; the app keeps serving meanwhile and after
        msg_id = kc.execute("await asyncio.sleep(60)")
        time.sleep(0.5)
        assert get(port, "/hit")["hits"] == 4, "the app answers while a cell awaits"
        reply, msgs, took = press_stop(km, kc, msg_id)
        assert took < 3 and reply["content"]["ename"] == "KeyboardInterrupt"
        assert get(port, "/hit")["hits"] == 5
        # blocking code in a cell does not run on the app's loop: the app still answers
        msg_id = kc.execute("import time\ntime.sleep(1.5)\nawait fetch_count()")
        time.sleep(0.5)
        t0 = time.monotonic()
        assert get(port, "/hit")["hits"] == 6
        assert time.monotonic() - t0 < 0.5
        reply, msgs = collect(kc, msg_id)
        assert reply["content"]["status"] == "ok"
    finally:
        execute(kc, "%detach")


def test_flamebook_serve_finds_the_loop_asyncio_run_starts_later(tmp_path):
    script = tmp_path / "plain_async.py"
    script.write_text(textwrap.dedent("""
        import asyncio
        counter = {"n": 0}

        async def bump():
            await asyncio.sleep(0)
            counter["n"] += 1
            return counter["n"], id(asyncio.get_running_loop())

        async def main():
            global main_loop
            main_loop = id(asyncio.get_running_loop())
            print("started", flush=True)
            while True:
                await asyncio.sleep(0.05)

        asyncio.run(main())
    """))
    env = dict(os.environ, PYTHONPATH=ROOT, FLAMEBOOK_ATTACH_DIR=str(tmp_path / "attach"))
    proc = subprocess.Popen([sys.executable, "-m", "kernel.cli", "serve", "--", "python", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "started"
        app = flame.connect(str(next((tmp_path / "attach").glob("plain_async-*.json"))))
        try:
            app.run("n, loop_id = await bump()\nassert loop_id == main_loop, 'not the app loop'\nprint(n)")
            assert app.call(lambda: __import__("__main__").counter["n"]) == 1
        finally:
            app.close()
    finally:
        proc.kill()
        proc.wait()


def test_serve_can_name_the_apps_loop(tmp_path):
    script = tmp_path / "threaded_loop.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys, threading, time
        import flame

        app_loop = asyncio.new_event_loop()  # the app runs its loop on a thread of its own
        threading.Thread(target=app_loop.run_forever, daemon=True).start()

        async def which():
            return asyncio.get_running_loop() is app_loop

        flame.serve(connection_file=sys.argv[1], loop=app_loop)
        print("up", flush=True)
        time.sleep(600)
    """))
    conn = str(tmp_path / "app.json")
    proc = subprocess.Popen([sys.executable, str(script), conn], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "up"
        app = flame.connect(conn)
        try:
            assert app.run("await which()")["data"]["text/plain"] == "True"
        finally:
            app.close()
    finally:
        proc.kill()
        proc.wait()
