"""A hand-held parent for one real runner: lets tests speak the wire protocol directly."""
from __future__ import annotations

import os
import subprocess
import sys

import zmq

from flame import serialize
from flame.wire import Wire
from conftest import ROOT


class FakeParent:
    def __init__(self, key: bytes | None = None, **env: str) -> None:
        self.key = key or os.urandom(32)
        self.wire = Wire(self.key, "parent")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.runner_id = "t-r1"
        full = dict(os.environ, FLAME_RUNNER_ID=self.runner_id, FLAME_ADDRESS=self.address,
                    FLAME_KEY=self.key.hex(), PYTHONPATH=ROOT, FLAME_PARENT_TIMEOUT="30",
                    FLAME_HEARTBEAT="0.2")
        full.update(env)
        self.proc = subprocess.Popen([sys.executable, "-m", "flame.node"], env=full,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ids = 0

    def recv(self, timeout: float = 10.0, kinds: tuple = ("hello", "result", "error", "stream")):
        """The next accepted message of one of ``kinds`` as (header, frames), or None on timeout."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not poller.poll(100):
                continue
            parts = self.sock.recv_multipart()
            msg = self.wire.decode(parts[1:], peer=parts[0].decode())
            if msg is not None and msg[0]["k"] in kinds:
                return msg
        return None

    def send_raw(self, parts: list) -> None:
        self.sock.send_multipart([self.runner_id.encode(), *parts])

    def call_message(self, fn, *args) -> tuple[str, list]:
        self.ids += 1
        call_id = f"x{self.ids}"
        fn_payload, arg_frames = serialize.dumps_call(fn, args, {})
        frames = [fn_payload, *arg_frames]
        msg = self.wire.encode("call", self.runner_id, {"id": call_id, "fn": f"h{self.ids}", "nf": 1,
                                                         "name": "t"}, frames)
        return call_id, msg

    def call(self, fn, *args, timeout: float = 10.0):
        call_id, msg = self.call_message(fn, *args)
        self.send_raw(msg)
        reply = self.recv(timeout, kinds=("result", "error"))
        assert reply is not None, "runner did not answer"
        head, frames = reply
        assert head["id"] == call_id
        if head["k"] == "error":
            raise AssertionError(head["tb"])
        return serialize.loads(frames)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.sock.close()
        self.ctx.term()
