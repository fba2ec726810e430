"""The bootstrap of a runner on another machine: flame's runner side, its own dependencies
and the local code come over the pool's own connection (after Mitogen), so a host needs
only a Python of the parent's minor version.

The parent sends this file's source on the command line (``python -c``, compressed; it
holds no secret), the settings as usual (SSH: a line on stdin; Slurm: the environment and
a 0600 key file). FLAME_BOOT names the archives the runner needs, flame's own and the
pool's local code, by the SHA-256 of their files, with the SHA-256 of each archive, and
(unless the pool has ``deps=False``) the parent's versions of pyzmq, cloudpickle and psutil
(``flame/deps.py``); those the host has at another version, or not at all, are needed too.
Each one the host's cache lacks is fetched from the parent, checked against its SHA-256
before a byte is written, unpacked into ``$XDG_CACHE_HOME/flamebook/code/<name>`` (0700)
and put first on ``sys.path``; then ``flame.node`` starts as if run with ``-m``.

How they are fetched: over SSH, on the session's own stdin (:func:`ask`: a request line on
stdout, saying what the host is, and the archives in answer), stdlib only, since pyzmq may
be what is missing; on Slurm they are already in the cache the home directory shares; else
over ZeroMQ (:func:`_fetch`), where a request carries an HMAC of the pool's key, so only the
pool's runners are served, and the answer needs none: the settings came over a trusted
channel, and the answer's hash is checked.

Runs before flame is importable, maybe under the wrong Python: stdlib only, syntax any
Python 3 parses, so that a wrong version or a missing package is *said*, not crashed on.
Once flame runs, the runner uses :func:`install` and :func:`cache_root` from here to take
in code changes (``node.py``).
"""
import json
import os
import sys

#: First frame of a code request and of its answer (flamebook's wire starts b"FL\x02").
BOOT = b"FLboot"
#: Exit code when this host cannot run a runner (wrong Python, missing package).
EXIT_UNFIT = 5
#: What a runner imports that is not in the standard library: module -> distribution.
NEEDS = (("zmq", "pyzmq"), ("cloudpickle", "cloudpickle"), ("psutil", "psutil"))
#: First bytes of the bootstrap's request line on stdout (SSH: see :func:`ask`).
ASK = b"FLboot "


def host_facts():
    """What this host is, for the parent's check of compiled code against it (``flame/deps.py``):
    its Python, OS, architecture and C library. FLAME_HOST_MACHINE replaces the architecture
    (tests simulate a host that compiled code does not fit)."""
    import platform
    import sysconfig
    libc, version = platform.libc_ver()
    return {"python": "%d.%d" % sys.version_info[:2], "system": platform.system().lower(),
            "machine": os.environ.get("FLAME_HOST_MACHINE") or platform.machine(),
            "libc": ("%s %s" % (libc, version)) if libc else "", "abiflags": getattr(sys, "abiflags", ""),
            "platform": sysconfig.get_platform()}


def host_version(dist):
    """The version of distribution ``dist`` this host's Python has, or None."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except Exception:
        return None


def cache_root():
    """Where this host keeps code archives, unpacked, by name: FLAME_CODE_CACHE if set, else
    ``$XDG_CACHE_HOME/flamebook/code`` (``~/.cache/flamebook/code``)."""
    if os.environ.get("FLAME_CODE_CACHE"):
        return os.environ["FLAME_CODE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flamebook", "code")


def untrusted(path):
    """Why directory ``path`` must not be used for code, or None if it may: it must be this
    user's own (not a symlink) and writable by nobody else, since what is in it runs as this
    user. A missing one is None (it will be made, 0700)."""
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "%s is not a directory" % path
    if st.st_uid != os.geteuid():
        return "%s belongs to another user (uid %d)" % (path, st.st_uid)
    if st.st_mode & 0o022:
        return "%s can be written by other users (mode %04o)" % (path, stat.S_IMODE(st.st_mode))
    return None


def trusted_root():
    """``cache_root()``, refused (a PermissionError saying why) if another user owns it or can
    write it: on a shared directory, another user's tree named like an archive would run."""
    root = cache_root()
    why = untrusted(root)
    if why is not None:
        raise PermissionError("the code cache %s: refusing to run code from it; set "
                              "FLAME_CODE_CACHE to a directory of your own" % why)
    return root


