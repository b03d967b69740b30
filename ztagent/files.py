"""Atomic file writes: temp file in the same directory, fsync, rename, fsync directory."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

KEY_MODE = 0o600
PUBLIC_MODE = 0o644

FileStamp = tuple[int, int, int]
"""(mtime_ns, size, inode): changes when a file is rewritten or replaced."""


def file_stamp(path: Path) -> FileStamp | None:
    """The file's ``FileStamp``; None when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Replace ``path`` with ``data``; the file is created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; keys stay 0600 either way
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def empty_private_dir(directory: Path) -> None:
    """Removes ``directory`` with everything in it and creates it again, empty, mode 0700."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
