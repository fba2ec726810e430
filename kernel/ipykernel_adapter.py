"""The private parts of ipykernel the kernel relies on, in one place, each with why.

ipykernel has no public way to do these two things; if a release renames them, this file is
the only one to change.
"""
from __future__ import annotations

from typing import Any


def iopub_topic(kernel: Any, msg_type: str) -> bytes:
    """The iopub topic ipykernel itself stamps on ``msg_type`` (``Kernel._topic``): remote output
    is sent from the pool's I/O thread with ``session.send``, not through the kernel's own
    ``send_response``, so it must name the topic the same way for frontends that filter by it."""
    return kernel._topic(msg_type)


def send_on_shell(kernel: Any, parts: list) -> None:
    """Send a reply on the shell channel from ipykernel 7's shell-channel thread
    (``ShellChannelThread.manager._send_on_shell_channel``): completion and inspection for an
    attached app are answered there, at once, instead of waiting behind a running cell on the
    main shell, and only that thread may use the shell socket."""
    kernel.shell_channel_thread.manager._send_on_shell_channel(parts)
