"""The CA's state in a database: SQLite by default, PostgreSQL for several replicas.

What the CA must remember — every certificate it issued (serial, kind, device id, notAfter,
AK name where TPM-bound), every revocation, the CRL number and the latest signed CRLs, and
the bootstrap tokens already redeemed — lives behind ``CaDatabase``. Two engines implement
it with the same SQL:

- **SQLite** (``sqlite3``, WAL, ``synchronous=FULL``), ``<ca dir>/ca.db``: the embedded
  default. Writers serialise on ``BEGIN IMMEDIATE``, so ``ca serve`` and a ``ca revoke`` run
  beside it are safe.
- **PostgreSQL** (psycopg 3), ``--db postgresql://...``: several ``ca serve`` replicas share
  one database. One-time use and uniqueness are the database's job: a primary key and
  ``INSERT ... ON CONFLICT DO NOTHING`` (a token redeemed at two replicas at once is inserted
  once), and the CRL number is an ``UPDATE ... RETURNING`` on one row, so concurrent
  revocations get distinct, increasing numbers and each CRL lists every revocation committed
  before its number was taken.

Each operation costs a few indexed statements, whatever the fleet size (the JSON file it
replaces was parsed and rewritten whole on every issuance). The schema is versioned
(``MIGRATIONS``), migrated at open; on PostgreSQL under an advisory lock, so replicas that
start together migrate once. Serial numbers are stored as lowercase hex (they exceed 64
bits), times as RFC 3339 UTC text (which sorts by time).

The audit chain is not here: each CA process appends to its own ``audit.jsonl`` with signed
checkpoints (``ztagent.ca.audit``), so every replica's history verifies on its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ztagent.pki.errors import CaError
from ztagent.timefmt import parse_rfc3339, rfc3339

log = logging.getLogger("ztagent.ca")

DB_FILE = "ca.db"
CRLS_KEPT = 8
"""Signed CRLs kept (the newest is served; a few older ones for inspection)."""
_PG_MIGRATION_LOCK = 0x7A74_6361  # "ztca": pg_advisory_xact_lock key

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            "CREATE TABLE issued (serial TEXT PRIMARY KEY, kind TEXT NOT NULL, device_id TEXT,"
            " not_after TEXT NOT NULL, ak_name TEXT, issued_at TEXT NOT NULL)",
            "CREATE INDEX issued_device ON issued (device_id)",
            "CREATE TABLE revoked (serial TEXT PRIMARY KEY REFERENCES issued (serial),"
            " revoked_at TEXT NOT NULL)",
            "CREATE TABLE used_tokens (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL)",
            "CREATE INDEX used_tokens_expiry ON used_tokens (expires_at)",
            "CREATE TABLE crls (number BIGINT PRIMARY KEY, pem TEXT NOT NULL,"
            " next_update TEXT NOT NULL)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class IssuedEntry:
    serial: int
    kind: str
    """``server`` or ``device``."""
    device_id: str | None
    not_after: datetime
    ak_name: str | None = None


@dataclass(frozen=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime


_SET_TRUST_DOMAIN = "INSERT INTO meta (key, value) VALUES ('trust_domain', ?)"
_INSERT_ISSUED = (
    "INSERT INTO issued (serial, kind, device_id, not_after, ak_name, issued_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _issued_row(entry: IssuedEntry, now: datetime) -> tuple[object, ...]:
    return (
        _hex(entry.serial), entry.kind, entry.device_id, rfc3339(entry.not_after),
        entry.ak_name, rfc3339(now),
    )  # fmt: skip


def _hex(serial: int) -> str:
    return format(serial, "x")


class CaDatabase(ABC):
    """The CA's state; one per process, safe to share between threads."""

    location: str

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trust_domain: str | None = None

    # --- engine ------------------------------------------------------------------------

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[Any]:
        """A cursor inside one transaction (committed on exit, rolled back on error)."""

    @abstractmethod
    def _sql(self, statement: str) -> str:
        """``statement`` with ``?`` placeholders in the engine's own style."""

    @abstractmethod
    def close(self) -> None: ...

    def _run(self, cur: Any, statement: str, args: Sequence[object] = ()) -> Any:
        cur.execute(self._sql(statement), tuple(args))
        return cur

    def _migrate(self, cur: Any, version: int) -> None:
        for target, statements in MIGRATIONS:
            if target <= version:
                continue
            for statement in statements:
                cur.execute(statement)
            self._run(cur, "UPDATE schema_version SET version = ?", (target,))
            log.info("CA database %s migrated to schema version %d", self.location, target)

    # --- the CA ------------------------------------------------------------------------

    def initialise(self, trust_domain: str, *, replace: bool = False) -> None:
        """A new CA: its trust domain, CRL number 0, nothing issued. ``replace`` empties
        an existing one (``ca init --force``)."""
        with self._transaction() as cur:
            if self._run(cur, "SELECT value FROM meta WHERE key = 'trust_domain'").fetchone():
                if not replace:
                    raise CaError("ca_exists", f"{self.location} already holds a CA")
                for table in ("revoked", "issued", "used_tokens", "crls", "counters", "meta"):
                    self._run(cur, f"DELETE FROM {table}")  # noqa: S608 (fixed names)
            self._run(
                cur, "INSERT INTO meta (key, value) VALUES ('trust_domain', ?)", (trust_domain,)
            )
            self._run(cur, "INSERT INTO counters (name, value) VALUES ('crl_number', 0)")
        self._trust_domain = trust_domain

    def trust_domain(self) -> str:
        if self._trust_domain is None:
            with self._transaction() as cur:
                row = self._run(cur, "SELECT value FROM meta WHERE key = 'trust_domain'").fetchone()
            if row is None:
                raise CaError("ca_missing", f"no CA in {self.location} (run `ztagent ca init`)")
            self._trust_domain = str(row[0])
        return self._trust_domain

    def record_issued(
        self, entry: IssuedEntry, now: datetime, *, token: tuple[str, int] | None = None
    ) -> bool:
        """Record a certificate. With ``token`` (jti, exp) the bootstrap token is consumed in
        the same transaction: False, and nothing recorded, when it was already used (the
        certificate must then not be handed out). A replica that dies between the two can
        never leave a token spent without its certificate, or the reverse."""
        with self._transaction() as cur:
            if token is not None:
                jti, expires_at = token
                inserted = self._run(
                    cur,
                    "INSERT INTO used_tokens (jti, expires_at) VALUES (?, ?)"
                    " ON CONFLICT (jti) DO NOTHING",
                    (jti, expires_at),
                ).rowcount
                if inserted != 1:
                    return False
            self._run(cur, _INSERT_ISSUED, _issued_row(entry, now))
        return True

    def record_issued_many(self, entries: Sequence[IssuedEntry], now: datetime) -> None:
        """Bulk insert (imports and benchmarks)."""
        with self._transaction() as cur:
            cur.executemany(self._sql(_INSERT_ISSUED), [_issued_row(e, now) for e in entries])

    def record_revoked_many(self, entries: Sequence[RevokedEntry]) -> None:
        """Bulk insert of revocations without numbering a CRL (imports and benchmarks)."""
        with self._transaction() as cur:
            cur.executemany(
                self._sql(
                    "INSERT INTO revoked (serial, revoked_at) VALUES (?, ?)"
                    " ON CONFLICT (serial) DO NOTHING"
                ),
                [(_hex(r.serial), rfc3339(r.revoked_at)) for r in entries],
            )

    def issued(self, serial: int) -> IssuedEntry | None:
        with self._transaction() as cur:
            row = self._run(
                cur,
                "SELECT kind, device_id, not_after, ak_name FROM issued WHERE serial = ?",
                (_hex(serial),),
            ).fetchone()
        if row is None:
            return None
        return IssuedEntry(serial, row[0], row[1], parse_rfc3339(row[2]), row[3])

    def counts(self) -> tuple[int, int]:
        """(certificates issued, revoked)."""
        with self._transaction() as cur:
            issued = self._run(cur, "SELECT COUNT(*) FROM issued").fetchone()[0]
            revoked = self._run(cur, "SELECT COUNT(*) FROM revoked").fetchone()[0]
        return int(issued), int(revoked)

    def revocation(self, serial: int) -> datetime | None:
        with self._transaction() as cur:
            row = self._run(
                cur, "SELECT revoked_at FROM revoked WHERE serial = ?", (_hex(serial),)
            ).fetchone()
        return None if row is None else parse_rfc3339(row[0])

    def revoke(self, serial: int, at: datetime) -> tuple[int, dict[int, datetime]]:
        """Record the revocation (a second one keeps the first date) and take the next CRL
        number; return it with every revocation, for the CRL to sign. ``cert_not_found``
        when this CA never issued ``serial``."""
        with self._transaction() as cur:
            if (
                self._run(cur, "SELECT 1 FROM issued WHERE serial = ?", (_hex(serial),)).fetchone()
                is None
            ):
                raise CaError(
                    "cert_not_found",
                    f"serial {_hex(serial)} was not issued by this CA (not in {self.location})",
                )
            self._run(
                cur,
                "INSERT INTO revoked (serial, revoked_at) VALUES (?, ?)"
                " ON CONFLICT (serial) DO NOTHING",
                (_hex(serial), rfc3339(at)),
            )
            return self._next_crl(cur)

    def next_crl(self) -> tuple[int, dict[int, datetime]]:
        """The next CRL number and every revocation (a re-signing with nothing new)."""
        with self._transaction() as cur:
            return self._next_crl(cur)

    def _next_crl(self, cur: Any) -> tuple[int, dict[int, datetime]]:
        # The UPDATE locks the counter row until commit: a concurrent revocation waits, and
        # whoever numbers after it reads its row.
        number = self._run(
            cur,
            "UPDATE counters SET value = value + 1 WHERE name = 'crl_number' RETURNING value",
        ).fetchone()
        if number is None:
            raise CaError("ca_missing", f"no CA in {self.location} (run `ztagent ca init`)")
        rows = self._run(cur, "SELECT serial, revoked_at FROM revoked").fetchall()
        return int(number[0]), {int(s, 16): parse_rfc3339(t) for s, t in rows}

    def store_crl(self, number: int, pem: bytes, next_update: datetime) -> None:
        with self._transaction() as cur:
            self._run(
                cur,
                "INSERT INTO crls (number, pem, next_update) VALUES (?, ?, ?)"
                " ON CONFLICT (number) DO NOTHING",
                (number, pem.decode("ascii"), rfc3339(next_update)),
            )
            self._run(cur, "DELETE FROM crls WHERE number <= ?", (number - CRLS_KEPT,))

    def latest_crl(self) -> tuple[int, bytes] | None:
        """The CRL with the highest number any replica signed."""
        with self._transaction() as cur:
            row = self._run(
                cur, "SELECT number, pem FROM crls ORDER BY number DESC LIMIT 1"
            ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]).encode("ascii"))

    def consume_token(self, jti: str, expires_at: int, now: int) -> bool:
        """Mark a bootstrap token used; False when it already was (here or at any replica).
        Entries past their expiry (plus a day) are dropped: such a token is refused as
        expired anyway."""
        with self._transaction() as cur:
            self._run(cur, "DELETE FROM used_tokens WHERE expires_at < ?", (now - 86400,))
            inserted = self._run(
                cur,
                "INSERT INTO used_tokens (jti, expires_at) VALUES (?, ?)"
                " ON CONFLICT (jti) DO NOTHING",
                (jti, expires_at),
            ).rowcount
        return bool(inserted == 1)

    def token_used(self, jti: str) -> bool:
        with self._transaction() as cur:
            row = self._run(cur, "SELECT 1 FROM used_tokens WHERE jti = ?", (jti,)).fetchone()
        return row is not None

    def import_state(
        self,
        trust_domain: str,
        crl_number: int,
        issued: Sequence[IssuedEntry],
        revoked: Sequence[RevokedEntry],
        tokens: dict[str, int],
        now: datetime,
    ) -> None:
        """Everything a file CA knew, in one transaction (``ca migrate --from-json``)."""
        with self._transaction() as cur:
            if self._run(cur, "SELECT 1 FROM meta WHERE key = 'trust_domain'").fetchone():
                raise CaError("ca_exists", f"{self.location} already holds a CA")
            self._run(
                cur, "INSERT INTO meta (key, value) VALUES ('trust_domain', ?)", (trust_domain,)
            )
            self._run(
                cur, "INSERT INTO counters (name, value) VALUES ('crl_number', ?)", (crl_number,)
            )
            cur.executemany(self._sql(_INSERT_ISSUED), [_issued_row(e, now) for e in issued])
            cur.executemany(
                self._sql("INSERT INTO revoked (serial, revoked_at) VALUES (?, ?)"),
                [(_hex(r.serial), rfc3339(r.revoked_at)) for r in revoked],
            )
            cur.executemany(
                self._sql("INSERT INTO used_tokens (jti, expires_at) VALUES (?, ?)"),
                sorted(tokens.items()),
            )
        self._trust_domain = trust_domain


