"""Challenge nonces shared by sidecar workers through a directory."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ztagent.posture.errors import PostureError
from ztagent.sidecar.shared_nonces import SharedNonceStore, clear_shared_nonces, nonce_dir

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
A, B = "aa" * 32, "bb" * 32


def test_issued_by_one_worker_consumed_by_another_once(tmp_path: Path) -> None:
    one, other = SharedNonceStore(tmp_path), SharedNonceStore(tmp_path)
    nonce, expires = one.issue(A, NOW)
    assert expires == NOW + timedelta(seconds=60) and len(nonce) == 32
    other.consume(A, nonce, NOW + timedelta(seconds=1))
    with pytest.raises(PostureError, match=r"^nonce_reused: "):
        one.consume(A, nonce, NOW + timedelta(seconds=2))


def test_refusals(tmp_path: Path) -> None:
    store = SharedNonceStore(tmp_path, ttl_s=30)
    nonce, _ = store.issue(A, NOW)
    with pytest.raises(PostureError, match=r"^nonce_mismatch: nonce was issued to certificate"):
        store.consume(B, nonce, NOW)
    store.consume(A, nonce, NOW)  # the other certificate's attempt did not burn it
    with pytest.raises(PostureError, match=r"^nonce_mismatch: nonce .* was not issued"):
        store.consume(A, b"\x01" * 32, NOW)
    with pytest.raises(PostureError, match=r"^nonce_mismatch: nonce of 0 bytes"):
        store.consume(A, b"", NOW)
    late, _ = store.issue(A, NOW)
    with pytest.raises(PostureError, match=r"^nonce_expired: "):
        store.consume(A, late, NOW + timedelta(seconds=30))
    with pytest.raises(PostureError, match=r"^nonce_reused: "):
        store.consume(A, late, NOW + timedelta(seconds=31))


def test_outstanding_nonces_are_bounded_per_certificate_and_purged(tmp_path: Path) -> None:
    store = SharedNonceStore(tmp_path, ttl_s=10, max_per_cert=3)
    first = [store.issue(A, NOW)[0] for _ in range(5)]
    store.issue(B, NOW)
    assert len(store) == 4  # 3 for A (the newest), 1 for B
    with pytest.raises(PostureError, match=r"^nonce_mismatch: "):
        store.consume(A, first[0], NOW)
    store.consume(A, first[-1], NOW)
    store.issue(B, NOW + timedelta(seconds=25))  # one TTL past expiry: everything old goes
    assert len(store) == 1
    assert len(list(nonce_dir(tmp_path).iterdir())) == 1


def _consume(state_dir: str, nonce: bytes, results: multiprocessing.Queue[str]) -> None:
    try:
        SharedNonceStore(Path(state_dir)).consume(A, nonce, NOW)
        results.put("ok")
    except PostureError as err:
        results.put(err.code)


def test_racing_workers_consume_a_nonce_exactly_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for _ in range(5):
        nonce, _ = SharedNonceStore(tmp_path).issue(A, NOW)
        results: multiprocessing.Queue[str] = ctx.Queue()
        procs = [ctx.Process(target=_consume, args=(str(tmp_path), nonce, results)) for _ in "ab"]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        assert sorted(results.get(timeout=5) for _ in procs) == ["nonce_reused", "ok"]


def test_clear_forgets_outstanding_nonces(tmp_path: Path) -> None:
    store = SharedNonceStore(tmp_path)
    nonce, _ = store.issue(A, NOW)
    clear_shared_nonces(tmp_path)
    with pytest.raises(PostureError, match=r"^nonce_mismatch: "):
        store.consume(A, nonce, NOW)
