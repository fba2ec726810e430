"""Archives: files packed into a deterministic zip named by the SHA-256 of their names and
contents. What code sync sends (the local code, flame's own package) and what travels of an
installed distribution (``deps``) alike; a runner checks what it fetched against ``check``.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from dataclasses import dataclass

_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same files always give the same hash


@dataclass(frozen=True)
class Archive:
    """Files packed into a zip, named by the SHA-256 of their names and contents."""

    #: the name: SHA-256 over each file's name and bytes (the bytecode added to flame's own
    #: archive is left out: marshal's output can differ between processes, the sources cannot)
    digest: str
    data: bytes
    #: archive name -> size in bytes, uncompressed
    files: dict
    #: SHA-256 of ``data``: what a runner checks an archive it fetched against
    check: str = ""


def pack(files: dict, cache: dict | None = None, compiled: bool = False) -> Archive:
    """Zip ``files`` (arcname -> path) deterministically; ``cache`` maps path -> (mtime, size, bytes).

    ``compiled`` adds each module's bytecode, as an unchecked hash-based pyc (PEP 552): valid
    on the runner, whose Python has this one's minor version, whatever the files' times
    there, and its first import need not compile them.
    """
    import zipfile
    buf = io.BytesIO()
    sizes = {}
    content = hashlib.sha256()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for arcname in sorted(files):
            path = files[arcname]
            data = _read(path, cache)
            if data is None:
                continue
            info = zipfile.ZipInfo(arcname, _EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
            sizes[arcname] = len(data)
            content.update(b"%d:%s%d:" % (len(arcname.encode()), arcname.encode(), len(data)))
            content.update(data)
            if compiled and arcname.endswith(".py"):
                pyc = _bytecode(data, path)
                if pyc is not None:
                    head, _, name = arcname.rpartition("/")
                    info = zipfile.ZipInfo(f"{head}/__pycache__/{name[:-3]}.{sys.implementation.cache_tag}.pyc", _EPOCH)
                    info.external_attr = 0o644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    z.writestr(info, pyc)
    data = buf.getvalue()
    return Archive(content.hexdigest(), data, sizes, hashlib.sha256(data).hexdigest())


def _bytecode(source: bytes, path: str) -> bytes | None:
    from importlib.util import MAGIC_NUMBER, source_hash
    import marshal
    try:
        code = compile(source, path, "exec", dont_inherit=True)
    except SyntaxError:
        return None
    # PEP 552 header: magic, flags (0b01: hash-based, not checked), the source's hash.
    return MAGIC_NUMBER + (1).to_bytes(4, "little") + source_hash(source) + marshal.dumps(code)


def _read(path: str, cache: dict | None) -> bytes | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if cache is not None:
        known = cache.get(path)
        if known is not None and known[0] == st.st_mtime_ns and known[1] == st.st_size:
            return known[2]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if cache is not None:
        cache[path] = (st.st_mtime_ns, st.st_size, data)
    return data
