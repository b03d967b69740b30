"""verify_device_cert: the accept case and every rejection, at a fixed validation time."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztagent.ca import builders
from ztagent.ca import store as ca_store
from ztagent.errors import ConfigError
from ztagent.pki.errors import CertError, DevicePolicyError
from ztagent.pki.verify import (
    DevicePolicy,
    TrustMaterial,
    VerifiedDevice,
    explain,
    verify_device_cert,
)

from ._support import DEVICE_URI, NOW, Mint, Pki, pem


def _reject(code: str, match: str, *args: object) -> CertError:
    with pytest.raises(CertError, match=match) as info:
        verify_device_cert(*args)  # type: ignore[arg-type]
    assert info.value.code == code
    return info.value


def test_accepts_a_good_device_cert_with_every_field(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    leaf = mint().cert
    got = verify_device_cert(leaf, session_pki.trust(), policy, NOW)
    assert got == VerifiedDevice(
        device_id="dev-1",
        spiffe_id=DEVICE_URI,
        serial=format(leaf.serial_number, "x"),
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        issuer=session_pki.issuing.cert.subject.rfc4514_string(),
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=29),
    )
    assert got.serial == got.serial.lower() and len(got.fingerprint_sha256) == 64
    assert got.not_before.tzinfo is not None
    assert got.as_input() == {
        "id": "dev-1",
        "spiffe_id": DEVICE_URI,
        "serial": got.serial,
        "fingerprint_sha256": got.fingerprint_sha256,
        "issuer": got.issuer,
        "not_before": "2026-11-25T12:00:00Z",
        "not_after": "2026-12-25T12:00:00Z",
    }


def test_accepts_the_demo_device_cert_written_by_init(
    session_pki: Pki, policy: DevicePolicy
) -> None:
    got = explain(
        session_pki.layout.device_cert("demo-device").read_bytes(),
        None,
        session_pki.trust(),
        policy,
        NOW,
    )
    assert got.spiffe_id == "spiffe://ztagent.dev/device/demo-device"
    assert got.device_id == "demo-device"


def test_rejects_expired(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    leaf = mint(not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(seconds=1)).cert
    _reject(
        "cert_expired",
        r"expired at 2026-11-26T11:59:59Z \(validation time 2026-11-26T12:00:00Z\)",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )


def test_rejects_not_yet_valid(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    leaf = mint(not_before=NOW + timedelta(hours=1), not_after=NOW + timedelta(days=10)).cert
    _reject(
        "cert_not_yet_valid",
        r"valid from 2026-11-26T13:00:00Z \(validation time 2026-11-26T12:00:00Z\)",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )


def test_rejects_lifetime_over_90_days(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    leaf = mint(not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=90)).cert
    _reject(
        "cert_lifetime_too_long",
        r"lifetime is 91 days \(expected at most 90 days\)",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )


def test_accepts_exactly_90_days(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    leaf = mint(not_before=NOW - timedelta(days=1), not_after=NOW + timedelta(days=89)).cert
    assert verify_device_cert(leaf, session_pki.trust(), policy, NOW).device_id == "dev-1"


def test_rejects_server_auth_only_eku(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    leaf = mint(eku=[ExtendedKeyUsageOID.SERVER_AUTH]).cert
    _reject(
        "eku_missing_client_auth",
        r"extendedKeyUsage is \[serverAuth\] \(expected clientAuth\)",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )


def test_rejects_missing_eku(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    # The chain verifier alone would accept this leaf: it only checks an EKU that is present.
    leaf = mint(eku=None).cert
    _reject(
        "eku_missing_client_auth",
        "no extendedKeyUsage",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )


@pytest.mark.parametrize(
    ("uris", "code", "match"),
    [
        ([], "spiffe_id_missing", "no URI subjectAltName"),
        (
            [DEVICE_URI, "spiffe://ztagent.dev/device/dev-2"],
            "spiffe_id_multiple",
            r"has 2 URI subjectAltNames .* \(expected exactly one\)",
        ),
        (["https://ztagent.dev/device/dev-1"], "spiffe_id_invalid", "scheme .* is 'https'"),
        (
            ["spiffe://evil.example/device/dev-1"],
            "spiffe_id_wrong_trust_domain",
            r"trust domain 'evil.example' \(expected 'ztagent.dev'\)",
        ),
        (
            ["spiffe://ztagent.dev/workload/dev-1"],
            "spiffe_id_not_device",
            r"path is '/workload/dev-1' \(expected exactly '/device/<id>'\)",
        ),
        (
            ["spiffe://ztagent.dev/device/dev-1/extra"],
            "spiffe_id_not_device",
            "expected exactly '/device/<id>'",
        ),
    ],
)
def test_rejects_bad_san(
    session_pki: Pki,
    policy: DevicePolicy,
    uris: list[str],
    code: str,
    match: str,
) -> None:
    # A DNS SAN keeps the chain verifier happy when there is no URI SAN.
    leaf = builders.build_leaf(
        session_pki.issuing,
        subject_cn="dev-1",
        uris=uris,
        eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
        dns=["dev-1.local"],
    ).cert
    _reject(code, match, leaf, session_pki.trust(), policy, NOW)


def test_rejects_cert_from_another_ca(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    _, other_issuing = builders.new_ca("other", now=NOW - timedelta(days=1))
    leaf = mint(issuer=other_issuing).cert
    err = _reject(
        "chain_untrusted",
        "no valid chain from issuer 'CN=other issuing CA,O=ztagent' to a trusted root",
        leaf,
        session_pki.trust(),
        policy,
        NOW,
    )
    assert "ztagent dev (ztagent.dev) root CA" in err.message


def test_rejects_when_same_name_but_other_key(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    """An impostor issuing CA with our issuing CA's exact name but its own key."""
    impostor = builders.KeyPair(session_pki.issuing.cert, builders.new_key())
    leaf = mint(issuer=impostor).cert
    _reject("chain_untrusted", "no valid chain", leaf, session_pki.trust(), policy, NOW)


