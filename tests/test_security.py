"""Every frame is signed; nothing unsigned, tampered, misaddressed or replayed is ever unpickled."""
from __future__ import annotations

import os
import pickle

import psutil
import pytest
import zmq

import flame
from flame.wire import MAGIC, Wire
from conftest import second_caller_wait
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

    def evil_call(call_id, wire=parent.wire, to="t-r1", extra=()):
        return wire.encode("call", to, {"id": call_id, "fn": call_id, "nf": 1}, [payload, args, *extra])

    sig_end = len(MAGIC) + 32  # each first frame: MAGIC, signature, signed part

    # 1. unsigned: a well-formed message whose signature is blank
    parent.send_raw([MAGIC + b"\0" * 32 + bytes(evil_call("e1")[0])[sig_end:]])
    # 2. signed with the wrong key
    parent.send_raw(evil_call("e2", wire=Wire(os.urandom(32), "parent")))
    # 3. tampered: a good signature over a harmless function, then the content swapped
    _, good = parent.call_message(len, [1])
    parent.send_raw([bytes(good[0])[:sig_end] + bytes(evil_call("e3")[0])[sig_end:]])
    # 3b. tampered out-of-band buffer: a large frame changed after signing, or dropped
    signed = evil_call("e3b", extra=[b"\1" * 100_000])
    assert len(signed) == 2, "a 100 kB buffer travels out of band"
    parent.send_raw([signed[0], b"\2" * 100_000])
    parent.send_raw(signed[:1])
    # 3c. garbage and truncated frames
    parent.send_raw([b"garbage"])
    parent.send_raw([bytes(good[0])[:40]])
    # 4. addressed to another runner
    parent.send_raw(evil_call("e4", to="t-r2"))
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
    call_id = next(iter(pool._inflight.calls))
    for rogue in rogues:
        rogue.send_multipart(forged.encode("result", "parent", {"id": call_id},
                                           [pickle.dumps(_CreateFile(evil), protocol=5)]))
        rogue.send_multipart([b"garbage"])
    assert fut.result(timeout=10) == "genuine"
    assert not os.path.exists(evil)
    assert pool._endpoint.wire.dropped >= 1
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
    # Loopback pools listen on a Unix socket in a directory that only this user can enter.
    assert pool.address.startswith("ipc://")
    where = os.path.dirname(pool.address.removeprefix("ipc://"))
    assert os.stat(where).st_uid == os.getuid() and os.stat(where).st_mode & 0o777 == 0o700
    # The runner removes the key from its environment before running user code, and it was
    # never in the environment the process started with (/proc/PID/environ keeps that one).
    assert pool.call(lambda: [k for k in __import__("os").environ if k.startswith("FLAME_KEY")]) == []
    assert key.encode() not in open(f"/proc/{pid}/environ", "rb").read()
    assert pool.call(lambda: __import__("pathlib").Path("/proc/self/environ").read_bytes()).find(key.encode()) == -1
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


def test_large_values_cross_a_curve_listener_in_pieces(make_pool, tmp_path):
    # Its MAXMSGSIZE would hang up at a whole 5 MiB frame: values and output that large reach
    # the pool and a served app in pieces, and arrive whole.
    import numpy as np
    from test_attach import serving
    pool = make_pool(backend=_OffLoopback(shared_memory=False), max=1)
    big = np.arange(5 << 18, dtype=np.int32)  # 5 MiB
    assert (pool.submit(lambda a: a + 1, big).result(timeout=60) == big + 1).all()
    assert len(pool.submit(lambda: "x" * (3 << 20)).result(timeout=60)) == 3 << 20
    path = str(tmp_path / "app.json")
    proc = serving("import flame, sys, time\nflame.serve(connection_file=sys.argv[1])\n"
                   "print('up', flush=True)\ntime.sleep(600)\n", path)
    try:
        app = flame.connect(path)
        assert (app.call(lambda a: a * 2, big) == big * 2).all()
        app.close()
    finally:
        proc.kill()
        proc.wait()


