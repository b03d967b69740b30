"""NonceStore: single use, bound to a certificate, expiring, bounded."""

from __future__ import annotations

from datetime import timedelta
from itertools import count

import pytest

from tests.unit.posture._support import FP, NOW, OTHER_FP
from ztagent.posture.errors import PostureError
from ztagent.posture.nonces import NonceStore


def counter_rng():
    numbers = count(1)
    return lambda n: next(numbers).to_bytes(n, "big")


def code_of(store: NonceStore, fp: str, nonce: bytes, now=NOW) -> str:
    with pytest.raises(PostureError) as info:
        store.consume(fp, nonce, now)
    return info.value.code


def test_issue_and_consume_once() -> None:
    store = NonceStore()
    nonce, expires_at = store.issue(FP, NOW)
    assert len(nonce) == 32 and expires_at == NOW + timedelta(seconds=60)
    store.consume(FP, nonce, NOW + timedelta(seconds=59))
    assert code_of(store, FP, nonce) == "nonce_reused"


def test_other_certificate_unknown_and_expired() -> None:
    store = NonceStore(ttl_s=10)
    nonce, _ = store.issue(FP, NOW)
    assert code_of(store, OTHER_FP, nonce) == "nonce_mismatch"
    assert code_of(store, FP, b"\x01" * 32) == "nonce_mismatch"
    assert code_of(store, FP, nonce, NOW + timedelta(seconds=10)) == "nonce_expired"
    # an expired nonce stays refused
    assert code_of(store, FP, nonce, NOW + timedelta(seconds=11)) == "nonce_reused"


def test_expired_entries_are_purged() -> None:
    store = NonceStore(ttl_s=10)
    old, _ = store.issue(FP, NOW)
    store.issue(OTHER_FP, NOW + timedelta(seconds=30))
    assert len(store) == 1
    assert code_of(store, FP, old, NOW + timedelta(seconds=30)) == "nonce_mismatch"


def test_bounded_per_certificate_and_in_total() -> None:
    store = NonceStore(max_outstanding=5, max_per_cert=2, rng=counter_rng(), nonce_bytes=16)
    first = store.issue(FP, NOW)[0]
    second = store.issue(FP, NOW)[0]
    third = store.issue(FP, NOW)[0]
    assert len(store) == 2
    assert code_of(store, FP, first) == "nonce_mismatch"  # evicted: refused, never accepted
    for n in range(6):
        store.issue(f"{n:02x}" * 32, NOW)
    assert len(store) == 5
    assert code_of(store, FP, second) == "nonce_mismatch"
    assert code_of(store, FP, third) == "nonce_mismatch"


def test_short_nonces_refused() -> None:
    with pytest.raises(ValueError, match="nonce_bytes"):
        NonceStore(nonce_bytes=8)