def request_mac(key, ident, digest):
    """The HMAC that proves a code request comes from a holder of the pool's key."""
    import hmac
    return hmac.new(key, BOOT + ident + digest.encode(), "sha256").digest()


def curve_client_keys(key):
    """The CurveZMQ key pair (Z85, public then secret) every runner and client of the pool's
    ``key`` connects with: derived from the key, so that a listener allows only this public key
    (ZAP) and a peer without the key is refused in the handshake, before any frame of its own
    reaches memory."""
    import hmac
    import zmq
    from zmq.utils import z85
    secret = z85.encode(hmac.new(key, b"flame curve client", "sha256").digest())
    return zmq.curve_public(secret), secret


def install(root, digest, data, check=None):
    """Unpack archive ``digest`` into ``root/digest`` and return that path; ``check`` is the
    SHA-256 that ``data`` must have (when it did not come over the signed wire).

    Unpacked into a private temporary directory first and renamed into place, so that runners
    booting side by side on one host never see half an archive.
    """
    import hashlib
    import io
    import zipfile
    if check is not None and hashlib.sha256(data).hexdigest() != check:
        raise ValueError("code archive %s arrived corrupted" % digest[:12])

    def unpack(tmp):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            z.extractall(tmp)  # zipfile drops absolute paths and "..": nothing lands outside tmp
    return _entry(root, digest, ".unpack-", unpack)


def _entry(root, name, prefix, fill):
    """Entry ``name`` of the cache ``root`` (PermissionError if it, or the root, is not this
    user's alone); if it is not there yet, ``fill(tmp)`` makes it in a private temporary
    directory, renamed into place."""
    import shutil
    import tempfile
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, name)
    for where in (root, path):
        why = untrusted(where)
        if why is not None:
            raise PermissionError("code cache entry: %s: refusing to run code from it" % why)
    if os.path.isdir(path):
        return path
    tmp = tempfile.mkdtemp(prefix=prefix, dir=root)
    try:
        fill(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another runner got there first
            if not os.path.isdir(path):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def switch(old, new):
    """Put code directory ``new`` on ``sys.path`` in place of ``old``, and forget every module
    imported from ``old`` (all of them, not only the changed ones: a package kept from the
    old directory would go on importing its submodules from there)."""
    import importlib
    if old and old != new:
        prefix = old + os.sep
        for name, module in list(sys.modules.items()):
            where = [getattr(module, "__file__", None) or ""]
            try:
                where += list(getattr(module, "__path__", None) or ())
            except TypeError:
                pass
            if any(isinstance(w, str) and w.startswith(prefix) for w in where):
                del sys.modules[name]
    if old in sys.path:
        sys.path[sys.path.index(old)] = new
    elif new not in sys.path:
        sys.path.insert(0, new)
    importlib.invalidate_caches()


def _unfit(text):
    sys.stderr.write("flame: " + text + "\n")
    sys.stderr.flush()
    sys.exit(EXIT_UNFIT)


def _check(boot):
    here = "%d.%d" % sys.version_info[:2]
    python = "%s (Python %s)" % (sys.executable, sys.version.split()[0])
    if here != boot["python"]:
        _unfit("the runner's Python is %s, but the parent runs Python %s: runners need the same "
               "minor version (pass python=... to the backend)" % (python, boot["python"]))
    if boot.get("dists") is not None:
        return  # what it lacks comes from the parent
    missing = []
    for module, dist in NEEDS:
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        pins = " ".join("'%s==%s'" % (d, boot["versions"][d]) if boot["versions"].get(d) else d
                        for d in missing)
        _unfit("the runner's Python %s lacks %s; install it there (or leave deps on, as it is unless "
               "deps=False): %s -m pip install %s" % (python, ", ".join(missing), sys.executable, pins))


def _read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise SystemExit("flame: the parent's answer ended early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_line(fd):
    chunks = []
    while True:
        ch = os.read(fd, 1)
        if not ch:
            raise SystemExit("flame: no answer from the parent on stdin")
        if ch == b"\n":
            return b"".join(chunks)
        chunks.append(ch)


def ask(need, root):
    """SSH: ask the parent for archives ``need`` on the session itself, stdlib only: one line
    on stdout (what it needs, and what this host is), and on stdin a line (what comes, or why
    this host cannot run a runner) and the archives. The session is the SSH connection the
    settings came on: nobody else can write to it. Returns the directories to put on
    ``sys.path`` besides the archives (an environment pip installed into)."""
    line = json.dumps({"need": need, "facts": host_facts()})
    os.write(1, ASK + line.encode() + b"\n")
    head = json.loads(_read_line(0).decode())
    if head.get("error"):
        _unfit(head["error"])
    for item in head["send"]:
        install(root, item["h"], _read_exact(0, item["size"]), item["c"])
    if head.get("install"):
        pip = [os.path.join(root, item["h"]) for item in head["send"] if item.get("pip")]
        try:
            return [pip_install(root, head["install"], pip)]
        except RuntimeError as exc:
            _unfit(str(exc))
    return []


def pip_install(root, requirements, pythonpath):
    """``pip install`` the exact ``requirements`` (compiled code the parent's cannot stand in
    for) into an environment of the cache named by them, made once per host; returns its path.
    RuntimeError says why not."""
    import hashlib
    import subprocess
    name = "env-" + hashlib.sha256(json.dumps([sorted(requirements), host_facts()]).encode()).hexdigest()[:32]

    def run_pip(tmp):
        # pip sees none of the FLAME_* settings (the key among them) and writes to our
        # stderr: stdout is the channel to the parent.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        sys.stderr.write("flame: pip install %s on this host\n" % " ".join(requirements))
        sys.stderr.flush()
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
                               "--disable-pip-version-check", "--target", tmp] + list(requirements),
                              env=env, stdin=subprocess.DEVNULL, stdout=2, stderr=2)
        if done.returncode != 0:
            raise RuntimeError("pip could not install %s on this host (its output is in the "
                               "runner's stderr)" % " ".join(requirements))
    try:
        return _entry(root, name, ".pip-", run_pip)
    except PermissionError as exc:
        raise RuntimeError(str(exc)) from None