def test_off_loopback_pools_encrypt_with_curve(make_pool):
    pool = make_pool(backend=_OffLoopback(), max=1)
    assert pool._endpoint.curve and pool._endpoint.curve_public
    assert pool.call(lambda x: x + 1, 41) == 42
    # A peer that does not speak CURVE gets no handshake: its messages never reach the pool.
    ctx = zmq.Context()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(pool.address)
    plain.send_multipart([b"x", b"y"])
    import time
    time.sleep(0.5)
    assert pool._endpoint.wire.dropped == 0, "the plaintext peer's frames were refused by CURVE, not even read"
    plain.close()
    ctx.term()
    assert pool.call(lambda: "still fine") == "still fine"


def test_off_loopback_the_waiting_caller_is_poked_through_curve(make_pool, monkeypatch):
    """The endpoint's own DEALER pokes a caller out of its blocking receive: off loopback, with
    CURVE on the socket, too (or a second thread's call would wait for the first's)."""
    assert second_caller_wait(make_pool, monkeypatch, backend=_OffLoopback()) < 1.5


def test_loopback_pools_do_not_pay_for_curve(make_pool):
    pool = make_pool(max=1)
    assert pool._endpoint.curve_public is None and not pool._endpoint.curve


def test_wire_checks_every_byte_and_frame_before_loading_anything():
    key = os.urandom(32)
    sender, receiver = Wire(key, "a"), Wire(key, "b")
    frames = [b"x" * 10, b"y" * 200_000]
    msg = sender.encode("call", "b", {"id": "c1"}, frames)
    assert len(msg) == 2, "the small frame rides inline, the large one out of band"
    first = bytes(msg[0])
    for i in range(len(first)):  # any changed byte of signature, header or inline frame
        bad = bytearray(first)
        bad[i] ^= 1
        assert receiver.decode([bytes(bad), msg[1]]) is None
    big = bytearray(msg[1])
    big[-1] ^= 1
    assert receiver.decode([first, bytes(big)]) is None
    assert receiver.decode([first]) is None  # an out-of-band frame dropped
    assert receiver.decode([first, msg[1], b"extra"]) is None  # or one added
    head, got = receiver.decode(msg)
    assert head["id"] == "c1" and [bytes(f) for f in got] == frames
    assert receiver.decode(msg) is None  # replayed
    assert receiver.dropped == len(first) + 4


def test_frames_larger_than_a_listener_takes_travel_as_pieces(tmp_path):
    """A listener others can reach hangs up at a frame over FRAME_MAX (its MAXMSGSIZE): a
    larger frame, or a header that makes the first frame larger, travels in pieces from a
    peer holding the key, and arrives whole."""
    from flame.wire import FRAME_MAX
    from flame.listen import curve_client, listener
    key = os.urandom(32)
    sender, receiver = Wire(key, "a", cut=True), Wire(key, "b")
    ctx = zmq.Context()
    router, public, gate = listener(ctx, key, curve=True)
    router.bind("tcp://127.0.0.1:0")
    dealers = []
    for _ in range(2):
        dealers.append(ctx.socket(zmq.DEALER))
        dealers[-1].setsockopt(zmq.LINGER, 0)
        curve_client(dealers[-1], public, key)
        dealers[-1].connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
    oversized, dealer = dealers
    try:
        oversized.send(bytes(2 * FRAME_MAX))  # one frame too large: the listener never reads it
        assert not router.poll(1000)
        big, text = os.urandom(3 * FRAME_MAX + 5), "t" * (FRAME_MAX + 7)
        msg = sender.encode("call", "b", {"id": "c1", "text": text}, [b"small", big])
        assert len(msg) > 3 and all(memoryview(p).nbytes <= FRAME_MAX for p in msg)
        dealer.send_multipart(msg, copy=False)
        assert router.poll(10_000)
        parts = router.recv_multipart(copy=False)[1:]
        head, got = receiver.decode(parts)
        assert head["text"] == text and bytes(got[0]) == b"small" and bytes(got[1]) == big
        # A map that does not fit its pieces, or joins them otherwise, is dropped.
        parts = [bytes(p) for p in sender.encode("call", "b", {"id": "c2"}, [big])]
        assert receiver.decode([parts[0]] + parts[2:]) is None
        assert receiver.decode(parts[:1] + parts[2:] + parts[1:2]) is None
        assert receiver.decode(parts) is not None
    finally:
        for d in dealers:
            d.close()
        router.close()
        gate.stop()
        ctx.term()


