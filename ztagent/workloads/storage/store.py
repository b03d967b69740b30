"""A synchronous, encrypted key-value store over SQLite.

Every value is sealed with AES-256-GCM under the key file's current data key, a fresh 96-bit
random nonce per write, and associated data that binds the namespace, the key name and the
key version: a row edited, or copied to another key or namespace, fails to decrypt and raises
:class:`StorageIntegrityError` instead of returning bytes.

The database runs in WAL mode with ``synchronous=FULL``, so a write that returned survives a
crash or ``kill -9``. One connection is shared under a lock; callers on an event loop run the
methods in a worker thread (the gRPC servicer uses a single-thread executor).
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ztagent import files
from ztagent.errors import ConfigError
from ztagent.workloads.storage.errors import (
    BackendError,
    InvalidRequestError,
    RecordNotFoundError,
    StorageIntegrityError,
)
from ztagent.workloads.storage.keys import DataKeys, load_or_create_keys

log = logging.getLogger(__name__)

DEFAULT_MAX_VALUE_BYTES = 4 * 1024 * 1024
"""Largest value a Put accepts, in bytes (4 MiB)."""
MAX_KEY_BYTES = 1024
"""Largest key name (or List/Watch prefix), in bytes of UTF-8."""
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
NONCE_BYTES = 12

DB_FILE = "storage.db"
KEY_FILE = "storage.key"

_AAD_LABEL = b"ztagent.workloads.storage.v1\x00"
_TOKEN_PREFIX = b"k1:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    namespace   TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    key_version INTEGER NOT NULL,
    nonce       BLOB    NOT NULL,
    ciphertext  BLOB    NOT NULL,
    revision    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0);
"""