class SqliteDatabase(CaDatabase):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.location = str(path)
        self._path = path
        self._local = threading.local()
        _create_private(path)
        with self._transaction() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise CaError(
                    "ca_state_invalid",
                    f"{path} has schema version {version}; this ztagent knows up to "
                    f"{SCHEMA_VERSION} (upgrade ztagent)",
                )
            self._migrate(cur, version)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.Error as exc:
                raise CaError("ca_unavailable", f"{self._path}: {exc}") from None
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise CaError("ca_unavailable", f"{self._path}: {exc}") from None
        cur = conn.cursor()
        try:
            yield cur
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise CaError("ca_state_invalid", f"{self._path}: {exc}") from None
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise CaError("ca_unavailable", f"{self._path}: commit failed: {exc}") from None
        finally:
            cur.close()

    def _sql(self, statement: str) -> str:
        return statement

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class PostgresDatabase(CaDatabase):
    """One connection per thread, reconnected after the server went away."""

    def __init__(self, dsn: str) -> None:
        super().__init__()
        import psycopg

        self._psycopg = psycopg
        self._dsn = dsn
        self.location = _redacted(dsn)
        self._local = threading.local()
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_MIGRATION_LOCK,))
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = cur.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                cur.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise CaError(
                    "ca_state_invalid",
                    f"{self.location} has schema version {version}; this ztagent knows up to "
                    f"{SCHEMA_VERSION} (upgrade ztagent)",
                )
            self._migrate(cur, version)

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            try:
                conn = self._psycopg.connect(self._dsn, connect_timeout=10)
            except self._psycopg.Error as exc:
                raise CaError("ca_unavailable", f"{self.location}: {_one_line(exc)}") from None
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Any]:
        psycopg = self._psycopg
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError as exc:
            raise CaError("ca_unavailable", f"{self.location}: {_one_line(exc)}") from None
        except psycopg.Error as exc:
            raise CaError("ca_state_invalid", f"{self.location}: {_one_line(exc)}") from None

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _create_private(path: Path) -> None:
    """The database file, made 0600 whatever the umask (SQLite gives its -wal and -shm files
    the same mode), never through a symlink."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if path.is_symlink():
            raise CaError("ca_state_invalid", f"{path} is a symbolic link (refused)") from None
        return
    except OSError as exc:
        raise CaError("ca_unavailable", f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _redacted(dsn: str) -> str:
    """The DSN without a password, for messages and logs."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        userinfo, host = rest.rsplit("@", 1)
        return f"{scheme}://{userinfo.split(':', 1)[0]}@{host}"
    return dsn


def is_postgres(db: str | None) -> bool:
    return db is not None and db.startswith(("postgresql://", "postgres://"))


def open_database(ca_dir: Path, db: str | None = None) -> CaDatabase:
    """The CA database: ``db`` a ``postgresql://`` DSN, else SQLite ``<ca_dir>/ca.db``
    (or the SQLite file ``db`` names)."""
    if is_postgres(db):
        assert db is not None
        return PostgresDatabase(db)
    path = Path(db) if db else ca_dir / DB_FILE
    if path.is_symlink():
        raise CaError("ca_state_invalid", f"{path} is a symbolic link (refused)")
    if not path.parent.is_dir():
        raise CaError("ca_missing", f"no CA in {path.parent}: the directory does not exist")
    return SqliteDatabase(path)