def test_key_files_are_created_new_and_private(tmp_path):
    from flame.keys import write_private
    loose = tmp_path / "loose.key"
    loose.write_text("old")
    loose.chmod(0o644)
    write_private(str(loose), "secret")  # replaced, not reused with its mode
    assert loose.read_text() == "secret" and loose.stat().st_mode & 0o777 == 0o600
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    link = tmp_path / "link.key"
    link.symlink_to(elsewhere)
    write_private(str(link), "secret")
    assert elsewhere.read_text() == "" and not link.is_symlink()
    with pytest.raises(FileExistsError):
        write_private(str(link), "other", replace=False)  # key files of backends: never taken over
    assert link.read_text() == "secret"


def test_runner_ids_are_unique_across_pools_and_processes(make_pool):
    import subprocess
    import sys
    from conftest import ROOT
    a, b = make_pool(max=1, name="same"), make_pool(max=1, name="same")
    a.call(lambda: 1)
    b.call(lambda: 1)
    ids = {a.runners[0].id, b.runners[0].id}
    code = ("import flame\nwith flame.Pool(max=1, name='same') as p:\n    p.call(lambda: 1)\n"
            "    print(p.runners[0].id)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=ROOT), timeout=60).stdout.strip()
    assert len(ids | {other}) == 3 and all(i.startswith("same-") for i in ids | {other})


def test_garbage_at_a_pool_is_logged_quietly(make_pool, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="flame.wire")
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.ROUTING_ID, b"rogue")
    rogue.connect(pool.address)
    for i in range(5000):
        rogue.send_multipart([b"garbage %d" % i])
    from conftest import wait_for
    assert wait_for(lambda: pool._endpoint.wire.dropped >= 5000, timeout=20)
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert 1 <= len(lines) <= 7, f"{len(lines)} log lines for 5000 bad frames"
    assert pool.call(os.getpid) == pid
    rogue.close()
    ctx.term()