def _read_key(settings):
    if settings.get("FLAME_KEY"):
        return bytes.fromhex(settings["FLAME_KEY"])
    with open(settings["FLAME_KEY_FILE"], "rb") as f:
        return bytes.fromhex(f.read().decode().strip())


def _fetch(settings, digests, checks, root, deadline):
    """Ask the parent for each archive in ``digests``; check each against ``checks`` (its
    SHA-256, from the settings) and unpack it as it comes."""
    import time
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    ident = (settings["FLAME_RUNNER_ID"] + "/boot").encode()
    sock.setsockopt(zmq.ROUTING_ID, ident)
    sock.setsockopt(zmq.LINGER, 0)
    key = _read_key(settings)
    server = settings.get("FLAME_CURVE_SERVER")
    if server:
        public, secret = curve_client_keys(key)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server.encode(), public, secret
    sock.connect(settings["FLAME_ADDRESS"])
    try:
        for digest in digests:
            sock.send_multipart([BOOT, digest.encode(), request_mac(key, ident, digest)])
        left = set(digests)
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not sock.poll(int(wait * 1000)):
                raise SystemExit("flame: the parent did not send code archive(s) %s in time"
                                 % ", ".join(d[:12] for d in sorted(left)))
            parts = sock.recv_multipart(copy=False)
            if len(parts) != 3 or parts[0].bytes != BOOT:
                continue
            digest = parts[1].bytes.decode()
            if digest in left:
                install(root, digest, parts[2].buffer, checks[digest])
                left.discard(digest)
    finally:
        sock.close(0)
        ctx.term()


