"""Files ztagent writes: atomic replacement (temp file in the same directory, fsync, rename,
fsync directory) and appends, neither ever through a symbolic link.

A local attacker who can replace a state or log path with a symlink must not make ztagent
write into the link's target: ``write_atomic`` refuses a path whose final component is a
symlink (``os.replace`` would only replace the link, but a planted link is a sign of
tampering the operator must see), and ``open_append`` opens with ``O_NOFOLLOW``. Both create
files with the given mode whatever the umask (``fchmod`` after creation).
"""

from __future__ import annotations

import contextlib
import errno
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


def refuse_symlink(path: Path) -> None:
    """Raise ``OSError(ELOOP)`` when ``path`` itself is a symbolic link."""
    if path.is_symlink():
        raise OSError(errno.ELOOP, "is a symbolic link (refusing to write through it)", str(path))


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    """Replace ``path`` with ``data``; the file is created with ``mode`` (never wider).
    ``OSError(ELOOP)`` when ``path`` is a symlink."""
    refuse_symlink(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
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


def open_append(path: Path, mode: int = KEY_MODE, *, read: bool = False) -> int:
    """A file descriptor appending to ``path`` (and reading it, with ``read``), never
    through a symlink (``OSError(ELOOP)``).

    A new file is created with ``mode`` whatever the umask; an existing one keeps its mode
    (an operator may have widened it for a log reader group on purpose).
    """
    access = os.O_RDWR if read else os.O_WRONLY
    flags = access | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        try:
            return os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(
                    errno.ELOOP, "is a symbolic link (refusing to write through it)", str(path)
                ) from None
            raise
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def empty_private_dir(directory: Path) -> None:
    """Removes ``directory`` with everything in it and creates it again, empty, mode 0700."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)


def make_private_dir(directory: Path, mode: int = 0o700) -> None:
    """Creates ``directory`` and any missing parent with exactly ``mode`` whatever the umask
    (``Path.mkdir(parents=True)`` gives parents the umask's default, 0777 under umask 0).
    An existing directory, or a symlink to one an operator placed, is left as it is."""
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current):
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # made meanwhile by another process: not ours to chmod
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "is not a directory", str(directory))
