"""Keys: made fresh for each pool and served app, written only into files no one else can read.

Shared by the parent side (pools, backends, ``serve``) and the node side (reading a key
file); keep it light.
"""
from __future__ import annotations

import os

#: Bytes of each pool's (and each served app's) key.
KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh random key."""
    return os.urandom(KEY_BYTES)


def write_private(path: str, text: str, replace: bool = True) -> None:
    """Write ``text`` to a new file at ``path`` that only this user can read (mode 0600).

    The file is created with ``O_EXCL``, so it is never one that already existed: not a file
    whose looser mode ``O_CREAT`` would keep, and not a symlink planted to lead elsewhere.
    An existing entry at ``path`` is removed first with ``replace`` (it is replaced, never
    written through); without, FileExistsError.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        if not replace:
            raise
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did, before a byte is written
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def read_private(path: str) -> bytes:
    """The bytes of ``path``, if it is this user's own regular file that nobody else can read
    or write; PermissionError saying which it is not otherwise. Checked on the open file (not
    a symlink), so the file checked is the file read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        import stat
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise PermissionError(f"{path} belongs to another user (uid {st.st_uid}): refused, "
                                  "since what it names would run this user's code")
        if st.st_mode & 0o077:
            raise PermissionError(f"{path} can be read or written by other users (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}): refused; flame writes these 0600")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def read_key(env: dict[str, str]) -> bytes:
    """The key from FLAME_KEY (hex) or the file FLAME_KEY_FILE names."""
    key = env.get("FLAME_KEY")
    if key:
        return bytes.fromhex(key)
    path = env.get("FLAME_KEY_FILE")
    if path:
        return bytes.fromhex(read_private(path).decode().strip())
    raise SystemExit("flame.node: no key (set FLAME_KEY or FLAME_KEY_FILE)")