def _import_needs(root, install):
    """Import pyzmq, cloudpickle and psutil as the runner will. Where the parent's compiled
    code does not load here (Slurm: a node unlike the machine that filled the shared cache),
    ``install`` (``install=True``: the requirements, and pip's archive) has pip install them."""
    try:
        for module, _ in NEEDS:
            __import__(module)
        return
    except ImportError as exc:
        failed = (module, exc)
    if not install:
        _unfit("the runner cannot import %s here: %s (pass install=True to the backend to have "
               "this host pip-install it)" % failed)
    sys.stderr.write("flame: cannot import %s here (%s): installing\n" % failed)
    try:
        path = pip_install(root, install["reqs"], [os.path.join(root, install["pip"])] if install.get("pip") else [])
    except RuntimeError as exc:
        _unfit(str(exc))
    sys.path.insert(0, path)
    for name in list(sys.modules):
        if name.split(".")[0] in [m for m, _ in NEEDS]:
            del sys.modules[name]
    try:
        for module, _ in NEEDS:
            __import__(module)
    except ImportError as exc:
        _unfit("the runner cannot import %s here, even installed by pip: %s" % (module, exc))


def settings_from_stdin():
    """``--stdin``: the FLAME_* settings (the key among them) arrive as one JSON line on stdin,
    into ``os.environ``. Used over SSH, where a command line is visible in ``ps`` and servers
    refuse to pass arbitrary environment variables. Read byte by byte up to the newline (a
    buffered reader would swallow what follows): stdin stays open, and the runner watches it
    for EOF, which means its connection is gone."""
    fd, chunks = sys.stdin.fileno(), []
    while True:
        ch = os.read(fd, 1)
        if not ch:
            raise SystemExit("flame: no configuration on stdin")
        if ch == b"\n":
            break
        chunks.append(ch)
    os.environ.update({k: str(v) for k, v in json.loads(b"".join(chunks).decode()).items()})


def main():
    import time
    start = time.monotonic()
    if "--stdin" in sys.argv[1:]:
        settings_from_stdin()
        os.environ["FLAME_WATCH_STDIN"] = "1"
    settings = dict(os.environ)
    boot = json.loads(settings["FLAME_BOOT"])
    _check(boot)
    # flame's own needs the host lacks, or has at another version: the parent's go first.
    dists = [d["h"] for d in boot.get("dists") or () if host_version(d["n"]) != d["v"]]
    try:
        root = trusted_root()
        wanted = [d for d in (boot["flame"], boot.get("code")) if d] + dists
        for d in wanted:
            why = untrusted(os.path.join(root, d))
            if why is not None:
                raise PermissionError("code cache entry: %s: refusing to run code from it" % why)
    except PermissionError as exc:
        _unfit(str(exc))
    missing = [d for d in wanted if not os.path.isdir(os.path.join(root, d))]
    extra = []
    if missing and boot.get("ask") and settings.get("FLAME_WATCH_STDIN"):
        extra = ask(missing, root)
    elif missing:
        if [d for d in missing if d in dists]:
            _unfit("this host lacks %s and there is no way to send them here (no stdin channel, "
                   "and they are not in the cache %s)" % (", ".join(n for _, n in NEEDS), root))
        sys.path[:0] = [os.path.join(root, d) for d in dists]  # pyzmq, to fetch the rest with
        if boot.get("dists") is not None:
            _import_needs(root, boot.get("install"))  # imported now: the check below is free
        _fetch(settings, missing, boot["checks"], root, start + float(settings.get("FLAME_FAILSAFE", "60")))
    # The local code first, then flame, then what the parent sent of flame's needs.
    for d in reversed([os.path.join(root, d) for d in wanted] + extra):
        if d in sys.path:
            sys.path.remove(d)
        sys.path.insert(0, d)
    if boot.get("dists") is not None:
        _import_needs(root, boot.get("install"))
        os.environ["FLAME_DEPS"] = "1"  # the runner's import hook asks the parent (importer.py)
    if boot.get("code"):
        os.environ["FLAME_CODE"] = boot["code"]
    # As if run with -m: by name, not by an import of flame's runner from here (it imports
    # this file's helpers, and would otherwise import the bootstrap that imports it).
    import runpy
    sys.argv[:] = ["flame.node"]
    runpy.run_module("flame.node", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
