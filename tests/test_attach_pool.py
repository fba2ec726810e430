"""%attach POOL: every cell runs on one runner of a pool, in a namespace that lasts there."""
from __future__ import annotations

import time

from kernel_util import execute, kernel_session, of_type, press_stop, streams


def out(msgs, cell):
    return [m["content"]["data"]["text/plain"] for m in of_type(msgs, "execute_result", cell)]


def text(msgs, cell):
    return "".join(t for _, t in streams(msgs, cell))


def test_attached_cells_run_on_a_runner_of_the_pool():
    with kernel_session() as (km, kc):
        execute(kc, "import flame, os\nkernel_pid = os.getpid()\npool = flame.Pool(max=2, idle_shutdown_after=1)")
        cell, (reply, msgs) = execute(kc, "%attach pool")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "attached to pool-" in text(msgs, cell) or "attached to" in text(msgs, cell)
        cell, (reply, msgs) = execute(kc, "import os, time, asyncio\nrunner_pid = os.getpid()\nprint('on', runner_pid)\nrunner_pid")
        assert reply["content"]["status"] == "ok", reply["content"]
        pid = int(out(msgs, cell)[0])
        assert text(msgs, cell) == f"on {pid}\n"
        assert reply["content"]["execution_count"] == of_type(msgs, "execute_result", cell)[0]["content"]["execution_count"]
        # The namespace lasts on the runner; the kernel's own is not there.
        cell, (reply, msgs) = execute(kc, "os.getpid() == runner_pid, 'kernel_pid' in dir()")
        assert out(msgs, cell) == ["(True, False)"]
        cell, (reply, msgs) = execute(kc, "%attach")
        assert "runner pool-" in text(msgs, cell), text(msgs, cell)
        # Rich display, top-level await.
        cell, (reply, msgs) = execute(kc, "from IPython.display import HTML, display\n"
                                          "display(HTML('<b>from the runner</b>'))\n"
                                          "await asyncio.sleep(0.1)\n'awaited'")
        assert [m["content"]["data"]["text/html"] for m in of_type(msgs, "display_data", cell)] == \
            ["<b>from the runner</b>"]
        assert out(msgs, cell) == ["'awaited'"]
        # Completion and inspection come from the runner's namespace.
        execute(kc, "runner_only_value = 12345")
        kc.complete("runner_only_v", 13)
        reply = kc.get_shell_msg(timeout=10)
        assert "runner_only_value" in reply["content"]["matches"], reply["content"]
        kc.inspect("runner_only_value", 17, 0)
        reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["found"] and "12345" in reply["content"]["data"]["text/plain"]
        # The stop button stops the cell on the runner; the namespace is still there.
        cell = kc.execute("time.sleep(30)")
        reply, msgs, took = press_stop(km, kc, cell)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        cell, (reply, msgs) = execute(kc, "os.getpid() == runner_pid")
        assert out(msgs, cell) == ["True"]
        # An error renders like a local one.
        cell, (reply, msgs) = execute(kc, "1 / 0")
        assert reply["content"]["ename"] == "ZeroDivisionError"
        # %detach: cells run here again, and the runner goes back to the pool (idle shutdown).
        cell, (reply, msgs) = execute(kc, "%detach")
        assert "detached from pool-" in text(msgs, cell) or "detached from" in text(msgs, cell)
        cell, (reply, msgs) = execute(kc, "os.getpid() == kernel_pid, 'runner_pid' in dir()")
        assert out(msgs, cell) == ["(True, False)"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            cell, (reply, msgs) = execute(kc, "len(pool.runners)")
            if out(msgs, cell) == ["0"]:
                break
            time.sleep(0.5)
        assert out(msgs, cell) == ["0"], "the runner was given back and stopped when idle"


def test_a_dead_runner_loses_the_namespace_and_the_next_cell_gets_a_fresh_one():
    with kernel_session() as (km, kc):
        execute(kc, "import flame\npool = flame.Pool(max=1)")
        execute(kc, "%attach pool")
        cell, (reply, msgs) = execute(kc, "import os\nfirst = os.getpid()\nfirst")
        first = int(out(msgs, cell)[0])
        cell, (reply, msgs) = execute(kc, "os.kill(os.getpid(), 9)")
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "RunnerDied", reply["content"]
        assert "namespace of the cells run there is lost" in text(msgs, cell)
        cell, (reply, msgs) = execute(kc, "import os\n'first' in dir(), os.getpid()")
        assert reply["content"]["status"] == "ok", reply["content"]
        fresh, pid = eval(out(msgs, cell)[0])
        assert fresh is False and pid != first, "still attached, on a fresh runner"
        execute(kc, "%detach")
        cell, (reply, msgs) = execute(kc, "pool.shutdown(); 'done'")
        assert out(msgs, cell) == ["'done'"]