def test_rejects_revoked_after_revoke(pki: Pki, policy: DevicePolicy) -> None:
    out = pki.dir / "out" / "dev-9.pem"
    cert = ca_store.issue_device_cert(pki.dir, "dev-9", out, now=NOW - timedelta(hours=2))
    assert verify_device_cert(cert, pki.trust(), policy, NOW).device_id == "dev-9"
    ca_store.revoke(pki.dir, cert_path=out, now=NOW - timedelta(hours=1))
    _reject(
        "cert_revoked",
        f"serial {cert.serial_number:x} was revoked at 2026-11-26T11:00:00Z",
        cert,
        pki.trust(),
        policy,
        NOW,
    )


def test_rejects_when_crl_missing(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    _reject(
        "crl_missing",
        "no CRL from issuer 'CN=ztagent dev",
        mint().cert,
        session_pki.trust(no_crl=True),
        policy,
        NOW,
    )


def test_no_crl_accepted_when_crl_check_is_off(session_pki: Pki, mint: Mint) -> None:
    policy = DevicePolicy("ztagent.dev", check_crl=False)
    verify_device_cert(mint().cert, session_pki.trust(no_crl=True), policy, NOW)


def test_rejects_crl_signed_by_other_key(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    forged_signer = builders.KeyPair(session_pki.issuing.cert, builders.new_key())
    crl = builders.build_crl(
        forged_signer,
        {},
        number=99,
        this_update=NOW - timedelta(hours=1),
        next_update=NOW + timedelta(days=1),
    )
    trust = session_pki.trust(crl.public_bytes(serialization.Encoding.PEM))
    _reject(
        "crl_bad_signature", "is not signed by that issuer's key", mint().cert, trust, policy, NOW
    )


def _stale_crl(pki: Pki) -> bytes:
    crl = builders.build_crl(
        pki.issuing,
        {},
        number=5,
        this_update=NOW - timedelta(days=8),
        next_update=NOW - timedelta(days=1),
    )
    return crl.public_bytes(serialization.Encoding.PEM)


def test_rejects_crl_past_next_update(session_pki: Pki, policy: DevicePolicy, mint: Mint) -> None:
    _reject(
        "crl_expired",
        r"nextUpdate 2026-11-25T12:00:00Z, grace 0 s \(validation time 2026-11-26T12:00:00Z\)",
        mint().cert,
        session_pki.trust(_stale_crl(session_pki)),
        policy,
        NOW,
    )


def test_stale_crl_used_within_grace_then_refused(session_pki: Pki, mint: Mint) -> None:
    """nextUpdate was a day ago: a 2-day grace still accepts, a 12-hour grace refuses."""
    trust = session_pki.trust(_stale_crl(session_pki))
    lenient = DevicePolicy("ztagent.dev", crl_grace=timedelta(days=2))
    assert verify_device_cert(mint().cert, trust, lenient, NOW).device_id == "dev-1"
    strict = DevicePolicy("ztagent.dev", crl_grace=timedelta(hours=12))
    _reject("crl_expired", r"grace 43200 s", mint().cert, trust, strict, NOW)


def test_stale_crl_used_when_fail_open(session_pki: Pki, mint: Mint) -> None:
    policy = DevicePolicy("ztagent.dev", crl_fail_open=True)
    got = verify_device_cert(mint().cert, session_pki.trust(_stale_crl(session_pki)), policy, NOW)
    assert got.device_id == "dev-1"


def test_stale_crl_still_revokes_when_fail_open(session_pki: Pki, mint: Mint) -> None:
    leaf = mint().cert
    crl = builders.build_crl(
        session_pki.issuing,
        {leaf.serial_number: NOW - timedelta(days=3)},
        number=6,
        this_update=NOW - timedelta(days=8),
        next_update=NOW - timedelta(days=1),
    )
    policy = DevicePolicy("ztagent.dev", crl_fail_open=True)
    trust = session_pki.trust(crl.public_bytes(serialization.Encoding.PEM))
    _reject("cert_revoked", "was revoked at 2026-11-23T12:00:00Z", leaf, trust, policy, NOW)


def test_revoked_intermediate_is_rejected_when_root_crl_present(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    root_crl = builders.build_crl(
        session_pki.root,
        {session_pki.issuing.cert.serial_number: NOW - timedelta(hours=3)},
        number=1,
        this_update=NOW - timedelta(hours=3),
        next_update=NOW + timedelta(days=30),
    )
    both = session_pki.layout.crl.read_bytes() + root_crl.public_bytes(serialization.Encoding.PEM)
    _reject(
        "cert_revoked",
        "CA certificate serial .* was revoked",
        mint().cert,
        session_pki.trust(both),
        policy,
        NOW,
    )


def test_trust_material_reads_several_pem_crls_or_one_der(session_pki: Pki) -> None:
    crl_pem = session_pki.layout.crl.read_bytes()
    assert len(session_pki.trust(crl_pem + crl_pem).crls) == 2
    der = builders.build_crl(
        session_pki.issuing, {}, number=1, this_update=NOW, next_update=NOW + timedelta(days=1)
    ).public_bytes(serialization.Encoding.DER)
    trust = session_pki.trust(der)
    assert len(trust.crls) == 1
    assert [r.subject for r in trust.roots] == [session_pki.root.cert.subject]
    assert [i.subject for i in trust.intermediates] == [session_pki.issuing.cert.subject]


@pytest.mark.parametrize(
    ("bundle", "crl", "match"),
    [
        (b"junk", None, "ca_bundle: not a PEM certificate bundle"),
        (None, b"junk", "crl: not a PEM or DER CRL"),
        (None, b"", "crl: not a PEM or DER CRL"),
    ],
)
def test_trust_material_refuses_junk(
    session_pki: Pki, bundle: bytes | None, crl: bytes | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        TrustMaterial.from_pem(bundle or session_pki.layout.bundle.read_bytes(), crl)


def test_trust_material_refuses_leaf_in_bundle(session_pki: Pki, mint: Mint) -> None:
    bundle = session_pki.layout.bundle.read_bytes() + pem(mint().cert)
    with pytest.raises(ConfigError, match="non-CA certificates"):
        TrustMaterial.from_pem(bundle, None)


def test_trust_material_needs_a_root(session_pki: Pki) -> None:
    with pytest.raises(ConfigError, match="no self-signed root CA"):
        TrustMaterial.from_pem(pem(session_pki.issuing.cert), None)


def test_explain_adds_chain_as_intermediates_never_roots(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    root_only = TrustMaterial.from_pem(
        pem(session_pki.root.cert), session_pki.layout.crl.read_bytes()
    )
    leaf = mint().cert
    with pytest.raises(CertError, match="no valid chain"):
        explain(pem(leaf), None, root_only, policy, NOW)
    assert explain(pem(leaf), pem(session_pki.issuing.cert), root_only, policy, NOW).device_id
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert explain(der, pem(session_pki.issuing.cert), root_only, policy, NOW).device_id
    # A foreign self-signed root passed as --chain does not become a trust anchor.
    other_root, other_issuing = builders.new_ca("other", now=NOW - timedelta(days=1))
    foreign = mint(issuer=other_issuing).cert
    with pytest.raises(CertError, match="no valid chain") as info:
        explain(
            pem(foreign),
            pem(other_issuing.cert, other_root.cert),
            session_pki.trust(),
            policy,
            NOW,
        )
    assert info.value.code == "chain_untrusted"


def test_explain_refuses_junk(session_pki: Pki, policy: DevicePolicy) -> None:
    with pytest.raises(CertError, match="not a PEM or DER certificate") as info:
        explain(b"not a cert", None, session_pki.trust(), policy, NOW)
    assert info.value.code == "cert_malformed"


def test_naive_validation_time_is_a_programming_error(
    session_pki: Pki, policy: DevicePolicy, mint: Mint
) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_device_cert(mint().cert, session_pki.trust(), policy, datetime(2026, 11, 26))


def test_policy_validates_its_values() -> None:
    """The domain names the setting; the configuration adds the section (test_config)."""
    with pytest.raises(DevicePolicyError, match=r"^device_policy_invalid: trust_domain: ") as info:
        DevicePolicy("Bad Domain")
    assert info.value.key == "trust_domain" and "lowercase" in info.value.reason
    with pytest.raises(DevicePolicyError, match=r"max_cert_lifetime_days: 0:00:00"):
        DevicePolicy("ztagent.dev", max_lifetime=timedelta(0))
    with pytest.raises(DevicePolicyError, match=r"crl_grace_s"):
        DevicePolicy("ztagent.dev", crl_grace=timedelta(seconds=-1))
    assert DevicePolicy("ztagent.dev").max_lifetime == timedelta(days=90)
