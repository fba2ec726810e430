"""Code sync: the local code a pool's runners on other machines cannot import themselves,
packed into archives named by their SHA-256 (after BEAM's code distribution and FLAME's
``code_sync``).

*Local code* is every top-level module or package that is neither in the standard library
nor in site-packages: those this process has loaded from elsewhere (the notebook's
directory, a project's source tree, editable installs), and the ``*.py`` files and packages
found in the directories on ``sys.path`` that are not install locations (so a module
imported only inside a call travels too). Only sources and package data go in: not
``.git``, virtualenvs, caches, or directories that are not packages.

flame's own package is packed the same way (:func:`flame_archive`): a runner on another
machine boots from it (``flame/node/boot.py``), so hosts never run another version.

Edits are found without reading a file per call: the archive is rebuilt when this process
has imported a module since the last look, or reloaded one (``importlib.reload`` and
``%autoreload`` give a module a new ``__spec__``).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import re
import sys
import threading
from typing import Any, Sequence

from .archive import Archive, pack
from .deps import Deps
from .errors import FlameError

log = logging.getLogger("flame.codesync")

#: Names never packed, wherever they are (matched against each file's and directory's name).
ALWAYS_EXCLUDED = (".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".ipynb_checkpoints",
                   ".mypy_cache", ".pytest_cache", ".ruff_cache", ".tox", ".nox", "node_modules",
                   "*.egg-info", ".venv", "venv", ".DS_Store")
#: Default size limit of the local code, in bytes (before compression).
CODE_LIMIT = 100 * 1024 * 1024
#: Archives kept in memory to serve runners that ask for them (the current ones and a few before).
KEEP = 4


class CodeSyncError(FlameError):
    """The local code cannot be sent: over the size limit, or a path that does not exist."""


def _installed() -> tuple[str, ...]:
    """Directories that hold installed code: the standard library and every site-packages."""
    import site
    import sysconfig
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # pragma: no cover - old virtualenv's site.py
        pass
    paths.add(site.getusersitepackages())
    # also what was installed with --target or put on PYTHONPATH: installed, not local code
    # (flame/deps.py sends it as a distribution)
    paths.update(p for p in sys.path if p and os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"))
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths.add(os.path.join(prefix, "lib"))
    return tuple(sorted(os.path.realpath(p) + os.sep for p in paths if p))


def _patterns(globs: Sequence[str]) -> re.Pattern:
    """One regular expression for all of ``globs`` (fnmatch's, case-sensitive)."""
    import fnmatch
    return re.compile("|".join(fnmatch.translate(g) for g in globs))


def _excluded(name: str, rel: str, patterns: re.Pattern) -> bool:
    return bool(patterns.match(name) or patterns.match(rel))


def _walk(top: str, arcname: str, patterns: re.Pattern, out: dict) -> None:
    """Add ``top`` (a file, or a directory tree) to ``out`` as arcname -> path."""
    if os.path.isfile(top):
        out.setdefault(arcname, top)
        return
    for dirpath, dirs, files in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        base = arcname if rel_dir == "." else f"{arcname}/{rel_dir.replace(os.sep, '/')}"
        dirs[:] = sorted(d for d in dirs if not _excluded(d, f"{base}/{d}", patterns)
                         and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg")))
        for f in sorted(files):
            if not _excluded(f, f"{base}/{f}", patterns):
                out.setdefault(f"{base}/{f}", os.path.join(dirpath, f))


def _where(module: Any) -> str | None:
    """The file of a top-level module, or the directory of a top-level package."""
    path = getattr(module, "__path__", None)
    if path is not None:
        try:
            dirs = list(path)
        except TypeError:
            return None
        return dirs[0] if dirs else None
    return getattr(module, "__file__", None)


_flame: Archive | None = None
_flame_lock = threading.Lock()


def flame_archive() -> Archive:
    """flame's own package, packed once per process: what a runner on another machine boots from."""
    global _flame
    with _flame_lock:
        if _flame is None:
            files: dict = {}
            _walk(os.path.dirname(os.path.abspath(__file__)), "flame", _patterns(ALWAYS_EXCLUDED), files)
            _flame = pack(files, compiled=True)
        return _flame


class LocalCode:
    """The pool's local code, kept current: :meth:`current` is cheap when nothing changed.

    ``paths``: what to send, or None to find the local code. A module file or a package
    directory goes under its own name; any other directory is one to import from, as if on
    ``sys.path`` (its modules and packages go). ``exclude``: further glob patterns to leave
    out. ``limit``: most bytes.
    """

    def __init__(self, paths: Sequence[str] | None = None, exclude: Sequence[str] = (),
                 limit: int = CODE_LIMIT) -> None:
        self.paths = None if paths is None else [os.path.abspath(p) for p in paths]
        for p in self.paths or ():
            if not os.path.exists(p):
                raise CodeSyncError(f"code_sync names {p!r}, which does not exist")
        self.exclude = _patterns(tuple(ALWAYS_EXCLUDED) + tuple(exclude))
        self.limit = limit
        self._lock = threading.Lock()
        self._installed = _installed()
        self._own = os.path.dirname(os.path.abspath(__file__)) + os.sep
        self._contents: dict = {}  # path -> (mtime_ns, size, bytes)
        self._locality: dict = {}  # path -> whether it holds local code
        self._archives: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._current: Archive | None = None
        self._stamps: list = []  # (arcname, path, mtime_ns, size) of the files last packed
        self._seen = -1  # len(sys.modules) at the last look
        self._watched: list = []  # (module, its __spec__) of the local modules loaded here

    def _local(self, path: str | None) -> bool:
        if not path:
            return False
        known = self._locality.get(path)
        if known is None:  # realpath costs a few stats: once per path
            real = os.path.realpath(path)
            known = self._locality[path] = not real.startswith(self._installed) and not (
                real + os.sep).startswith(self._own)
        return known and os.path.exists(path)

    def current(self) -> Archive | None:
        """The archive of the local code as it is now (None when there is none)."""
        with self._lock:
            if len(sys.modules) == self._seen and all(m.__spec__ is s for m, s in self._watched):
                return self._current
            self._seen = len(sys.modules)
            self._watched = [(m, m.__spec__) for m in list(sys.modules.values())
                             if self._local(getattr(m, "__file__", None))]
            archive = self._build()
            if self._current is None or archive.digest != self._current.digest:
                if self._current is not None:
                    log.info("flame: local code changed (%d files, %d bytes packed): runners "
                             "get it before their next call", len(archive.files), len(archive.data))
                self._current = archive
                self._archives[archive.digest] = archive.data
                while len(self._archives) > KEEP:
                    self._archives.popitem(last=False)
            return self._current if self._current.files else None

    def get(self, digest: str) -> bytes | None:
        """The archive named ``digest``, if it is one of this pool's recent ones."""
        with self._lock:
            return self._archives.get(digest)

    def _files(self) -> dict:
        entries: dict = {}  # top-level name -> its file or package directory
        if self.paths is not None:
            for p in self.paths:
                if os.path.isfile(p) or os.path.isfile(os.path.join(p, "__init__.py")):
                    entries.setdefault(os.path.basename(p.rstrip(os.sep)).removesuffix(".py"), p)
                else:  # a directory to import from, as if on sys.path
                    self._importable(p, entries)
        else:
            for name, module in list(sys.modules.items()):  # what this process imported wins
                if "." in name or name in ("__main__", "flame") or name.startswith("__"):
                    continue
                where = _where(module)
                if self._local(where):
                    entries.setdefault(name, where)
            for entry in sys.path:  # then what it could import from local directories
                d = os.path.abspath(entry or os.getcwd())
                if os.path.isdir(d) and self._local(d) and not os.path.exists(os.path.join(d, "pyvenv.cfg")):
                    self._importable(d, entries)
        files: dict = {}
        for name, where in sorted(entries.items()):
            arcname = os.path.basename(where) if os.path.isfile(where) else name
            _walk(where, arcname, self.exclude, files)
        return files

    def _importable(self, d: str, entries: dict) -> None:
        """The modules and packages at the top of directory ``d``, by name, into ``entries``."""
        try:
            children = sorted(os.listdir(d))
        except OSError:
            return
        for child in children:
            path = os.path.join(d, child)
            if child.endswith(".py") and os.path.isfile(path):
                name = child[:-3]
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                name = child
            else:
                continue
            if name != "flame" and name.isidentifier() and not _excluded(child, child, self.exclude):
                entries.setdefault(name, path)

    def _build(self) -> Archive:
        files = self._files()
        sizes, stamps = {}, []
        for arcname, path in sorted(files.items()):
            try:
                st = os.stat(path)
            except OSError:
                continue
            sizes[arcname] = st.st_size
            stamps.append((arcname, path, st.st_mtime_ns, st.st_size))
        if self._current is not None and stamps == self._stamps:
            return self._current  # an import elsewhere: no file changed, nothing to pack
        self._stamps = stamps
        total = sum(sizes.values())
        if total > self.limit:
            largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
            raise CodeSyncError(
                f"the local code to send to runners is {total / 1e6:.1f} MB, over code_limit "
                f"({self.limit / 1e6:.1f} MB). Largest files: "
                + ", ".join(f"{files[a]} ({s / 1e6:.1f} MB)" for a, s in largest)
                + ". Leave them out with code_exclude=[...], name what to send with "
                "code_sync=[...], or raise code_limit.")
        live = set(files.values())
        for path in [p for p in self._contents if p not in live]:
            del self._contents[path]
        return pack(files, self._contents)


class CodeSync:
    """A pool's code sync: what its runners on other machines boot from and get before their
    calls, which archives each host is known to have, and how many bytes went out.

    ``local``: the pool's local code (None: only flame's own package travels). The pool asks
    :meth:`refresh` before it pickles a call, outside its lock; the rest runs on the threads
    that send and receive, and counts under this object's own lock.
    """

    def __init__(self, local: LocalCode | None, deps: Any = None, ask: bool = False) -> None:
        self.local = local
        #: the pool's dependency travel (``deps.Deps``), None with ``deps=False``
        self.deps = deps
        #: the backend answers the bootstrap on the runner's stdin (SSH)
        self.ask = ask
        #: the local code's archive as of the last refresh (None: there is none)
        self.now: Archive | None = local.current() if local is not None else None  # errors at the door
        self._lock = threading.Lock()
        self._hosts: dict[tuple, set] = {}  # (host, cache) -> archives known to be there
        self._sent = 0

    @classmethod
    def for_pool(cls, backend: Any, code_sync: bool | Sequence[str] | None, exclude: Sequence[str],
                 limit: int, deps: bool | None, deps_limit: int) -> CodeSync | None:
        """The code sync of a pool with these options (checked), or None where its runners
        share this machine's files. Local code is found now: what it lacks errs at the door."""
        if not backend.remote:
            return None
        sync = cls(None if code_sync is False else LocalCode(
            None if code_sync is True else list(code_sync), exclude, limit), ask=backend.asks)
        if deps is not False:  # installed packages travel too (deps.py)
            sync.deps = Deps(deps_limit, backend.install, sync.count)
        return sync

    @property
    def bytes_sent(self) -> int:
        """Bytes of code archives sent to runners, flame's own included."""
        return self._sent

    def refresh(self) -> Archive | None:
        """The local code as it is now: cheap unless a module was imported or reloaded."""
        if self.local is not None:
            self.now = self.local.current()
        return self.now

    def code_digest(self) -> str | None:
        return self.now.digest if self.now is not None else None

    def boot_settings(self) -> dict:
        """``FLAME_BOOT`` for a runner that boots from archives it fetches (node/boot.py)."""
        import sys
        flame, code = flame_archive(), self.now
        checks = {a.digest: a.check for a in (flame, code) if a is not None}
        settings = {"flame": flame.digest, "code": code.digest if code else None, "checks": checks,
                    "versions": _versions(), "python": "%d.%d" % sys.version_info[:2], "ask": self.ask}
        if self.deps is not None:
            settings["dists"] = self.deps.boot_entries()
            settings["install"] = self.deps.install_settings()
        return settings

    def boot_answer(self, host: str, request: dict, runner_id: str) -> tuple[dict, list[bytes]]:
        """The answer to a booting runner's request on its stdin channel (``boot.ask``, SSH):
        the code archives it lacks, and the distributions (``deps.Deps.answer``)."""
        need = list(request.get("need", ()))
        items, datas = [], []
        for digest in need:
            data = None if digest.startswith("d-") else self.serve(digest, runner_id)
            if data is not None:
                items.append({"h": digest, "c": hashlib.sha256(data).hexdigest(), "size": len(data)})
                datas.append(data)
        head: dict = {"send": [], "install": [], "error": None}
        if self.deps is not None:
            head, more = self.deps.answer(host, {**request, "need": [d for d in need if d.startswith("d-")]})
            datas += more
        head["send"] = items + head["send"]
        return head, datas

    def serve(self, digest: str, runner_id: str, host: str = "") -> bytes | None:
        """The archive a booting runner asks for by name, if it is flame's or a recent one of
        ours; or the answer to a runner's import hook (``mod:``, ``part:``: ``deps.Deps.serve``)."""
        if digest.startswith(("mod:", "part:")):
            return self.deps.serve(digest, host, runner_id) if self.deps is not None else None
        flame = flame_archive()
        data = flame.data if digest == flame.digest else self.local.get(digest) if self.local else None
        if data is not None:
            self._count(len(data))
            log.info("flame: sent code archive %s (%d bytes) to runner %s", digest[:12], len(data), runner_id)
        return data

    def frames_for(self, archive: Archive, cache: tuple | None, runner_id: str) -> tuple:
        """The frames of a ``code`` message: the archive, or nothing where the runner's host
        (``cache``: host and cache directory) is known to have it already."""
        with self._lock:
            have = self._hosts.setdefault(cache, set()) if cache else set()
            known = archive.digest in have
            have.add(archive.digest)
        if known:
            return ()
        self._count(len(archive.data))
        log.info("flame: sent code archive %s (%d bytes) to runner %s", archive.digest[:12],
                 len(archive.data), runner_id)
        return (archive.data,)

    def host_has(self, cache: tuple | None, digest: str | None) -> None:
        """A runner booted from ``digest`` on the host with ``cache``: later runners there have it."""
        if cache and digest:
            with self._lock:
                self._hosts.setdefault(cache, set()).add(digest)

    def host_lost(self, cache: tuple | None, digest: str | None) -> None:
        """The host with ``cache`` lost archive ``digest`` (its cache was cleaned)."""
        with self._lock:
            self._hosts.get(cache, set()).discard(digest)

    def count(self, n: int) -> None:
        """Add ``n`` bytes sent (installed packages are counted here too: ``deps.py``)."""
        self._count(n)

    def _count(self, n: int) -> None:
        with self._lock:
            self._sent += n


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    """This process's versions of what a runner needs besides the standard library, so that
    a host lacking one is told the exact ``pip install``."""
    from importlib import metadata
    found = {}
    for dist in ("pyzmq", "cloudpickle", "psutil"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def missing_module_hint(name: str | None, host: str, python: str) -> str:
    """What to say when a runner lacks module ``name``: if it is an installed distribution here,
    its version and the command that installs it there; "" otherwise."""
    if not name:
        return ""
    top = name.split(".")[0]
    from importlib import metadata
    try:
        dists = metadata.packages_distributions().get(top) or []
    except Exception:  # a broken distribution's metadata must not hide the real error
        return ""
    if not dists:
        return ""
    dist = dists[0]
    try:
        version = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""
    where = f"{host}" + (f" ({python})" if python else "")
    return (f"; {top} is installed here ({dist} {version}) but not on the runner's host {where}. "
            f"The pool has deps=False, so installed packages are not sent: install it there, for example "
            f"`{python or 'python'} -m pip install '{dist}=={version}'`")
