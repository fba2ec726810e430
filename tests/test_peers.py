"""Runners address each other: a call whose Remotes live on several runners runs, the values
travelling runner to runner, not through this process."""
from __future__ import annotations

import logging
import os
import signal
import stat
import time

import numpy as np
import pytest

import flame
from conftest import wait_for


def pid_and(*values):
    return os.getpid(), [type(v).__name__ for v in values]


def served():
    """How many copies this runner has sent to its peers."""
    from flame.node import peers
    return peers._Node.server.sent if peers._Node.server is not None else 0


def two_runners(pool):
    """Two Remotes on two different runners of ``pool`` (a big array and a small list)."""
    big, small = pool.spawn_map(_slow_value, ["array", "list"], [200_000, 3])
    assert big.runner_id != small.runner_id
    return big, small


def _slow_value(kind, n):
    time.sleep(0.3)  # overlapping spawns: one runner each
    return np.arange(n, dtype=np.float64) if kind == "array" else list(range(n))


def test_a_call_with_remotes_on_two_runners_runs_where_most_bytes_are(make_pool, caplog):
    pool = make_pool(max=2)
    big, small = two_runners(pool)
    with caplog.at_level(logging.INFO, logger="flame"):
        pid, kinds = pool.call(pid_and, small, big)
    holder_of_big = pool.call(lambda b: os.getpid(), big)
    assert pid == holder_of_big, "placed on the runner holding the most bytes"
    assert kinds == ["list", "ndarray"], "both arrive as the real objects"
    assert pool.call(lambda s, b: float(b.sum()) + sum(s), small, big) == float(np.arange(200_000).sum()) + 3
    assert not [r for r in caplog.records if "through this process" in r.getMessage()], \
        "the copy went runner to runner"
    assert pool.submit_to(small.runner_id, served).result() >= 2, "the small list's runner sent the copies"
    assert pool.submit_to(big.runner_id, served).result() == 0


def test_ties_go_to_the_first_arguments_runner_and_submit_to_names_one(make_pool):
    pool = make_pool(max=3)
    a, b = pool.spawn_map(_slow_value, ["list", "list"], [3, 3])
    first = pool.call(lambda x, y: os.getpid(), a, b)
    assert first == pool.call(lambda x: os.getpid(), a)
    assert pool.call(lambda x, y: os.getpid(), b, a) == pool.call(lambda x: os.getpid(), b)
    list(pool.map(time.sleep, [0.5] * 3))  # a third runner, holding nothing
    elsewhere = next(r.id for r in pool.runners if r.id not in (a.runner_id, b.runner_id))
    future = pool.submit_to(elsewhere, lambda x, y: (os.getpid(), x + y), a, b)
    assert future.runner_id == elsewhere and future.result()[1] == [0, 1, 2, 0, 1, 2]


def test_copies_are_values(make_pool):
    pool = make_pool(max=2)
    a, b = pool.spawn_map(_slow_value, ["list", "list"], [3, 2])

    def mutate(x, y):
        y.append("changed here")
        return len(y)
    # Placed with a (the longer list: more bytes); b arrives as a copy, which it changes.
    assert pool.call(mutate, a, b) == 3
    assert b.get() == [0, 1], "the holder's value is not changed by a copy's mutation"


def test_a_remote_method_takes_a_remote_from_another_runner(make_pool):
    pool = make_pool(max=2)
    big, small = two_runners(pool)
    total = big.sum()  # a Remote on big's runner
    assert float((big[:3] * 2).sum().get()) == 6.0
    assert small.__add__(flame_list := [9]).get() == [0, 1, 2, 9] and flame_list == [9]
    assert float(big.__getitem__(small).sum().get()) == 3.0, "small's value, copied to big's runner"
    del total


def test_a_remote_of_another_pool_travels_the_same_way(make_pool, caplog):
    one, two = make_pool(max=1), make_pool(max=1)
    value = one.spawn(list, range(4))
    with caplog.at_level(logging.INFO, logger="flame"):
        assert two.call(lambda v: (os.getpid(), sum(v)), value)[1] == 6
    assert not [r for r in caplog.records if "through this process" in r.getMessage()]
    assert one.call(served) == 1, "the holder sent the copy itself"


