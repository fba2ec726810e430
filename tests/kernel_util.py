"""Drive a real flamebook kernel through jupyter_client, as a frontend would."""
from __future__ import annotations

import contextlib
import queue
import time

from jupyter_client.manager import start_new_kernel


def start(kernel_name: str = "flamebook"):
    km, kc = start_new_kernel(kernel_name=kernel_name, startup_timeout=60)
    return km, kc


@contextlib.contextmanager
def kernel_session(kernel_name: str = "flamebook"):
    """A started kernel and its client, shut down afterwards."""
    km, kc = start(kernel_name)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = 60.0, stop_when=None):
    """Run ``code``; return (reply, [(time, msg)...] of iopub messages whose parent is this request)."""
    msg_id = kc.execute(code)
    return msg_id, collect(kc, msg_id, timeout)


def collect(kc, msg_id: str, timeout: float = 60.0):
    msgs = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        msgs.append((time.monotonic(), msg))
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            reply = kc.get_shell_msg(timeout=10)
            return reply, msgs
    raise TimeoutError(f"no idle status for {msg_id} within {timeout} s")


def press_stop(km, kc, msg_id: str):
    """Press the stop button a second into the cell ``msg_id``; its reply and messages, and how
    long the kernel took to answer after the interrupt."""
    time.sleep(1.0)
    t0 = time.monotonic()
    km.interrupt_kernel()
    reply, msgs = collect(kc, msg_id, timeout=15)
    return reply, msgs, time.monotonic() - t0


def drain(kc, seconds: float):
    """All iopub messages that arrive within ``seconds``."""
    msgs = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            msgs.append((time.monotonic(), kc.get_iopub_msg(timeout=0.1)))
        except queue.Empty:
            pass
    return msgs


def streams(msgs, parent_id: str | None = None, name: str = "stdout"):
    return [(t, m["content"]["text"]) for t, m in msgs
            if m["msg_type"] == "stream" and m["content"]["name"] == name
            and (parent_id is None or m["parent_header"].get("msg_id") == parent_id)]


def of_type(msgs, msg_type: str, parent_id: str | None = None):
    return [m for _, m in msgs if m["msg_type"] == msg_type
            and (parent_id is None or m["parent_header"].get("msg_id") == parent_id)]
