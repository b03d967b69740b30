"""CA cost against fleet size: the same operations with 100 and with 100,000 certificates
already issued, on SQLite and on PostgreSQL (a private server from tests/fixtures/postgres).

Rows: enrollments/s (bootstrap token, CSR, Enroll RPC to an in-process ``ca serve``,
issuance, the device directory written), revocation + CRL re-signing (``ca revoke``'s
library call), and CRL generation with 100,000 issued and 5,000 revoked. Prefilling goes
through the storage interface (``record_issued_many``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ztagent.ca import store as ca_store
from ztagent.ca.bootstrap import issue_bootstrap_token
from ztagent.ca.db import IssuedEntry, RevokedEntry
from ztagent.ca.service import start_ca_server
from ztagent.device.enroll import enroll

SIZES = (100, 100_000)
ENROLLMENTS = 40
REVOCATIONS = 20
CRL_REVOKED = 5_000


@dataclass(frozen=True)
class Scale:
    engine: str
    issued: int
    enroll_per_s: float
    revoke_ms: float


@contextlib.contextmanager
def _engines(tmp: Path) -> Iterator[list[tuple[str, str | None]]]:
    """("sqlite", None) and, when PostgreSQL is installed, ("postgresql", dsn)."""
    from tests.fixtures import postgres

    if postgres.find_pg_bin() is None:
        yield [("sqlite", None)]
        return
    with (
        postgres.postgres_server() as server,
        postgres.fresh_database(server) as a,
        postgres.fresh_database(server) as b,
    ):
        yield [("sqlite", None), ("postgresql", a), ("postgresql-5k", b)]


def _prefill(ca_dir: Path, db: str | None, count: int) -> list[int]:
    now = datetime.now(UTC)
    serials = [secrets.randbits(150) | 1 for _ in range(count)]
    with ca_store.database(ca_dir, db) as store:
        for start in range(0, count, 10_000):
            batch = serials[start : start + 10_000]
            entries = [IssuedEntry(s, "device", f"fill-{s % 100_000}", now + timedelta(days=90))
                       for s in batch]  # fmt: skip
            store.record_issued_many(entries, now)
    if db is None:  # a fleet's database is not one fresh 100,000-row write: fold the WAL in
        import sqlite3

        with contextlib.closing(sqlite3.connect(ca_dir / "ca.db")) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return serials


async def _enroll_rate(ca_dir: Path, db: str | None, out: Path) -> float:
    server = await start_ca_server(ca_dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0", db=db)
    address = f"127.0.0.1:{server.enroll_port}"
    bundle = ca_dir / "ca-bundle.pem"
    try:
        tokens = [issue_bootstrap_token(ca_dir, f"dev-{i}", db=db) for i in range(ENROLLMENTS + 2)]
        for i in range(2):  # warm-up: connections, caches
            await enroll(address, tokens[i], bundle, out / f"warm-{i}", force=True)
        started = time.perf_counter()
        for i, token in enumerate(tokens[2:]):
            await enroll(address, token, bundle, out / f"dev-{i}", force=True)
        return ENROLLMENTS / (time.perf_counter() - started)
    finally:
        await server.stop(0)


def _revoke_ms(ca_dir: Path, db: str | None, serials: list[int]) -> float:
    started = time.perf_counter()
    for serial in serials[:REVOCATIONS]:
        ca_store.revoke(ca_dir, serial=serial, db=db)
    return (time.perf_counter() - started) / REVOCATIONS * 1000


def measure(tmp: Path) -> tuple[list[Scale], dict[str, float]]:
    """The scale rows, and CRL generation seconds with 100,000 issued / 5,000 revoked."""
    scales: list[Scale] = []
    crl_s: dict[str, float] = {}
    with _engines(tmp) as engines:
        for engine, db in engines:
            if engine == "postgresql-5k":
                continue
            for size in SIZES:
                ca_dir = tmp / f"ca-{engine}-{size}"
                dsn = db
                if db is not None and size == SIZES[-1]:
                    dsn = next(d for e, d in engines if e == "postgresql-5k")
                ca_store.init_ca(ca_dir, db=dsn)
                serials = _prefill(ca_dir, dsn, size)
                rate = asyncio.run(_enroll_rate(ca_dir, dsn, tmp / f"dev-{engine}-{size}"))
                scales.append(Scale(engine, size, rate, _revoke_ms(ca_dir, dsn, serials)))
                if size == SIZES[-1]:
                    now = datetime.now(UTC)
                    with ca_store.database(ca_dir, dsn) as store:
                        store.record_revoked_many(
                            [RevokedEntry(s, now) for s in serials[:CRL_REVOKED]]
                        )
                    started = time.perf_counter()
                    crl = ca_store.write_crl(ca_dir, db=dsn)
                    crl_s[engine] = time.perf_counter() - started
                    assert len(crl) >= CRL_REVOKED
    return scales, crl_s


def markdown(scales: list[Scale], crl_s: dict[str, float]) -> str:
    lines = [
        "## CA cost against fleet size",
        "",
        "| engine | already issued | enrollments/s | revoke + re-sign CRL, ms |",
        "|---|---:|---:|---:|",
    ]
    for s in scales:
        lines.append(f"| {s.engine} | {s.issued:,} | {s.enroll_per_s:.1f} | {s.revoke_ms:.1f} |")
    lines.append("")
    for engine in sorted({s.engine for s in scales}):
        small, large = (next(s for s in scales if s.engine == engine and s.issued == n)
                        for n in SIZES)  # fmt: skip
        lines.append(
            f"- {engine}: enrollments/s at 100,000 = {large.enroll_per_s / small.enroll_per_s:.2f}"
            f" x at 100; revocation time {large.revoke_ms / small.revoke_ms:.2f} x"
        )
    for engine, seconds in crl_s.items():
        lines.append(
            f"- {engine}: CRL generation with 100,000 issued and {CRL_REVOKED:,} revoked: "
            f"{seconds * 1000:.0f} ms"
        )
    return "\n".join(lines) + "\n"