def test_runners_on_another_machine_get_copies_relayed_and_the_log_says_so(sshd, make_pool, caplog):
    from test_ssh import backend
    remote, local = make_pool(backend=backend(sshd), max=1), make_pool(max=1)
    value = remote.spawn(list, range(4))
    with caplog.at_level(logging.INFO, logger="flame"):
        assert local.call(sum, value) == 6
    assert any("through this process" in r.getMessage() for r in caplog.records)


class SlowToCopy:
    def __reduce__(self):
        time.sleep(30)  # the holder is killed while it pickles the copy
        return (SlowToCopy, ())


def test_a_holder_dying_mid_transfer_fails_the_call_with_runner_died(make_pool):
    pool = make_pool(max=2)
    slow, other = pool.spawn_map(_slow_value_or_slow_copy, [True, False])
    holder_pid = pool.call(lambda s: os.getpid(), other)  # other is bigger: the call runs there
    slow_pid = pool.submit_to(slow.runner_id, os.getpid).result()
    future = pool.submit(lambda a, b: "never", other, slow)
    time.sleep(1.0)
    os.kill(slow_pid, signal.SIGKILL)
    with pytest.raises(flame.RunnerDied, match=slow.runner_id):
        future.result(timeout=20)
    assert pool.call(lambda o: os.getpid(), other) == holder_pid, "the calling runner lives on"


def _slow_value_or_slow_copy(slow):
    time.sleep(0.3)
    return SlowToCopy() if slow else list(range(10_000))


def test_the_peer_socket_is_private_and_refuses_strangers(make_pool):
    import zmq
    from flame.wire import Kind, Wire
    pool = make_pool(max=1)
    value = pool.spawn(list, range(3))
    server = pool.call(lambda v: (lambda s: (s.dir, s.address))(__import__("flame.node.peers").node.peers._Node.server), value)
    where, address = server
    st = os.stat(where)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"stranger")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        wrong = Wire(os.urandom(32), "stranger")
        sock.send_multipart(wrong.encode(Kind.FETCH, value.runner_id, {"id": 1, "oid": 1, "path": []}))
        assert not sock.poll(1500), "a request signed with another key gets no answer"
        sock.send_multipart([b"not even the wire format"])
        assert not sock.poll(500)
    finally:
        sock.close()
        ctx.term()
    assert value.get() == [0, 1, 2], "the holder lives on"


class Encoder:
    """A stand-in for a model on a GPU runner."""

    def __init__(self):
        self.calls = 0
        self.pid = os.getpid()

    def encode(self, batch):
        self.calls += 1
        return [x * 2 for x in batch]


def embed(model, chunk):
    """On a CPU runner: each call goes straight to the model's runner."""
    assert isinstance(model, flame.Remote)
    return os.getpid(), model.encode(chunk).get(), model.pid.get()


def test_a_handle_is_used_from_many_runners_straight_to_its_holder(make_pool, caplog):
    gpu_pool, cpu_pool = make_pool(max=1), make_pool(max=3)
    model = gpu_pool.spawn(Encoder)
    with caplog.at_level(logging.INFO, logger="flame"):
        out = list(cpu_pool.map(embed, [flame.ref(model)] * 6, [[i] for i in range(6)]))
    assert [o[1] for o in out] == [[2 * i] for i in range(6)]
    assert {o[2] for o in out} == {model.pid.get()}, "every operation ran on the model's runner"
    assert len({o[0] for o in out}) >= 2, "from several runners"
    assert model.calls.get() == 6
    assert not [r for r in caplog.records if "through this process" in r.getMessage()]
    assert gpu_pool.call(served) >= 6 * 3, "the model's runner answered each operation itself"


def keep(handle):
    import builtins
    builtins.flame_test_kept = handle
    return handle.__class__.__name__


def use_kept():
    import builtins
    return builtins.flame_test_kept.get()


def drop_kept():
    import builtins
    import gc
    del builtins.flame_test_kept
    gc.collect()


