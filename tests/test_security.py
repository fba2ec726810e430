"""Every frame is signed; nothing unsigned, tampered, misaddressed or replayed is ever unpickled."""
from __future__ import annotations

import os
import pickle

import psutil
import pytest
import zmq

import flame
from flame.wire import Wire
from harness import FakeParent


class _CreateFile:
    """Unpickling this creates a file: the proof that a payload was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def parent():
    p = FakeParent()
    head, _ = p.recv(kinds=("hello",))
    assert head["pid"] == p.proc.pid
    p.send_raw(p.wire.encode("welcome", p.runner_id))
    yield p
    p.close()


def test_runner_drops_unsigned_tampered_misaddressed_and_replayed_frames(parent, tmp_path):
    evil = str(tmp_path / "pwned")
    payload = pickle.dumps(_CreateFile(evil), protocol=5)
    args = pickle.dumps(((), {}), protocol=5)

    # 1. unsigned: a plausible header with an empty signature
    parent.send_raw([b"", b'{"k":"call","f":"parent","t":"t-r1","q":99,"id":"e1","fn":"e","nf":1}',
                     payload, args])
    # 2. signed with the wrong key
    rogue = Wire(os.urandom(32), "parent")
    parent.send_raw(rogue.encode("call", "t-r1", {"id": "e2", "fn": "e", "nf": 1}, [payload, args]))
    # 3. tampered: a good signature over a harmless function, then the function frame swapped
    _, good = parent.call_message(len, [1])
    tampered = list(good)
    tampered[2] = payload
    parent.send_raw(tampered)
    # 4. addressed to another runner
    parent.send_raw(parent.wire.encode("call", "t-r2", {"id": "e4", "fn": "e", "nf": 1}, [payload, args]))
    # 5. replay: a valid call that appends to a file, sent twice
    log = str(tmp_path / "log")
    call_id, msg = parent.call_message(lambda p: open(p, "a").write("x"), log)
    parent.send_raw(msg)
    head, _ = parent.recv(kinds=("result", "error"))
    assert head["id"] == call_id and head["k"] == "result"
    parent.send_raw(msg)

    # The runner still serves a fresh, properly signed call...
    assert parent.call(lambda: "still serving") == "still serving"
    # ...and loaded none of the bad ones: no file, one append only, and no extra replies.
    assert not os.path.exists(evil)
    assert open(log).read() == "x"
    assert parent.recv(timeout=0.5, kinds=("result", "error")) is None
    assert parent.proc.poll() is None


def test_pool_drops_forged_messages_from_a_rogue_peer(make_pool, tmp_path):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    runner_id = pool.runners[0].id
    ctx = zmq.Context()
    rogues = []
    for identity in (runner_id, "rogue"):  # impersonating the runner, and under its own name
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.ROUTING_ID, identity.encode())
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(pool.address)
        rogues.append(rogue)
    evil = str(tmp_path / "pwned")
    fut = pool.submit(lambda: __import__("time").sleep(0.5) or "genuine")
    forged = Wire(os.urandom(32), runner_id)
    call_id = next(iter(pool._calls))
    for rogue in rogues:
        rogue.send_multipart(forged.encode("result", "parent", {"id": call_id},
                                           [pickle.dumps(_CreateFile(evil), protocol=5)]))
        rogue.send_multipart([b"garbage"])
    assert fut.result(timeout=10) == "genuine"
    assert not os.path.exists(evil)
    assert pool._wire.dropped >= 1
    assert pool.call(os.getpid) == pid
    for rogue in rogues:
        rogue.close()
    ctx.term()


def test_key_is_never_on_argv_or_in_logs_and_binding_is_loopback(make_pool):
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    key = pool._key.hex()
    proc = psutil.Process(pid)
    assert all(key not in arg for arg in proc.cmdline())
    assert pool.address.startswith("tcp://127.0.0.1:")
    # The runner removes the key from its environment before running user code.
    assert pool.call(lambda: [k for k in __import__("os").environ if k.startswith("FLAME_KEY")]) == []
    runner = next(iter(pool._runners.values()))
    assert key not in runner.handle.stderr_tail(1000)


def test_short_or_missing_keys_are_refused():
    with pytest.raises(ValueError):
        Wire(b"short", "x")


class _OffLoopback(flame.LocalBackend):
    """Runners on this machine, but the pool listens on every interface."""
    bind_host = "0.0.0.0"

    def connect_address(self, bound):
        return "tcp://127.0.0.1:" + bound.rsplit(":", 1)[1]


def test_off_loopback_pools_encrypt_with_curve(make_pool):
    pool = make_pool(backend=_OffLoopback(), max=1)
    assert pool._sock.curve_server and pool._curve_public
    assert pool.call(lambda x: x + 1, 41) == 42
    # A peer that does not speak CURVE gets no handshake: its messages never reach the pool.
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(pool.address)
    plain.send_multipart([b"x", b"y"])
    import time
    time.sleep(0.5)
    assert pool._wire.dropped == 0, "the plaintext peer's frames were refused by CURVE, not even read"
    plain.close()
    ctx.term()
    assert pool.call(lambda: "still fine") == "still fine"


def test_loopback_pools_do_not_pay_for_curve(make_pool):
    pool = make_pool(max=1)
    assert pool._curve_public is None and not pool._sock.curve_server