def test_strangers_at_a_served_app_are_refused_and_logged_quietly(tmp_path):
    # An app's socket is on loopback, where every local user can connect: peers without the
    # key are refused in the CurveZMQ handshake, each refusal counted, the log kept short.
    import json
    import subprocess
    import sys
    import time
    from conftest import ROOT
    path = str(tmp_path / "app.json")
    code = ("import flame, sys, time\nflame.serve(connection_file=sys.argv[1])\n"
            "print('up', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert proc.stdout.readline().strip() == "up"
        info = json.load(open(path))
        ctx = zmq.Context()
        rogues = []
        for i in range(40):
            rogue = ctx.socket(zmq.DEALER)
            rogue.setsockopt(zmq.LINGER, 0)
            public, secret = zmq.curve_keypair()
            rogue.curve_serverkey, rogue.curve_publickey, rogue.curve_secretkey = (
                info["curve_server_key"].encode(), public, secret)
            rogue.connect(info["address"])
            rogue.send_multipart([b"garbage %d" % i], zmq.NOBLOCK)
            rogues.append(rogue)
        time.sleep(3)
        app = flame.connect(path)  # still serving
        assert app.call(lambda: 7) == 7
        app.close()
        for rogue in rogues:
            rogue.close()
        ctx.term()
    finally:
        proc.kill()
        _, err = proc.communicate()
    lines = [line for line in err.splitlines() if "refused a peer" in line]
    assert 1 <= len(lines) <= 7, f"{len(lines)} log lines for 40 strangers:\n" + "\n".join(lines[:20])


def _mark_then_die(path):
    import os
    import signal
    with open(path, "a") as f:
        f.write("ran\n")
    os.kill(os.getpid(), signal.SIGKILL)


PLANTER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, (0).to_bytes(8, "little"))  # "nothing started"
print("planted", flush=True)
"""


def test_a_start_count_planted_by_another_user_never_makes_a_call_run_twice(make_pool, tmp_path, remote_host):
    # Anyone can list /dev/shm. A start count planted where the next runner would make its
    # own, saying "nothing started", would have the pool run a started call again after the
    # runner died. The runner's count has a name nobody can guess, and the pool reads only
    # its own user's file.
    import signal
    import time
    from conftest import gone
    pool = make_pool(max=1)
    pid = pool.call(os.getpid)
    first = pool.runners[0]
    prefix = first.runner_id[:first.runner_id.rfind("-r") + 2]
    planted = f"/dev/shm/flame-{prefix}2-starts"  # where the next one's used to be
    planter = _as_other_user(remote_host, PLANTER, planted)  # the attack: another local user
    try:
        assert planter.communicate(timeout=30)[0].strip() == "planted"
        os.kill(pid, signal.SIGKILL)  # the next call boots the runner the count was planted for
        assert wait_for_gone(pool, first.runner_id)
        path = str(tmp_path / "marks")
        a = pool.submit(time.sleep, 0.3)
        b = pool.submit(_mark_then_die, path)  # sent ahead (the pool is at max); it starts after a
        assert a.result(timeout=30) is None
        with pytest.raises(flame.RunnerDied):
            b.result(timeout=30)
        time.sleep(1.0)  # a second run, if any, has had time to write
        assert open(path).read() == "ran\n", "a call that had started ran again"
        assert gone(pid)
    finally:
        try:
            os.unlink(planted)
        except FileNotFoundError:
            pass


def wait_for_gone(pool, runner_id, timeout=20.0):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(r.runner_id != runner_id for r in pool.runners):
            return True
        time.sleep(0.05)
    return False


def test_the_sweep_goes_on_past_what_it_cannot_unlink():
    # Another user's file named like ours (or a directory) must not keep our arenas in /dev/shm.
    from flame import shm
    owner = f"sweep-{os.urandom(8).hex()}"
    blocker = os.path.join(shm.DIR, f"flame-{owner}-0")
    os.mkdir(blocker)
    arenas = [os.path.join(shm.DIR, f"flame-{owner}-{i}") for i in (1, 2, 3)]
    try:
        for path in arenas:
            open(path, "wb").close()
        shm.sweep(owner)
        assert not [p for p in arenas if os.path.exists(p)], "arenas left behind"
    finally:
        os.rmdir(blocker)
        for path in arenas:
            if os.path.exists(path):
                os.unlink(path)


SQUATTER = """
import sys, time, zmq
ctx = zmq.Context()
socks = []
for n in range(2, 7):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, (sys.argv[2] + str(n)).encode())
    s.connect(sys.argv[1])
    socks.append(s)
time.sleep(1.0)
print("up", flush=True)
time.sleep(60)
"""


def test_another_user_cannot_squat_the_next_runner_ids(make_pool, remote_host):
    # Runner ids are seen by other users (in /dev/shm, in squeue). Another user's sockets
    # connected under the ids the next runners would take must not keep them from booting.
    import signal
    import subprocess
    from conftest import gone
    from services import REMOTE_USER
    import pwd
    uid = pwd.getpwnam(REMOTE_USER).pw_uid
    pool = make_pool(max=1, boot_timeout=10)
    pid = pool.call(os.getpid)
    first = pool.runners[0].runner_id
    prefix = first[:first.rfind("-r") + 2]
    attacker = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", "-i", "HOME=/tmp",
         "PATH=/usr/bin:/bin", remote_host.venv("bare"), "-c", SQUATTER, pool.address, prefix],
        stdout=subprocess.PIPE, text=True)
    try:
        assert attacker.stdout.readline().strip() == "up"
        os.kill(pid, signal.SIGKILL)  # the next call boots the next runner
        assert wait_for_gone(pool, first)
        assert pool.call(os.getpid) != pid
    finally:
        attacker.kill()
        attacker.wait()
    assert gone(pid)


FLOODER = r"""
import errno, socket, sys, time, zmq
address, server_key = sys.argv[1], sys.argv[2]
if address.startswith("ipc://"):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(address[len("ipc://"):])
        print("connected", flush=True)
    except OSError as exc:
        print(errno.errorcode[exc.errno], flush=True)