def test_a_handle_kept_on_a_runner_keeps_its_value_until_it_is_dropped(make_pool):
    holders, users = make_pool(max=1, idle_shutdown_after=1), make_pool(max=1)
    value = holders.spawn(list, range(5))
    holder = value.runner_id
    assert users.call(keep, flame.ref(value)) == "Remote"
    del value  # the notebook lets go; the handle on the other runner still keeps it
    time.sleep(3.0)
    assert [r.id for r in holders.runners] == [holder], "not stopped for being idle"
    assert holders.runners[0].objects == 1, "one value, whatever the handles"
    assert users.call(use_kept) == [0, 1, 2, 3, 4]
    users.call(drop_kept)
    assert wait_for(lambda: not holders.runners or holders.runners[0].objects == 0, timeout=10)


def test_a_handle_returned_to_the_notebook_is_a_working_remote(make_pool):
    pool = make_pool(max=2)
    value = pool.spawn(list, range(3))
    back = pool.call(lambda h: h, flame.ref(value))
    assert isinstance(back, flame.Remote) and back.runner_id == value.runner_id
    assert back.get() == [0, 1, 2]
    made = pool.call(lambda h: h + [7], flame.ref(value))  # made on the holder, through the handle
    assert made.get() == [0, 1, 2, 7] and made.runner_id == value.runner_id
    del value, back, made
    assert wait_for(lambda: all(r.objects == 0 for r in pool.runners), timeout=10)


def test_a_runner_that_dies_lets_go_of_what_its_handles_kept(make_pool):
    holders, users = make_pool(max=1), make_pool(max=1)
    value = holders.spawn(list, range(3))
    users.call(keep, flame.ref(value))
    del value
    user_pid = users.call(os.getpid)
    os.kill(user_pid, signal.SIGKILL)
    assert wait_for(lambda: holders.runners[0].objects == 0, timeout=15)


