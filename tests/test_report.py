"""flame.report: numbers calls report while they run, drawn as one live chart in the cell that
made them (Vega-Lite), and sent only where someone draws them."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from kernel_util import collect, execute, of_type, start

VEGALITE = "application/vnd.vegalite.v5+json"


@pytest.fixture(scope="module")
def kernel():
    km, kc = start()
    # Both runners up before the tests: each test checks it leaves no runner it started.
    execute(kc, "import flame, os, time\npool = flame.Pool(min=2, max=2, idle_shutdown_after=60)\n"
                "def train(lr, steps=6, pause=0.3):\n"
                "    loss = 1.0\n"
                "    for step in range(steps):\n"
                "        loss *= 1 - lr\n"
                "        flame.report(loss=loss, acc=1 - loss, step=step)\n"
                "        time.sleep(pause)\n"
                "    return loss\n"
                "list(pool.map(time.sleep, [0.5, 0.5]))")
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def charts(msgs, cell):
    """(time, content) of each chart message of ``cell``, in order."""
    return [(t, m["content"]) for t, m in msgs
            if m["msg_type"] in ("display_data", "update_display_data")
            and m["parent_header"].get("msg_id") == cell and VEGALITE in m["content"]["data"]]


def points(content):
    return content["data"][VEGALITE]["data"]["values"]


def test_a_map_draws_one_live_chart_in_its_cell(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "list(pool.map(train, [0.1, 0.2, 0.3, 0.4]))")
    assert reply["content"]["status"] == "ok", reply["content"]
    drawn = charts(msgs, cell)
    assert drawn, "the cell shows a chart"
    display_id = drawn[0][1]["transient"]["display_id"]
    assert all(c["transient"]["display_id"] == display_id for _, c in drawn), "one chart, updated in place"
    assert [m["msg_type"] for _, m in msgs if m["msg_type"] == "display_data"
            and VEGALITE in m["content"]["data"]] == ["display_data"]
    counts = [len(points(c)) for _, c in drawn]
    # Updates while the map runs: the chart grew several times before the cell ended.
    grew = sum(1 for a, b in zip(counts, counts[1:]) if b > a)
    assert grew >= 3, counts
    idle = max(t for t, m in msgs if m["msg_type"] == "status")
    assert idle - drawn[0][0] > 1.0, "the first picture came while the calls ran"
    final = drawn[-1][1]
    values = points(final)
    assert len(values) == 4 * 6 * 2, "every series and point, both metrics"
    assert {v["series"] for v in values} == {"0", "1", "2", "3"}, "a series per call, by map index"
    assert {v["metric"] for v in values} == {"loss", "acc"}
    spec = final["data"][VEGALITE]
    assert spec["facet"]["row"]["field"] == "metric", "one panel per metric"
    assert spec["$schema"].endswith("vega-lite/v5.json")
    loss3 = [v["value"] for v in values if v["series"] == "3" and v["metric"] == "loss"]
    assert loss3 == pytest.approx([0.6 ** (i + 1) for i in range(6)])
    assert "3: loss=0.04666" in final["data"]["text/plain"], final["data"]["text/plain"]


def test_named_series_steps_and_chunks(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "def named(i):\n"
                                      "    for s in range(3):\n"
                                      "        flame.report(series=f'run-{i}', score=i * 10 + s, step=s * 100)\n"
                                      "    return i\n"
                                      "list(pool.map(named, range(2))), list(pool.map(train, [0.5, 0.5, 0.5], [2] * 3, [0] * 3, chunksize=2))")
    assert reply["content"]["status"] == "ok", reply["content"]
    drawn = charts(msgs, cell)
    values = points(drawn[-1][1])
    named = [v for v in values if v["series"].startswith("run-")]
    assert {(v["series"], v["x"], v["value"]) for v in named} == {
        (f"run-{i}", s * 100, i * 10 + s) for i in range(2) for s in range(3)}
    chunked = {v["series"] for v in values if v["metric"] == "loss"}
    assert chunked == {"0", "1", "2"}, "each item of a chunk is a series of its own"


def test_reports_from_a_background_future_go_to_the_cell_that_made_it(kernel):
    km, kc = kernel
    first, _ = execute(kc, "fut = pool.submit(train, 0.5, 4, 0.4)")
    other, (reply, msgs) = execute(kc, "time.sleep(2.5); fut.result() > 0")
    assert not charts(msgs, other), "the later cell draws nothing"
    assert charts(msgs, first), "the calling cell's chart kept updating after it ended"
    assert all(v["series"] == "call 1" for _, c in charts(msgs, first) for v in points(c))


def test_a_remote_cell_reports_into_its_own_chart(kernel):
    km, kc = kernel
    cell, (reply, msgs) = execute(kc, "%%remote pool\nimport flame\nfor i in range(3):\n    flame.report(x=i)\n'ok'")
    assert reply["content"]["status"] == "ok", reply["content"]
    values = points(charts(msgs, cell)[-1][1])
    assert [v["value"] for v in values] == [0, 1, 2] and [v["x"] for v in values] == [1, 2, 3], \
        "without a step, x is the count of the series' reports"


def test_stop_button_stops_reporting_calls(kernel):
    km, kc = kernel
    cell = kc.execute("list(pool.map(train, [0.1, 0.1], [100] * 2, [0.2] * 2))")
    time.sleep(2.0)
    km.interrupt_kernel()
    reply, msgs = collect(kc, cell, timeout=20)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert charts(msgs, cell), "it had drawn what came before the stop"
    _, (reply, msgs) = execute(kc, "[r.active for r in pool.runners]")
    assert of_type(msgs, "execute_result")[0]["content"]["data"]["text/plain"] == "[0, 0]"


def test_nothing_is_kept_or_sent_for_reports_no_one_shows(make_pool):
    """Outside a kernel (no FLAME_PROGRESS) a call's reports are dropped where they are made."""
    import flame

    def report_and_look():
        from flame.node import capture
        flame.report(loss=1.0)
        out = capture.installed.current()
        return out.reports, list(out.events)

    pool = make_pool(max=1)
    assert pool.call(report_and_look) == (False, [])

    class Showing:
        reports = True

        def __init__(self):
            self.got = []

        def stream(self, name, text):
            pass

        def display(self, data):
            pass

        def report(self, points, key, index):
            self.got.append((points, key, index))
    sink = Showing()
    flame.set_sink_factory(lambda: sink)
    try:
        wants, events = pool.call(report_and_look)
        assert wants is True and events and events[0][0] == "report"
        assert [p for p, _, _ in sink.got] == [[{"metrics": {"loss": 1.0}}]]
    finally:
        flame.set_sink_factory(None)