class ChangeKind(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class Record:
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Change:
    """A committed write, handed to the ``on_change`` callback in commit order."""

    namespace: str
    kind: ChangeKind
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Page:
    keys: list[str]
    next_page_token: str
    """Empty when this is the last page."""


@dataclass(frozen=True)
class RecordPage:
    records: list[Record]
    last_key: str | None
    """The last key read, to resume from; None when there are no more records."""
    revision: int
    """The store revision this page was read at."""


def validate_key(key: str) -> None:
    """Key names: non-empty, at most 1024 bytes of UTF-8, no NUL."""
    if not key:
        raise InvalidRequestError("invalid_key", "key is empty; expected 1 to 1024 bytes")
    _validate_name("key", "invalid_key", key)


def validate_prefix(prefix: str) -> None:
    """A List/Watch prefix may be empty; otherwise it follows the key rules."""
    _validate_name("prefix", "invalid_prefix", prefix)


def validate_namespace(namespace: str) -> None:
    """Namespaces (device ids): non-empty, at most 1024 bytes of UTF-8, no NUL."""
    if not namespace:
        raise InvalidRequestError("invalid_namespace", "namespace is empty")
    _validate_name("namespace", "invalid_namespace", namespace)


def _validate_name(what: str, code: str, name: str) -> None:
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise InvalidRequestError(
            code, f"{what} is {size} bytes of UTF-8; maximum is {MAX_KEY_BYTES} bytes"
        )
    if "\x00" in name:
        raise InvalidRequestError(code, f"{what} {name[:64]!r} contains a NUL character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(code, f"{what} {name[:64]!r} is not valid UTF-8") from None


def associated_data(namespace: str, key: str, key_version: int) -> bytes:
    """AES-GCM associated data: an unambiguous, length-prefixed (namespace, key, version)."""
    ns = namespace.encode("utf-8")
    k = key.encode("utf-8")
    return b"".join(
        (_AAD_LABEL, struct.pack(">I", len(ns)), ns, struct.pack(">I", len(k)), k),
    ) + struct.pack(">I", key_version)


def encode_page_token(last_key: str) -> str:
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_key.encode("utf-8")).decode("ascii")


def decode_page_token(token: str, prefix: str) -> str:
    """The key a page token resumes after; INVALID_ARGUMENT for anything not ours."""

    def bad(why: str) -> InvalidRequestError:
        return InvalidRequestError(
            "invalid_page_token",
            f"page_token {token[:64]!r} {why}; expected a next_page_token from a previous "
            "List with the same prefix",
        )

    try:
        raw = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        last_key = raw.removeprefix(_TOKEN_PREFIX).decode("utf-8")
    except (binascii.Error, ValueError):
        raise bad("is not a page token") from None
    if not raw.startswith(_TOKEN_PREFIX):
        raise bad("is not a page token")
    try:
        validate_key(last_key)
    except InvalidRequestError:
        raise bad("is not a page token") from None
    if not last_key.startswith(prefix):
        raise bad(f"does not belong to prefix {prefix!r}")
    return last_key


def prefix_upper_bound(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with ``prefix``.

    None when no such bound exists (empty prefix, or only U+10FFFF characters).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # no valid string holds a surrogate: skip them
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


def check_page_size(page_size: int) -> int:
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidRequestError(
            "invalid_page_size",
            f"page_size is {page_size}; expected 1 to {MAX_PAGE_SIZE} "
            f"(0 means the default, {DEFAULT_PAGE_SIZE})",
        )
    return page_size


class Store:
    """Encrypted records, one namespace per device, with a store-wide monotonic revision."""

    def __init__(
        self,
        db_path: Path,
        keys: DataKeys,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        on_change: Callable[[Change], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_value_bytes < 1:
            raise ConfigError(
                "max_value_bytes", f"got {max_value_bytes}, expected a positive number of bytes"
            )
        self.max_value_bytes = max_value_bytes
        self._keys = keys
        self._ciphers = {version: AESGCM(material) for version, material in keys.keys.items()}
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        _touch_private(db_path)  # WAL and shm files inherit the database file's mode
        try:
            self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL").fetchone()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise BackendError("storage_backend", f"{db_path}: cannot open ({exc})") from None
        self._closed = False

    @classmethod
    def open(
        cls,
        data_dir: Path,
        *,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        on_change: Callable[[Change], None] | None = None,
    ) -> Store:
        """Opens (creating if needed, mode 0700) ``data_dir`` with its key file and database."""
        make_private_dir(data_dir)
        keys = load_or_create_keys(data_dir / KEY_FILE)
        return cls(data_dir / DB_FILE, keys, max_value_bytes=max_value_bytes, on_change=on_change)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    # -- writes ---------------------------------------------------------------------------

    def check_value(self, key: str, value: bytes) -> None:
        validate_key(key)
        if len(value) > self.max_value_bytes:
            raise InvalidRequestError(
                "value_too_large",
                f"value for key {key[:64]!r} is {len(value)} bytes; "
                f"maximum is {self.max_value_bytes} bytes",
            )

    def put(self, namespace: str, key: str, value: bytes) -> int:
        """Stores ``value``; returns the revision assigned to the write."""
        return self.put_many(namespace, [(key, value)])[-1]

    def put_many(self, namespace: str, items: Sequence[tuple[str, bytes]]) -> list[int]:
        """Stores every item in one transaction, or none if any is invalid or the write fails."""
        validate_namespace(namespace)
        for key, value in items:
            self.check_value(key, value)
        if not items:
            return []
        version = self._keys.current
        cipher = self._ciphers[version]
        sealed = []
        for key, value in items:
            nonce = secrets.token_bytes(NONCE_BYTES)
            ct = cipher.encrypt(nonce, value, associated_data(namespace, key, version))
            sealed.append((key, nonce, ct))
        now_ms = int(self._clock() * 1000)
        with self._lock, self._transaction() as db:
            revision = self._current_revision(db)
            revisions = []
            for key, nonce, ct in sealed:
                revision += 1
                db.execute(
                    "INSERT INTO records (namespace, key, key_version, nonce, ciphertext,"
                    " revision, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (namespace, key) DO UPDATE SET key_version=excluded.key_version,"
                    " nonce=excluded.nonce, ciphertext=excluded.ciphertext,"
                    " revision=excluded.revision, updated_at=excluded.updated_at",
                    (namespace, key, version, nonce, ct, revision, now_ms),
                )
                revisions.append(revision)
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
            db.execute("COMMIT")
            self._emit(
                Change(namespace, ChangeKind.PUT, key, value, rev)
                for (key, value), rev in zip(items, revisions, strict=True)
            )
        return revisions

    def delete(self, namespace: str, key: str) -> int | None:
        """Deletes ``key``; returns the revision of the delete, or None if it was absent."""
        validate_namespace(namespace)
        validate_key(key)
        with self._lock, self._transaction() as db:
            gone = db.execute(
                "DELETE FROM records WHERE namespace = ? AND key = ?", (namespace, key)
            ).rowcount
            if not gone:
                db.execute("ROLLBACK")
                return None
            revision = self._current_revision(db) + 1
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))
            db.execute("COMMIT")
            self._emit([Change(namespace, ChangeKind.DELETE, key, b"", revision)])
        return revision

    # -- reads ----------------------------------------------------------------------------

    def get(self, namespace: str, key: str) -> Record:
        validate_namespace(namespace)
        validate_key(key)
        with self._lock:
            row = self._query_one(
                "SELECT key_version, nonce, ciphertext, revision FROM records"
                " WHERE namespace = ? AND key = ?",
                (namespace, key),
            )
        if row is None:
            raise RecordNotFoundError(key)
        return self._open_row(namespace, key, *row)

    def list_keys(
        self, namespace: str, prefix: str = "", page_size: int = 0, page_token: str = ""
    ) -> Page:
        """Keys under ``prefix`` in key order, at most ``page_size`` per page."""
        validate_namespace(namespace)
        validate_prefix(prefix)
        size = check_page_size(page_size)
        after = decode_page_token(page_token, prefix) if page_token else None
        with self._lock:
            rows = self._range(namespace, prefix, after, "key", size + 1)
        keys = [row[0] for row in rows]
        more = len(keys) > size
        keys = keys[:size]
        return Page(keys=keys, next_page_token=encode_page_token(keys[-1]) if more else "")

    def scan(self, namespace: str, prefix: str, after: str | None, limit: int) -> RecordPage:
        """Up to ``limit`` decrypted records under ``prefix`` with keys after ``after``."""
        validate_namespace(namespace)
        validate_prefix(prefix)
        with self._lock:
            rows = self._range(
                namespace, prefix, after, "key, key_version, nonce, ciphertext, revision", limit + 1
            )
            revision = self._current_revision(self._db)
        more = len(rows) > limit
        records = [self._open_row(namespace, *row) for row in rows[:limit]]
        return RecordPage(
            records=records, last_key=records[-1].key if more else None, revision=revision
        )

    def namespaces(self, prefix: str = "") -> list[str]:
        """The namespaces holding at least one key under ``prefix``, in order (for readers
        that walk every device's keys, such as the outbox shipper)."""
        validate_prefix(prefix)
        sql = "SELECT DISTINCT namespace FROM records WHERE key >= ?"
        args: list[Any] = [prefix]
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            sql += " AND key < ?"
            args.append(upper)
        with self._lock:
            try:
                rows = self._db.execute(sql + " ORDER BY namespace", args).fetchall()
            except sqlite3.Error as exc:
                raise BackendError("storage_backend", f"read failed ({exc})") from None
        return [str(row[0]) for row in rows]

    def revision(self) -> int:
        with self._lock:
            return self._current_revision(self._db)

    # -- internals ------------------------------------------------------------------------

    def _open_row(
        self, namespace: str, key: str, key_version: Any, nonce: Any, ct: Any, revision: int
    ) -> Record:
        def fail(reason: str) -> StorageIntegrityError:
            log.warning("integrity check failed: namespace=%r key=%r: %s", namespace, key, reason)
            return StorageIntegrityError(key, reason)

        cipher = self._ciphers.get(key_version) if isinstance(key_version, int) else None
        if cipher is None:
            raise fail(f"data key version {key_version!r} is not in the key file")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise fail(f"nonce is not {NONCE_BYTES} bytes")
        if not isinstance(ct, bytes):
            raise fail("ciphertext is not a blob")
        try:
            value = cipher.decrypt(nonce, ct, associated_data(namespace, key, key_version))
        except (InvalidTag, ValueError):
            raise fail("AES-GCM authentication failed") from None
        return Record(key=key, value=value, revision=revision)

    def _range(
        self, namespace: str, prefix: str, after: str | None, columns: str, limit: int
    ) -> list[tuple[Any, ...]]:
        sql = f"SELECT {columns} FROM records WHERE namespace = ? AND key >= ?"  # noqa: S608
        args: list[Any] = [namespace, prefix]
        upper = prefix_upper_bound(prefix)
        if upper is not None:
            sql += " AND key < ?"
            args.append(upper)
        if after is not None:
            sql += " AND key > ?"
            args.append(after)
        sql += " ORDER BY key LIMIT ?"
        args.append(limit)
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise BackendError("storage_backend", f"read failed ({exc})") from None

    def _query_one(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self._db.execute(sql, args).fetchone()
        except sqlite3.Error as exc:
            raise BackendError("storage_backend", f"read failed ({exc})") from None
        return row

    @staticmethod
    def _current_revision(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def _emit(self, changes: Iterable[Change]) -> None:
        if self._on_change is None:
            return
        for change in changes:
            try:
                self._on_change(change)
            except Exception:
                log.exception("change listener failed")


class _Transaction:
    """``BEGIN IMMEDIATE`` … the body commits; an exception rolls back and is wrapped."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise BackendError("storage_backend", f"cannot begin a transaction ({exc})") from None
        return self._db

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise BackendError("storage_backend", f"write failed ({exc})") from None


def make_private_dir(path: Path) -> None:
    """Creates ``path`` with mode 0700 if it is missing (parents too, 0700 whatever the
    umask); ``storage_backend`` naming the path when it cannot."""
    try:
        files.make_private_dir(path)
    except OSError as exc:
        raise BackendError("storage_backend", f"{path}: cannot create ({exc.strerror})") from None


def _touch_private(path: Path) -> None:
    """Creates the database file 0600 (whatever the umask) or opens the existing one, never
    through a symlink: a planted link is refused with ``storage_backend`` naming the path."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            fd = os.open(path, flags)
        else:
            try:
                os.fchmod(fd, 0o600)
            except BaseException:
                os.close(fd)
                raise
    except OSError as exc:
        reason = "is a symbolic link (refused)" if exc.errno == errno.ELOOP else exc.strerror
        raise BackendError("storage_backend", f"{path}: cannot open ({reason})") from None
    os.close(fd)
