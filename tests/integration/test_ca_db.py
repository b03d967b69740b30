"""The CA database on both engines: SQLite (the default) and a real PostgreSQL started by the
test (``tests.fixtures.postgres``). The same checks run on each: uniqueness, one-time tokens
under concurrency, CRL numbering under concurrent revocations, migrations and the import of
a file CA."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.fixtures.postgres import postgres_dsn_fixture, postgres_server_fixture  # noqa: F401
from ztagent.ca import store as ca_store
from ztagent.ca.db import CaDatabase, IssuedEntry, open_database
from ztagent.ca.migrate import migrate_from_json
from ztagent.pki.errors import CaError

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """None: the SQLite default in tmp_path; else a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("postgres_dsn")


def _open(tmp_path: Path, location: str | None) -> CaDatabase:
    return open_database(tmp_path, location)


def _entry(serial: int, device: str = "dev-1") -> IssuedEntry:
    return IssuedEntry(serial, "device", device, NOW + timedelta(days=90))


def test_a_ca_its_certificates_and_revocations(tmp_path: Path, location: str | None) -> None:
    db = _open(tmp_path, location)
    with pytest.raises(CaError, match=r"^ca_missing: no CA in"):
        db.trust_domain()
    db.initialise("factory.example")
    with pytest.raises(CaError, match=r"^ca_exists"):
        db.initialise("other.example")
    assert db.trust_domain() == "factory.example"
    serial = 2**150 + 7  # serials exceed 64 bits
    db.record_issued(IssuedEntry(serial, "device", "cam-1", NOW, "000b" + "ab" * 32), NOW)
    with pytest.raises(CaError, match=r"^ca_state_invalid"):
        db.record_issued(_entry(serial), NOW)  # a serial is issued once
    got = db.issued(serial)
    assert got is not None and (got.device_id, got.ak_name) == ("cam-1", "000b" + "ab" * 32)
    assert db.issued(12345) is None
    number, revoked = db.revoke(serial, NOW)
    assert (number, revoked) == (1, {serial: NOW})
    number2, revoked2 = db.revoke(serial, NOW + timedelta(hours=1))  # the first date stays
    assert (number2, revoked2) == (2, {serial: NOW})
    with pytest.raises(CaError, match=r"^cert_not_found: serial 3039 was not issued"):
        db.revoke(12345, NOW)
    assert db.revocation(serial) == NOW and db.counts() == (1, 1)
    db.store_crl(2, b"-----BEGIN X509 CRL-----\n2\n", NOW + timedelta(days=62))
    db.store_crl(1, b"-----BEGIN X509 CRL-----\n1\n", NOW + timedelta(days=62))  # late, older
    assert db.latest_crl() == (2, b"-----BEGIN X509 CRL-----\n2\n")
    db.close()
    reopened = _open(tmp_path, location)  # the state outlives the process
    assert reopened.trust_domain() == "factory.example" and reopened.counts() == (1, 1)
    reopened.close()