def test_a_handle_whose_holder_died_raises_runner_died(make_pool):
    holders, users = make_pool(max=1), make_pool(max=1)
    value = holders.spawn(Encoder)
    users.call(keep, flame.ref(value))
    holder, holder_pid = value.runner_id, value.pid.get()
    os.kill(holder_pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(flame.RunnerDied, match=holder):
        users.call(use_kept)
    assert time.monotonic() - t0 < 20, "no hang"
    assert users.call(lambda: 1) == 1


def test_an_error_through_a_handle_is_the_holders_exception(make_pool):
    holders, users = make_pool(max=1), make_pool(max=1)
    value = holders.spawn(Encoder)
    with pytest.raises(TypeError):
        users.call(lambda h: len(h), flame.ref(value))
    with pytest.raises(AttributeError):
        users.call(lambda h: h.missing.get(), flame.ref(value))


def test_a_pool_that_shuts_down_lets_go_of_what_its_runners_handles_kept(make_pool):
    holders, users = make_pool(max=1), make_pool(max=1)
    value = holders.spawn(list, range(3))
    users.call(keep, flame.ref(value))
    del value
    time.sleep(1.5)
    assert holders.runners[0].objects == 1
    users.shutdown()
    assert wait_for(lambda: holders.runners[0].objects == 0, timeout=15)


def test_a_handle_to_another_machine_is_relayed_through_this_process(sshd, make_pool, caplog):
    """Its holder listens on a Unix socket on "another host" (an SSH pool without peer_host):
    the handle's requests go through this process, and everything a handle does works."""
    from test_ssh import backend
    remote, local = make_pool(backend=backend(sshd), max=1, idle_shutdown_after=1), make_pool(max=1)
    value = remote.spawn(list, range(4))
    with caplog.at_level(logging.INFO, logger="flame"):
        assert local.call(lambda h: (h.append(4), h.get())[1], flame.ref(value)) == [0, 1, 2, 3, 4]
    assert any("relayed through this process" in r.getMessage() for r in caplog.records)
    assert value.get() == [0, 1, 2, 3, 4], "the append ran on the holder"
    assert local.call(keep, flame.ref(value)) == "Remote"
    holder = value.runner_id
    del value  # the handle kept on the local runner keeps it, through the relay too
    time.sleep(3.0)
    assert [r.id for r in remote.runners] == [holder] and remote.runners[0].objects == 1
    assert local.call(use_kept) == [0, 1, 2, 3, 4]
    local.call(drop_kept)
    assert wait_for(lambda: not remote.runners or remote.runners[0].objects == 0, timeout=10)


def holder_address():
    from flame.node import peers
    return peers._Node.server.address


def test_with_peer_host_copies_and_handles_go_straight_between_machines(sshd, make_pool, caplog):
    """An SSH backend's peer_host: its runners listen on TCP with CurveZMQ, and a runner
    elsewhere (here: a local pool's) fetches copies and uses handles there directly."""
    from test_ssh import backend
    remote = make_pool(backend=backend(sshd, peer_host="127.0.0.1"), max=1)
    local = make_pool(max=1)
    value = remote.spawn(list, range(4))
    address = remote.call(lambda v: holder_address(), value)
    assert address.startswith("tcp://127.0.0.1:") and "#" in address, address
    with caplog.at_level(logging.INFO, logger="flame"):
        assert local.call(sum, value) == 6
        assert local.call(lambda h: (h.append(4), h.get())[1], flame.ref(value)) == [0, 1, 2, 3, 4]
    assert not any("through this process" in r.getMessage() for r in caplog.records)
    assert remote.call(lambda v: served(), value) >= 2, "the copy and the handle's calls came from the holder"
    assert value.get() == [0, 1, 2, 3, 4], "the handle's append ran on the holder"


def test_a_tcp_peer_listener_refuses_strangers_in_the_handshake(sshd, make_pool):
    import zmq
    from flame.wire import Kind, Wire
    from test_ssh import backend
    pool = make_pool(backend=backend(sshd, peer_host="127.0.0.1"), max=1)
    value = pool.spawn(list, range(3))
    where, _, server_key = pool.call(lambda v: holder_address(), value).partition("#")
    ctx = zmq.Context()
    try:
        for curve in (False, True):  # no CURVE at all; CURVE with a key pair of its own
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                sock.curve_serverkey = server_key.encode()
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.connect(where)
            wrong = Wire(os.urandom(32), "stranger")
            sock.send_multipart(wrong.encode(Kind.FETCH, value.runner_id, {"id": 1, "oid": 1, "path": []}))
            assert not sock.poll(1500), "no answer to a stranger"
            sock.close()
    finally:
        ctx.term()
    assert value.get() == [0, 1, 2], "the holder lives on"


def test_an_ssh_runners_peer_directory_goes_with_its_connection(sshd, make_pool):
    """Inside the SSH tunnel's private directory, which the backend removes with the
    connection: a killed SSH runner (nobody left on its host to clean up) leaves nothing."""
    from test_ssh import backend
    b = backend(sshd)
    pool = make_pool(backend=b, max=1)
    value = pool.spawn(list, range(3))
    where, pid = pool.call(lambda v: (__import__("flame.node.peers").node.peers._Node.server.dir, os.getpid()), value)
    assert os.path.basename(os.path.dirname(where)).startswith("flame-ipc-"), where
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(flame.RunnerDied):
        value.get()
    pool.shutdown()
    b.close()
    assert not os.path.exists(where)


def forged_relay(holder, oid):
    """On a runner: ask ``holder`` through the parent with a key that is not its pool's."""
    from flame.node import peers, relay
    peers.configure()
    head, frames = relay.ask(peers._Node.post, peers._Node.gone, 30, holder, os.urandom(32),
                             {"id": 10**6, "oid": oid, "path": []}, [], "forged")
    return head.get("type"), frames


def test_a_relayed_request_without_the_peer_key_is_refused_and_a_dead_holder_named(sshd, make_pool):
    from test_ssh import backend
    b = backend(sshd)
    try:
        remote, local = make_pool(backend=b, max=1), make_pool(max=1)
        value = remote.spawn(list, range(4))
        assert local.call(forged_relay, value.runner_id, 1) == ("PermissionError", [])
        assert local.call(keep, flame.ref(value)) == "Remote"
        holder_pid = remote.call(lambda v: os.getpid(), value)
        os.kill(holder_pid, signal.SIGKILL)
        with pytest.raises(flame.RunnerDied, match=value.runner_id):
            local.call(use_kept)
        remote.shutdown()
    finally:
        b.close()  # the killed holder's peer directory goes with the tunnel's