def test_a_bad_value_names_the_metric(make_pool):
    import flame
    pool = make_pool(max=1)
    flame.report(loss=object())  # outside a call: nothing, whatever it is given
    with pytest.raises(TypeError, match="loss='high' is not a number"):
        pool.call(_bad_report)


def _bad_report():
    import flame
    from flame.node import capture
    capture.installed.current().reports = True  # as if its caller showed reports
    flame.report(loss="high")


def test_a_script_prints_reports_with_flame_progress(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import flame\n"
                      "def f(i):\n    flame.report(loss=i / 10, step=i)\n    return i\n"
                      "with flame.Pool(max=1) as pool:\n    print(list(pool.map(f, range(3))))\n")
    env = {**os.environ, "FLAME_PROGRESS": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "[0, 1, 2]" in done.stdout
    for i in range(3):
        assert f"flame.report [{i}]: loss={i / 10:.4g} (step {i})" in done.stderr, done.stderr
    env.pop("FLAME_PROGRESS")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "flame.report" not in done.stderr, done.stderr


def test_stop_button_stops_every_variant_of_a_spawn_map(kernel):
    km, kc = kernel
    execute(kc, "class Slow:\n    def __init__(self, lr):\n        for step in range(200):\n"
                "            flame.report(loss=lr / (step + 1))\n            time.sleep(0.1)\n")
    cell = kc.execute("models = pool.spawn_map(Slow, [0.1, 0.2])")
    time.sleep(2.0)
    km.interrupt_kernel()
    reply, msgs = collect(kc, cell, timeout=20)
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    assert {v["series"] for _, c in charts(msgs, cell) for v in points(c)} == {"0", "1"}
    cell, (reply, msgs) = execute(kc, "[(r.active, r.objects) for r in pool.runners]")
    assert of_type(msgs, "execute_result", cell)[0]["content"]["data"]["text/plain"] == "[(0, 0), (0, 0)]"


def test_a_chart_stays_light_past_a_few_thousand_points():
    from flame.chart import MAX_POINTS, Chart
    chart = Chart()
    chart.add("c1", 0, [{"metrics": {"loss": 1.0 / (i + 1)}} for i in range(10 * MAX_POINTS)])
    line = chart.series["0"]["loss"]
    assert MAX_POINTS <= len(line) <= 2 * MAX_POINTS + 1, len(line)
    assert line[0][0] < line[1][0] and line[-1][0] == 10 * MAX_POINTS, "spread over the run, the last kept"
    spec = chart.spec()
    assert "facet" not in spec and spec["encoding"]["y"]["title"] == "loss", "one metric: one panel"
    chart.add("c2", None, [{"metrics": {"loss": float("nan")}}, {"metrics": {"loss": None}}])
    assert [v["value"] for v in chart.spec()["data"]["values"][-2:]] == [None, None], \
        "NaN (sent as null) is drawn as a gap, not broken JSON"
    assert "call 1: loss=nan" in chart.text()
