"""Dependencies travel: the installed distributions a pool's runners on other machines use,
this process's versions, sent where the host lacks them or has another version.

A *distribution* is what pip installed: its files, listed in its ``RECORD``. It is packed
from those files (bytecode left out: the host compiles its own), named by a hash of its
name, version and ``RECORD`` (which holds every file's hash), so it is known by name before
it is packed, and packed only when a host asks for it. Editable installs are left to code
sync: their code is local code.

What goes where:

- flame's own runner-side needs (:data:`flame.node.boot.NEEDS`: pyzmq, cloudpickle, psutil)
  are named in ``FLAME_BOOT``; a host that lacks them, or has another version, gets them
  before the runner imports them: over SSH on the session's own stdin (the bootstrap is
  stdlib only, see ``flame/node/boot.py``), on Slurm in the shared home's cache
  (:meth:`Deps.stage`);
- everything else when the runner first imports it: the runner's import hook
  (``flame/node/importer.py``) asks for each new top-level module, naming the host's
  version; the answer is "use yours" (the host has this version, or it is not installed
  here) or the distribution, in parts. Not at boot: a notebook's kernel has imported
  IPython, jedi, tornado and more that runners never use.

Compiled code is sent only where one of its wheel tags is among the host's
(:func:`host_tags`, from what the host says of itself, with ``packaging.tags``); elsewhere a
backend with ``install=True`` has the host pip-install the exact version, and without it the
runner fails to boot (or the import fails) with an error naming both platforms.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import FlameError

log = logging.getLogger("flame.deps")

#: Default cap on the bytes (unpacked) of the distributions one pool sends to one host.
DEPS_LIMIT = 2 * 1024 ** 3
#: Bytes of an archive per answer of the import hook's fetch (it keeps WINDOW parts in flight).
PART = 4 * 1024 * 1024
#: Transfers larger than this show a progress line (the one ``map`` shows).
SHOW_OVER = 10 * 1024 * 1024
#: Packed archives kept in memory, most recently used last (a host that asks again is served
#: from here; one that has it cached does not ask).
KEEP_BYTES = 1024 ** 3


class DepsError(FlameError):
    """An installed distribution cannot reach a runner: over ``deps_limit``, or compiled for
    another platform than the host's (and the backend cannot install it there)."""


@dataclass(frozen=True)
class Dist:
    """One installed distribution, as its ``RECORD`` lists it."""

    name: str
    version: str
    #: hash of name, version and RECORD: the archive's name, known before packing
    digest: str
    #: archive name (relative to site-packages) -> path
    files: dict = field(repr=False)
    #: its wheel's tags ("cp311-cp311-manylinux_2_17_x86_64"); () when it has no compiled code
    tags: tuple = ()
    #: top-level modules and packages it provides
    top: tuple = ()
    #: bytes, unpacked
    size: int = 0

    def describe(self) -> str:
        return f"{self.name} {self.version}"


