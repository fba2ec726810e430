"""The live pool view (%flame, pool.view()) and the load runners report with their heartbeats."""
from __future__ import annotations

import re
import time

from conftest import wait_for
from kernel_util import drain, execute, kernel_session, of_type


def test_runners_report_their_load_with_heartbeats(make_pool):
    pool = make_pool(max=1)

    def spin(seconds):
        end = time.monotonic() + seconds
        blob = bytearray(50 << 20)  # 50 MB resident while it spins
        while time.monotonic() < end:
            blob[0] = (blob[0] + 1) % 256
        return len(blob)

    future = pool.submit(spin, 3.0)
    assert wait_for(lambda: (pool.runners[0].cpu or 0) > 50, timeout=15), pool.runners
    info = pool.runners[0]
    assert info.rss > 50 << 20, info
    future.result()
    pool.call(int)
    info = pool.runners[0]
    assert (info.calls_done, info.failures) == (2, 0)
    try:
        pool.call(lambda: 1 / 0)
    except ZeroDivisionError:
        pass
    assert pool.runners[0].failures == 1
    assert info.gpu_use == (), "no GPUs, no GPU use"


def row_of(text, column):
    """The value of ``column`` in each runner row of a view's text."""
    cols = ["runner", "state", "host", "pid", "GPUs", "running", "done", "failed", "Remotes",
            "held", "CPU", "RSS", "GPU use"]
    return [line.strip().split(" | ")[cols.index(column)] for line in text.splitlines() if " | " in line]


def test_flame_magic_shows_a_live_view_that_updates_while_other_cells_run():
    with kernel_session() as (km, kc):
        execute(kc, "import flame, time\npool = flame.Pool(min=2, max=2, name='viewed')\n"
                    "list(pool.map(time.sleep, [0.3, 0.3]))")
        shown, (reply, msgs) = execute(kc, "%flame")
        first = of_type(msgs, "display_data", shown)
        assert len(first) == 1 and "<b>viewed</b>" in first[0]["content"]["data"]["text/html"]
        display_id = first[0]["content"]["transient"]["display_id"]
        cell, (reply, msgs) = execute(kc, "list(pool.map(time.sleep, [0.4] * 10))")
        assert reply["content"]["status"] == "ok"
        updates = [m for _, m in msgs if m["msg_type"] == "update_display_data"
                   and m["content"]["transient"].get("display_id") == display_id]
        assert len(updates) >= 2, "about once a second while the other cell ran"
        texts = [m["content"]["data"]["text/plain"] for m in updates]
        assert any("1" in row_of(t, "running") for t in texts), texts
        done = [sum(int(x) for x in row_of(t, "done")) for t in texts]
        assert done == sorted(done) and done[-1] > done[0], done
        assert all(m["parent_header"].get("msg_id") == shown for m in updates), \
            "updates belong to the cell that shows the view"
        assert any(re.search(r"\d\.\d calls/s", t) and not t.split("\n")[0].endswith("0.0 calls/s")
                   for t in texts), texts
        # Shut down: one last picture, then it stops.
        execute(kc, "pool.shutdown()")
        tail = drain(kc, 2.5)
        last = [m for _, m in tail if m["msg_type"] == "update_display_data"
                and m["content"]["transient"].get("display_id") == display_id]
        assert last and "shut down" in last[-1]["content"]["data"]["text/plain"]
        assert not [m for _, m in drain(kc, 2.0) if m["msg_type"] == "update_display_data"], \
            "no updates once its pools are shut down"


def test_pool_view_as_a_cell_value():
    with kernel_session() as (km, kc):
        cell, (reply, msgs) = execute(kc, "import flame\npool = flame.Pool(max=1)\npool.call(int)\npool.view()")
        shown = of_type(msgs, "display_data", cell)
        assert shown and "GPU use" in shown[0]["content"]["data"]["text/html"]
        assert row_of(shown[0]["content"]["data"]["text/plain"], "done") == ["1"]
        execute(kc, "pool.shutdown()")
        drain(kc, 1.5)
