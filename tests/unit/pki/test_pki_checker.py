"""DeviceChecker: caching of answers per PEM, expiry of cached answers, trust replacement."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.pki.checker import DeviceChecker
from ztagent.pki.errors import CertError
from ztagent.pki.verify import DevicePolicy

from ._support import NOW, Mint, Pki, pem


def test_cache_hit_returns_the_same_object(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    checker = DeviceChecker(session_pki.trust(), policy)
    leaf_pem = pem(mint().cert)
    first = checker.check_pem(leaf_pem, NOW)
    assert checker.check_pem(leaf_pem, NOW + timedelta(minutes=1)) is first
    assert len(checker) == 1


def test_cached_success_not_reused_after_not_after(session_pki: Pki, mint: Mint) -> None:
    policy = DevicePolicy("ztagent.dev", check_crl=False)  # no CRL bound on the entry
    checker = DeviceChecker(session_pki.trust(no_crl=True), policy)
    leaf_pem = pem(mint(not_after=NOW + timedelta(days=2)).cert)
    checker.check_pem(leaf_pem, NOW)
    with pytest.raises(CertError, match="expired at") as info:
        checker.check_pem(leaf_pem, NOW + timedelta(days=3))
    assert info.value.code == "cert_expired"


def test_cached_success_not_reused_after_crl_next_update(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    checker = DeviceChecker(session_pki.trust(), policy)  # CRL nextUpdate is NOW + 61 days
    leaf_pem = pem(mint(not_after=NOW + timedelta(days=80)).cert)
    checker.check_pem(leaf_pem, NOW)
    with pytest.raises(CertError, match="nextUpdate") as info:
        checker.check_pem(leaf_pem, NOW + timedelta(days=62))
    assert info.value.code == "crl_expired"


def test_failures_are_cached_and_raised_fresh(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    checker = DeviceChecker(session_pki.trust(), policy)
    leaf_pem = pem(mint(eku=None).cert)
    errors = []
    for _ in range(2):
        with pytest.raises(CertError) as info:
            checker.check_pem(leaf_pem, NOW)
        errors.append(info.value)
    assert [e.code for e in errors] == ["eku_missing_client_auth"] * 2
    assert errors[0] is not errors[1]
    assert len(checker) == 1


def test_not_yet_valid_failure_is_not_reused_once_valid(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    checker = DeviceChecker(session_pki.trust(), policy)
    leaf_pem = pem(mint(not_before=NOW + timedelta(hours=1)).cert)
    with pytest.raises(CertError, match="valid from"):
        checker.check_pem(leaf_pem, NOW)
    assert checker.check_pem(leaf_pem, NOW + timedelta(hours=2)).device_id == "dev-1"


def test_malformed_pem(session_pki: Pki, policy: DevicePolicy) -> None:
    checker = DeviceChecker(session_pki.trust(), policy)
    with pytest.raises(CertError, match="not PEM") as info:
        checker.check_pem(b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n", NOW)
    assert info.value.code == "cert_malformed"


def test_replace_trust_with_revoking_crl_fails_next_check(
    pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    out = pki.dir / "dev-7.pem"
    cert = ca_store.issue_device_cert(pki.dir, "dev-7", out, now=NOW - timedelta(hours=1))
    checker = DeviceChecker(pki.trust(), policy)
    leaf_pem = pem(cert)
    assert checker.check_pem(leaf_pem, NOW).device_id == "dev-7"
    ca_store.revoke(pki.dir, serial=cert.serial_number, now=NOW)
    assert checker.check_pem(leaf_pem, NOW).device_id == "dev-7"  # still the old trust
    checker.replace_trust(pki.trust())
    assert len(checker) == 0
    with pytest.raises(CertError, match="was revoked") as info:
        checker.check_pem(leaf_pem, NOW)
    assert info.value.code == "cert_revoked"
    assert checker.trust.crls[0].get_revoked_certificate_by_serial_number(cert.serial_number)


def test_cache_is_bounded(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    checker = DeviceChecker(session_pki.trust(), policy, max_entries=2)
    pems = [pem(mint().cert) for _ in range(3)]
    results = [checker.check_pem(p, NOW) for p in pems]
    assert len(checker) == 2
    assert checker.check_pem(pems[2], NOW) is results[2]
    assert checker.check_pem(pems[0], NOW) is not results[0]  # evicted, recomputed
    assert checker.check_pem(pems[0], NOW) == results[0]


def test_fail_open_entry_survives_stale_crl(session_pki: Pki, mint: Mint) -> None:
    stale = builders.build_crl(
        session_pki.issuing,
        {},
        number=3,
        this_update=NOW - timedelta(days=8),
        next_update=NOW - timedelta(days=1),
    )
    policy = DevicePolicy("ztagent.dev", crl_fail_open=True)
    checker = DeviceChecker(
        session_pki.trust(stale.public_bytes(serialization.Encoding.PEM)), policy
    )
    leaf_pem = pem(mint().cert)
    first = checker.check_pem(leaf_pem, NOW)
    assert checker.check_pem(leaf_pem, NOW + timedelta(hours=1)) is first


def test_a_crl_expired_refusal_is_not_kept_past_a_clock_correction(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    """A node whose clock jumped ahead refuses crl_expired; once the clock is corrected the
    cached refusal must not outlive it (the cache holds an answer only for its time window)."""
    checker = DeviceChecker(session_pki.trust(), policy)
    leaf_pem = pem(mint(not_after=NOW + timedelta(days=80)).cert)
    with pytest.raises(CertError) as info:
        checker.check_pem(leaf_pem, NOW + timedelta(days=62))  # the clock ran ahead
    assert info.value.code == "crl_expired"
    assert checker.check_pem(leaf_pem, NOW).device_id == "dev-1"  # corrected: accepted
