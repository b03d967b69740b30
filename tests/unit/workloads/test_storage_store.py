"""The encrypted SQLite store: round trips, sealing, integrity, limits, pagination."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztagent.workloads.storage.errors import (
    InvalidRequestError,
    RecordNotFoundError,
    StorageIntegrityError,
)
from ztagent.workloads.storage.store import (
    DB_FILE,
    KEY_FILE,
    MAX_PAGE_SIZE,
    Change,
    ChangeKind,
    Store,
    decode_page_token,
    encode_page_token,
    prefix_upper_bound,
)

NS = "device-1"
SECRET = b"plaintext-canary-7f3e9a"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store.open(data_dir)
    yield s
    s.close()


@contextlib.contextmanager
def _raw(data_dir: Path) -> Iterator[sqlite3.Connection]:
    """A second, plain SQLite connection: what an attacker with the disk could do."""
    db = sqlite3.connect(data_dir / DB_FILE, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def test_round_trip(store: Store) -> None:
    rev = store.put(NS, "a/b", SECRET)
    record = store.get(NS, "a/b")
    assert (record.key, record.value, record.revision) == ("a/b", SECRET, rev)


def test_empty_value_round_trips(store: Store) -> None:
    store.put(NS, "empty", b"")
    assert store.get(NS, "empty").value == b""


def test_overwrite_replaces_and_revisions_increase(store: Store) -> None:
    r1 = store.put(NS, "k", b"one")
    r2 = store.put("other-device", "k", b"x")
    r3 = store.put(NS, "k", b"two")
    assert r1 < r2 < r3
    assert store.get(NS, "k").value == b"two"


def test_get_absent_is_not_found(store: Store) -> None:
    with pytest.raises(RecordNotFoundError, match="key 'nope' not found"):
        store.get(NS, "nope")


def test_delete(store: Store) -> None:
    put_rev = store.put(NS, "k", b"v")
    delete_rev = store.delete(NS, "k")
    assert delete_rev is not None and delete_rev > put_rev
    assert store.delete(NS, "k") is None
    with pytest.raises(RecordNotFoundError):
        store.get(NS, "k")


def test_namespaces_are_isolated(store: Store) -> None:
    store.put("dev-a", "k", b"a")
    with pytest.raises(RecordNotFoundError):
        store.get("dev-b", "k")
    assert store.list_keys("dev-b").keys == []
    assert store.delete("dev-b", "k") is None
    assert store.get("dev-a", "k").value == b"a"


def test_plaintext_is_not_on_disk(store: Store, data_dir: Path) -> None:
    store.put(NS, "k", SECRET * 10)
    files = list(data_dir.iterdir())
    assert {p.name for p in files} >= {DB_FILE, f"{DB_FILE}-wal", KEY_FILE}
    for path in files:  # database, WAL (where the write is now), key file
        assert SECRET not in path.read_bytes(), path.name
    store.close()  # checkpoints the WAL into the database file
    assert (data_dir / DB_FILE).stat().st_size > 0
    for path in data_dir.iterdir():
        assert SECRET not in path.read_bytes(), path.name
    with _raw(data_dir) as db:
        nonce, ciphertext = db.execute("SELECT nonce, ciphertext FROM records").fetchone()
    assert len(nonce) == 12
    assert SECRET not in ciphertext
    assert len(ciphertext) == len(SECRET) * 10 + 16  # GCM tag


def test_same_value_twice_gets_fresh_nonce_and_ciphertext(store: Store, data_dir: Path) -> None:
    store.put(NS, "a", SECRET)
    store.put(NS, "b", SECRET)
    store.put(NS, "a", SECRET)
    with _raw(data_dir) as db:
        rows = db.execute("SELECT nonce, ciphertext FROM records").fetchall()
    nonces = {r[0] for r in rows}
    ciphertexts = {r[1] for r in rows}
    assert len(nonces) == len(ciphertexts) == 2
    # and the rewrite of "a" changed its nonce, not only its revision
    first_nonce = rows[0][0]
    store.put(NS, "a", SECRET)
    with _raw(data_dir) as db:
        (after,) = db.execute("SELECT nonce FROM records WHERE key = 'a'").fetchone()
    assert after != first_nonce


def _flip_first_byte(blob: bytes) -> bytes:
    return bytes([blob[0] ^ 1]) + blob[1:]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("UPDATE records SET ciphertext = ? WHERE key = 'k'", "AES-GCM authentication failed"),
        ("UPDATE records SET nonce = ? WHERE key = 'k'", "AES-GCM authentication failed"),
    ],
)
def test_tampered_bytes_fail_integrity(store: Store, data_dir: Path, sql: str, reason: str) -> None:
    store.put(NS, "k", SECRET)
    column = "ciphertext" if "ciphertext" in sql else "nonce"
    with _raw(data_dir) as db:
        (blob,) = db.execute(f"SELECT {column} FROM records").fetchone()
        db.execute(sql, (_flip_first_byte(blob),))
    with pytest.raises(StorageIntegrityError, match=f"key 'k' failed .*{reason}") as info:
        store.get(NS, "k")
    assert info.value.code == "storage_integrity"
    assert SECRET.decode() not in str(info.value)


def test_changed_key_version_fails_integrity(tmp_path: Path, data_dir: Path) -> None:
    store = Store.open(data_dir)
    store.put(NS, "k", SECRET)
    store.close()
    # a second key version that exists, so the row is opened with the wrong key
    key_path = data_dir / KEY_FILE
    doc = json.loads(key_path.read_text())
    doc["keys"]["2"] = doc["keys"]["1"]  # same material: only the AAD differs
    key_path.write_text(json.dumps(doc))
    store = Store.open(data_dir)
    try:
        with _raw(data_dir) as db:
            db.execute("UPDATE records SET key_version = 2")
        with pytest.raises(StorageIntegrityError, match="AES-GCM authentication failed"):
            store.get(NS, "k")
        with _raw(data_dir) as db:
            db.execute("UPDATE records SET key_version = 9")
        with pytest.raises(StorageIntegrityError, match="version 9 is not in the key file"):
            store.get(NS, "k")
    finally:
        store.close()


def test_row_moved_to_another_key_fails_integrity(store: Store, data_dir: Path) -> None:
    store.put(NS, "public", b"harmless")
    store.put(NS, "secret", SECRET)
    with _raw(data_dir) as db:
        db.execute("DELETE FROM records WHERE key = 'public'")
        db.execute("UPDATE records SET key = 'public' WHERE key = 'secret'")
    with pytest.raises(StorageIntegrityError, match="key 'public'"):
        store.get(NS, "public")


def test_row_moved_to_another_namespace_fails_integrity(store: Store, data_dir: Path) -> None:
    store.put("victim", "k", SECRET)
    with _raw(data_dir) as db:
        db.execute(
            "INSERT INTO records SELECT 'attacker', key, key_version, nonce, ciphertext,"
            " revision, updated_at FROM records WHERE namespace = 'victim'"
        )
    with pytest.raises(StorageIntegrityError):
        store.get("attacker", "k")
    assert store.get("victim", "k").value == SECRET


def test_truncated_nonce_fails_integrity(store: Store, data_dir: Path) -> None:
    store.put(NS, "k", SECRET)
    with _raw(data_dir) as db:
        db.execute("UPDATE records SET nonce = x'0011'")
    with pytest.raises(StorageIntegrityError, match="nonce is not 12 bytes"):
        store.get(NS, "k")


def test_oversized_value(data_dir: Path) -> None:
    store = Store.open(data_dir, max_value_bytes=10)
    try:
        store.put(NS, "k", b"x" * 10)
        with pytest.raises(
            InvalidRequestError, match="value for key 'k' is 11 bytes; maximum is 10 bytes"
        ) as info:
            store.put(NS, "k", b"x" * 11)
        assert info.value.code == "value_too_large"
        assert store.get(NS, "k").value == b"x" * 10
    finally:
        store.close()


def test_default_max_value_is_4_mib(store: Store) -> None:
    store.put(NS, "k", b"x" * (4 * 1024 * 1024))
    with pytest.raises(InvalidRequestError, match="maximum is 4194304 bytes"):
        store.put(NS, "k", b"x" * (4 * 1024 * 1024 + 1))


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "key is empty"),
        ("a\x00b", "contains a NUL"),
        ("x" * 1025, "key is 1025 bytes of UTF-8; maximum is 1024"),
        ("é" * 513, "key is 1026 bytes of UTF-8"),
        ("\ud800", "not valid UTF-8"),
    ],
)
def test_bad_key_names(store: Store, key: str, message: str) -> None:
    for op in (
        lambda: store.put(NS, key, b"v"),
        lambda: store.get(NS, key),
        lambda: store.delete(NS, key),
    ):
        with pytest.raises(InvalidRequestError, match=message):
            op()


def test_longest_key_is_accepted(store: Store) -> None:
    store.put(NS, "k" * 1024, b"v")
    assert store.get(NS, "k" * 1024).value == b"v"


def test_put_many_is_all_or_nothing(store: Store) -> None:
    with pytest.raises(InvalidRequestError):
        store.put_many(NS, [("a", b"1"), ("", b"2")])
    assert store.list_keys(NS).keys == []
    revisions = store.put_many(NS, [("a", b"1"), ("b", b"2")])
    assert revisions == [revisions[0], revisions[0] + 1]
    assert store.get(NS, "b").value == b"2"


def test_pagination_across_pages(store: Store) -> None:
    keys = [f"k/{i:03d}" for i in range(25)]
    for key in reversed(keys):
        store.put(NS, key, b"v")
    store.put(NS, "other", b"v")
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = store.list_keys(NS, "k/", page_size=10, page_token=token)
        seen += page.keys
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == keys
    assert pages == 3


def test_exact_page_has_no_next_token(store: Store) -> None:
    for key in "abc":
        store.put(NS, key, b"v")
    page = store.list_keys(NS, page_size=3)
    assert page.keys == ["a", "b", "c"]
    assert page.next_page_token == ""


def test_list_default_page_size_is_100(store: Store) -> None:
    store.put_many(NS, [(f"{i:04d}", b"") for i in range(150)])
    page = store.list_keys(NS)
    assert len(page.keys) == 100
    assert len(store.list_keys(NS, page_token=page.next_page_token).keys) == 50


def test_list_prefix_does_not_leak_neighbours(store: Store) -> None:
    for key in ["a", "a/", "a/x", "a0", "a\U0010ffff", "ab", "b"]:
        store.put(NS, key, b"")
    assert store.list_keys(NS, "a/").keys == ["a/", "a/x"]
    assert store.list_keys(NS, "a").keys == ["a", "a/", "a/x", "a0", "ab", "a\U0010ffff"]


@pytest.mark.parametrize("size", [-1, MAX_PAGE_SIZE + 1])
def test_bad_page_size(store: Store, size: int) -> None:
    with pytest.raises(InvalidRequestError, match=f"page_size is {size}; expected 1 to 1000"):
        store.list_keys(NS, page_size=size)


@pytest.mark.parametrize("token", ["garbage!", "Zm9v", encode_page_token("x")[:-2] + "@@"])
def test_garbage_page_token(store: Store, token: str) -> None:
    with pytest.raises(InvalidRequestError, match="is not a page token") as info:
        store.list_keys(NS, page_token=token)
    assert info.value.code == "invalid_page_token"


def test_page_token_from_another_prefix(store: Store) -> None:
    with pytest.raises(InvalidRequestError, match="does not belong to prefix 'b/'"):
        store.list_keys(NS, "b/", page_token=encode_page_token("a/1"))


def test_page_token_round_trip() -> None:
    assert decode_page_token(encode_page_token("a/é/\U0001f600"), "a/") == "a/é/\U0001f600"


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("") is None
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\ud7ff") == "\ue000"


def test_reopen_with_same_key_file_reads_old_data(data_dir: Path) -> None:
    first = Store.open(data_dir)
    rev = first.put(NS, "k", SECRET)
    first.close()
    second = Store.open(data_dir)
    try:
        assert second.get(NS, "k").value == SECRET
        assert second.put(NS, "k2", b"v") > rev  # revision keeps counting
    finally:
        second.close()


def test_another_key_file_cannot_read(data_dir: Path) -> None:
    first = Store.open(data_dir)
    first.put(NS, "k", SECRET)
    first.close()
    (data_dir / KEY_FILE).unlink()
    second = Store.open(data_dir)  # makes a fresh key
    try:
        with pytest.raises(StorageIntegrityError):
            second.get(NS, "k")
    finally:
        second.close()


def test_data_dir_and_files_are_private(store: Store, data_dir: Path) -> None:
    store.put(NS, "k", b"v")
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / DB_FILE).stat().st_mode) == 0o600


def test_wal_and_full_sync(store: Store, data_dir: Path) -> None:
    with _raw(data_dir) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_changes_reported_in_commit_order(data_dir: Path) -> None:
    changes: list[Change] = []
    store = Store.open(data_dir, on_change=changes.append)
    try:
        store.put(NS, "a", b"1")
        store.put_many(NS, [("b", b"2"), ("c", b"3")])
        store.delete(NS, "a")
        store.delete(NS, "absent")
    finally:
        store.close()
    assert [(c.kind, c.key, c.value) for c in changes] == [
        (ChangeKind.PUT, "a", b"1"),
        (ChangeKind.PUT, "b", b"2"),
        (ChangeKind.PUT, "c", b"3"),
        (ChangeKind.DELETE, "a", b""),
    ]
    assert [c.revision for c in changes] == [1, 2, 3, 4]


def test_scan_pages_decrypted_records(store: Store) -> None:
    store.put_many(NS, [(f"p/{i}", bytes([i])) for i in range(5)])
    first = store.scan(NS, "p/", None, 3)
    assert [r.value for r in first.records] == [b"\x00", b"\x01", b"\x02"]
    assert first.last_key == "p/2"
    rest = store.scan(NS, "p/", first.last_key, 3)
    assert [r.key for r in rest.records] == ["p/3", "p/4"]
    assert rest.last_key is None
