"""The data key file: versioned AES-256 keys that encrypt every stored value.

Format (JSON, mode 0600)::

    {"current": 1, "keys": {"1": "<base64 of 32 bytes>"}}

``current`` is the version new writes use; older versions stay in ``keys`` so rows written
before a rotation remain readable. Parsing (:func:`parse_key_file`) is pure; only
:func:`load_or_create_keys` touches the file system.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ztagent import json_input
from ztagent.workloads.storage.errors import KeyFileError

KEY_BYTES = 32
"""AES-256: every data key is 32 bytes."""

KEY_FILE_MODE = 0o600


@dataclass(frozen=True)
class DataKeys:
    """The parsed key file: the version new writes use and every readable version."""

    current: int
    keys: Mapping[int, bytes]

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise ValueError(f"current key version {self.current} is not among the keys")

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current]

    def __repr__(self) -> str:  # never print key material
        return f"DataKeys(current={self.current}, versions={sorted(self.keys)})"


def generate_keys() -> DataKeys:
    """A fresh key set with one random version 1 key."""
    return DataKeys(current=1, keys=MappingProxyType({1: secrets.token_bytes(KEY_BYTES)}))


def serialize_keys(keys: DataKeys) -> bytes:
    doc = {
        "current": keys.current,
        "keys": {str(v): base64.b64encode(k).decode("ascii") for v, k in sorted(keys.keys.items())},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def parse_key_file(data: bytes, path: Path) -> DataKeys:
    """Parses key-file bytes; ``path`` only names the file in error messages."""

    def bad(what: str) -> KeyFileError:
        return KeyFileError("key_file_invalid", f"{path}: {what}")

    try:
        doc = json_input.loads(data, max_depth=None)
    except ValueError as exc:  # also not UTF-8, nested too deep to parse
        raise bad(f"not valid JSON ({exc}); expected {{'current': N, 'keys': {{...}}}}") from None
    if not isinstance(doc, dict):
        raise bad(f"got a JSON {type(doc).__name__}, expected an object")
    unknown = sorted(set(doc) - {"current", "keys"})
    if unknown:
        raise bad(f"unknown field(s) {unknown}; expected only 'current' and 'keys'")
    current = doc.get("current")
    if not isinstance(current, int) or isinstance(current, bool) or current < 1:
        raise bad(f"'current' is {current!r}, expected a positive integer key version")
    raw_keys = doc.get("keys")
    if not isinstance(raw_keys, dict) or not raw_keys:
        raise bad(f"'keys' is {raw_keys!r:.40}, expected a non-empty object of version → key")
    keys: dict[int, bytes] = {}
    for version_text, encoded in raw_keys.items():
        if not version_text.isdigit() or int(version_text) < 1:
            raise bad(f"key version {version_text!r} is not a positive integer")
        if not isinstance(encoded, str):
            raise bad(f"key version {version_text} is a {type(encoded).__name__}, expected base64")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"key version {version_text} is not valid base64") from None
        if len(material) != KEY_BYTES:
            raise bad(f"key version {version_text} is {len(material)} bytes, expected {KEY_BYTES}")
        keys[int(version_text)] = material
    if current not in keys:
        raise bad(f"'current' is {current} but 'keys' holds only versions {sorted(keys)}")
    return DataKeys(current=current, keys=MappingProxyType(keys))


def check_key_file_mode(mode: int, path: Path) -> None:
    """Refuses a key file that is not a regular file or that group or others may access."""
    if not stat.S_ISREG(mode):
        raise KeyFileError("key_file_insecure", f"{path}: not a regular file")
    loose = stat.S_IMODE(mode) & 0o077
    if loose:
        raise KeyFileError(
            "key_file_insecure",
            f"{path}: mode is {stat.S_IMODE(mode):04o}, expected 0600 (no group or other "
            f"access); fix it with: chmod 600 {path}",
        )


def load_or_create_keys(path: Path) -> DataKeys:
    """Reads the key file, creating it (0600, fsynced) with a fresh key if it does not exist."""
    try:
        return _create(path)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        reason = "is a symbolic link (refused)" if exc.errno == errno.ELOOP else exc.strerror
        raise KeyFileError("key_file_invalid", f"{path}: cannot open ({reason})") from None
    with os.fdopen(fd, "rb") as fh:
        check_key_file_mode(os.fstat(fh.fileno()).st_mode, path)
        data = fh.read()
    return parse_key_file(data, path)


def _create(path: Path) -> DataKeys:
    """Writes a new key file atomically: a fsynced temporary file, then link(2) into place.

    ``link`` fails with FileExistsError if the file appeared meanwhile, and a crash never
    leaves a half-written key file behind under the real name.
    """
    if path.exists() or path.is_symlink():
        raise FileExistsError(path)
    keys = generate_keys()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, KEY_FILE_MODE
    )
    try:
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # exact mode whatever the umask
            view = memoryview(serialize_keys(keys))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return keys


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