else:
    # A ZMTP 3.0 greeting for CURVE, then a handshake command declaring 1 GiB: ZeroMQ would
    # read it into memory before the handshake could refuse it, but for MAXMSGSIZE.
    host, port = address[len("tcp://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + bytes(32))
    s.settimeout(10)
    s.recv(64)
    try:
        s.sendall(b"\x06" + (1 << 30).to_bytes(8, "big"))
        for _ in range(256):
            s.sendall(bytes(1 << 20))
        print("tcp kept", flush=True)
    except OSError:
        print("tcp closed", flush=True)
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.ROUTING_ID, sys.argv[3].encode())
if server_key != "-":
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key.encode(), public, secret
sock.connect(address)
frame = bytes(256 << 20)
sock.setsockopt(zmq.SNDTIMEO, 3000)
for _ in range(2):
    try:
        sock.send_multipart([frame])
    except zmq.Again:  # no pipe: the CurveZMQ handshake was refused
        pass
time.sleep(3)
print("sent", flush=True)
time.sleep(60)
"""


def _as_other_user(remote_host, script, *args):
    """``script`` run as REMOTE_USER (another local user, with none of our files), from the
    pyzmq-only venv; its stdout is a pipe."""
    import pwd
    import subprocess
    from services import REMOTE_USER
    uid = pwd.getpwnam(REMOTE_USER).pw_uid
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", "-i", "HOME=/tmp",
         "PATH=/usr/bin:/bin", remote_host.venv("bare"), "-c", script, *args],
        stdout=subprocess.PIPE, text=True)


def _flooded(remote_host, address, server_key, pid, ident="x"):
    """How many bytes the process ``pid`` grew by at most while another user attacked
    ``address`` (FLOODER), and what the attacker's first connection met."""
    import threading
    import time
    victim = psutil.Process(pid)
    before = victim.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():  # memory read in and freed again within the attack counts too
        while not done.wait(0.01):
            peak[0] = max(peak[0], victim.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    attacker = _as_other_user(remote_host, FLOODER, address, server_key or "-", ident)
    try:
        met = attacker.stdout.readline().strip()
        assert attacker.stdout.readline().strip() == "sent"
        time.sleep(1)
        return peak[0] - before, met
    finally:
        done.set()
        sampler.join()
        attacker.kill()
        attacker.wait()


@pytest.mark.parametrize("where", ["loopback", "off loopback"])
def test_another_user_cannot_put_frames_into_a_pools_memory(make_pool, remote_host, where):
    # The HMAC is checked only once ZeroMQ has read a whole frame: another user must not reach
    # the pool's socket at all (loopback: a Unix socket in a 0700 directory), or must be
    # refused in the handshake (off loopback: CurveZMQ, ZAP admits only the pool's key).
    pool = make_pool(max=1, **({"backend": _OffLoopback()} if where == "off loopback" else {}))
    pid = pool.call(os.getpid)
    nxt = pool.runners[0].runner_id[:-4] + "0000"  # an id squatted, were the handshake to pass
    grew, met = _flooded(remote_host, pool.address, pool._endpoint.curve_public and
                         pool._endpoint.curve_public.decode(), os.getpid(), nxt)
    assert grew < 128 << 20, f"the pool grew by {grew >> 20} MiB"
    assert met == ("EACCES" if where == "loopback" else "tcp closed")
    assert pool.call(os.getpid) == pid


def test_another_user_cannot_put_frames_into_a_served_apps_memory(tmp_path, remote_host):
    import json
    from test_attach import serving
    path = str(tmp_path / "app.json")
    proc = serving("import flame, sys, time\nflame.serve(connection_file=sys.argv[1])\n"
                   "print('up', flush=True)\ntime.sleep(600)\n", path)
    try:
        info = json.load(open(path))
        grew, met = _flooded(remote_host, info["address"], info["curve_server_key"], proc.pid)
        assert grew < 128 << 20, f"the app grew by {grew >> 20} MiB"
        assert met == "tcp closed"
        app = flame.connect(path)
        assert app.call(lambda: 7) == 7
        app.close()
    finally:
        proc.kill()
        proc.wait()