def test_a_token_is_used_once_whatever_the_concurrency(
    tmp_path: Path, location: str | None
) -> None:
    """Ten threads, each with its own connection (as separate replicas would be), redeem
    the same token at once: the database accepts exactly one."""
    _open(tmp_path, location).initialise("ztagent.dev")
    dbs = [_open(tmp_path, location) for _ in range(10)]
    start = threading.Barrier(len(dbs))
    results: list[bool] = []

    def redeem(db: CaDatabase) -> None:
        start.wait()
        results.append(db.consume_token("j" * 32, int(NOW.timestamp()) + 900, int(NOW.timestamp())))

    threads = [threading.Thread(target=redeem, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False] * 9 + [True]
    assert dbs[0].token_used("j" * 32) and not dbs[0].token_used("k" * 32)
    for db in dbs:
        db.close()


def test_concurrent_revocations_get_distinct_numbers_and_the_last_crl_lists_all(
    tmp_path: Path, location: str | None
) -> None:
    db = _open(tmp_path, location)
    db.initialise("ztagent.dev")
    db.record_issued_many([_entry(s) for s in range(1, 41)], NOW)
    replicas = [_open(tmp_path, location) for _ in range(4)]
    taken: list[tuple[int, dict[int, datetime]]] = []
    lock = threading.Lock()

    def revoke_range(db: CaDatabase, serials: range) -> None:
        for serial in serials:
            result = db.revoke(serial, NOW)
            with lock:
                taken.append(result)

    threads = [
        threading.Thread(target=revoke_range, args=(r, range(1 + 10 * i, 11 + 10 * i)))
        for i, r in enumerate(replicas)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    numbers = sorted(n for n, _ in taken)
    assert numbers == list(range(1, 41))  # no number handed out twice, none skipped
    last = max(taken, key=lambda t: t[0])
    assert set(last[1]) == set(range(1, 41))  # the highest number saw every revocation
    # and each CRL lists at least every revocation committed before its number was taken
    for number, revoked in taken:
        assert len(revoked) >= number
    for r in (db, *replicas):
        r.close()


def test_a_newer_schema_is_refused(tmp_path: Path, location: str | None) -> None:
    db = _open(tmp_path, location)
    with db._transaction() as cur:
        db._run(cur, "UPDATE schema_version SET version = ?", (99,))
    db.close()
    with pytest.raises(CaError, match="schema version 99; this ztagent knows up to 1"):
        _open(tmp_path, location)


def test_a_file_ca_is_imported_without_losing_a_revocation_or_a_used_token(
    tmp_path: Path, location: str | None
) -> None:
    """``ca migrate --from-json``: a CA directory from before the database."""
    ca_dir = tmp_path / "ca"
    layout = ca_store.init_ca(ca_dir, now=NOW, db=str(tmp_path / "scratch.db"))
    issued = [
        {"serial": format(s, "x"), "kind": "device", "device_id": f"d{s}",
         "not_after": "2027-02-24T12:00:00Z"}
        for s in range(1, 1001)
    ]  # fmt: skip
    revoked = [{"serial": format(s, "x"), "revoked_at": "2026-11-27T12:00:00Z"} for s in (5, 77)]
    revoked.append({"serial": "fffff", "revoked_at": "2026-11-28T12:00:00Z"})  # not in issued
    layout.legacy_state.write_text(
        json.dumps({"version": 1, "trust_domain": "ztagent.dev", "crl_number": 41,
                    "issued": issued, "revoked": revoked})
    )  # fmt: skip
    used = {"a" * 32: int(NOW.timestamp()) + 600, "b" * 32: int(NOW.timestamp()) + 900}
    (ca_dir / "bootstrap-used.json").write_text(json.dumps({"version": 1, "used": used}))
    report = migrate_from_json(ca_dir, db=location)
    assert (report.issued, report.revoked, report.tokens, report.crl_number) == (1001, 3, 2, 41)
    db = open_database(ca_dir, location)
    assert db.counts() == (1001, 3)
    assert db.revocation(0xFFFFF) is not None and db.revocation(77) is not None
    assert all(db.token_used(j) for j in used)
    number, _ = db.next_crl()
    assert number == 42  # numbering continues: no sidecar sees a CRL rollback
    assert not layout.legacy_state.exists()
    assert layout.legacy_state.with_name("ca.json.migrated").exists()
    with pytest.raises(CaError, match=r"^ca_missing: no ca.json"):
        migrate_from_json(ca_dir, db=location)
    db.close()


def test_the_default_database_imports_a_file_ca_on_first_use(tmp_path: Path) -> None:
    """An upgraded checkout needs no manual step on the default engine."""
    ca_dir = tmp_path / "ca"
    layout = ca_store.init_ca(ca_dir, now=NOW)
    serial = 0xABC
    layout.state.unlink()  # as before the database: keys, ca.json, no ca.db
    layout.legacy_state.write_text(
        json.dumps({"version": 1, "trust_domain": "ztagent.dev", "crl_number": 3,
                    "issued": [{"serial": "abc", "kind": "device", "device_id": "cam",
                                "not_after": "2027-02-24T12:00:00Z"}],
                    "revoked": []})
    )  # fmt: skip
    assert ca_store.revoke(ca_dir, serial=serial, now=NOW) == serial
    with ca_store.database(ca_dir) as db:
        assert db.revocation(serial) == NOW and db.next_crl()[0] == 5