def norm(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    import re
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- what is installed here -----------------------------------------------------------
_index_lock = threading.Lock()
_index: tuple[tuple, dict, dict] | None = None  # (stamps, name -> Dist, top-level -> [Dist])


def _site_dirs() -> list[str]:
    import site
    dirs = [p for p in sys.path if p and os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages")]
    try:
        dirs += [d for d in site.getsitepackages() if d not in dirs]
    except AttributeError:  # pragma: no cover - old virtualenv's site.py
        pass
    return [d for d in dirs if os.path.isdir(d)]


def index() -> tuple[dict, dict]:
    """The distributions installed here, by normalised name, and by top-level module. Scanned
    again when a site-packages directory changed (an install or upgrade here adds and removes
    ``*.dist-info`` directories, which changes the directory's mtime): the next runner, and
    the next import on a running one, get the new version."""
    global _index
    dirs = _site_dirs()
    stamps = tuple((d, os.stat(d).st_mtime_ns) for d in dirs)
    with _index_lock:
        if _index is not None and _index[0] == stamps:
            return _index[1], _index[2]
        by_name: dict = {}
        by_top: dict = collections.defaultdict(list)
        from importlib import metadata
        for dist in metadata.distributions(path=dirs):
            d = _describe(dist)
            if d is not None and norm(d.name) not in by_name:  # the first on the path wins, as for imports
                by_name[norm(d.name)] = d
                for top in d.top:
                    by_top[top].append(d)
        _index = (stamps, by_name, dict(by_top))
        return by_name, _index[2]


def _describe(dist: Any) -> Dist | None:
    """A :class:`Dist` for an installed distribution, or None for one that cannot travel (no
    RECORD, an editable install, flamebook itself)."""
    import json
    try:
        name, version = dist.metadata["Name"], dist.version
        record = dist.read_text("RECORD")
    except Exception:
        return None
    if not name or not version or not record or norm(name) == "flamebook":
        return None
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    if direct.get("dir_info", {}).get("editable"):
        return None
    base = os.path.realpath(str(dist.locate_file("")))
    files, size, top, compiled = {}, 0, set(), False
    for entry in dist.files or ():
        parts = entry.parts
        if not parts or ".." in parts or "__pycache__" in parts or entry.name.endswith((".pyc", ".pyo")):
            continue  # scripts in ../../bin, and bytecode (the host compiles its own)
        path = os.path.join(base, *parts)
        arcname = "/".join(parts)
        files[arcname] = path
        size += entry.size or 0
        first = parts[0]
        if not first.endswith((".dist-info", ".data", ".pth")) and first != "__pycache__":
            top.add(first[:-3] if first.endswith(".py") else first.split(".")[0])
        compiled = compiled or entry.name.endswith((".so", ".pyd", ".dylib"))
    tags: tuple = ()
    if compiled:
        wheel = dist.read_text("WHEEL") or ""
        tags = tuple(sorted({t for line in wheel.splitlines() if line.startswith("Tag:")
                             for t in _expand(line.split(":", 1)[1].strip())})) or ("unknown",)
    digest = hashlib.sha256(f"{norm(name)}=={version}\n".encode() + record.encode()).hexdigest()
    return Dist(name, version, "d-" + digest[:40], files, tags, tuple(sorted(t for t in top if t.isidentifier())), size)


def _expand(tag: str) -> list[str]:
    """A compressed tag set ("cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64") as single tags."""
    try:
        interp, abi, plat = tag.split("-")
    except ValueError:
        return []
    return [f"{i}-{a}-{p}" for i in interp.split(".") for a in abi.split(".") for p in plat.split(".")]


# ---- which hosts can run which compiled code ------------------------------------------------
def host_tags(facts: dict) -> frozenset:
    """The wheel tags a host supports, from what it says of itself (``boot.host_facts``)."""
    from packaging import tags

    from .node.boot import host_facts
    if facts == host_facts():
        return frozenset(str(t) for t in tags.sys_tags())
    major, minor = (int(x) for x in facts["python"].split("."))
    interp = f"cp{major}{minor}"
    arch = facts["machine"]
    if facts["system"] == "linux":
        libc, _, version = facts["libc"].partition(" ")
        platforms = _linux_platforms(arch, libc, version)
    else:
        platforms = [facts["platform"].replace("-", "_").replace(".", "_")]
    found = [*tags.cpython_tags((major, minor), [interp + facts.get("abiflags", "")], platforms),
             *tags.compatible_tags((major, minor), interp, platforms)]
    return frozenset(str(t) for t in found)


def _linux_platforms(arch: str, libc: str, version: str) -> list[str]:
    """manylinux (glibc) or musllinux tags for a Linux host, newest first, then plain linux."""
    out = []
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        major = minor = -1
    if libc == "glibc" and major == 2:
        out += [f"manylinux_2_{m}_{arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        out += [f"{name}_{arch}" for at, name in legacy.items() if minor >= at]
    elif libc == "musl" and major == 1:
        out += [f"musllinux_1_{m}_{arch}" for m in range(minor, -1, -1)]
    return out + [f"linux_{arch}"]


def describe_host(facts: dict) -> str:
    libc = f", {facts['libc']}" if facts.get("libc") else ""
    return f"{facts['system']} {facts['machine']}{libc}, CPython {facts['python']}"


def fits(dist: Dist, supported: frozenset) -> bool:
    return not dist.tags or any(t in supported for t in dist.tags)


# ---- packing ------------------------------------------------------------------------
@dataclass(frozen=True)
class Packed:
    dist: Dist
    data: bytes
    #: SHA-256 of ``data``
    check: str


_packed: collections.OrderedDict[str, Packed] = collections.OrderedDict()
_pack_lock = threading.Lock()


def packed(dist: Dist) -> Packed:
    """``dist`` zipped (once per process while it stays among the KEEP_BYTES recently used)."""
    from .archive import pack
    with _pack_lock:
        known = _packed.get(dist.digest)
        if known is not None:
            _packed.move_to_end(dist.digest)
            return known
    started = time.monotonic()
    archive = pack(dist.files)
    p = Packed(dist, archive.data, archive.check)
    log.info("flame: packed %s (%d files, %.1f MB, %.1f MB zipped) in %.2f s", dist.describe(),
             len(archive.files), dist.size / 1e6, len(p.data) / 1e6, time.monotonic() - started)
    with _pack_lock:
        _packed[dist.digest] = p
        while sum(len(x.data) for x in _packed.values()) > KEEP_BYTES and len(_packed) > 1:
            _packed.popitem(last=False)
    return p


# ---- a pool's side ------------------------------------------------------------------
class Deps:
    """A pool's dependency travel: what its runners' hosts are sent, counted against
    ``limit`` per host, with a progress line for big transfers.

    ``count(n)``: adds ``n`` bytes to the pool's ``code_bytes_sent``. ``install``: whether
    the backend has hosts pip-install what does not fit them (``install=True``).
    """

    def __init__(self, limit: int, install: bool, count: Callable[[int], None]) -> None:
        self.limit = limit
        self.install = install
        self._count = count
        self._lock = threading.Lock()
        self._sent: dict = collections.defaultdict(dict)  # host -> digest -> bytes unpacked

    # ---- at boot ---------------------------------------------------------------------
    def boot_entries(self) -> list[dict]:
        """``FLAME_BOOT["dists"]``: flame's runner-side needs, this process's versions."""
        from .node.boot import NEEDS
        by_name, _ = index()
        out = []
        for _, name in NEEDS:
            d = by_name.get(norm(name))
            if d is not None:
                out.append({"n": d.name, "v": d.version, "h": d.digest})
        return out

    def install_settings(self) -> dict | None:
        """``FLAME_BOOT["install"]`` with ``install=True``: what a host pip-installs where
        flame's compiled needs from the cache do not load (the bootstrap's last resort), and
        pip's archive to do it with."""
        if not self.install:
            return None
        from .node.boot import NEEDS
        by_name, _ = index()
        compiled = [by_name[norm(n)] for _, n in NEEDS if norm(n) in by_name and by_name[norm(n)].tags]
        pip = by_name.get("pip")
        return {"reqs": [f"{d.name}=={d.version}" for d in compiled], "pip": pip.digest if pip else None}

    def answer(self, host: str, request: dict) -> tuple[dict, list[bytes]]:
        """What a booting runner asked for on its stdin channel (SSH): ``request`` names the
        archives it lacks (``need``) and what the host is (``facts``). Returns the answer's
        head and the archives' bytes, in order; the head's ``error`` says why it cannot boot."""
        by_digest = {d.digest: d for d in index()[0].values()}
        facts = request.get("facts") or {}
        wanted = [by_digest[h] for h in request.get("need", ()) if h in by_digest]
        send, install, error = self.plan(host, wanted, facts)
        self._count(sum(len(p.data) for p in send))
        for p in send:
            log.info("flame: sent %s (%d bytes) to %s", p.dist.describe(), len(p.data), host)
        return {"send": [{"h": p.dist.digest, "c": p.check, "size": len(p.data), "pip": p.dist.name == "pip"}
                         for p in send], "install": install, "error": error}, [p.data for p in send]

    def plan(self, host: str, wanted: list[Dist], facts: dict) -> tuple[list[Packed], list[str], str | None]:
        """Which of ``wanted`` are sent packed, which the host pip-installs, or the error."""
        supported = host_tags(facts) if facts else frozenset()
        unfit = [d for d in wanted if facts and not fits(d, supported)]
        if unfit and not self.install:
            d = unfit[0]
            return [], [], (
                f"{d.describe()} has compiled code built for {', '.join(d.tags[:3])} (this machine: "
                f"{describe_host(_own_facts())}), which does not fit the runner's host {host} "
                f"({describe_host(facts)}). Pass install=True to the backend to have the host "
                f"pip-install {d.name}=={d.version}, or install it there yourself.")
        go = [d for d in wanted if d not in unfit]
        error = self._over_limit(host, go)
        if error:
            return [], [], error
        install = [f"{d.name}=={d.version}" for d in unfit]
        if install:
            pip = index()[0].get("pip")
            if pip is not None and pip not in go:
                go.append(pip)  # the host may have no pip of its own (a venv --without-pip)
        return [packed(d) for d in go], install, None

    def _over_limit(self, host: str, dists: list[Dist]) -> str | None:
        with self._lock:
            sent = self._sent[host]
            total = sum(sent.values()) + sum(d.size for d in dists if d.digest not in sent)
            if total <= self.limit:
                for d in dists:
                    sent[d.digest] = d.size
                return None
        largest = sorted(dists, key=lambda d: -d.size)[:4]
        return (f"the installed packages to send to {host} are {total / 1e6:.0f} MB, over deps_limit "
                f"({self.limit / 1e6:.0f} MB). Largest: " + ", ".join(f"{d.describe()} ({d.size / 1e6:.0f} MB)" for d in largest)
                + ". Install them on the host, raise deps_limit, or pass deps=False to use the host's own packages.")

    def stage(self, root: str) -> None:
        """Put flame's runner-side needs into the cache ``root`` that the runners' hosts share
        with this one (Slurm: the home directory), where they find them at boot. Raises
        DepsError past the limit."""
        from .node.boot import install, untrusted
        by_name, _ = index()
        by_digest = {d.digest: d for d in by_name.values()}
        digests = [e["h"] for e in self.boot_entries()]
        if self.install and "pip" in by_name:
            digests.append(by_name["pip"].digest)  # to install with, where the host has none
        wanted = [by_digest[h] for h in digests if h in by_digest and not os.path.isdir(os.path.join(root, h))]
        error = self._over_limit("the shared cache " + root, wanted)
        if error:
            raise DepsError(error)
        for d in wanted:
            why = untrusted(root)
            if why is not None:
                raise PermissionError(f"the code cache {why}: refusing to put code there")
            p = packed(d)
            install(root, d.digest, p.data, p.check)
            self._count(len(p.data))

    # ---- while runners run: the import hook --------------------------------------------
    def serve(self, ref: str, host: str, runner_id: str) -> bytes | None:
        """The answer to one request of a runner's import hook (``flame/node/importer.py``):
        ``mod:NAME HAVE`` (a head, JSON) or ``part:DIGEST:I`` (part I of that archive)."""
        import json
        if ref.startswith("mod:"):
            name, _, asked = ref[4:].partition(" ")
            asked = json.loads(asked or "{}")
            return json.dumps(self._module(name, asked.get("have") or {}, asked.get("facts") or {}, host)).encode()
        if ref.startswith("part:"):
            digest, _, i = ref[5:].rpartition(":")
            with _pack_lock:
                p = _packed.get(digest)
            if p is None:  # packed for the head, and dropped since (KEEP_BYTES): pack it again
                d = next((d for d in index()[0].values() if d.digest == digest), None)
                p = packed(d) if d is not None else None
            if p is None or not i.isdigit():
                return None
            at = int(i) * PART
            chunk = p.data[at:at + PART]
            self._count(len(chunk))
            self._show(p, runner_id, at + len(chunk))
            return chunk
        return None

    def _module(self, name: str, have: dict, facts: dict, host: str) -> dict:
        """Which distributions provide top-level module ``name`` here, and which of them the
        runner must fetch (``have``: the host's versions of those it has; ``facts``: what the
        host is, for compiled code)."""
        _, by_top = index()
        dists = by_top.get(name, [])
        if not dists:
            return {"use": "host"}  # not installed here: the host's own, or ModuleNotFoundError
        fetch = [d for d in dists if have.get(norm(d.name)) != d.version]
        if not fetch:
            return {"use": "host"}
        send, install, error = self.plan(host, fetch, facts)
        if error:
            return {"error": error}
        return {"use": "ours", "install": install,
                "get": [{"n": p.dist.name, "v": p.dist.version, "h": p.dist.digest, "c": p.check,
                         "size": len(p.data), "parts": -(-len(p.data) // PART), "pip": p.dist.name == "pip"}
                        for p in send]}

    # ---- showing big transfers ----------------------------------------------------------------
    def _show(self, p: Packed, runner_id: str, done: int) -> None:
        if len(p.data) <= SHOW_OVER:
            return
        Transfer.get(f"{p.dist.describe()} to runner {runner_id}", len(p.data)).update(done)


def _own_facts() -> dict:
    from .node.boot import host_facts
    return host_facts()


class Transfer:
    """The progress line of one big transfer ("sending numpy 2.4.6 to runner r1: 12/40 MB, 30 MB/s")."""

    _live: dict = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, title: str, total: int) -> "Transfer":
        with cls._lock:
            t = cls._live.get(title)
            if t is None:
                t = cls._live[title] = cls(title, total)
            return t

    def __init__(self, title: str, total: int) -> None:
        from . import progress
        self.title, self.total = title, total
        self.started = time.monotonic()
        self.shown_at = 0.0
        self.line = progress.make()

    def update(self, done: int) -> None:
        final = done >= self.total
        now = time.monotonic()
        if self.line is not None and (final or now - self.shown_at >= 0.25):
            self.shown_at = now
            rate = done / max(now - self.started, 1e-6)
            try:
                self.line.update(f"sending {self.title}: {done / 1e6:.1f}/{self.total / 1e6:.1f} MB, "
                                 f"{rate / 1e6:.1f} MB/s", final)
            except Exception:
                pass
        if final:
            with self._lock:
                self._live.pop(self.title, None)
