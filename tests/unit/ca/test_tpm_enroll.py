"""TPM-bound enrollment, the pure parts: the AK-name extension, the device check's
``ak_name``, and the CA's pending TPM enrollments (single use, 60 s)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from ztagent.ca import store as ca_store
from ztagent.ca.issuance import IssuancePolicy, issue_for
from ztagent.ca.service import (
    TPM_ENROLL_TTL_S,
    PendingTpmEnrollment,
    PendingTpmEnrollments,
)
from ztagent.enrollment import EnrollError
from ztagent.pki.device_check import (
    AK_NAME_OID,
    DevicePolicy,
    ak_name_extension,
    cert_ak_name,
    verify_device_cert,
)
from ztagent.pki.errors import CertError
from ztagent.pki.trust import TrustMaterial
from ztagent.posture.ak_binding import PendingBinding

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
TD = "ztagent.dev"
AK_NAME = "000b" + "ab" * 32  # SHA-256 nameAlg + digest


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ca_store.init_ca(
        tmp_path_factory.mktemp("ca") / "ca", TD, now=NOW - timedelta(days=1)
    ).dir


def _leaf(
    ca_dir: Path, extension: x509.ExtensionType, *, critical: bool = False
) -> x509.Certificate:
    issuing = ca_store.load_issuing(ca_store.CaLayout(ca_dir))
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuing.cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(extension, critical=critical)
    )
    return builder.sign(issuing.key, hashes.SHA256())


def test_issued_certificate_carries_the_ak_name_and_the_device_check_reports_it(
    ca_dir: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_for(ca_dir, "dev-1", key.public_key(), IssuancePolicy(), NOW, ak_name=AK_NAME)
    ext = cert.extensions.get_extension_for_oid(AK_NAME_OID)
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == bytes([0x04, 34]) + bytes.fromhex(AK_NAME)  # DER OCTET STRING
    assert cert_ak_name(cert) == AK_NAME

    layout = ca_store.CaLayout(ca_dir)
    trust = TrustMaterial.from_pem(layout.bundle.read_bytes(), layout.crl.read_bytes())
    device = verify_device_cert(cert, trust, DevicePolicy(TD), NOW + timedelta(minutes=1))
    assert device.ak_name == AK_NAME
    assert "ak_name" not in device.as_input()  # the policy input is unchanged

    plain = issue_for(ca_dir, "dev-2", key.public_key(), IssuancePolicy(), NOW)
    assert cert_ak_name(plain) is None
    assert verify_device_cert(plain, trust, DevicePolicy(TD), NOW).ak_name is None
    eku = plain.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    ("value", "critical", "match"),
    [
        (b"\x04\x22" + bytes.fromhex(AK_NAME), True, "critical"),
        (bytes.fromhex(AK_NAME), False, "OCTET STRING"),  # no DER wrapper
        (b"\x04\x30" + bytes.fromhex(AK_NAME), False, "OCTET STRING"),  # wrong length
        (b"\x04\x22" + b"\x00\x04" + b"\x00" * 32, False, "not a TPM name"),  # SHA-1 nameAlg
        (b"\x04\x10" + b"\x00\x0b" + b"\x00" * 14, False, "not a TPM name"),  # short digest
    ],
)
def test_a_malformed_ak_name_extension_is_cert_malformed(
    ca_dir: Path, value: bytes, critical: bool, match: str
) -> None:
    cert = _leaf(ca_dir, x509.UnrecognizedExtension(AK_NAME_OID, value), critical=critical)
    with pytest.raises(CertError, match=match) as info:
        cert_ak_name(cert)
    assert info.value.code == "cert_malformed"


def test_ak_name_extension_refuses_what_is_not_a_tpm_name() -> None:
    with pytest.raises(ValueError, match="not a TPM name"):
        ak_name_extension("000b" + "ab" * 20)
    with pytest.raises(ValueError, match="non-hexadecimal"):
        ak_name_extension("zz")


def _pending(expires_at: datetime) -> PendingTpmEnrollment:
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return PendingTpmEnrollment(
        binding=PendingBinding(b"s" * 32, AK_NAME, b"ak", b"ek"),
        token="t",
        csr=csr.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()),
        device_id="dev-1",
        jti="0" * 32,
        expires_at=expires_at,
    )


def test_pending_tpm_enrollments_are_single_use_and_expire() -> None:
    pending = PendingTpmEnrollments()
    ttl = timedelta(seconds=TPM_ENROLL_TTL_S)
    first = pending.add(_pending(NOW + ttl), NOW)
    assert len(first) == 32 and len(pending) == 1
    assert pending.take(first, NOW + ttl - timedelta(seconds=1)).device_id == "dev-1"
    with pytest.raises(EnrollError, match=r"^ak_binding_failed: .*unknown or already completed"):
        pending.take(first, NOW)

    late = pending.add(_pending(NOW + ttl), NOW)
    with pytest.raises(EnrollError, match=r"^tpm_enroll_expired: ") as info:
        pending.take(late, NOW + ttl)
    assert info.value.rpc_status() == "UNAUTHENTICATED"
    with pytest.raises(EnrollError, match=r"^ak_binding_failed"):  # gone after the refusal
        pending.take(late, NOW)


def test_pending_tpm_enrollments_are_bounded_and_pruned() -> None:
    pending = PendingTpmEnrollments(max_pending=2)
    ids = [pending.add(_pending(NOW + timedelta(seconds=60)), NOW) for _ in range(3)]
    assert len(pending) == 2
    with pytest.raises(EnrollError, match=r"^ak_binding_failed"):
        pending.take(ids[0], NOW)  # the oldest was dropped, never accepted
    pending.add(_pending(NOW + timedelta(seconds=120)), NOW + timedelta(seconds=61))
    assert len(pending) == 1  # the expired ones were pruned
