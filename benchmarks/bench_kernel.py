"""The flamebook kernel against the stock python3 kernel, measured in the same run.

Prints a table: kernel start time, a local cell's execute round trip, and the latency
from a remote print to its iopub message at the frontend (p50/p90).
Run: `python benchmarks/bench_kernel.py [--quick]` (needs `python -m kernel install`).
"""
from __future__ import annotations

import statistics
import sys
import time

from jupyter_client.manager import start_new_kernel
from table import print_table


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * q))]


def wait_idle(kc, msg_id):
    while True:
        msg = kc.get_iopub_msg(timeout=30)
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            return


def start_times(name, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
        out.append(time.perf_counter() - t)
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return out


def execute_times(name, n):
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=60)
    out = []
    for i in range(n + 10):
        t = time.perf_counter()
        msg_id = kc.execute("x = 1")
        kc.get_shell_msg(timeout=30)
        wait_idle(kc, msg_id)
        if i >= 10:
            out.append(time.perf_counter() - t)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return out


def remote_print_latency(n):
    km, kc = start_new_kernel(kernel_name="flamebook", startup_timeout=60)
    msg_id = kc.execute("import flame; pool = flame.Pool(max=1); pool.call(len, [1])")
    wait_idle(kc, msg_id)
    code = ("def stamps(n):\n    import time\n    for _ in range(n):\n"
            "        print(repr(time.time()))\n        time.sleep(0.05)\n"
            f"pool.call(stamps, {n})")
    msg_id = kc.execute(code)
    lat = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        now = time.time()
        if msg["msg_type"] == "stream" and msg["parent_header"].get("msg_id") == msg_id:
            for line in msg["content"]["text"].split():
                lat.append(now - float(line))
        if (msg["msg_type"] == "status" and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"]["execution_state"] == "idle"):
            break
    msg_id = kc.execute("pool.shutdown()")
    wait_idle(kc, msg_id)
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    return lat


def main(quick: bool = False) -> None:
    n_start, n_exec, n_print = (2, 30, 20) if quick else (6, 300, 100)
    rows = []
    s_py, s_fb = start_times("python3", n_start), start_times("flamebook", n_start)
    e_py, e_fb = execute_times("python3", n_exec), execute_times("flamebook", n_exec)
    lat = remote_print_latency(n_print)
    rows.append(("kernel start (s)", f"{statistics.median(s_py):.3f} / {pct(s_py, .9):.3f}",
                 f"{statistics.median(s_fb):.3f} / {pct(s_fb, .9):.3f}",
                 f"{statistics.median(s_fb) / statistics.median(s_py):.2f}x"))
    rows.append(("local cell execute round trip (ms)", f"{statistics.median(e_py)*1e3:.2f} / {pct(e_py, .9)*1e3:.2f}",
                 f"{statistics.median(e_fb)*1e3:.2f} / {pct(e_fb, .9)*1e3:.2f}",
                 f"{statistics.median(e_fb) / statistics.median(e_py):.2f}x"))
    rows.append(("remote print -> iopub message (ms)", "", f"{statistics.median(lat)*1e3:.1f} / {pct(lat, .9)*1e3:.1f}", ""))
    print_table(("measure", "python3 (median / p90)", "flamebook (median / p90)", "ratio"), rows)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
